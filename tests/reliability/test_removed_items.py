"""Items removed from the catalogue leave the split and the training set, said in one line; the stages that
trained on them train again (their stamps see the new item set), and the split keeps every other assignment."""
from __future__ import annotations

import json
import shutil

import polars as pl

from pipeline.catalog import read_split
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.pretrain import pretrain
from pipeline.sketch import sketch

from .conftest import Log, Tiny, copy_workdir, quiet

TRAINED = ("config.json", "split.parquet", "features", "tokenizers", "models", "sketches", "fusion")


def test_items_removed_from_the_catalogue_leave_the_split_and_training(tmp_path, tiny: Tiny, one_torch_thread):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    catalog = shutil.copytree(tiny.catalog, tmp_path / "catalog")
    before = read_split(w)
    x = pl.read_csv(catalog / "X_train.csv", infer_schema=False)
    gone = x[""].cast(pl.Int64).to_list()[:40]  # 40 ids dropped from X_train.csv and Y_train.csv
    for name in ("X_train.csv", "Y_train.csv"):
        table = pl.read_csv(catalog / name, infer_schema=False)
        table.filter(~pl.col("").cast(pl.Int64).is_in(gone)).write_csv(catalog / name)
    old = json.loads((w / "models" / "title_bpe" / "metrics.json").read_text())

    log = Log()
    extract("title_bpe", catalog, w, tiny.cfg, progress=False, log=log)
    assert "40 item(s) no longer in the catalogue left the split" in log.text(), log.text()
    after = read_split(w)
    assert not after["item_id"].is_in(gone).any()
    assert after.equals(before.filter(~pl.col("item_id").is_in(gone)))  # every other assignment kept

    log = Log()
    metrics = pretrain("title_bpe", w, tiny.cfg, progress=False, log=log)
    assert "nothing to do" not in log.text()
    dropped = before.filter(pl.col("item_id").is_in(gone))
    assert metrics["train_items"] == old["train_items"] - int((dropped["split"] == "train").sum())
    assert metrics["valid_items"] == old["valid_items"] - int((dropped["split"] == "valid").sum())

    sketch("title_bpe", w, tiny.cfg, progress=False, log=quiet)
    log = Log()
    fused = fuse(w, tiny.cfg, progress=False, log=log)
    assert "nothing to do" not in log.text() and fused["valid_items"] == metrics["valid_items"]
    predictions = pl.read_csv(w / "fusion" / "valid_predictions.csv")
    assert not predictions["item_id"].is_in(gone).any()
    extract("title_bpe", catalog, w, tiny.cfg, progress=False, log=quiet)  # and then it holds: nothing more to say
    assert pretrain("title_bpe", w, tiny.cfg, progress=False, log=log)["fingerprint"] == metrics["fingerprint"]
