"""Reading a catalogue's text files (CSV, TSV) without ever guessing: the bytes are checked in the configured
encoding (never decoded lossily), and a file that does not parse is refused in one line naming the row, and
the setting that reads it when its header row suggests another separator or encoding."""
from __future__ import annotations

import codecs
import csv
import io
import re
from pathlib import Path

import polars as pl

from pipeline.catalog.items import CatalogError

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


def read_csv(path: Path, encoding: str, separator: str, needed: dict[str, str], setting: str) -> pl.DataFrame:
    """Every column of the file, as text, once the `needed` ones ({field: column}) are checked to be there.

    `setting` is the config table whose `separator` reads the file (named when the header suggests another)."""
    data = _utf8_bytes(path, encoding, separator)
    try:
        df = pl.read_csv(data, separator=separator, infer_schema=False, quote_char='"', truncate_ragged_lines=False)
    except Exception as err:  # polars raises several exception types for malformed text files
        problem = _first_bad_row(data.decode("utf-8"), separator)
        if not problem:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            problem = f": cannot be read as a '{separator}'-separated table ({first})"
        raise CatalogError(f"{path}{problem}{_separator_hint(data, separator, setting)}") from None
    check_columns(df, path, needed, _separator_hint(data, separator, setting))
    return df


def check_columns(df: pl.DataFrame, path: Path, needed: dict[str, str], hint: str = "") -> None:
    """Refuse a table without one of the `needed` columns ({field: column}), listing the columns it has."""
    for field, column in needed.items():
        if column not in df.columns:
            shown = [c if c else "(unnamed index)" for c in df.columns]
            raise CatalogError(f"{path}, header row: missing column '{column or '(unnamed index)'}' "
                               f"(for the item's {field}); columns found: {shown}{hint}")


def _separator_hint(data: bytes, separator: str, setting: str) -> str:
    """When the header row is one field holding another separator: the setting that reads the file."""
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    if separator in header:
        return ""
    counts = {s: header.count(s) for s in _SEPARATORS if s != separator}
    other = max(counts, key=counts.get)
    if not counts[other]:
        return ""
    return (f" (the header row is one field: if the file is {other!r}-separated, set "
            f"[{setting}] separator = {other!r} in the config)")


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


