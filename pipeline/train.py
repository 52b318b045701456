"""`pipeline train`: every stage in one command (extract all, pretrain each modality, sketch all, fuse), and
`pipeline pretrain all`.

A composer, not a stage: it calls each stage's public entry point in order, exactly as the stage commands
would, so a rerun continues what a killed run left (finished blocks and epochs are kept) and an unchanged
stage says "nothing to do". It ends with one line per stage (its seconds and what it did) and the results
table.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline import registry
from pipeline.config import Config
from pipeline.upstream import check_models


def pretrain_all(modality: str, workdir: str | Path, cfg: Config, *, coder: str | None = None, progress: bool = True,
                 log=print) -> dict[str, dict]:
    """`pipeline pretrain MODALITY|all`: each modality's network (every modality of the config for "all")."""
    from pipeline.pretrain import pretrain

    names = cfg.modality_names if modality == "all" else [registry.get(modality).name]
    return {m: pretrain(m, Path(workdir), cfg, coder=coder, progress=progress, log=log) for m in names}


def train(catalog: str | Path, workdir: str | Path, cfg: Config, *, backend: str | None = None, progress: bool = True,
          log=print, data: str = "this catalogue") -> dict:
    """Every stage on `catalog` into `workdir`; the fusion's metrics. `data` names the catalogue in the results
    table (the demo's is synthetic)."""
    from pipeline.extract import extract
    from pipeline.fuse import fuse, summary_table
    from pipeline.sketch import sketch

    workdir = Path(workdir)
    check_models(cfg, cfg.modality_names, catalog, workdir, "train")  # before anything is written
    lines = []

    def stage(name: str, call, result):
        started = time.perf_counter()
        out = call()
        lines.append(f"  {name:<20} {time.perf_counter() - started:8.1f} s  {result(out)}")
        return out

    stage("extract all", lambda: extract("all", catalog, workdir, cfg, backend=backend, progress=progress, log=log),
          lambda summaries: _did(summaries, "extracted"))
    for m in cfg.modality_names:
        stage(f"pretrain {m}", lambda m=m: pretrain_all(m, workdir, cfg, progress=progress, log=log)[m],
              lambda metrics: f"valid macro-F1 {100 * metrics['macro_f1']:.2f}")
    stage("sketch all", lambda: sketch("all", workdir, cfg, progress=progress, log=log),
          lambda summaries: _did(summaries, "sketched"))
    fused = stage("fuse", lambda: fuse(workdir, cfg, progress=progress, log=log, table=False),
                  lambda metrics: f"valid macro-F1 {100 * metrics['macro_f1']:.2f}")
    log(f"  {'stage':<20} {'seconds':>10}  result\n" + "\n".join(lines))
    log(summary_table(workdir, fused, cfg.fusion.output, data))
    return fused


def _did(summaries, verb: str) -> str:
    computed = sum(s.computed for s in summaries)
    if not computed:
        return "nothing to do"
    return f"{computed} items {verb} into {len(summaries)} store(s)"
