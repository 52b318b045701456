"""Stage 1, extract: each modality's upstream representation into a feature store (paper 3.3-3.4)."""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import torch

from pipeline.catalog import Catalog, load_catalog, make_split
from pipeline.config import section
from pipeline.errors import PipelineError
from pipeline.extract.driver import Summary, parse_shard, run_extraction
from pipeline.extract.text_cam import CamembertTokens, clean_description
from pipeline.extract.title_bpe import TitleBpe, train_tokenizer
from pipeline.upstream import image_weights, text_model_dir
from pipeline.workdir import MODALITIES, feature_store_path, tokenizer_dir
from stores import FeatureStore


def pick_device(cfg: dict) -> torch.device:
    """The [extract] device; on CUDA under torchrun, the GPU of this process's LOCAL_RANK (one GPU a worker)."""
    want = section(cfg, "extract")["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise PipelineError("[extract] device = \"cuda\" but torch sees no CUDA device")
    if want == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return torch.device(want)


def train_texts(catalog: Catalog, split: pl.DataFrame) -> list[str]:
    """Titles and cleaned descriptions of the train split (what a tiny text model learns from)."""
    train = catalog.items.filter(pl.col("item_id").is_in(
        split.filter(pl.col("split") == "train")["item_id"].implode()))
    return train["title"].to_list() + [clean_description(d, 10**6) for d in train["description"].to_list() if d]


def _extractor(modality: str, catalog: Catalog, split: pl.DataFrame, workdir: Path, cfg: dict,
               rebuild: bool, rebuild_hint: str):
    if modality == "title_bpe":
        opts = section(cfg, "title_bpe")
        train_ids = split.filter(pl.col("split") == "train")["item_id"].implode()
        titles = catalog.items.filter(pl.col("item_id").is_in(train_ids))["title"].to_list()
        if rebuild:
            for f in tokenizer_dir(workdir).glob("title_bpe.*"):
                f.unlink()
        return TitleBpe(train_tokenizer(titles, tokenizer_dir(workdir), opts, rebuild_hint), opts)
    if modality in ("title_cam", "desc_cam"):
        model_dir = text_model_dir(cfg, workdir, train_texts(catalog, split))
        return CamembertTokens(modality, model_dir, section(cfg, modality), section(cfg, "text_model"),
                               pick_device(cfg))
    if modality == "image":
        from pipeline.extract.image import ImageMaps  # timm/PIL only where images are needed

        return ImageMaps(section(cfg, "image"), image_weights(cfg, workdir), pick_device(cfg))
    raise PipelineError(f"unknown modality '{modality}' (use one of {', '.join(MODALITIES)} or all)")


def extract(modality: str, catalog_dir: str | Path, workdir: str | Path, cfg: dict, *,
            backend: str | None = None, shard: str | None = None, rebuild: bool = False,
            progress: bool = True, log=print) -> list[Summary]:
    """`pipeline extract MODALITY|all`: fill W/features/<modality>.zarr|h5 with what is missing.

    The stores go under `[stores] root` instead of W when it is set (a local directory or a URL)."""
    names = list(MODALITIES) if modality == "all" else [modality]
    for name in names:
        if name not in MODALITIES:
            raise PipelineError(f"unknown modality '{name}' (use one of {', '.join(MODALITIES)} or all)")
    catalog = load_catalog(catalog_dir, cfg)
    log(catalog.summary())
    split = make_split(catalog, cfg, workdir)
    return extract_items(names, catalog, split, Path(workdir), cfg, backend=backend, shard=shard,
                         rebuild=rebuild, progress=progress, log=log)


def extract_items(names: list[str], catalog: Catalog, split: pl.DataFrame, workdir: Path, cfg: dict, *,
                  backend: str | None = None, shard: str | None = None, rebuild: bool = False,
                  progress: bool = True, log=print) -> list[Summary]:
    """Extract the modalities `names` of every item of `catalog` (the split says what is train)."""
    summaries = []
    for name in names:
        # An existing store keeps its backend unless --backend asks for the other one.
        existing = feature_store_path(workdir, cfg, name)
        path = (feature_store_path(workdir, cfg, name, backend) if backend
                else existing if FeatureStore.exists(existing)
                else feature_store_path(workdir, cfg, name, section(cfg, "stores")["backend"]))
        backend_name = "hdf5" if str(path).endswith(".h5") else "zarr"
        hint = (f"pipeline extract {name} --catalog {catalog.directory} --workdir {workdir} "
                f"--config {cfg.get('config_path')} --backend {backend_name} --rebuild")
        extractor = _extractor(name, catalog, split, workdir, cfg, rebuild, hint)
        block_rows = int(section(cfg, name).get("block_items", section(cfg, "stores")["block_items"]))
        summary = run_extraction(
            extractor, catalog.items, path, block_rows=block_rows, shard=parse_shard(shard),
            rebuild=rebuild, rebuild_hint=hint, progress=progress,
        )
        log(summary.line())
        summaries.append(summary)
    return summaries
