"""Catalogue ingest: product tables and the challenge layouts, the split table, and one clear message per kind of
bad input."""
from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline.catalog import (CatalogError, class_codes, class_names, load_catalog, make_split, rakuten_to_table,
                              read_split)
from pipeline.config import load_config
from pipeline.synth import synthesize
from tests.conftest import Log

CFG = load_config("configs/tiny.toml")

X_HEADER = ",designation,description,productid,imageid\n"


def write_catalog(d: Path, x_rows: list[str], y_rows: list[str], test_rows: list[str] | None = None,
                  images: list[tuple[str, str, str]] = ()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "X_train.csv").write_text(X_HEADER + "".join(r + "\n" for r in x_rows))
    (d / "Y_train.csv").write_text(",prdtypecode\n" + "".join(r + "\n" for r in y_rows))
    if test_rows is not None:
        (d / "X_test.csv").write_text(X_HEADER + "".join(r + "\n" for r in test_rows))
    for part, image_id, product_id in images:
        (d / f"image_{part}").mkdir(exist_ok=True)
        (d / f"image_{part}" / f"image_{image_id}_product_{product_id}.jpg").write_bytes(b"jpeg")
    return d


GOOD_X = ['0,Livre de cuisine,"<b>Recettes</b>, avec retour\nà la ligne",11,21', "1,Jeu de cartes,,12,22",
          "2,Peluche ours,Doux,13,23"]
GOOD_Y = ["0,2705", "1,1281", "2,1280"]


def test_rakuten_layout_reads_items_images_and_labels(tmp_path):
    d = write_catalog(tmp_path, GOOD_X, GOOD_Y, ["3,Lego city,,14,24"],
                      images=[("train", "21", "11"), ("train", "23", "13"), ("test", "24", "14")])
    cat = load_catalog(d, CFG)
    items = cat.items
    assert items["item_id"].to_list() == [0, 1, 2, 3]
    assert items["part"].to_list() == ["train", "train", "train", "test"]
    assert items["label"].to_list() == [2705, 1281, 1280, None]
    assert items["description"][0] == "<b>Recettes</b>, avec retour\nà la ligne"  # kept as is
    assert items["description"][1] == ""
    assert items["has_image"].to_list() == [True, False, True, True]
    assert items["image_path"][3].endswith("image_test/image_24_product_14.jpg")
    assert cat.missing_images == 1 and "1 missing image(s)" in cat.summary()


def test_sigir_tsv_layout_through_the_column_mapping(tmp_path):
    (tmp_path / "data_train.tsv").write_text(
        "Integer_id\tTitle\tDescription\tImage_id\tProduct_id\tPrdtypecode\n"
        "5\tTitre un\t\t31\t41\t10\n6\tTitre deux\tDesc\t32\t42\t40\n")
    cfg = CFG.merged({"catalog": {"layout": "sigir"}})
    items = load_catalog(tmp_path, cfg).items
    assert items["item_id"].to_list() == [5, 6] and items["label"].to_list() == [10, 40]
    assert items["title"].to_list() == ["Titre un", "Titre deux"]


@pytest.mark.parametrize("x_rows, y_rows, test_rows, message", [
    # A column missing from the header.
    (None, GOOD_Y, None, r"X_train.csv, header row: missing column 'description'"),
    # An id that is not an integer.
    (["0,a,,11,21", "x1,b,,12,22", "2,c,,13,23"], GOOD_Y, None,
     r"X_train.csv, row 2, column '\(unnamed index\)': item id 'x1' is not an integer"),
    # The same id twice.
    (["0,a,,11,21", "1,b,,12,22", "1,c,,13,23"], GOOD_Y, None,
     r"X_train.csv, row 3, column '\(unnamed index\)': duplicate item id 1 \(first at row 2\)"),
    # A label for an item that is not in X.
    (GOOD_X, GOOD_Y + ["9,10"], None, r"Y_train.csv, row 4: label for item id 9, which is not in X_train.csv"),
    # An item without a label.
    (GOOD_X, GOOD_Y[:2], None, r"X_train.csv, row 3: item id 2 has no label in Y_train.csv"),
    # A label that is not a number.
    (GOOD_X, ["0,2705", "1,toys", "2,1280"], None,
     r"Y_train.csv, row 2, column 'prdtypecode': label 'toys' is not an integer"),
    # A test id that is also a train id.
    (GOOD_X, GOOD_Y, ["2,d,,15,25"], r"X_test.csv, row 1: item id 2 is also in X_train.csv"),
    # A non-numeric image id (image paths are built from it).
    (["0,a,,11,21", "1,b,,12,img", "2,c,,13,23"], GOOD_Y, None,
     r"X_train.csv, row 2, column 'imageid': image id 'img' is not an integer"),
])
def test_bad_input_gets_one_message_naming_file_row_column(tmp_path, x_rows, y_rows, test_rows, message):
    d = write_catalog(tmp_path, x_rows or [], y_rows, test_rows)
    if x_rows is None:  # rewrite the header without the description column
        (d / "X_train.csv").write_text(",designation,productid,imageid\n0,a,11,21\n")
    with pytest.raises(CatalogError, match=message):
        load_catalog(d, CFG)


