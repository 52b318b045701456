"""`pipeline evaluate`: a labelled catalogue scored by a trained work directory, which it never changes.

The items go through `Predictor` (new items in memory, stored ones reused by input fingerprint), so the
training stores, models and split are only read. The fused system and each modality's own pretrained
network (encoder, EMDE, its head) are scored against the catalogue's labels; a class the work directory
never learned counts against every system. Writes W/evaluations/<catalogue name>/ (or `--out DIR`),
built beside and swapped in whole:

    metrics.json, confusion.csv, confusion.png, per_class_f1.png   the fused system
    <modality>/ (the same files)                                    each modality's network
    predictions.parquet                                             item_id, label, each system's prediction

and sums it up on the terminal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline import workdir as wd
from pipeline.catalog import class_names, load_catalog, read_split
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.metrics import class_report, save_report
from pipeline.provenance import staged_dir

BATCH_ROWS = 4096


def evaluate(catalog_dir: str | Path, workdir: str | Path, cfg: Config, out: str | Path | None = None, *,
             log=print) -> dict:
    """Score the labelled items of `catalog_dir`; the reports of every system (fused first)."""
    workdir, catalog_dir = Path(workdir), Path(catalog_dir)
    name = catalog_dir.stem if catalog_dir.is_file() else catalog_dir.resolve().name
    out = Path(out) if out is not None else workdir / "evaluations" / name
    _check_out(out, workdir)
    split = read_split(workdir, wd.command(cfg, workdir, "train", catalog=True))  # W is trained, or this says how
    catalog = load_catalog(catalog_dir, cfg)
    items = _truth(catalog.items, class_names(split), catalog_dir)
    with wd.repair_hint(cfg, workdir):
        predictions = _predict(workdir, cfg, items)
    names = class_names(split) | _new_names(items)
    reports = {system: class_report(items["code"].to_numpy(), codes, names) for system, codes in predictions.items()}
    with staged_dir(out) as tmp:
        for system, report in reports.items():
            title = f"{system} on {catalog_dir.name} ({len(items)} items)"
            save_report(tmp if system == "fused" else tmp / system, report, title)
        pl.DataFrame({"item_id": items["item_id"], "label": items["code"]}
                     | {f"predicted_{s}": c for s, c in predictions.items()}).write_parquet(tmp / "predictions.parquet")
    log(_summary(reports, catalog_dir, len(items), out))
    return reports


def _check_out(out: Path, workdir: Path) -> None:
    """The report replaces `out` whole: refuse anything there but an earlier report (or an empty folder)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise PipelineError(f"--out {out}: not a folder; give a folder for the report (it is replaced whole)")
    if out.resolve() in (workdir.resolve(), *workdir.resolve().parents):
        raise PipelineError(f"--out {out}: holds the work directory; give a folder of its own for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / "predictions.parquet").is_file():
        raise PipelineError(f"--out {out}: a folder holding other files; give a new or empty folder (the report "
                            "replaces it whole)")


def _truth(items: pl.DataFrame, names: dict[int, str], where: Path) -> pl.DataFrame:
    """The labelled items with their class code in the work directory's numbering (`code`): a class named by
    text gets its code from the split, a name W never saw a code of its own (it can only be mispredicted)."""
    items = items.filter(pl.col("part") == "train")
    if items.is_empty():
        raise PipelineError(f"{where}: no labelled item to score")
    if items["label_name"].is_null().all():
        if names:
            raise PipelineError(f"{where}: labels are codes, and the work directory's classes are names "
                                f"({', '.join(list(names.values())[:3])}, ...)")
        return items.with_columns(code=pl.col("label"))
    if not names and len(items):
        raise PipelineError(f"{where}: labels are names, and the work directory's classes are codes")
    codes = {n: c for c, n in names.items()}
    unseen = sorted(set(items["label_name"].to_list()) - set(codes))
    codes |= {n: max(codes.values(), default=-1) + 1 + i for i, n in enumerate(unseen)}
    return items.with_columns(code=pl.col("label_name").replace_strict(codes, return_dtype=pl.Int64))


def _new_names(items: pl.DataFrame) -> dict[int, str]:
    named = items.filter(pl.col("label_name").is_not_null()).select("code", "label_name").unique()
    return dict(zip(named["code"].to_list(), named["label_name"].to_list()))


def _predict(workdir: Path, cfg: Config, items: pl.DataFrame) -> dict[str, np.ndarray]:
    """Predicted class codes of every item: "fused", then each modality's own network."""
    import torch

    from pipeline.predictor import Predictor

    predictor = Predictor.open(workdir, cfg)
    frame = items.select("item_id", "title", "description", image=pl.col("image_path"))
    classes = np.asarray(predictor.classes, np.int64)
    out = {"fused": [], **{m: [] for m in predictor.branches}}
    for start in range(0, len(frame), BATCH_ROWS):
        chunk = frame[start : start + BATCH_ROWS]
        # the sketches the fusion heads read (Predictor.embed), then the heads: the fused system and each
        # modality network's own head over the same sketch (what it was pretrained with)
        sketches = {m: torch.from_numpy(np.asarray(_array(predictor.embed(chunk, m)), np.float32))
                    for m in predictor.branches}
        with torch.inference_mode():
            out["fused"].append(classes[predictor.heads(sketches).argmax(-1).numpy()])
            for m, b in predictor.branches.items():
                out[m].append(classes[b.model.head(sketches[m]).argmax(-1).numpy()])
    return {system: np.concatenate(parts) for system, parts in out.items()}


def _array(values) -> np.ndarray:
    """A numpy array of what `Predictor.embed` returns (an array, or a data frame of the same numbers)."""
    return values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)


def _summary(reports: dict, catalog_dir: Path, n: int, out: Path) -> str:
    fused = reports["fused"]
    lines = [f"evaluate: {n} labelled items of {catalog_dir}, {len(fused['per_class'])} classes",
             f"  {'system':<12} {'macro-F1':>9} {'accuracy':>9}"]
    lines += [f"  {s:<12} {100 * r['macro_f1']:9.2f} {100 * r['accuracy']:9.2f}" for s, r in reports.items()]
    worst = sorted(fused["per_class"].values(), key=lambda c: c["f1"])[:5]
    lines.append("  worst classes (fused): " + ", ".join(f"{c['name']} F1 {100 * c['f1']:.1f} ({c['support']} items)"
                                                         for c in worst))
    lines.append(f"  report: {out}/ (metrics.json, confusion.csv, confusion.png, per_class_f1.png; the same per "
                 f"modality in {out}/<modality>/)")
    return "\n".join(lines)
