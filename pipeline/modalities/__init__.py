"""The paper's four modalities (3.3-3.4); importing this package registers their records.

Each module holds one modality's config tables, its record and its extractor; an extractor that needs
torch, timm or transformers lives in a module of its own beside the record, imported when it is built.
"""
# The registration order is the order of `all` on the command line: title_cam, desc_cam, title_bpe, image.
from pipeline.modalities import text_cam  # noqa: F401, I001
from pipeline.modalities import title_bpe  # noqa: F401
from pipeline.modalities import image  # noqa: F401