def test_missing_files_and_folders_are_named(tmp_path):
    with pytest.raises(CatalogError, match="catalogue not found"):
        load_catalog(tmp_path / "nope", CFG)
    tmp_path.joinpath("X_train.csv").write_text(X_HEADER)
    with pytest.raises(CatalogError, match=r"no label file matching 'Y_train\*.csv' \(layout 'rakuten'"):
        load_catalog(tmp_path, CFG)


def _many_items(tmp_path: Path, n: int, test: int = 0) -> Path:
    x = [f"{i},t{i},,{100 + i},{200 + i}" for i in range(n)]
    y = [f"{i},{(10, 40, 50)[i % 3]}" for i in range(n)]
    t = [f"{n + i},t{n + i},,{900 + i},{990 + i}" for i in range(test)]
    return write_catalog(tmp_path, x, y, t)


def test_split_is_proportional_seeded_and_written_once(tmp_path):
    d = _many_items(tmp_path / "cat", 1000, test=50)
    cfg = load_config("configs/default.toml")
    split = make_split(load_catalog(d, cfg), cfg, tmp_path / "w")
    counts = dict(split.group_by("split").len().iter_rows())
    assert counts == {"train": 1000 - 47, "valid": 47, "test": 50}  # 4000 * 1000 / 84916 = 47.1
    assert split.filter(pl.col("split") == "test")["label"].is_null().all()
    again = make_split(load_catalog(d, cfg), cfg, tmp_path / "w2")
    assert again.equals(split)  # same seed, same split
    reseeded = cfg.merged({"split": {"seed": 1}})
    assert make_split(load_catalog(d, cfg), reseeded, tmp_path / "w").equals(split)  # written once, reused
    assert not make_split(load_catalog(d, cfg), reseeded, tmp_path / "w3").equals(split)
    assert class_codes(split) == [10, 40, 50]


def test_scale_benchmark_holds_out_the_same_share_at_every_size(tmp_path):
    """benchmarks/scale.py reads each stage's growth against the catalogue's size: its split must keep the
    train part a fixed share of it (a capped validation part makes training look super-linear)."""
    cfg = load_config("benchmarks/scale.toml")
    shares = []
    for n in (5_000, 40_000):
        split = make_split(load_catalog(_many_items(tmp_path / f"cat{n}", n), cfg), cfg, tmp_path / f"w{n}")
        shares.append((split["split"] == "train").mean())
    assert shares[0] == pytest.approx(0.8, abs=1e-3) and shares[1] == pytest.approx(0.8, abs=1e-3)


def test_split_keeps_assignments_when_the_catalogue_grows(tmp_path):
    cfg = load_config("configs/default.toml")
    split = make_split(load_catalog(_many_items(tmp_path / "a", 600), cfg), cfg, tmp_path / "w")
    grown = make_split(load_catalog(_many_items(tmp_path / "b", 700, test=5), cfg), cfg, tmp_path / "w")
    assert grown.head(600).equals(split)
    assert grown.tail(105)["split"].to_list() == ["train"] * 100 + ["test"] * 5


def test_split_refuses_a_relabelled_item(tmp_path):
    d = write_catalog(tmp_path / "c", GOOD_X, GOOD_Y)
    make_split(load_catalog(d, CFG), CFG, tmp_path / "w")
    write_catalog(tmp_path / "c", GOOD_X, ["0,2705", "1,1281", "2,10"])
    with pytest.raises(CatalogError, match="item 2 is labelled 10 but .*split.parquet holds 1280"):
        make_split(load_catalog(d, CFG), CFG, tmp_path / "w")


def test_real_rakuten_sample_reads_when_present():
    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "rakuten-real"
    if not real.is_dir():
        pytest.skip(f"real Rakuten sample not present at {real}")
    cat = load_catalog(real, load_config("configs/default.toml"))
    train = cat.items.filter(pl.col("part") == "train")
    assert len(train) == 6616 and train["label"].n_unique() == 27
    assert 700 <= int(train["has_image"].sum()) <= 2026  # text and images cover different items


# ---------------------------------------------------------------------- product tables
TABLE = ("item_id,title,description,image,label\n"
         "10,Livre de cuisine,Recettes,photos/a.jpg,livres\n"
         '11,"Jeu, de cartes",,,jeux\n'
         "12,Peluche ours,Doux,photos/missing.jpg,\n")


def _table(d: Path, text: str = TABLE, name: str = "products.csv") -> Path:
    (d / "photos").mkdir(parents=True, exist_ok=True)
    (d / "photos" / "a.jpg").write_bytes(b"jpeg")
    (d / name).write_text(text)
    return d / name


