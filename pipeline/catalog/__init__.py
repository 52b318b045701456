"""Catalogue ingest: a product table or a challenge folder -> one items table; the split; prediction files.

`load_catalog` reads the layout `[catalog] layout` names: "table" (a CSV, Parquet or JSON-lines table of
products, or a folder of them: pipeline.catalog.table), a folder layout of `[catalog.layouts]` (the Rakuten
challenge's files, the SIGIR TSV files, or the user's own: pipeline.catalog.folder), or "auto": a folder
whose files match a folder layout reads as that layout, any other table file or folder of them as "table".
Every layout gives the same items table (pipeline.catalog.items). Bad input stops with one message naming
the file, row and column; missing photos do not: they are counted and reported, and the image stage
records them as missing.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.catalog.folder import matches, read_folder
from pipeline.catalog.items import COLUMNS, Catalog, CatalogError, train_texts
from pipeline.catalog.outputs import probabilities_table, write_submission
from pipeline.catalog.split import SPLIT_FILE, class_codes, class_names, make_split, read_split, split_items
from pipeline.catalog.table import read_table, write_table

__all__ = ["Catalog", "CatalogError", "SPLIT_FILE", "class_codes", "class_names", "column_names", "layout_of", "load_catalog",
           "make_split", "probabilities_table", "rakuten_to_table", "read_split", "split_items", "train_texts",
           "write_submission"]


def column_names(settings, field: str) -> list[str]:
    """The names the catalogue's layouts give the item's `field` ("title", "description"): the configured
    layout's first, then the product table's and every folder layout's."""
    sets = [settings.table.columns, *(layout.columns for layout in settings.layouts.values())]
    if settings.layout in settings.layouts:
        sets.insert(0, settings.layouts[settings.layout].columns)
    return list(dict.fromkeys(getattr(s, field) for s in sets))


def layout_of(path: Path, cfg) -> str:
    """The layout `path` is read with: `[catalog] layout`, or for "auto" the first folder layout whose files
    `path` holds, else "table"."""
    name = cfg.catalog.layout
    if name != "auto":
        return name
    if path.is_dir():
        for layout, spec in cfg.catalog.layouts.items():
            if matches(path, spec):
                return layout
    return "table"


def load_catalog(path: str | Path, cfg, require_train: bool = True) -> Catalog:
    """Read the catalogue at `path` (a folder, or a table file) with the layout the config names.

    Without `require_train` (new items to predict), a folder holding only test items is enough."""
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"catalogue not found: {path}")
    layout = layout_of(path, cfg)
    if layout == "table":
        items, files = read_table(path, cfg.catalog.table, cfg.catalog.encoding)
        if require_train and not (items["part"] == "train").any():
            raise CatalogError(f"{path}: no row has a label (column '{cfg.catalog.table.columns.label}'); a "
                               "training catalogue needs labelled rows")
    elif path.is_dir():
        items, files = read_folder(path, layout, cfg.catalog.layouts[layout], cfg.catalog.encoding, require_train)
    else:
        raise CatalogError(f"{path}: layout '{layout}' reads a folder; give the catalogue's folder, or set "
                           f"[catalog] layout = \"table\" for a table file")
    return Catalog(path, items.select(COLUMNS), files)


def rakuten_to_table(directory: str | Path, cfg=None) -> Path:
    """A catalogue folder of the Rakuten layout rewritten as `products.csv` (photos where they are, referred
    to relative to it; test items unlabelled); the challenge's files are removed."""
    from pipeline.config import load_config

    directory = Path(directory)
    cfg = cfg or load_config()
    catalog = load_catalog(directory, cfg)
    out = directory / "products.csv"
    write_table(catalog.items, out)
    for path in catalog.files.values():
        path.unlink()
    return out
