"""Stage 3, sketch (paper 3.5): each pretrained encoder, up to and including its EMDE coder, over every item.

"For multimodal fusion, we remove the last linear layer and feed representation obtained with EMDE
(input sketches) to the linear layer in the final fusion classifier." The sketch of a modality is
written to W/sketches/<modality>.zarr|h5 (or <[stores] root>/sketches/; array `sketch`, N x depth*width)
through the same block driver as the extract stage: resumable, incremental (new items only), and its provenance
names the checkpoint's sha256 and the feature store it read. A new checkpoint rebuilds the store.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import polars as pl
import torch

from pipeline.catalog import SPLIT_FILE
from pipeline.config import section
from pipeline.errors import PipelineError
from pipeline.extract import pick_device
from pipeline.extract.driver import Summary, run_extraction
from pipeline.extract.title_bpe import sha256_file
from pipeline.pretrain import FEATURE_ARRAY, load_model, model_dir
from pipeline.train_reader import TrainReader
from pipeline.workdir import MODALITIES, feature_store_path, store_path, stores_root
from stores import ArraySpec, FeatureStore


def sketch_store_path(workdir, cfg: dict, modality: str, backend: str | None = None) -> Path | str:
    """<root>/sketches/<modality>.zarr|h5, root being `[stores] root` or the work directory."""
    return store_path(stores_root(workdir, cfg), "sketches", modality, backend)


class Sketcher:
    """An Extractor whose "model" is a pretrained encoder + EMDE coder, reading a feature store."""

    def __init__(self, modality: str, workdir: Path, cfg: dict):
        self.name = modality
        checkpoint = model_dir(workdir, modality) / "model.pt"
        self.model, ckpt = load_model(checkpoint)
        self.device = pick_device(cfg)
        self.model.to(self.device)
        self.features = FeatureStore(feature_store_path(workdir, cfg, modality))
        trained_on = ckpt.get("store", {}).get("provenance", {}).get("producer")
        if trained_on is not None and trained_on != self.features.provenance["producer"]:
            raise PipelineError(f"{self.features.path} was rebuilt since {checkpoint} was trained; run "
                                f"`pipeline pretrain {modality} --workdir {workdir}` again first")
        self.array = FEATURE_ARRAY[modality]
        self.batch_size = int(section(cfg, "sketch")["batch_size"])
        self.arrays = {"sketch": ArraySpec("float32", (self.model.sketch_dim,))}
        # The feature store by name, not by absolute path: a work directory that is moved or copied
        # (to the machine that serves predictions) keeps its sketches.
        self.producer = {"checkpoint_sha256": sha256_file(checkpoint), "modality": modality,
                         "features": PurePosixPath(str(self.features.path)).name,
                         "features_producer": self.features.provenance["producer"]}

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray:
        planned_ids, planned_hash = self.features.planned()
        order = np.argsort(planned_ids)
        return planned_hash[order][np.searchsorted(planned_ids[order], items["item_id"].to_numpy())]

    def lengths(self, items: pl.DataFrame) -> dict:
        return {}

    def prepare(self, items: pl.DataFrame) -> tuple[np.ndarray, TrainReader]:
        ids = items["item_id"].to_numpy()
        return ids, TrainReader(self.features, self.array, ids, np.zeros(len(ids), np.int64),
                                batch_size=self.batch_size, shuffle=False, mode="memory",
                                pin_memory=self.device.type == "cuda")

    @torch.inference_mode()
    def compute(self, prepared) -> tuple[dict[str, np.ndarray], np.ndarray]:
        ids, reader = prepared  # the block's items, in the order the sketch store wants them
        out = np.zeros((len(ids), self.model.sketch_dim), np.float32)
        sorter = np.argsort(ids)
        for batch in reader.epoch(0):  # batches come length-sorted: put each row back in its place
            batch = batch.to(self.device)
            rows = sorter[np.searchsorted(ids, batch.ids.cpu().numpy(), sorter=sorter)]
            out[rows] = self.model.sketch(*batch.inputs).float().cpu().numpy()
        return {"sketch": out}, self.features.read_missing(ids)


def sketch(modality: str, workdir: str | Path, cfg: dict, *, progress: bool = True, log=print) -> list[Summary]:
    """`pipeline sketch [MODALITY|all]`: the input sketch of every item, for each pretrained modality."""
    workdir = Path(workdir)
    if not (workdir / SPLIT_FILE).exists():
        raise PipelineError(f"{workdir / SPLIT_FILE} not found: run `pipeline extract ... --workdir {workdir}` first")
    if modality == "all":
        names = [m for m in MODALITIES if (model_dir(workdir, m) / "model.pt").exists()]
        if not names:
            raise PipelineError(f"no pretrained model in {workdir / 'models'}: run `pipeline pretrain MODALITY "
                                f"--workdir {workdir}` first")
    elif modality in MODALITIES:
        names = [modality]
    else:
        raise PipelineError(f"unknown modality '{modality}' (use one of {', '.join(MODALITIES)} or all)")
    split_ids = pl.read_parquet(workdir / SPLIT_FILE)["item_id"]
    summaries = []
    for name in names:
        sketcher = Sketcher(name, workdir, cfg)
        # Items in the feature store's row order: each sketch block reads contiguous feature rows.
        ids = sketcher.features.ids
        items = pl.DataFrame({"item_id": ids[np.isin(ids, split_ids.to_numpy())]})
        path = sketch_store_path(workdir, cfg, name, section(cfg, "stores")["backend"])
        rebuild = False
        if FeatureStore.exists(path):
            with FeatureStore(path) as old:
                rebuild = old.provenance["producer"] != sketcher.producer
            if rebuild:
                log(f"{name}: the checkpoint or its features changed since {path} was written: rebuilding it")
        summary = run_extraction(sketcher, items, path, block_rows=int(section(cfg, "sketch")["block_items"]),
                                 rebuild=rebuild, rebuild_hint=f"pipeline sketch {name} --workdir {workdir}",
                                 progress=progress)
        log(summary.line())
        summaries.append(summary)
    return summaries
