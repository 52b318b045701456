"""Catalogue ingest: the challenge's files -> one items table, and the train/valid/test split.

The items table (polars) has one row per item of the train and test files:

    item_id  int64   unique across train and test (the files' integer index)
    title    str     as given ("" when absent); never cleaned here
    description str  as given ("" when absent)
    product_id, image_id  int64
    image_path  str  where its photo should be
    has_image   bool whether that file exists
    part     str     "train" or "test" (which file it came from)
    label    int64   product type code (null for test items)

Bad input stops with one message naming the file, row and column. Missing photos do not: they
are counted and reported, and the image stage records them as missing.
"""
from __future__ import annotations

import codecs
import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.schema import Catalog as CatalogSettings, Layout
from pipeline.text import clean_description
from pipeline.errors import PipelineError
from pipeline.provenance import atomic_path, write_parquet

FIELDS = ("id", "title", "description", "product_id", "image_id")
SPLIT_FILE = "split.parquet"


class CatalogError(PipelineError):
    """The catalogue's files cannot be read as the configured layout."""


@dataclass
class Catalog:
    directory: Path
    items: pl.DataFrame
    files: dict[str, Path]

    @property
    def missing_images(self) -> int:
        return int((~self.items["has_image"]).sum())

    def summary(self) -> str:
        parts = self.items["part"].value_counts()
        counts = dict(zip(parts["part"], parts["count"]))
        return (f"{self.directory}: {counts.get('train', 0)} train and {counts.get('test', 0)} test items, "
                f"{self.items.filter(pl.col('part') == 'train')['label'].n_unique()} classes, "
                f"{self.missing_images} missing image(s)")


def _find(directory: Path, pattern: str, what: str, layout: str, required: bool) -> Path | None:
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


_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
              (b"\xfe\xff", "UTF-16"))
_SEPARATORS = (",", ";", "\t", "|")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that did not decode, under errors="surrogateescape"


def _check_text(path: Path, data: bytes) -> None:
    """Refuse, saying what to do, the text that would otherwise read as a wrong header: UTF-16/32 (with or
    without a byte-order mark) and line ends of a carriage return alone."""
    head = data[: 1 << 16]
    for bom, encoding in _WIDE_BOMS:
        if head.startswith(bom):
            raise CatalogError(f"{path}: {encoding} text; save it as UTF-8 (iconv -f {encoding} -t UTF-8) or "
                               f"set [catalog] encoding = \"{encoding.lower()}\"")
    if b"\x00" in head.split(b"\n", 1)[0]:
        raise CatalogError(f"{path}: NUL bytes in the header row (UTF-16 or UTF-32 text without a byte-order "
                           "mark?); save it as UTF-8")
    if b"\r" in head and b"\n" not in head:
        raise CatalogError(f"{path}: lines end with a carriage return alone (old Mac line ends); convert them "
                           "to \\n or \\r\\n")


def _utf8_bytes(path: Path, encoding: str, separator: str) -> bytes:
    """The file's text as UTF-8 bytes: checked when `encoding` is UTF-8, decoded from `encoding` otherwise.

    Never lossy: a byte that is not valid in `encoding` is refused, naming its row and the setting to use."""
    raw = path.read_bytes()
    utf8 = codecs.lookup(encoding).name == "utf-8"
    if utf8:  # a wide encoding would otherwise read as bad bytes: say what it is
        _check_text(path, raw)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise CatalogError(_not_in_encoding(path, raw, err, encoding, separator)) from None
    if utf8:
        return raw
    data = text.encode("utf-8")
    _check_text(path, data)
    return data


def _not_in_encoding(path: Path, raw: bytes, err: UnicodeDecodeError, encoding: str, separator: str) -> str:
    """"FILE, row N, column 'C': byte 0xE9 is not valid utf-8 text; ... [catalog] encoding = ..."."""
    line = raw.count(b"\n", 0, err.start) + 1
    where = f"line {line}"
    try:  # the row and column of the first bad byte (surrogateescape marks it with a lone surrogate)
        text = raw.decode(encoding, "surrogateescape")
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=separator, quotechar='"')
        header = None
        for n, row in enumerate(rows):
            header = row if header is None else header
            bad = [i for i, field in enumerate(row) if _has_surrogate(field)]
            if bad:
                column = header[bad[0]] if bad[0] < len(header) else f"#{bad[0] + 1}"
                where = "header row" if n == 0 else f"row {n}, column '{column or '(unnamed index)'}'"
                break
    except (csv.Error, UnicodeError):
        pass
    guess = next(e for e in ("cp1252", "latin-1") if _decodes(raw, e))
    return (f"{path}, {where}: byte 0x{raw[err.start]:02X} is not valid {encoding}; name the file's encoding "
            f"in the config ([catalog] encoding = \"{guess}\", say), or save the file as {encoding}")


