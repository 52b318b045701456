"""`pipeline demo`: the embedded default, end to end: a synthetic catalogue, small models, every stage.

The stages run through `pipeline train`, the same calls as their commands; run again, every stage finds its
outputs and does nothing. The closing table puts the scores on the synthetic catalogue beside the paper's on
the full real one: they are not comparable, and the table says which is which.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.synth import synthesize
from pipeline.train import train
from pipeline.upstream import check_models


def demo(workdir: str | Path, cfg: Config, *, progress: bool = True, log=print) -> dict:
    started = time.perf_counter()
    workdir = Path(workdir)
    if cfg.demo is None:
        raise PipelineError(f"{cfg.source}: no [demo] table (the demo runs with configs/demo.toml)")
    catalog = workdir / "catalog"
    check_models(cfg, cfg.modality_names, catalog, workdir, None)  # before the catalogue is written
    if not (catalog / "X_train.csv").exists():
        summary = synthesize(catalog, items=cfg.demo.items, seed=cfg.demo.seed)
        log(f"synthetic catalogue: {summary['train_items']} train + {summary['test_items']} test items "
            f"in {catalog} ({summary['seconds']:.1f} s)")
    metrics = train(catalog, workdir, cfg, progress=progress, log=log,
                    data=f"{cfg.demo.items:,} synthetic items")
    log(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {workdir}")
    return metrics
