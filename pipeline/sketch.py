"""Stage 3, sketch (paper 3.5): each pretrained encoder, up to and including its EMDE coder, over every item.

"For multimodal fusion, we remove the last linear layer and feed representation obtained with EMDE
(input sketches) to the linear layer in the final fusion classifier." The sketch of a modality is
written to W/sketches/<modality>.zarr|h5 (or <[stores] root>/sketches/; array `sketch`, N x depth*width)
through the same store filler as the extract stage (pipeline.fill): resumable, incremental (new items only), and its
provenance names the checkpoint's sha256 and the feature store it read. A new checkpoint rebuilds the
store (beside the old one, swapped in when complete).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import polars as pl

from pipeline import checkpoint, registry, workdir as wd
from pipeline.catalog import read_split
from pipeline.config import Config
from pipeline.batches import sketches
from pipeline.distributed import pick_device
from pipeline.errors import PipelineError
from pipeline.provenance import Stamp, sha256_file
from pipeline.fill import Summary, fill_store
from stores import ArraySpec, FeatureStore


class SketchExtractor:
    """An Extractor whose "model" is a pretrained encoder + EMDE coder, reading a feature store.

    Its producer is the checkpoint's sha256 and the features' producer; the checkpoint itself is loaded on
    first use (`load`), so a sketch store that is up to date costs no network."""

    def __init__(self, modality: str, workdir: Path, cfg: Config, features: FeatureStore | None = None):
        self.name = modality
        self.path = wd.model_path(workdir, modality)
        self.retrain = wd.command(cfg, workdir, f"pretrain {modality}")
        if not self.path.is_file():
            raise PipelineError(f"{self.path}: no pretrained model; run `{self.retrain}` first")
        self.device = pick_device(cfg.extract.device, "[extract] device")
        self.features = features or FeatureStore(wd.feature_store_path(workdir, cfg, modality))
        self.batch_size = cfg.sketch.batch_size
        # The feature store by name, not by absolute path: a work directory that is moved or copied
        # (to the machine that serves predictions) keeps its sketches.
        self.producer = {"checkpoint_sha256": sha256_file(self.path), "modality": modality,
                         "features": PurePosixPath(str(self.features.path)).name,
                         "features_producer": self.features.provenance["producer"]}
        self._model = None

    def load(self):
        """The network (loaded once), refusing a checkpoint trained on other features than the store's."""
        if self._model is None:
            ckpt = checkpoint.load_model(self.path, self.retrain)
            if ckpt.sha256 != self.producer["checkpoint_sha256"]:
                raise PipelineError(f"{self.path} changed while it was being sketched; run the same command again")
            if not ckpt.trained_on(self.features.provenance["producer"]):
                raise PipelineError(f"{self.features.path} was rebuilt since {self.path} was trained; run "
                                    f"`{self.retrain}` again first")
            self.max_tokens = ckpt.max_tokens  # what the network read of an item in training
            self._model = ckpt.network().to(self.device)
        return self._model

    @property
    def arrays(self) -> dict[str, ArraySpec]:
        return {"sketch": ArraySpec("float32", (self.load().sketch_dim,))}

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray:
        return self.features.input_hashes(items["item_id"].to_numpy())

    def lengths(self, items: pl.DataFrame) -> dict:
        return {}

    def prepare(self, items: pl.DataFrame) -> np.ndarray:
        return items["item_id"].to_numpy()  # the block's items, in the order the sketch store wants them

    def compute(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        model = self.load()
        out = sketches(model, self.features, self.name, ids, self.batch_size, self.device, self.max_tokens)
        return {"sketch": out}, self.features.read_missing(ids)


def sketch_into_store(sketcher: SketchExtractor, ids: np.ndarray, path, cfg: Config, hint: str, progress: bool,
                      log=print, repair: bool = False, rebuild: bool = False) -> Summary:
    """The sketches of `ids` into the store at `path` (rebuilt beside it when the checkpoint changed, or when
    asked: a store whose layout is damaged)."""
    complete = False
    if FeatureStore.exists(path) and not rebuild:
        with FeatureStore(path) as old:
            rebuild = bool(Stamp("sketch", sketcher.producer).changed(old.provenance["producer"]))
            complete = not rebuild and bool(old.contains(ids).all())
        if rebuild:
            log(f"{sketcher.name}: the checkpoint or its features changed since {path} was written: rebuilding it")
    if not complete:
        sketcher.load()  # a checkpoint of other features is refused before anything is written
    # Items in the feature store's row order: each sketch block reads contiguous feature rows.
    rows = sketcher.features.rows(ids)
    items = pl.DataFrame({"item_id": ids[np.argsort(rows, kind="stable")]})
    summary = fill_store(sketcher, items, path, block_rows=cfg.sketch.block_items, stores=cfg.stores,
                         rebuild=rebuild, repair=repair and not rebuild, rebuild_hint=hint, progress=progress)
    summary.verb = "sketched"
    return summary


def sketch(modality: str, workdir: str | Path, cfg: Config, *, repair: bool = False, rebuild: bool = False,
           progress: bool = True, log=print) -> list[Summary]:
    """`pipeline sketch [MODALITY|all]`: the input sketch of every item, for each pretrained modality
    (`repair`: sketch again the blocks whose chunks are damaged; `rebuild`: every block, into a new store)."""
    if repair and rebuild:
        raise PipelineError("--repair or --rebuild, not both: --rebuild sketches every block anew")
    workdir = Path(workdir)
    with wd.repair_hint(cfg, workdir):
        return _sketch_all(modality, workdir, cfg, repair, rebuild, progress, log)


def _sketch_all(modality: str, workdir: Path, cfg: Config, repair: bool, rebuild: bool, progress: bool,
                log) -> list[Summary]:
    split_ids = read_split(workdir)["item_id"].to_numpy()
    if modality == "all":
        names = [m for m in cfg.modality_names if wd.model_path(workdir, m).exists()]
        if not names:
            raise PipelineError(f"no pretrained model in {workdir / 'models'}: run "
                                f"`{wd.command(cfg, workdir, 'pretrain MODALITY')}` first")
    else:
        names = [registry.get(modality).name]
    summaries = []
    for name in names:
        sketcher = SketchExtractor(name, workdir, cfg)
        ids = sketcher.features.ids
        path = wd.sketch_store_path(workdir, cfg, name, cfg.stores.backend)
        summary = sketch_into_store(sketcher, ids[np.isin(ids, split_ids)], path, cfg,
                                    wd.command(cfg, workdir, f"sketch {name}") + " --rebuild", progress, log,
                                    repair=repair, rebuild=rebuild)
        log(summary.line())
        summaries.append(summary)
    return summaries
