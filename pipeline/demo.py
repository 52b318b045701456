"""`pipeline demo`: the embedded default, end to end: a synthetic catalogue, small models, every stage.

Each stage is the same call as its command; run again, every stage finds its outputs and does nothing.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.pretrain import pretrain
from pipeline.sketch import sketch
from pipeline.synth import synthesize


def demo(workdir: str | Path, cfg: Config, *, progress: bool = True, log=print) -> dict:
    started = time.perf_counter()
    workdir = Path(workdir)
    if cfg.demo is None:
        raise PipelineError(f"{cfg.source}: no [demo] table (the demo runs with configs/demo.toml)")
    catalog = workdir / "catalog"
    if not (catalog / "X_train.csv").exists():
        summary = synthesize(catalog, items=cfg.demo.items, seed=cfg.demo.seed)
        log(f"synthetic catalogue: {summary['train_items']} train + {summary['test_items']} test items "
            f"in {catalog} ({summary['seconds']:.1f} s)")
    stages = {}
    t = time.perf_counter()
    extract("all", catalog, workdir, cfg, progress=progress, log=log)
    stages["extract"] = time.perf_counter() - t
    for modality in cfg.modality_names:
        t = time.perf_counter()
        pretrain(modality, workdir, cfg, progress=progress, log=log)
        stages[f"pretrain {modality}"] = time.perf_counter() - t
    t = time.perf_counter()
    sketch("all", workdir, cfg, progress=progress, log=log)
    stages["sketch"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = fuse(workdir, cfg, progress=progress, log=log)
    stages["fuse"] = time.perf_counter() - t
    log("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    log(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {workdir}")
    return metrics
