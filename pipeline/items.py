"""New items as the Predictor reads them, and its answers in the caller's own kind of table.

Input: a pandas or polars DataFrame, a list of dicts (one per item) or a dict of columns, with `title`,
`description` (may be null), `image` (a file path or the photo's bytes, may be null; one column may mix
both) and optional `item_id`; the catalogue's own column names (`designation`, ... as the configured
layout names them) work too. Answers come back as the input came: pandas in, pandas out (indexed like
the input); polars in, polars out; numpy arrays for a list or a dict.

A photo that was given but cannot be used (a path that is not there or not a regular file, bytes that are
not an image, a file that does not decode) is never silently read as "no photo": each such item is named
in `Items.problems` (row -> what was wrong), which the Predictor reports (a warning, `missing_inputs`).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.catalog import column_names
from pipeline.config import Config
from pipeline.errors import PipelineError

NO_FILE = "image: no such file"
NOT_A_FILE = "image: not a regular file"
NOT_AN_IMAGE = "image: not an image"
UNREADABLE = "image: unreadable (the file does not decode)"


def _kind(data) -> str:
    module = type(data).__module__.split(".")[0]
    if module in ("pandas", "polars") and hasattr(data, "columns"):
        return module
    if isinstance(data, Mapping) or (isinstance(data, (list, tuple)) and all(isinstance(r, Mapping) for r in data)):
        return "records"
    raise PipelineError(f"items must be a pandas or polars DataFrame, a list of dicts or a dict of columns, "
                        f"not {type(data).__name__}")


def _is_null(v) -> bool:
    return v is None or (isinstance(v, float) and v != v) or type(v).__name__ in ("NAType", "NaTType")


def _columns(data, kind: str) -> dict[str, list]:
    """Every column as a Python list, nulls (None, NaN, pandas NA) as None."""
    if kind == "polars":
        return {c: data[c].to_list() for c in data.columns}
    if kind == "pandas":
        return {str(c): [None if _is_null(v) else v for v in data[c].tolist()] for c in data.columns}
    if isinstance(data, Mapping):
        cols = {str(c): list(v) for c, v in data.items()}
        if len({len(v) for v in cols.values()}) > 1:
            raise PipelineError(f"the columns have different lengths: {({c: len(v) for c, v in cols.items()})}")
        return cols
    names = list(dict.fromkeys(k for row in data for k in row))
    return {str(c): [row.get(c) for row in data] for c in names}


def _text(values: list) -> list[str]:
    return ["" if _is_null(v) else str(v) for v in values]


class Items:
    """A batch of new items: `frame` (item_id = row, title, description, image_path) as the extractors read
    it, what the caller gave (`kind`, `index`, `ids`), and `problems` (row -> [what could not be read]).
    Photos given as bytes are written to a temporary folder (named by content) for the duration of a call."""

    def __init__(self, data, cfg: Config):
        self.data, self.cfg, self._tmp = data, cfg, None
        self.kind = _kind(data)
        self.index = data.index if self.kind == "pandas" else None
        self.problems: dict[int, list[str]] = {}

    def __enter__(self) -> Items:
        cols = _columns(self.data, self.kind)
        for field in ("title", "description"):  # a catalogue's own column names work too ("designation", ...)
            own = [c for c in column_names(self.cfg.catalog, field) if c in cols]
            if field not in cols and own:
                cols[field] = cols[own[0]]
        if "title" not in cols:
            raise PipelineError(f"no title column among {list(cols)}: give `title` (and `description`, `image`)")
        n = len(cols["title"])
        self.ids = cols.get("item_id")
        self.frame = pl.DataFrame({
            "item_id": pl.Series(np.arange(n, dtype=np.int64)),  # row positions: the caller's ids may be anything
            "title": pl.Series(_text(cols["title"]), dtype=pl.String),
            "description": pl.Series(_text(cols.get("description", [None] * n)), dtype=pl.String),
            "image_path": pl.Series([self._path(row, x) for row, x in enumerate(cols.get("image", [None] * n))],
                                    dtype=pl.String),
        })
        return self

    def _path(self, row: int, image) -> str:
        """The file the image extractor reads for this row ("" = none), after checking what was given."""
        if _is_null(image):
            return ""
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self._bytes_path(row, bytes(image))
        if not isinstance(image, (str, os.PathLike)):
            raise PipelineError(f"row {row}: image must be a file path or the photo's bytes, not {type(image).__name__}")
        try:
            mode = os.stat(image).st_mode
        except OSError:
            return self.problem(row, NO_FILE)
        if not stat.S_ISREG(mode):  # a FIFO or a device would hang or never end; a folder is no photo
            return self.problem(row, NOT_A_FILE)
        return str(image)

    def _bytes_path(self, row: int, data: bytes) -> str:
        if not is_image(data):
            return self.problem(row, NOT_AN_IMAGE)
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="emde-predict-")
        path = Path(self._tmp.name) / f"{hashlib.sha256(data).hexdigest()[:32]}.img"
        path.write_bytes(data)
        return str(path)

    def problem(self, row: int, what: str) -> str:
        self.problems.setdefault(row, []).append(what)
        return ""

    def undecodable(self, rows: np.ndarray) -> None:
        """Rows whose photo file was read but did not decode (the image extractor's missing codes)."""
        for row in rows.tolist():
            if self.frame["image_path"][row] and UNREADABLE not in self.problems.get(row, []):
                self.problem(row, UNREADABLE)

    def missing_inputs(self) -> list[str]:
        """Per row: what was given but could not be read ("" for none)."""
        return ["; ".join(self.problems.get(row, [])) for row in range(len(self.frame))]

    def names(self, rows) -> str:
        """The first few rows with a problem, by the caller's item id where given, for a one-line message."""
        def name(row: int) -> str:
            return f"item_id {self.ids[row]}" if self.ids is not None else f"row {row}"
        shown = [f"{name(r)} ({'; '.join(self.problems[r])})" for r in list(rows)[:5]]
        return ", ".join(shown) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    # ------------------------------------------------------------------ answers in the caller's kind
    def series(self, values: np.ndarray, name: str):
        if self.kind == "pandas":
            import pandas as pd

            return pd.Series(values, index=self.index, name=name)
        return pl.Series(name, values) if self.kind == "polars" else values

    def table(self, values: np.ndarray, codes: list[int]):
        """(rows, classes) as a table with one column per class code (pandas: int labels; polars: strings)."""
        if self.kind == "pandas":
            import pandas as pd

            return pd.DataFrame(values, index=self.index, columns=list(codes))
        if self.kind == "polars":
            return pl.DataFrame({str(c): values[:, j] for j, c in enumerate(codes)})
        return values

    def frame_of(self, columns: dict):
        """Named columns as the caller's kind of table (polars for a list or a dict), with `item_id` first
        when the caller gave one."""
        cols = ({"item_id": self.ids} if self.ids is not None else {}) | columns
        if self.kind == "pandas":
            import pandas as pd

            return pd.DataFrame(cols, index=self.index)
        return pl.DataFrame(cols, strict=False)


def is_image(data: bytes) -> bool:
    """Whether Pillow recognises the bytes as an image (the header only; decoding comes later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.size  # noqa: B018  (the header is parsed)
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False