def test_a_product_table_reads_by_itself_with_photos_beside_it(tmp_path):
    items = load_catalog(_table(tmp_path), CFG).items  # [catalog] layout "auto": a .csv file is a table
    assert items["item_id"].to_list() == [10, 11, 12]
    assert items["title"].to_list() == ["Livre de cuisine", "Jeu, de cartes", "Peluche ours"]
    assert items["description"].to_list() == ["Recettes", "", "Doux"]
    assert items["part"].to_list() == ["train", "train", "test"]  # no label: an item to predict
    assert items["label_name"].to_list() == ["livres", "jeux", None] and items["label"].is_null().all()
    assert items["image_path"][0] == str(tmp_path / "photos" / "a.jpg")  # relative to the table
    assert items["has_image"].to_list() == [True, False, False]


def test_parquet_json_lines_and_a_folder_of_tables_give_the_same_items(tmp_path):
    csv = load_catalog(_table(tmp_path / "csv"), CFG).items
    frame = pl.read_csv(tmp_path / "csv" / "products.csv", infer_schema=False)
    _table(tmp_path / "pq", "")
    frame.write_parquet(tmp_path / "pq" / "products.csv".replace(".csv", ".parquet"))
    (tmp_path / "pq" / "products.csv").unlink()
    _table(tmp_path / "js", "")
    frame.with_columns(pl.col("item_id").cast(pl.Int64)).write_ndjson(tmp_path / "js" / "products.jsonl")
    (tmp_path / "js" / "products.csv").unlink()
    for d in ("pq", "js"):
        got = load_catalog(tmp_path / d, CFG).items
        assert got.drop("image_path").equals(csv.drop("image_path")), d
    folder = tmp_path / "two"
    _table(folder, TABLE.split("12,")[0], "a.csv")
    (folder / "b.csv").write_text("item_id,title\n12,Peluche ours\n")
    both = load_catalog(folder, CFG).items
    assert both["item_id"].to_list() == [10, 11, 12] and both["part"].to_list() == ["train", "train", "test"]


def test_ids_and_codes_saved_as_floats_read_as_integers(tmp_path):
    """pandas writes an integer column with a missing value as floats: 12.0 is item 12, 1280.0 the code 1280."""
    pl.DataFrame({"item_id": [12.0, 13.0], "title": ["a", "b"], "label": [1280.0, None]}).write_parquet(tmp_path / "t.parquet")
    items = load_catalog(tmp_path / "t.parquet", CFG).items
    assert items["item_id"].to_list() == [12, 13] and items["label"].to_list() == [1280, None]
    assert items["part"].to_list() == ["train", "test"]


@pytest.mark.parametrize("text, message", [
    ("id,title\n1,a\n", r"products.csv, header row: missing column 'item_id' \(for the item's id\)"),
    ("item_id,title,label\n1,a,x\nSKU-2,b,y\n", r"products.csv, row 2, column 'item_id': item id 'SKU-2' is not"),
    ("item_id,title,label\n1,a,x\n1,b,y\n", r"row 2, column 'item_id': duplicate item id 1 \(first at row 1\)"),
    ("item_id,title,label\n1,a,\n2,b,\n", r"products.csv: no row has a label \(column 'label'\)"),
])
def test_a_bad_table_gets_one_message_naming_file_row_column(tmp_path, text, message):
    with pytest.raises(CatalogError, match=message):
        load_catalog(_table(tmp_path, text), CFG)


def test_class_names_keep_their_codes_and_removed_items_leave_the_split(tmp_path):
    rows = [f"{i},t{i},,,{('b', 'a', 'c')[i % 3]}" for i in range(30)]
    path = _table(tmp_path / "t", "item_id,title,description,image,label\n" + "\n".join(rows) + "\n")
    split = make_split(load_catalog(path, CFG), CFG, tmp_path / "w")
    assert class_names(split) == {0: "a", 1: "b", 2: "c"} and class_codes(split) == [0, 1, 2]
    # a new class, and six items gone: codes kept, the new name numbered next, the gone items out, one line said
    kept = [r for i, r in enumerate(rows) if i >= 6] + ["99,t99,,,aa"]
    path.write_text("item_id,title,description,image,label\n" + "\n".join(kept) + "\n")
    log = Log()
    again = make_split(load_catalog(path, CFG), CFG, tmp_path / "w", log)
    assert class_names(again) == {0: "a", 1: "b", 2: "c", 3: "aa"}
    assert sorted(again["item_id"].to_list()) == list(range(6, 30)) + [99]
    assert again.filter(pl.col("item_id") < 30).equals(split.filter(pl.col("item_id") >= 6))
    assert "6 item(s) no longer in the catalogue left the split" in log.text()
    assert read_split(tmp_path / "w").equals(again)


def test_a_rakuten_folder_rewritten_as_a_table_reads_the_same_items(tmp_path):
    synthesize(tmp_path / "r", items=60, seed=1)
    before = load_catalog(tmp_path / "r", CFG).items
    rakuten_to_table(tmp_path / "r")
    assert not (tmp_path / "r" / "X_train.csv").exists()
    after = load_catalog(tmp_path / "r", CFG).items  # auto: now a table
    same = ["item_id", "title", "description", "has_image", "part", "label"]
    assert after.select(same).equals(before.select(same))
    assert [Path(p).resolve() for p in after.filter("has_image")["image_path"]] == \
        [Path(p).resolve() for p in before.filter("has_image")["image_path"]]