def _has_surrogate(text: str) -> bool:
    return _ESCAPED_BYTE.search(text) is not None


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def _read_table(path: Path, catalog: CatalogSettings, needed: dict[str, str]) -> pl.DataFrame:
    """Read every column as text, check the needed ones exist, rename them to our field names."""
    separator = catalog.layouts[catalog.layout].separator
    data = _utf8_bytes(path, catalog.encoding, separator)
    try:
        df = pl.read_csv(data, separator=separator, infer_schema=False, quote_char='"', truncate_ragged_lines=False)
    except Exception as err:  # polars raises several exception types for malformed text files
        problem = _first_bad_row(data.decode("utf-8"), separator)
        if not problem:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            problem = f": cannot be read as a '{separator}'-separated table ({first})"
        raise CatalogError(f"{path}{problem}{_separator_hint(data, catalog)}") from None
    for field, column in needed.items():
        if column not in df.columns:
            shown = [c if c else "(unnamed index)" for c in df.columns]
            raise CatalogError(f"{path}, header row: missing column '{column or '(unnamed index)'}' "
                               f"(for the item's {field}); columns found: {shown}{_separator_hint(data, catalog)}")
    return df.select([pl.col(c).alias(f) for f, c in needed.items()])


def _separator_hint(data: bytes, catalog: CatalogSettings) -> str:
    """When the header row is one field holding another separator: the setting that reads the file."""
    separator = catalog.layouts[catalog.layout].separator
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    if separator in header:
        return ""
    counts = {s: header.count(s) for s in _SEPARATORS if s != separator}
    other = max(counts, key=counts.get)
    if not counts[other]:
        return ""
    return (f" (the header row is one field: if the file is {other!r}-separated, set "
            f"[catalog.layouts.{catalog.layout}] separator = {other!r} in the config)")


def _first_bad_row(text: str, separator: str) -> str:
    """", row N: what is wrong" for the first row that does not parse or does not fit the header, or ""."""
    line = _unclosed_quote_line(text)
    if line is not None:
        before = "\n".join(text.split("\n")[: line - 1])  # balanced: every quote before it is closed
        n = len(list(csv.reader(io.StringIO(before, newline=""), delimiter=separator, quotechar='"')))
        where = "header row" if n == 0 else f"row {n}"
        return (f", {where}: the '\"' on line {line} is never closed (an unbalanced quote); a field holding the "
                f"separator, a quote or a line break must be quoted, with its own quotes doubled")
    try:
        rows = csv.reader(io.StringIO(text, newline=""), delimiter=separator, quotechar='"', strict=True)
        header = next(rows, [])
        for n, row in enumerate(rows, 1):
            if row and len(row) != len(header):
                return f", row {n}: {len(row)} fields where the header row has {len(header)}"
    except csv.Error as err:
        return f", line {rows.line_num}: {err}"
    return ""


def _unclosed_quote_line(text: str) -> int | None:
    """The line of the '"' that is never closed: the file holds an odd number of quotes, and from this line
    on the count stays odd."""
    odd, opened = False, None
    for number, line in enumerate(text.split("\n"), 1):
        if line.count('"') % 2:
            odd = not odd
            opened = number if odd else opened
    return opened if odd else None


def _integer_column(df: pl.DataFrame, field: str, column: str, path: Path, what: str) -> pl.Series:
    """Cast a text column to int64, naming the first row that is not an integer."""
    raw = df[field].str.strip_chars()
    values = raw.cast(pl.Int64, strict=False)
    bad = values.is_null()
    if bad.any():
        row = int(bad.arg_max())
        if raw[row] is None or not raw[row]:
            problem = "is empty"
        elif re.fullmatch(r"[+-]?[0-9]+", raw[row]):
            problem = f"{raw[row]} is out of the 64-bit integer range"
        else:
            problem = f"{raw[row]!r} is not an integer"
        raise CatalogError(f"{path}, row {row + 1}, column '{column or '(unnamed index)'}': {what} {problem}")
    return values


def _first_duplicate(ids: pl.Series) -> tuple[int, int] | None:
    dup = ids.is_duplicated()
    if not dup.any():
        return None
    rows = np.flatnonzero(dup.to_numpy() & (ids == ids[int(dup.arg_max())]).to_numpy())
    return int(rows[0]), int(rows[1])


