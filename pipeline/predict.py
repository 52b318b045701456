"""`pipeline predict`: classify the items of any catalogue with a trained work directory.

The work directory's fusion and every model it reads are loaded once (`pipeline.predictor.Predictor`);
the catalogue's items are computed in memory, reusing what W already holds for the same inputs, and
never written into the training stores or the split (ids may overlap W's: a new catalogue numbered from
0 is fine). Writes `--out` in the challenge's submission format (`,prdtypecode` header; item id, code)
and, beside it, `<out>.parquet`: item id, code, its probability and the probability of every class.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import workdir as wd
from pipeline.catalog import load_catalog, probabilities_table, write_submission
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.predictor import Predictor
from pipeline.progress import Progress


def check_output(out_csv: Path) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    if out_csv.is_dir():
        raise PipelineError(f"--out {out_csv}: is a directory; give a file name (e.g. {out_csv / 'predictions.csv'})")
    folder = out_csv.parent if str(out_csv.parent) else Path(".")
    if not folder.is_dir():
        raise PipelineError(f"--out {out_csv}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise PipelineError(f"--out {out_csv}: the folder {folder} is not writable")


def predict(catalog_dir: str | Path, workdir: str | Path, out_csv: str | Path, cfg: Config, *,
            cache: str | Path | None = None, progress: bool = True, log=print) -> pl.DataFrame:
    """Predictions for every item of the catalogue: the table written to `<out>.parquet`."""
    out_csv = Path(out_csv)
    check_output(out_csv)
    with wd.repair_hint(cfg, workdir):
        return _predict(catalog_dir, Path(workdir), out_csv, cfg, cache, progress, log)


def _predict(catalog_dir, workdir: Path, out_csv: Path, cfg: Config, cache, progress: bool, log) -> pl.DataFrame:
    predictor = Predictor.load(workdir, cfg, cache=cache)
    catalog = load_catalog(catalog_dir, cfg, require_train=False)
    log(catalog.summary())
    items = catalog.items.select("item_id", "title", "description", image=pl.col("image_path"))
    probs = np.zeros((len(items), len(predictor.classes)), np.float32)
    with Progress("predict", len(items), progress) as bar:
        for start in range(0, len(items), cfg.predict.batch_rows):
            chunk = items[start : start + cfg.predict.batch_rows]
            probs[start : start + len(chunk)] = predictor.predict_proba(chunk)
            bar.advance(len(chunk))
    ids = items["item_id"].to_numpy()
    table = probabilities_table(ids, probs, predictor.classes.tolist())
    write_submission(out_csv, ids, table["prdtypecode"])
    table.write_parquet(out_csv.with_suffix(".parquet"))
    log(f"predict: {len(table)} items -> {out_csv} and {out_csv.with_suffix('.parquet')}")
    return table
