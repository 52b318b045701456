"""title_bpe hyperparameters chosen without looking at the validation split, then scored on it.

    python benchmarks/title_bpe_sweep.py [--workdir work/rakuten-real] [--config configs/rakuten-real.toml]
                                         [--jobs 8] [--seeds 2] [--final-seeds 3] [--only NAME ...]

Needs the title_bpe store and split of a work directory (`python benchmarks/rakuten_real.py` builds them).

1. Inner split: the *train* items of W/split.parquet, a fifth of each class held out (seed 0). The real
   validation items take no part.
2. Every candidate of ``CANDIDATES`` (overrides of ``[pretrain.title_bpe]``) x ``--seeds`` seeds trains on
   the inner train part, its best epoch chosen on the inner held-out part.
3. The candidate with the best mean, and the config as it is ("base"), train on the real split (train ->
   valid) with ``--final-seeds`` seeds: the only figures that touch the validation split.

Runs go ``--jobs`` at a time (one torch thread each; on a GPU they share it). Writes W/title_bpe_sweep/
sweep.jsonl, final.jsonl and prints both tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import polars as pl
from joblib import Parallel, delayed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CANDIDATES = {
    "base": {},
    "emde16x128": {"depth": 16, "width": 128},
    "emde64x16": {"depth": 64, "width": 16},
    "lr1e-3_40ep": {"lr": 1e-3, "epochs": 40},
    "decay0.95_30ep": {"decay": 0.95, "epochs": 30},
    "batch32": {"batch_size": 32},
    "batch128_lr5e-3": {"batch_size": 128, "lr": 5e-3},
    "channels512": {"channels": 512},
    "kernels123": {"kernel_sizes": [1, 2, 3]},
    "plain_loss": {"loss": "plain"},
    "dropout0": {"dropout": 0.0},
    "dropout0.4_30ep": {"dropout": 0.4, "epochs": 30},
    "token_dropout0.1": {"token_dropout": 0.1},
    "embed128": {"embed_dim": 128},
}


def inner_split(split: pl.DataFrame, held_out: float = 0.2, seed: int = 0) -> pl.DataFrame:
    """The train items only, `held_out` of each class relabelled 'valid'."""
    train = split.filter(pl.col("split") == "train").sample(fraction=1.0, shuffle=True, seed=seed)
    rank, size = pl.int_range(pl.len()).over("label"), pl.len().over("label")
    held = rank < (size * held_out).round().cast(pl.Int64)
    return train.with_columns(split=pl.when(held).then(pl.lit("valid")).otherwise(pl.lit("train"))).sort("item_id")


def train(name: str, over: dict, seed: int, run_dir: Path, split_file: Path, source: Path, config: Path) -> dict:
    """One pretraining run in its own work directory (links to the source's store and tokenizer)."""
    import torch

    from pipeline.config import load_config
    from pipeline.pretrain import pretrain

    torch.set_num_threads(1)
    (run_dir / "features").mkdir(parents=True, exist_ok=True)
    for link, target in (("split.parquet", split_file), ("tokenizers", source / "tokenizers"),
                         ("features/title_bpe.zarr", source / "features" / "title_bpe.zarr")):
        if not (run_dir / link).exists():
            (run_dir / link).symlink_to(target.resolve())
    cfg = load_config(config).merged({"seed": seed, "pretrain": {"title_bpe": over}})
    t = time.perf_counter()
    m = pretrain("title_bpe", run_dir, cfg, progress=False, log=lambda *_a, **_k: None)
    return {"name": name, "seed": seed, "macro_f1": round(100 * m["macro_f1"], 2), "best_epoch": m["best_epoch"],
            "seconds": round(time.perf_counter() - t, 1), "device": m.get("device"), "overrides": over}


def run_all(jobs: list, n_jobs: int, out: Path) -> list[dict]:
    results = []
    with out.open("w") as f:
        for r in Parallel(n_jobs=n_jobs, return_as="generator_unordered")(jobs):
            results.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"  {r['name']} seed {r['seed']}: {r['macro_f1']:.2f} (epoch {r['best_epoch']}, {r['seconds']} s)",
                  flush=True)
    return results


def table(results: list[dict]) -> list[tuple[float, str, list[float]]]:
    by_name: dict[str, list[float]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r["macro_f1"])
    return sorted(((sum(v) / len(v), n, sorted(v)) for n, v in by_name.items()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "rakuten-real")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "rakuten-real.toml")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--final-seeds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="candidate names (default: all)")
    a = ap.parse_args()
    if not (a.workdir / "features" / "title_bpe.zarr").exists():
        sys.exit(f"no title_bpe store in {a.workdir}: run `python benchmarks/rakuten_real.py` first")
    out = a.workdir / "title_bpe_sweep"
    out.mkdir(parents=True, exist_ok=True)
    inner_file = out / "inner_split.parquet"
    inner = inner_split(pl.read_parquet(a.workdir / "split.parquet"))
    inner.write_parquet(inner_file)
    print(f"inner split of the train items: {dict(inner.group_by('split').len().iter_rows())}")
    candidates = {k: v for k, v in CANDIDATES.items() if not a.only or k in a.only or k == "base"}

    t = time.perf_counter()
    jobs = [delayed(train)(n, o, s, out / "inner" / f"{n}-s{s}", inner_file, a.workdir, a.config)
            for n, o in candidates.items() for s in range(a.seeds)]
    ranked = table(run_all(jobs, a.jobs, out / "sweep.jsonl"))
    print(f"inner held-out macro-F1, mean of {a.seeds} seeds ({time.perf_counter() - t:.0f} s):")
    for mean, name, values in ranked:
        print(f"  {name:18s} {mean:6.2f}  {values}")

    finals = list(dict.fromkeys([ranked[0][1], "base"]))
    t = time.perf_counter()
    jobs = [delayed(train)(n, candidates[n], s, out / "final" / f"{n}-s{s}", a.workdir / "split.parquet",
                           a.workdir, a.config) for n in finals for s in range(a.final_seeds)]
    results = run_all(jobs, a.jobs, out / "final.jsonl")
    print(f"validation macro-F1 (train -> valid), {a.final_seeds} seeds ({time.perf_counter() - t:.0f} s, "
          f"{results[0]['device']}):")
    for mean, name, values in table(results):
        print(f"  {name:18s} {mean:6.2f}  {values}")


if __name__ == "__main__":
    main()
