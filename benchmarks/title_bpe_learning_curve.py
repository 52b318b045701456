"""title_bpe against TF-IDF on titles as the training set grows: is the gap a matter of data?

    python benchmarks/title_bpe_learning_curve.py [--workdir work/rakuten-real] [--config configs/rakuten-real.toml]
                                                  [--fractions 0.125 0.25 0.5 1] [--seeds 2] [--jobs 2]

Needs the title_bpe store and split of a work directory (`python benchmarks/rakuten_real.py` builds them).
For each fraction, a stratified sample of the *train* items (the same sample for both models, seed 0) trains
title_bpe (``[pretrain.title_bpe]`` as configured, ``--seeds`` seeds, best epoch on the validation split, as
in the full benchmark) and the TF-IDF + LinearSVC baseline of `rakuten_real.py`; both are scored on the whole
validation split. Writes W/title_bpe_learning_curve.jsonl and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl
from joblib import Parallel, delayed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from rakuten_real import tfidf_baseline  # noqa: E402
from title_bpe_sweep import train  # noqa: E402


def subsample(split: pl.DataFrame, fraction: float, seed: int = 0) -> pl.DataFrame:
    """The validation items, and `fraction` of each class's train items (at least one)."""
    train_items = split.filter(pl.col("split") == "train").sample(fraction=1.0, shuffle=True, seed=seed)
    rank, size = pl.int_range(pl.len()).over("label"), pl.len().over("label")
    kept = train_items.filter(rank < (size * fraction).round().cast(pl.Int64).clip(lower_bound=1))
    return pl.concat([kept, split.filter(pl.col("split") == "valid")]).sort("item_id")


def main() -> None:
    from pipeline.catalog import load_catalog
    from pipeline.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "rakuten-real")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "rakuten-real.toml")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    if not (a.workdir / "features" / "title_bpe.zarr").exists():
        sys.exit(f"no title_bpe store in {a.workdir}: run `python benchmarks/rakuten_real.py` first")
    cfg = load_config(a.config)
    split = pl.read_parquet(a.workdir / "split.parquet")
    titles = load_catalog((ROOT / cfg.real_data.catalog).resolve(), cfg).items.select("item_id", "title")
    codes = sorted(split.filter(pl.col("split") != "test")["label"].unique().to_list())
    out = a.workdir / "title_bpe_learning_curve"
    out.mkdir(parents=True, exist_ok=True)

    rows, jobs = [], []
    for f in a.fractions:
        part = subsample(split, f)
        part_file = out / f"split-{f:g}.parquet"
        part.write_parquet(part_file)
        data = part.join(titles, on="item_id")
        tr, va = data.filter(pl.col("split") == "train"), data.filter(pl.col("split") == "valid")
        tfidf = tfidf_baseline(tr["title"].to_list(), tr["label"].to_list(), va["title"].to_list(),
                               va["label"].to_list(), codes)
        rows.append({"fraction": f, "train_items": tr.height, "tfidf_title": round(100 * tfidf, 2)})
        print(f"fraction {f:g}: {tr.height} train titles, TF-IDF {100 * tfidf:.2f}", flush=True)
        jobs += [delayed(train)(f"{f:g}", {}, s, out / f"{f:g}-s{s}", part_file, a.workdir, a.config)
                 for s in range(a.seeds)]
    runs = Parallel(n_jobs=a.jobs)(jobs)

    with (a.workdir / "title_bpe_learning_curve.jsonl").open("w") as fh:
        print("| train titles | TF-IDF titles | title_bpe (mean of seeds) | gap |")
        print("|---|---|---|---|")
        for row in rows:
            mine = [r for r in runs if r["name"] == f"{row['fraction']:g}"]
            scores = [r["macro_f1"] for r in mine]
            row |= {"title_bpe": scores, "title_bpe_mean": round(sum(scores) / len(scores), 2),
                    "seconds": [r["seconds"] for r in mine]}
            fh.write(json.dumps(row) + "\n")
            print(f"| {row['train_items']} ({row['fraction']:g}) | {row['tfidf_title']:.2f} | "
                  f"{row['title_bpe_mean']:.2f} {sorted(scores)} | {row['title_bpe_mean'] - row['tfidf_title']:+.2f} |")


if __name__ == "__main__":
    main()
