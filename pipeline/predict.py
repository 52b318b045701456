"""`pipeline predict`: classify the items of any catalogue with a trained work directory or a bundle.

The model's fusion and every network it reads are loaded once (`pipeline.predictor.Predictor`);
the catalogue's items are computed in memory, reusing what W already holds for the same inputs, and
never written into the training stores or the split (ids may overlap W's: a new catalogue numbered from
0 is fine). The catalogue is any layout (a product table too); its labels, if any, are ignored. Writes
`--out` in the challenge's submission format (`,prdtypecode` header; item id, code), its folder created if
need be, and, beside it, `<out>.parquet`: item id, code, its probability, the class name when the model
knows its classes' names, and the probability of every class. A photo the catalogue names that cannot be
read (not a regular file, does not decode) is one log line naming the items, which are classified without it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import workdir as wd
from pipeline.catalog import load_catalog, probabilities_table, write_submission
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.predictor import MissingInputWarning, Predictor
from pipeline.provenance import replaceable, write_parquet
from pipeline.progress import Progress

BATCH_ROWS = 4096


def check_output(out_csv: Path) -> None:
    """Refuse an output path that cannot be written, before any work is done (a missing folder is created
    when the predictions are written)."""
    if out_csv.is_dir():
        raise PipelineError(f"--out {out_csv}: is a directory; give a file name (e.g. {out_csv / 'predictions.csv'})")
    folder = out_csv.parent if str(out_csv.parent) else Path(".")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise PipelineError(f"--out {out_csv}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise PipelineError(f"--out {out_csv}: the folder {existing} is not writable")
    for path in (out_csv, out_csv.with_suffix(".parquet")):  # never renamed over a link, a FIFO, a device
        replaceable(path)


def predict(catalog_dir: str | Path, workdir: str | Path, out_csv: str | Path, cfg: Config, *,
            cache: str | Path | None = None, progress: bool = True, log=print) -> pl.DataFrame:
    """Predictions for every item of the catalogue: the table written to `<out>.parquet`. `workdir`: a trained
    work directory or a bundle (`pipeline bundle`)."""
    out_csv = Path(out_csv)
    check_output(out_csv)
    for path in (out_csv, out_csv.with_suffix(".parquet")):  # W/split.csv would write over W/split.parquet
        wd.check_output_path(path, workdir, cfg, f"--out {out_csv}")
    with wd.repair_hint(cfg, workdir):
        return _predict(catalog_dir, Path(workdir), out_csv, cfg, cache, progress, log)


def _predict(catalog_dir, workdir: Path, out_csv: Path, cfg: Config, cache, progress: bool, log) -> pl.DataFrame:
    predictor = Predictor.open(workdir, cfg, cache=cache)
    catalog = load_catalog(catalog_dir, cfg, require_train=False)
    log(catalog.summary())
    photo = pl.when(pl.col("has_image")).then(pl.col("image_path"))  # a photo the catalogue lacks is no photo
    items = catalog.items.select("item_id", "title", "description", image=photo)
    probs = np.zeros((len(items), len(predictor.classes)), np.float32)
    with Progress("predict", len(items), progress) as bar, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", MissingInputWarning)
        for start in range(0, len(items), BATCH_ROWS):
            chunk = items[start : start + BATCH_ROWS]
            probs[start : start + len(chunk)] = predictor.predict_proba(chunk).to_numpy()
            bar.advance(len(chunk))
    for w in said:
        if issubclass(w.category, MissingInputWarning):
            log(f"predict: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    ids = items["item_id"].to_numpy()
    table = probabilities_table(ids, probs, predictor.classes.tolist(), predictor.class_names)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    write_submission(out_csv, ids, table["prdtypecode"])
    write_parquet(table, out_csv.with_suffix(".parquet"))
    log(f"predict: {len(table)} items -> {out_csv} and {out_csv.with_suffix('.parquet')}")
    return table
