"""`pipeline demo`: the embedded default, end to end: a synthetic catalogue, tiny models, every stage."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import section
from pipeline.extract import extract
from pipeline.synth import synthesize


def demo(workdir: str | Path, cfg: dict, *, progress: bool = True, log=print) -> None:
    started = time.perf_counter()
    workdir = Path(workdir)
    opts = section(cfg, "demo")
    catalog = workdir / "catalog"
    if not (catalog / "X_train.csv").exists():
        summary = synthesize(catalog, items=int(opts["items"]), seed=int(opts["seed"]))
        log(f"synthetic catalogue: {summary['train_items']} train + {summary['test_items']} test items "
            f"in {catalog} ({summary['seconds']:.1f} s)")
    extract("all", catalog, workdir, cfg, progress=progress, log=log)
    log(f"demo finished in {time.perf_counter() - started:.1f} s; outputs in {workdir}")
