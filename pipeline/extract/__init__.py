"""Stage 1, extract: each modality's upstream representation into a feature store (paper 3.3-3.4).

What a modality extracts, and how, is its record in pipeline.modalities; this module reads the
catalogue, keeps the split, and runs each modality's extractor through the block driver.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline import modalities, workdir as wd
from pipeline.catalog import Catalog, load_catalog, make_split, split_items
from pipeline.config import Config
from pipeline.distributed import pick_device
from pipeline.errors import PipelineError
from pipeline.extract.driver import Summary, check_writers, parse_shard, run_extraction
from pipeline.modalities import ExtractContext
from pipeline.upstream import check_models, check_planned_model
from stores import SCHEMA_VERSION, FeatureStore, StoreError
from stores.locks import writer_of


def extract(modality: str, catalog_dir: str | Path, workdir: str | Path, cfg: Config, *,
            backend: str | None = None, shard: str | None = None, rebuild: bool = False, repair: bool = False,
            progress: bool = True, log=print) -> list[Summary]:
    """`pipeline extract MODALITY|all`: fill W/features/<modality>.zarr|h5 with what is missing
    (`repair`: extract again the blocks whose chunks are damaged).

    The stores go under `[stores] root` instead of W when it is set (a local directory or a URL)."""
    # Every argument is checked before anything is read or written.
    names = cfg.modality_names if modality == "all" else [modalities.get(modality).name]
    shard_kn = parse_shard(shard)
    for name in names:  # an unknown backend, an HDF5 store for several workers, a sharded rebuild
        path = _store_for(Path(workdir), cfg, name, backend)
        check_writers(path, shard_kn, rebuild)
        if (who := writer_of(path)) is not None:  # a second HDF5 writer: refused before any model loads
            raise PipelineError(f"{path}: {who} is writing this HDF5 store, and an HDF5 store takes one writer at "
                                "a time: wait for it to end")
    check_models(cfg, names, catalog_dir, workdir, f"extract {modality}")  # found (or fetched) before W is touched
    catalog = load_catalog(catalog_dir, cfg)
    log(catalog.summary())
    wd.remember(workdir, cfg, catalog_dir)
    split = make_split(catalog, cfg, workdir, log)
    return extract_items(names, catalog, split, Path(workdir), cfg, backend=backend, shard=shard_kn,
                         rebuild=rebuild, repair=repair, progress=progress, log=log)


def _store_for(workdir: Path, cfg: Config, name: str, backend: str | None) -> Path | str:
    """An existing store keeps its backend unless --backend asks for the other one."""
    if backend:
        return wd.feature_store_path(workdir, cfg, name, backend)
    existing = wd.feature_store_path(workdir, cfg, name)
    return existing if FeatureStore.exists(existing) else wd.feature_store_path(workdir, cfg, name, cfg.stores.backend)


def extract_items(names: list[str], catalog: Catalog, split: pl.DataFrame, workdir: Path, cfg: Config, *,
                  backend: str | None = None, shard: tuple[int, int] = (0, 1), rebuild: bool = False,
                  repair: bool = False, progress: bool = True, log=print) -> list[Summary]:
    """Extract the modalities `names` of every item of `catalog` (the split says what is train)."""
    summaries = []
    train = split_items(catalog, split, "train")
    for name in names:
        path = _store_for(workdir, cfg, name, backend)
        hint = (wd.command(cfg, workdir, f"extract {name}", catalog=True)
                + f" --backend {'hdf5' if str(path).endswith('.h5') else 'zarr'} --rebuild")
        ctx = ExtractContext(cfg, workdir, pick_device(cfg.extract.device, "[extract] device"), train, rebuild, hint)
        if not rebuild:
            _check_model_first(path, cfg, name, hint)
        extractor = modalities.get(name).extractor(ctx)
        with wd.repair_hint(cfg, workdir):  # a store whose metadata is damaged: the rebuild that restores it
            summary = run_extraction(extractor, catalog.items, path, block_rows=cfg.block_items(name), shard=shard,
                                     rebuild=rebuild, repair=repair, rebuild_hint=hint, progress=progress)
        log(summary.line())
        _say_if_old(path, hint, log)
        summaries.append(summary)
    return summaries


def _check_model_first(path, cfg: Config, name: str, hint: str) -> None:
    """A store of another upstream model is refused before this run builds or converts its own."""
    if not FeatureStore.exists(path):
        return
    try:
        with FeatureStore(path) as store:
            producer = store.provenance["producer"]
    except StoreError:  # damaged or busy: the run itself says so, naming the fix
        return
    check_planned_model(cfg, name, producer, path, f"refusing to mix them: rebuild with `{hint}`")


def _say_if_old(path, rebuild_hint: str, log) -> None:
    """A store of an older schema still reads; say what its upgrade costs and how to run it."""
    with FeatureStore(path) as store:
        if store.schema_version < SCHEMA_VERSION:
            log(f"{path}: schema {store.schema_version} (chunks without checksums: damage can go unnoticed); "
                f"upgrade it with `{rebuild_hint}`")
