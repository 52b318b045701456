"""Latency and throughput of `Predictor` (pipeline/predictor.py) on this machine.

    python benchmarks/predict.py --model W|BUNDLE [--catalog DIR] [--items 20] [--batch 512]

* one item after load (title, description, photo; every feature computed, nothing reused): p50/p99
  seconds over `--items` different items, against the bare upstream work for the same item (the
  extractors' tokenising/decoding and model forwards, nothing of the predictor around them);
  target: p50 within 1.3x of the bare upstream;
* a batch of `--batch` items: items/s of `predict_proba` against the extraction stage's items/s over the
  same items (every modality the fusion reads, into fresh stores); target: >= 0.9x.

W is a trained work directory: `pipeline demo --workdir W` (demo models), or one trained with
configs/rakuten-real.toml (multilingual-e5-small + EfficientNet-Lite2); `--build-real N` trains a small one
of those on N items of the real sample (one epoch each: the networks' shapes are what latency depends on).
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import Predictor, workdir as wd  # noqa: E402
from pipeline.catalog import load_catalog  # noqa: E402
from pipeline.extract.driver import run_extraction  # noqa: E402


def rows_of(workdir: Path, n: int, catalog: Path | None = None) -> pl.DataFrame:
    """n catalogue items with a photo and a description, as the predictor takes them."""
    cfg = wd.load(workdir)
    catalog = catalog or (wd.recorded(workdir) or {}).get("catalog")
    if not catalog:
        raise SystemExit(f"{workdir} names no catalogue (a bundle): give --catalog DIR")
    items = load_catalog(catalog, cfg).items
    full = items.filter(pl.col("has_image") & (pl.col("description") != ""))
    return full[:n].select("item_id", "title", "description", image=pl.col("image_path"))


def one_item(predictor: Predictor, rows: pl.DataFrame) -> dict:
    """Seconds per single-item call, and the bare upstream seconds of the same item."""
    for i in range(min(3, len(rows))):  # warm-up: the first calls of a shape set up oneDNN's kernels
        predictor.predict_proba(rows[i : i + 1])
    calls, bare = [], []
    for i in range(len(rows)):
        row = rows[i : i + 1]
        t = time.perf_counter()
        predictor.predict_proba(row)
        calls.append(time.perf_counter() - t)
        t = time.perf_counter()
        for b in predictor.branches.values():
            b.extractor.compute(b.extractor.prepare(predictor_frame(row)))
        bare.append(time.perf_counter() - t)
    calls, bare = np.array(calls), np.array(bare)
    return {"one_item_p50_s": float(np.percentile(calls, 50)), "one_item_p99_s": float(np.percentile(calls, 99)),
            "bare_upstream_p50_s": float(np.percentile(bare, 50)),
            "one_item_ratio_p50": float(np.percentile(calls, 50) / np.percentile(bare, 50))}


def predictor_frame(row: pl.DataFrame) -> pl.DataFrame:
    return row.select("item_id", "title", "description", image_path=pl.col("image"))


def extraction_seconds(predictor: Predictor, frame: pl.DataFrame) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for name, b in predictor.branches.items():
            run_extraction(b.extractor, frame, Path(tmp) / f"{name}.zarr", block_rows=predictor.cfg.block_items(name),
                           progress=False)
        return time.perf_counter() - t


def batch(predictor: Predictor, rows: pl.DataFrame, repeats: int = 3) -> dict:
    """items/s of predict_proba against the extraction stage's items/s (every modality, fresh stores).

    Alternated `repeats` times, the fastest of each kept: the first run of a batch shape pays oneDNN's
    kernel set-up (seconds on a CPU), and a shared machine disturbs single runs."""
    predict_s, extract_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        predictor.predict_proba(rows)
        predict_s.append(time.perf_counter() - t)
        extract_s.append(extraction_seconds(predictor, predictor_frame(rows)))
    p, e = min(predict_s), min(extract_s)
    return {"batch_items": len(rows), "predict_items_s": len(rows) / p, "extract_items_s": len(rows) / e,
            "batch_ratio": e / p}


def build_real(workdir: Path, n: int) -> None:
    """A small work directory with the real-data models (one epoch each) on n items of the real sample."""
    from pipeline.config import load_config
    from pipeline.extract import extract
    from pipeline.fuse import fuse
    from pipeline.pretrain import pretrain
    from pipeline.sketch import sketch

    src = ROOT.parent / "shared" / "data" / "rakuten-real"
    cat = workdir.parent / f"{workdir.name}-catalog"
    if not (cat / "X_train.csv").exists():
        (cat / "image_train").mkdir(parents=True, exist_ok=True)
        x, y = pl.read_csv(src / "X_train.csv", infer_schema=False), pl.read_csv(src / "Y_train.csv", infer_schema=False)
        with_photo = [i for i, (p, m) in enumerate(zip(x["productid"], x["imageid"]))
                      if (src / "image_train" / f"image_{m}_product_{p}.jpg").exists()]
        keep = sorted(set(with_photo[: n // 2]) | set(range(n - min(len(with_photo), n // 2))))[:n]
        x[keep].write_csv(cat / "X_train.csv")
        y[keep].write_csv(cat / "Y_train.csv")
        for p, m in zip(x[keep]["productid"], x[keep]["imageid"]):
            f = src / "image_train" / f"image_{m}_product_{p}.jpg"
            if f.exists():
                (cat / "image_train" / f.name).symlink_to(f)
    one_epoch = {m: {"epochs": 1} for m in ("title_cam", "desc_cam", "title_bpe", "image")}
    cfg = load_config(ROOT / "configs" / "rakuten-real.toml", {"pretrain": one_epoch, "fusion": {"epochs": 1}})
    quiet = lambda *_a, **_k: None  # noqa: E731
    extract("all", cat, workdir, cfg, progress=False, log=quiet)
    for m in cfg.modality_names:
        pretrain(m, workdir, cfg, progress=False, log=quiet)
    sketch("all", workdir, cfg, progress=False, log=quiet)
    fuse(workdir, cfg, progress=False, log=quiet)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", "--workdir", dest="workdir", type=Path, required=True,
                    help="a trained work directory or a bundle")
    ap.add_argument("--catalog", type=Path, help="the items (default: the work directory's catalogue)")
    ap.add_argument("--items", type=int, default=20, help="single-item calls (distinct items)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--build-real", type=int, default=0, help="first train a small real-data W of N items")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.build_real:
        build_real(args.workdir, args.build_real)
    t = time.perf_counter()
    predictor = Predictor.load(args.workdir, reuse=False)
    load_s = time.perf_counter() - t
    rows = rows_of(args.workdir, max(args.items, args.batch), args.catalog)
    report = {"workdir": str(args.workdir), "load_s": load_s} | one_item(predictor, rows[: args.items])
    report |= batch(predictor, rows[: args.batch])
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