def _read_items(path: Path, catalog: CatalogSettings, part: str, with_label: bool) -> pl.DataFrame:
    columns = catalog.layouts[catalog.layout].columns
    needed = {f: getattr(columns, f) for f in FIELDS} | ({"label": columns.label} if with_label else {})
    df = _read_table(path, catalog, needed)
    ids = _integer_column(df, "id", columns.id, path, "item id")
    if (dup := _first_duplicate(ids)) is not None:
        raise CatalogError(f"{path}, row {dup[1] + 1}, column '{columns.id or '(unnamed index)'}': "
                           f"duplicate item id {ids[dup[1]]} (first at row {dup[0] + 1})")
    out = df.with_columns(
        id=ids,
        title=pl.col("title").fill_null(""),
        description=pl.col("description").fill_null(""),
        product_id=_integer_column(df, "product_id", columns.product_id, path, "product id"),
        image_id=_integer_column(df, "image_id", columns.image_id, path, "image id"),
        part=pl.lit(part),
    ).rename({"id": "item_id"})
    if with_label:
        out = out.with_columns(label=_integer_column(df, "label", columns.label, path, "label"))
        if out["label"].is_null().any():
            row = int(out["label"].is_null().arg_max())
            raise CatalogError(f"{path}, row {row + 1}, column '{columns.label}': empty label")
    return out


def _read_labels(path: Path, catalog: CatalogSettings, items: pl.DataFrame, x_path: Path) -> pl.DataFrame:
    columns = catalog.layouts[catalog.layout].columns
    df = _read_table(path, catalog, {"id": columns.id, "label": columns.label})
    ids = _integer_column(df, "id", columns.id, path, "item id")
    labels = _integer_column(df, "label", columns.label, path, "label")
    if (dup := _first_duplicate(ids)) is not None:
        raise CatalogError(f"{path}, row {dup[1] + 1}: duplicate label for item id {ids[dup[1]]}")
    in_x = ids.is_in(items["item_id"].implode())
    if not in_x.all():
        row = int((~in_x).arg_max())
        raise CatalogError(f"{path}, row {row + 1}: label for item id {ids[row]}, which is not in {x_path.name}")
    labelled = items["item_id"].is_in(ids.implode())
    if not labelled.all():
        row = int((~labelled).arg_max())
        raise CatalogError(f"{x_path}, row {row + 1}: item id {items['item_id'][row]} has no label in {path.name}")
    if labels.is_null().any():
        row = int(labels.is_null().arg_max())
        raise CatalogError(f"{path}, row {row + 1}, column '{columns.label}': empty label")
    return items.join(pl.DataFrame({"item_id": ids, "label": labels}), on="item_id", how="left",
                      maintain_order="left")


def _resolve_images(items: pl.DataFrame, directory: Path, layout: Layout) -> pl.DataFrame:
    """Image path of every item from its ids, and whether the file is there (one listing per folder)."""
    name = layout.image_name
    head, _, rest = name.partition("{image_id}")
    mid, _, tail = rest.partition("{product_id}")
    if "{" in head + mid + tail:
        raise CatalogError(f"image_name '{name}' may use only {{image_id}} and {{product_id}}, in that order")
    paths = []
    for part, sub in layout.image_dirs.items():
        folder = directory / sub
        present = pl.Series(os.listdir(folder) if folder.is_dir() else [], dtype=pl.String)
        rows = items.filter(pl.col("part") == part)
        files = pl.concat_str([pl.lit(head), pl.col("image_id"), pl.lit(mid), pl.col("product_id"), pl.lit(tail)])
        rows = rows.with_columns(image_path=pl.lit(str(folder) + os.sep) + files,
                                 has_image=files.is_in(present.implode()))
        paths.append(rows.select("item_id", "image_path", "has_image"))
    return items.join(pl.concat(paths), on="item_id", how="left", maintain_order="left").with_columns(
        pl.col("has_image").fill_null(False), pl.col("image_path").fill_null(""))


