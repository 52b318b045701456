"""The split table W/split.parquet: item_id, split (train/valid/test), label (the class code), label_name.

Paper 3.3: `[split] valid_items` train items held out for validation with a fixed seed (a proportional share
for a catalogue smaller than `reference_train_items`). The table is the record of assignments: written once,
then kept for every item still in the catalogue. New items join as train or test, items no longer in the
catalogue leave it (so they leave training, and every stage's stamp sees the new set), and a class named by
text keeps its code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.catalog.items import Catalog, CatalogError
from pipeline.errors import PipelineError
from pipeline.provenance import write_parquet

SPLIT_FILE = "split.parquet"


def read_split(workdir: str | Path, hint: str = "") -> pl.DataFrame:
    """W/split.parquet (item_id, split, label[, label_name]), or one line saying which command builds it."""
    path = Path(workdir) / SPLIT_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: the first stage builds it, "
                            f"`{hint or f'pipeline extract MODALITY --catalog DIR --workdir {workdir}'}`")
    try:
        split = pl.read_parquet(path)
    except Exception as err:  # polars/arrow raise several kinds for a damaged file
        raise PipelineError(f"{path}: unreadable ({type(err).__name__}); it is the work directory's split: "
                            "restore it, or start a new --workdir") from None
    if not {"item_id", "split", "label"} <= set(split.columns):
        raise PipelineError(f"{path}: not a split table (needs item_id, split, label)")
    return split if "label_name" in split.columns else split.with_columns(label_name=pl.lit(None, pl.String))


def _draw(items: pl.DataFrame, opts) -> pl.DataFrame:
    """Paper 3.3: `valid_items` train items held out with a fixed seed (a proportional share for a catalogue
    smaller than `reference_train_items`)."""
    train_ids = items.filter(pl.col("part") == "train")["item_id"].sort().to_numpy()
    n_valid = opts.valid_items
    if len(train_ids) < opts.reference_train_items:
        n_valid = max(1, round(n_valid * len(train_ids) / opts.reference_train_items))
    rng = np.random.default_rng(opts.seed)
    valid = rng.choice(train_ids, size=max(min(n_valid, len(train_ids) - 1), 0), replace=False)
    return items.select(
        "item_id",
        split=pl.when(pl.col("item_id").is_in(valid)).then(pl.lit("valid")).otherwise(pl.col("part")),
        label="label", label_name="label_name",
    )


def _numbered(items: pl.DataFrame, known: pl.DataFrame) -> pl.DataFrame:
    """Items whose classes are names get codes: a name the split already numbers keeps its code, new names
    get the next ones (in sorted order)."""
    if items["label_name"].is_null().all():
        return items
    codes = dict(zip(known["label_name"], known["label"])) if len(known) else {}
    start = max(codes.values(), default=-1) + 1
    new = sorted(set(items["label_name"].drop_nulls().to_list()) - set(codes))
    codes |= {name: start + i for i, name in enumerate(new)}
    return items.with_columns(label=pl.col("label_name").replace_strict(codes, default=None, return_dtype=pl.Int64))


def make_split(catalog: Catalog, cfg, workdir: str | Path, log=None) -> pl.DataFrame:
    """The split table (item_id, split, label, label_name), written once to W/split.parquet and kept.

    A run on a changed catalogue keeps the assignment of every item still there, adds new items as train or
    test and drops the items that are gone (saying how many through `log`); a relabelled item is refused
    (the work directory belongs to another catalogue)."""
    path = Path(workdir) / SPLIT_FILE
    items = catalog.items.select("item_id", "part", "label", "label_name")
    if not path.exists():
        split = _draw(_numbered(items, _classes(None)), cfg.split)
    else:
        split = read_split(workdir)
        items = _numbered(items, _classes(split))
        _refuse_relabelled(catalog, split, items, path)
        gone = ~split["item_id"].is_in(items["item_id"].implode())
        new = items.filter(~pl.col("item_id").is_in(split["item_id"].implode()))
        if not gone.any() and len(new) == 0:
            return split
        if gone.any() and log is not None:
            log(f"{path}: {int(gone.sum())} item(s) no longer in the catalogue left the split "
                f"({_counts(split.filter(gone))}); the stages retrain without them")
        split = pl.concat([split.filter(~gone),
                           new.select("item_id", split=pl.col("part"), label="label", label_name="label_name")])
    write_parquet(split, path)  # atomically: shard workers starting together write the same table
    return split


def _classes(split: pl.DataFrame | None) -> pl.DataFrame:
    """The (label_name, label) pairs a split numbers (none for a split of codes)."""
    if split is None:
        return pl.DataFrame({"label_name": [], "label": []}, schema={"label_name": pl.String, "label": pl.Int64})
    return split.filter(pl.col("label_name").is_not_null()).select("label_name", "label").unique()


def _counts(rows: pl.DataFrame) -> str:
    parts = rows["split"].value_counts(sort=True)
    return ", ".join(f"{n} {s}" for s, n in zip(parts["split"], parts["count"]))


def _refuse_relabelled(catalog: Catalog, split: pl.DataFrame, items: pl.DataFrame, path: Path) -> None:
    both = split.join(items, on="item_id", how="inner", suffix="_now")
    changed = both.filter(pl.col("label").ne_missing(pl.col("label_now")))
    if len(changed):
        row = changed.row(0, named=True)
        now, then = (row["label_name_now"], row["label_name"]) if row["label_name_now"] else (row["label_now"],
                                                                                              row["label"])
        raise CatalogError(f"{catalog.source}: item {row['item_id']} is labelled {now} but {path} holds {then}; "
                           f"the catalogue changed under this work directory: use a new --workdir (or delete "
                           f"{path} and every stage's output)")


def split_items(catalog: Catalog, split: pl.DataFrame, part: str) -> pl.DataFrame:
    """The catalogue's items of one part of the split ("train", "valid", "test")."""
    ids = split.filter(pl.col("split") == part)["item_id"].implode()
    return catalog.items.filter(pl.col("item_id").is_in(ids))


def class_codes(split: pl.DataFrame) -> list[int]:
    """Product type codes of the training items, sorted: class index i <-> code class_codes[i]."""
    return sorted(split.filter(pl.col("split") != "test")["label"].unique().to_list())


def class_names(split: pl.DataFrame) -> dict[int, str]:
    """Code -> class name, when the catalogue names its classes (empty when it gives codes)."""
    pairs = _classes(split)
    return dict(zip(pairs["label"].to_list(), pairs["label_name"].to_list()))
