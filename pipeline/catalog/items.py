"""The items table every layout is read into, and the checks every layout shares (ids, labels).

One row per item of the catalogue:

    item_id  int64   unique across the catalogue's files
    title    str     as given ("" when absent); never cleaned here
    description str  as given ("" when absent)
    product_id, image_id  int64   the Rakuten layouts' (null for a product table)
    image_path  str  where its photo should be ("" when it has none)
    has_image   bool whether that file exists
    part     str     "train" (labelled) or "test" (to predict)
    label    int64   the class code (null for test items, and for classes given by name)
    label_name  str  the class name, when the catalogue names its classes (null when it gives codes)

A label column whose values are all integers gives codes (the Rakuten product type codes); any other text
gives class names, which the split table (pipeline.catalog.split) numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.errors import PipelineError
from pipeline.text import clean_description

COLUMNS = ("item_id", "title", "description", "product_id", "image_id", "image_path", "has_image", "part", "label",
           "label_name")
INTEGER = re.compile(r"[+-]?[0-9]+")


class CatalogError(PipelineError):
    """The catalogue's files cannot be read as the configured layout."""


@dataclass
class Catalog:
    directory: Path  # what --catalog named: the catalogue's folder, or a table file
    items: pl.DataFrame
    files: dict[str, Path]  # what was read: "train", "labels", "test", or "table"

    @property
    def missing_images(self) -> int:
        return int((~self.items["has_image"]).sum())

    @property
    def source(self) -> Path:
        """The file a message about the training items names."""
        return self.files.get("train") or self.files.get("table") or self.directory

    def summary(self) -> str:
        parts = self.items["part"].value_counts()
        counts = dict(zip(parts["part"], parts["count"]))
        train = self.items.filter(pl.col("part") == "train")
        classes = train["label_name"].n_unique() if train["label"].is_null().all() else train["label"].n_unique()
        return (f"{self.directory}: {counts.get('train', 0)} train and {counts.get('test', 0)} test items, "
                f"{classes if len(train) else 0} classes, {self.missing_images} missing image(s)")


def integer_column(values: pl.Series, path: Path, column: str, what: str, row_offset: int = 1) -> pl.Series:
    """A text column as int64, naming the first row that is not an integer."""
    raw = values.cast(pl.String).str.strip_chars()
    ints = raw.cast(pl.Int64, strict=False)
    bad = ints.is_null()
    if bad.any():
        row = int(bad.arg_max())
        if raw[row] is None or not raw[row]:
            problem = "is empty"
        elif INTEGER.fullmatch(raw[row]):
            problem = f"{raw[row]} is out of the 64-bit integer range"
        else:
            problem = f"{raw[row]!r} is not an integer"
        raise CatalogError(f"{path}, row {row + row_offset}, column '{column or '(unnamed index)'}': {what} {problem}")
    return ints


def first_duplicate(ids: pl.Series) -> tuple[int, int] | None:
    """The rows (first, second) of the first id that appears twice, or None."""
    dup = ids.is_duplicated()
    if not dup.any():
        return None
    rows = np.flatnonzero(dup.to_numpy() & (ids == ids[int(dup.arg_max())]).to_numpy())
    return int(rows[0]), int(rows[1])


def check_unique(ids: pl.Series, path: Path, column: str) -> None:
    """Refuse a duplicated item id, naming both rows."""
    if (dup := first_duplicate(ids)) is not None:
        raise CatalogError(f"{path}, row {dup[1] + 1}, column '{column or '(unnamed index)'}': duplicate item id "
                           f"{ids[dup[1]]} (first at row {dup[0] + 1})")


def labels(values: pl.Series) -> tuple[pl.Series, pl.Series]:
    """A label column (text, null or "" when unlabelled) as (codes, names): codes when every label is an
    integer, names otherwise (the other one all null)."""
    text = values.cast(pl.String).str.strip_chars()
    raw = pl.select(pl.when(text != "").then(text)).to_series()  # "" (a CSV's empty field) is no label
    given = raw.drop_nulls()
    if given.str.contains(r"^[+-]?[0-9]{1,18}$").all():
        return raw.cast(pl.Int64), pl.Series("label_name", [None] * len(raw), pl.String)
    return pl.Series("label", [None] * len(raw), pl.Int64), raw.alias("label_name")


def train_texts(train_items: pl.DataFrame) -> list[str]:
    """Titles and cleaned descriptions of the train items (what a tiny text model learns from)."""
    return train_items["title"].to_list() + [clean_description(d) for d in train_items["description"].to_list() if d]
