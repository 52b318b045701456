"""A table of products: one row per item, in a CSV (.csv, .tsv), Parquet (.parquet) or JSON-lines (.jsonl,
.ndjson) file, or a folder of such files read together.

The columns are named in `[catalog.table] columns` (defaults `item_id`, `title`, `description`, `image`,
`label`); only the id and the title are required. `image` is a photo's path, relative to the table's own
folder (absolute paths work too); `label` is a class code or name, and a row without one is an item to
predict. Every value is read as text, so a CSV, a Parquet file and a JSON-lines file of the same products
give the same items.
"""
from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from pipeline.catalog.items import CatalogError, check_unique, integer_column, labels
from pipeline.catalog.text_files import check_columns, read_csv
from pipeline.schema import Table

SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".ndjson")
OPTIONAL = ("description", "image", "label")


def table_files(path: Path) -> list[Path]:
    """The table files `path` names: itself, or the table files of a folder (sorted); [] when none."""
    if path.is_file():
        return [path] if path.suffix.lower() in SUFFIXES else []
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not p.name.startswith("."))


def _read_any(path: Path, table: Table, encoding: str) -> pl.DataFrame:
    """Every column of one file as text (nulls where a field is empty or absent)."""
    needed = {"id": table.columns.id, "title": table.columns.title}
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return read_csv(path, encoding, "\t" if suffix == ".tsv" else table.separator, needed, "catalog.table")
    try:
        df = pl.read_parquet(path) if suffix == ".parquet" else pl.read_ndjson(path, infer_schema_length=None)
    except Exception as err:  # polars/arrow raise several kinds for a damaged or foreign file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CatalogError(f"{path}: cannot be read as {suffix[1:]} ({first[:200]})") from None
    check_columns(df, path, needed)
    nested = [c for c, t in df.schema.items() if t.is_nested() and c in table.columns.model_dump().values()]
    if nested:
        raise CatalogError(f"{path}, column '{nested[0]}': holds lists or records; a product field is one value")
    # ids and codes written as floats (pandas does, when a column has a missing value): 12.0 is the integer 12
    whole = [c for c, t in df.schema.items() if t.is_float() and c in (table.columns.id, table.columns.label)
             and (df[c].drop_nulls() % 1 == 0).all()]
    return df.with_columns(pl.col(whole).cast(pl.Int64)).with_columns(pl.all().cast(pl.String))


def _items(path: Path, table: Table, encoding: str) -> pl.DataFrame:
    """The items of one table file, in the items table's columns."""
    c = table.columns
    raw = _read_any(path, table, encoding)
    named = {f: getattr(c, f) for f in ("id", "title") + OPTIONAL}
    df = raw.select([(pl.col(n) if n in raw.columns else pl.lit(None, pl.String)).alias(f) for f, n in named.items()])
    ids = integer_column(df["id"], path, c.id, "item id")
    check_unique(ids, path, c.id)
    codes, names = labels(df["label"])
    photos = df["image"].str.strip_chars().fill_null("").to_list()
    image_path = [str(p if Path(p).is_absolute() else path.parent / p) if p else "" for p in photos]
    none = pl.Series([None] * len(df), dtype=pl.Int64)
    return pl.DataFrame({
        "item_id": ids, "title": df["title"].fill_null(""), "description": df["description"].fill_null(""),
        "product_id": none, "image_id": none,
        "image_path": pl.Series(image_path, dtype=pl.String), "has_image": [bool(p) and os.path.isfile(p) for p in image_path],
        "part": pl.Series(["train" if has else "test" for has in (codes.is_not_null() | names.is_not_null())],
                          dtype=pl.String),
        "label": codes, "label_name": names,
    })


def read_table(path: Path, table: Table, encoding: str) -> tuple[pl.DataFrame, dict[str, Path]]:
    """The items of a table file, or of every table file of a folder (ids unique across them)."""
    files = table_files(path)
    if not files:
        raise CatalogError(f"{path}: no product table ({', '.join(SUFFIXES)}) there")
    parts = [_items(f, table, encoding) for f in files]
    items = pl.concat(parts, how="vertical_relaxed")
    dup = items["item_id"].is_duplicated()
    if dup.any():
        item = items["item_id"][int(dup.arg_max())]
        where = [f.name for f, p in zip(files, parts) if (p["item_id"] == item).any()]
        raise CatalogError(f"{path}: item id {item} is in {' and '.join(where)}; item ids must be unique "
                           "across the table files")
    if items["label"].is_not_null().any() and items["label_name"].is_not_null().any():
        raise CatalogError(f"{path}: some files label with codes (integers), others with names; use one kind")
    return items, {"table": path}


def write_table(items: pl.DataFrame, path: Path) -> None:
    """An items table (as read from any layout) as a product table: item_id, title, description, image
    (relative to the table's folder), label."""
    base = path.parent.resolve()
    image = [os.path.relpath(p, base) if has else "" for p, has in zip(items["image_path"], items["has_image"])]
    label = items["label"].cast(pl.String) if items["label_name"].is_null().all() else items["label_name"]
    pl.DataFrame({"item_id": items["item_id"], "title": items["title"], "description": items["description"],
                  "image": image, "label": label}).write_csv(path)