def load_catalog(directory: str | Path, cfg, require_train: bool = True) -> Catalog:
    """Read the catalogue in `directory` with the layout the config names.

    Without `require_train` (new items to predict), a folder holding only test items is enough.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CatalogError(f"catalogue folder not found: {directory}")
    name = cfg.catalog.layout
    layout = cfg.catalog.layouts[name]
    x_train = _find(directory, layout.train, "train", name, required=require_train)
    x_test = _find(directory, layout.test, "test", name, required=x_train is None)
    if x_train is not None:
        y_train = _find(directory, layout.labels, "label", name, required=True)
        items = _read_items(x_train, cfg.catalog, "train", with_label=y_train is None)
        if y_train is not None:
            items = _read_labels(y_train, cfg.catalog, items, x_train)
        if len(items) == 0:  # nothing to learn from, and no split to draw
            raise CatalogError(f"{x_train}: no items below the header row")
        files = {"train": x_train} | ({"labels": y_train} if y_train else {})
    else:
        items = _read_items(x_test, cfg.catalog, "test", with_label=False).with_columns(label=pl.lit(None, pl.Int64))
        files, x_test = {"test": x_test}, None
    if x_test is not None:
        test = _read_items(x_test, cfg.catalog, "test", with_label=False).with_columns(label=pl.lit(None, pl.Int64))
        clash = test["item_id"].is_in(items["item_id"].implode())
        if clash.any():
            row = int(clash.arg_max())
            raise CatalogError(f"{x_test}, row {row + 1}: item id {test['item_id'][row]} is also in "
                               f"{x_train.name}; item ids must be unique across train and test")
        items = pl.concat([items, test], how="vertical_relaxed")
        files["test"] = x_test
    items = _resolve_images(items, directory, layout)
    return Catalog(directory, items.select(
        "item_id", "title", "description", "product_id", "image_id", "image_path", "has_image", "part", "label"
    ), files)


def train_texts(train_items: pl.DataFrame) -> list[str]:
    """Titles and cleaned descriptions of the train items (what a tiny text model learns from)."""
    return train_items["title"].to_list() + [clean_description(d) for d in train_items["description"].to_list() if d]


# ---------------------------------------------------------------------- the split table
def read_split(workdir: str | Path, hint: str = "") -> pl.DataFrame:
    """W/split.parquet (item_id, split, label), or one line saying which command builds it."""
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
    return split


def _draw_split(items: pl.DataFrame, opts) -> pl.DataFrame:
    """Paper 3.3: `valid_items` train items held out with a fixed seed (a proportional share for a
    catalogue smaller than `reference_train_items`)."""
    train_ids = items.filter(pl.col("part") == "train")["item_id"].sort().to_numpy()
    n_valid = opts.valid_items
    if len(train_ids) < opts.reference_train_items:
        n_valid = max(1, round(n_valid * len(train_ids) / opts.reference_train_items))
    rng = np.random.default_rng(opts.seed)
    valid = rng.choice(train_ids, size=min(n_valid, len(train_ids) - 1), replace=False)
    return items.select(
        "item_id",
        split=pl.when(pl.col("item_id").is_in(valid)).then(pl.lit("valid")).otherwise(pl.col("part")),
        label="label",
    )


def make_split(catalog: Catalog, cfg, workdir: str | Path) -> pl.DataFrame:
    """The split table (item_id, split, label), written once to W/split.parquet and reused.

    A run on a grown catalogue keeps every existing assignment and adds new items as train or test;
    a relabelled item is refused (the work directory belongs to another catalogue).
    """
    path = Path(workdir) / SPLIT_FILE
    items = catalog.items.select("item_id", "part", "label")
    if not path.exists():
        split = _draw_split(items, cfg.split)
    else:
        split = read_split(workdir)
        both = split.join(items, on="item_id", how="inner", suffix="_now")
        changed = both.filter(pl.col("label").ne_missing(pl.col("label_now")))
        if len(changed):
            row = changed.row(0, named=True)
            raise CatalogError(f"{catalog.files['train']}: item {row['item_id']} is labelled {row['label_now']} "
                               f"but {path} holds {row['label']}; the catalogue changed under this work "
                               f"directory: use a new --workdir (or delete {path} and every stage's output)")
        new = items.filter(~pl.col("item_id").is_in(split["item_id"].implode()))
        if len(new) == 0:
            return split
        split = pl.concat([split, new.select("item_id", split=pl.col("part"), label="label")])
    write_parquet(split, path)  # atomically: shard workers starting together write the same table
    return split


def split_items(catalog: Catalog, split: pl.DataFrame, part: str) -> pl.DataFrame:
    """The catalogue's items of one part of the split ("train", "valid", "test")."""
    ids = split.filter(pl.col("split") == part)["item_id"].implode()
    return catalog.items.filter(pl.col("item_id").is_in(ids))


def class_codes(split: pl.DataFrame) -> list[int]:
    """Product type codes of the training items, sorted: class index i <-> code class_codes[i]."""
    return sorted(split.filter(pl.col("split") != "test")["label"].unique().to_list())


def write_submission(path: str | Path, ids, codes) -> None:
    """Predictions in the challenge's submission format: a `,prdtypecode` header, then `item_id,code` rows."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(",prdtypecode\n")  # polars would quote the empty index name
        pl.DataFrame({"item_id": np.asarray(ids, np.int64), "code": np.asarray(codes, np.int64)}) \
            .write_csv(fh, include_header=False)


def probabilities_table(ids, probs: np.ndarray, codes: list[int]) -> pl.DataFrame:
    """Predictions with their probabilities: item_id, prdtypecode (the most probable code), probability (of
    that code), and p_<code> for every class (probs: (items, classes), column j for codes[j])."""
    probs = np.asarray(probs, np.float32)
    return pl.DataFrame({"item_id": np.asarray(ids, np.int64), "prdtypecode": np.asarray(codes, np.int64)[probs.argmax(-1)],
                         "probability": probs.max(-1)} | {f"p_{c}": probs[:, i] for i, c in enumerate(codes)})
