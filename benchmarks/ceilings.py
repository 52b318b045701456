"""The highest validation macro-F1 a single-modality model can reach on a catalogue, given which items lack it.

    python benchmarks/ceilings.py [--catalog ../shared/data/rakuten-real] [--workdir work/rakuten-real]
                                  [--config configs/rakuten-real.toml] [--json]

A model that reads one modality sees the same input for every item that lacks it (no photo; a description
empty once cleaned and cut as desc_cam reads it; an empty title), so it gives all of them one prediction. The
best any such model can do on the validation split is then: every item that has the input predicted right,
every item without it predicted as one class c, c the best choice. That is the exact maximum of macro-F1 under
this constraint alone: for each class, right answers on the items with the input give the most true positives
and the fewest false ones whatever c is, so only c remains to choose. Items whose inputs are identical but
labelled differently lower the reachable figure further; they are counted, not folded into the bound.

The split is W/split.parquet (the one every system of benchmarks/rakuten_real.py is scored on); without one,
it is drawn as the pipeline draws it, from the config, in a temporary folder. Prints one line per modality and,
with --json, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.catalog import load_catalog, make_split  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.metrics import classification_metrics  # noqa: E402
from pipeline.text import clean_description  # noqa: E402


def ceiling(labels: np.ndarray, has: np.ndarray, codes: list[int]) -> tuple[float, int]:
    """max over c of the macro-F1 of: right where `has`, class c elsewhere; (that macro-F1, the best c)."""
    index = {c: i for i, c in enumerate(codes)}
    y = np.array([index[c] for c in labels])
    best = (-1.0, codes[0])
    for c in range(len(codes)):
        pred = np.where(has, y, c)
        best = max(best, (classification_metrics(y, pred, codes)["macro_f1"], codes[c]))
    return best


def conflicts(inputs: list[str], labels: np.ndarray, has: np.ndarray) -> int:
    """Items with the input whose identical input another item carries with another label."""
    df = pl.DataFrame({"x": inputs, "y": labels, "has": has}).filter("has")
    per_input = df.group_by("x").agg(pl.col("y").n_unique().alias("labels"), pl.len().alias("n"))
    return int(per_input.filter(pl.col("labels") > 1)["n"].sum())


def inputs(valid: pl.DataFrame, cfg) -> dict[str, tuple[list[str], np.ndarray]]:
    """Each modality's input as the model reads it (text) or the photo's file (image), and whether it exists."""
    desc = cfg.options("desc_cam")
    titles = valid["title"].fill_null("").to_list()
    descriptions = [clean_description(d or "", desc.max_chars) if desc.clean_html else (d or "")[: desc.max_chars or None]
                    for d in valid["description"].to_list()]
    photos = valid["image_path"].to_list()
    return {"title": (titles, np.array([bool(t.strip()) for t in titles])),
            "description": (descriptions, np.array([bool(d) for d in descriptions])),
            "photo": (photos, valid["has_image"].to_numpy())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalog", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "rakuten-real")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "rakuten-real.toml")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cfg = load_config(a.config)
    catalog_dir = a.catalog or (ROOT / cfg.real_data.catalog).resolve()
    catalog = load_catalog(catalog_dir, cfg)
    if (a.workdir / "split.parquet").is_file():
        split, source = pl.read_parquet(a.workdir / "split.parquet"), str(a.workdir / "split.parquet")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            split, source = make_split(catalog, cfg, tmp), "drawn from the config"
    valid = catalog.items.join(split.filter(pl.col("split") == "valid").select("item_id"), on="item_id")
    codes = sorted(split.filter(pl.col("split") != "test")["label"].unique().to_list())
    labels = valid["label"].to_numpy()
    out = {"catalog": str(catalog_dir), "split": source, "valid_items": len(valid), "modalities": {}}
    for name, (values, has) in inputs(valid, cfg).items():
        f1, c = ceiling(labels, has, codes)
        out["modalities"][name] = {"with_input": int(has.sum()), "without": int((~has).sum()),
                                   "ceiling_macro_f1": round(100 * f1, 2), "best_class_for_the_rest": int(c),
                                   "conflicting_items": conflicts(values, labels, has)}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{catalog_dir}: {len(valid)} validation items ({source})")
    for name, r in out["modalities"].items():
        print(f"{name:12s} present for {r['with_input']:5d}, absent for {r['without']:5d}: a {name}-only model "
              f"scores at most {r['ceiling_macro_f1']:.2f} macro-F1 (the rest predicted as "
              f"{r['best_class_for_the_rest']}); {r['conflicting_items']} items share their input with another "
              "label")


if __name__ == "__main__":
    main()
