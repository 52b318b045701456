"""The challenge's folder layouts: train, label and test files plus folders of photos named after ids.

`[catalog.layouts.rakuten]` (`X_train*.csv`, `Y_train*.csv`, `X_test*.csv`, `image_train/image_{imageid}_
product_{productid}.jpg`), `[catalog.layouts.sigir]` (the SIGIR eCom'20 TSV files) or a layout of the user's
own, read through its column mapping. Item ids are the files' integer index, unique across train and test.
"""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from pipeline.catalog.items import CatalogError, check_unique, first_duplicate, integer_column
from pipeline.catalog.text_files import read_csv
from pipeline.schema import Layout

FIELDS = ("id", "title", "description", "product_id", "image_id")


def find(directory: Path, pattern: str, what: str, layout: str, required: bool) -> Path | None:
    """The one file of `directory` matching `pattern` (None when there is none and it is not required)."""
    if not pattern:
        return None
    found = sorted(directory.glob(pattern))
    if not found:
        if required:
            raise CatalogError(f"{directory}: no {what} file matching '{pattern}' (layout '{layout}'; "
                               "pick another with [catalog] layout in the config)")
        return None
    if len(found) > 1:
        raise CatalogError(f"{directory}: several {what} files match '{pattern}': "
                           f"{[p.name for p in found]}; keep one or set the file name in the config")
    return found[0]


def matches(directory: Path, layout: Layout) -> bool:
    """Whether `directory` holds a file of this layout's train (or test) pattern."""
    return any(next(directory.glob(p), None) is not None for p in (layout.train, layout.test) if p)


class _Reader:
    """One folder layout's files, read through its column mapping."""

    def __init__(self, name: str, layout: Layout, encoding: str):
        self.name, self.layout, self.encoding = name, layout, encoding
        self.columns = layout.columns

    def read(self, path: Path, needed: dict[str, str]) -> pl.DataFrame:
        df = read_csv(path, self.encoding, self.layout.separator, needed, f"catalog.layouts.{self.name}")
        return df.select([pl.col(c).alias(f) for f, c in needed.items()])

    def items(self, path: Path, part: str, with_label: bool) -> pl.DataFrame:
        c = self.columns
        needed = {f: getattr(c, f) for f in FIELDS} | ({"label": c.label} if with_label else {})
        df = self.read(path, needed)
        ids = integer_column(df["id"], path, c.id, "item id")
        check_unique(ids, path, c.id)
        out = df.with_columns(
            id=ids, title=pl.col("title").fill_null(""), description=pl.col("description").fill_null(""),
            product_id=integer_column(df["product_id"], path, c.product_id, "product id"),
            image_id=integer_column(df["image_id"], path, c.image_id, "image id"), part=pl.lit(part),
        ).rename({"id": "item_id"})
        if not with_label:
            return out.with_columns(label=pl.lit(None, pl.Int64))
        return out.with_columns(label=integer_column(df["label"], path, c.label, "label"))

    def labels(self, path: Path, items: pl.DataFrame, x_path: Path) -> pl.DataFrame:
        c = self.columns
        df = self.read(path, {"id": c.id, "label": c.label})
        ids = integer_column(df["id"], path, c.id, "item id")
        codes = integer_column(df["label"], path, c.label, "label")
        if (dup := first_duplicate(ids)) is not None:
            raise CatalogError(f"{path}, row {dup[1] + 1}: duplicate label for item id {ids[dup[1]]}")
        in_x = ids.is_in(items["item_id"].implode())
        if not in_x.all():
            row = int((~in_x).arg_max())
            raise CatalogError(f"{path}, row {row + 1}: label for item id {ids[row]}, which is not in {x_path.name}")
        labelled = items["item_id"].is_in(ids.implode())
        if not labelled.all():
            row = int((~labelled).arg_max())
            raise CatalogError(f"{x_path}, row {row + 1}: item id {items['item_id'][row]} has no label in {path.name}")
        return items.join(pl.DataFrame({"item_id": ids, "label": codes}), on="item_id", how="left",
                          maintain_order="left")

    def photos(self, items: pl.DataFrame, directory: Path) -> pl.DataFrame:
        """Image path of every item from its ids, and whether the file is there (one listing per folder)."""
        name = self.layout.image_name
        head, _, rest = name.partition("{image_id}")
        mid, _, tail = rest.partition("{product_id}")
        if "{" in head + mid + tail:
            raise CatalogError(f"image_name '{name}' may use only {{image_id}} and {{product_id}}, in that order")
        paths = []
        for part, sub in self.layout.image_dirs.items():
            folder = directory / sub
            present = pl.Series(os.listdir(folder) if folder.is_dir() else [], dtype=pl.String)
            rows = items.filter(pl.col("part") == part)
            files = pl.concat_str([pl.lit(head), pl.col("image_id"), pl.lit(mid), pl.col("product_id"), pl.lit(tail)])
            rows = rows.with_columns(image_path=pl.lit(str(folder) + os.sep) + files,
                                     has_image=files.is_in(present.implode()))
            paths.append(rows.select("item_id", "image_path", "has_image"))
        return items.join(pl.concat(paths), on="item_id", how="left", maintain_order="left").with_columns(
            pl.col("has_image").fill_null(False), pl.col("image_path").fill_null(""))


def read_folder(directory: Path, name: str, layout: Layout, encoding: str,
                require_train: bool) -> tuple[pl.DataFrame, dict[str, Path]]:
    """The items of a folder layout (train, labels, test), and the files read."""
    reader = _Reader(name, layout, encoding)
    x_train = find(directory, layout.train, "train", name, required=require_train)
    x_test = find(directory, layout.test, "test", name, required=x_train is None)
    files: dict[str, Path] = {}
    items = None
    if x_train is not None:
        y_train = find(directory, layout.labels, "label", name, required=True)
        items = reader.items(x_train, "train", with_label=y_train is None)
        if y_train is not None:
            items = reader.labels(y_train, items.drop("label"), x_train)
        if len(items) == 0:  # nothing to learn from, and no split to draw
            raise CatalogError(f"{x_train}: no items below the header row")
        files = {"train": x_train} | ({"labels": y_train} if y_train else {})
    if x_test is not None:
        test = reader.items(x_test, "test", with_label=False)
        if items is not None:
            clash = test["item_id"].is_in(items["item_id"].implode())
            if clash.any():
                row = int(clash.arg_max())
                raise CatalogError(f"{x_test}, row {row + 1}: item id {test['item_id'][row]} is also in "
                                   f"{x_train.name}; item ids must be unique across train and test")
        items = test if items is None else pl.concat([items, test], how="vertical_relaxed")
        files["test"] = x_test
    items = reader.photos(items, directory)
    return items.with_columns(label_name=pl.lit(None, pl.String)), files
