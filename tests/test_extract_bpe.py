"""title_bpe extraction through the store: contents, incremental runs, stale caches, shards, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sentencepiece as spm

from pipeline.catalog import load_catalog
from pipeline.config import load_config
from pipeline.extract import extract
from pipeline.errors import StaleStoreError
from pipeline.fill import fill_store
from pipeline.synth import synthesize
from stores import FeatureStore
from tests.conftest import cli, process, quiet
from tests.test_stores_url import Chars, toy_items

CFG = load_config("configs/tiny.toml")


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("catalog")
    synthesize(d, items=800, seed=3)
    return d


def copy_catalog(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_store_holds_every_item_bpe_ids_untruncated(tmp_path, catalog_dir, backend):
    cat = copy_catalog(catalog_dir, tmp_path / "cat")
    x = pl.read_csv(cat / "X_train.csv")
    long_title = " ".join(f"mot{i} produit{i}" for i in range(400))  # a title far past any usual limit
    x = x.with_columns(pl.when(pl.col("") == 7).then(pl.lit(long_title)).otherwise(pl.col("designation"))
                       .alias("designation"))
    x.write_csv(cat / "X_train.csv")
    [summary] = extract("title_bpe", cat, tmp_path / "w", CFG, backend=backend, progress=False, log=quiet)
    items = load_catalog(cat, CFG).items
    assert summary.computed == summary.items == len(items) == 800
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "w" / "tokenizers" / "title_bpe.model"))
    with FeatureStore(summary.store) as store:
        assert store.path.suffix == (".zarr" if backend == "zarr" else ".h5")
        got = store.read("tokens", items["item_id"])
        for k, title in enumerate(items["title"].to_list()):
            assert got[k].tolist() == sp.encode(title)
        assert len(got[7]) > 800  # never truncated
        prov = store.provenance
        assert prov["kind"] == "title_bpe" and len(prov["producer"]["tokenizer_sha256"]) == 64
        assert 0 < prov["producer"]["vocab_size"] <= 2000


def test_rerun_does_nothing_and_new_items_only_are_added(tmp_path, catalog_dir):
    cat = copy_catalog(catalog_dir, tmp_path / "cat")
    w = tmp_path / "w"
    extract("title_bpe", cat, w, CFG, progress=False, log=quiet)
    messages = []
    [again] = extract("title_bpe", cat, w, CFG, progress=False, log=messages.append)
    assert again.computed == 0 and "nothing to do" in messages[-1]
    x_test = pl.read_csv(cat / "X_test.csv")
    new = pl.DataFrame({"": [5000, 5001], "designation": ["Nouveau livre", "Neue Puppe"],
                        "description": [None, None], "productid": [1, 2], "imageid": [3, 4]})
    pl.concat([x_test, new], how="vertical_relaxed").write_csv(cat / "X_test.csv")
    [grown] = extract("title_bpe", cat, w, CFG, progress=False, log=quiet)
    assert grown.computed == 2 and grown.items == 802
    with FeatureStore(grown.store) as store:
        assert 5001 in store and store.verify()["ok"]


def test_planning_asks_token_lengths_a_block_at_a_time(tmp_path):
    """Laying out a store (and appending new items) tokenises one block of items at a time: the whole
    catalogue's token lists at once made extraction's peak memory grow with the catalogue."""
    asked = []

    class Counting(Chars):
        def lengths(self, items):
            asked.append(len(items))
            return super().lengths(items)

    items = toy_items(300)
    fill_store(Counting(), items.head(200), tmp_path / "s.zarr", block_rows=32, stores=CFG.stores, progress=False)
    fill_store(Counting(), items, tmp_path / "s.zarr", block_rows=32, stores=CFG.stores, progress=False)
    assert max(asked) <= 32 and sum(asked) == 300
    with FeatureStore(tmp_path / "s.zarr") as store:
        got = store.read("tokens", items["item_id"].to_numpy())
        assert [bytes(got[k].astype(np.uint8)).decode() for k in range(len(items))] == items["title"].to_list()


def test_changed_input_or_config_is_refused_with_the_rebuild_command(tmp_path, catalog_dir):
    cat = copy_catalog(catalog_dir, tmp_path / "cat")
    w = tmp_path / "w"
    extract("title_bpe", cat, w, CFG, progress=False, log=quiet)
    bigger_vocab = CFG.merged({"title_bpe": {"vocab_size": 500}})
    with pytest.raises(StaleStoreError, match="trained with .*vocab_size.*--rebuild"):
        extract("title_bpe", cat, w, bigger_vocab, progress=False, log=quiet)
    x = pl.read_csv(cat / "X_train.csv")
    x.with_columns(pl.when(pl.col("") == 3).then(pl.lit("Titre modifié")).otherwise(pl.col("designation"))
                   .alias("designation")).write_csv(cat / "X_train.csv")
    with pytest.raises(StaleStoreError, match=r"input of 1 stored item\(s\) changed.*item 3.*--rebuild"):
        extract("title_bpe", cat, w, CFG, progress=False, log=quiet)
    [rebuilt] = extract("title_bpe", cat, w, CFG, rebuild=True, progress=False, log=quiet)
    assert rebuilt.computed == 800


@pytest.mark.slow
def test_two_shard_processes_fill_one_store_like_one_process(tmp_path, catalog_dir):
    one = tmp_path / "one"
    extract("title_bpe", catalog_dir, one, CFG, progress=False, log=quiet)
    two = tmp_path / "two"
    args = ["extract", "title_bpe", "--catalog", str(catalog_dir), "--workdir", str(two),
            "--config", "configs/tiny.toml"]
    # The tokenizer is trained once (first run); then two workers share the store's blocks.
    extract("title_bpe", catalog_dir, two, CFG, shard="0/2", progress=False, log=quiet)
    procs = [process(*args, "--shard", f"{k}/2") for k in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "nothing to do" in outs[0][1] and "items extracted" in outs[1][1]
    a, b = FeatureStore(one / "features" / "title_bpe.zarr"), FeatureStore(two / "features" / "title_bpe.zarr")
    ids = a.ids
    np.testing.assert_array_equal(a.read("tokens", ids).values, b.read("tokens", ids).values)
    assert b.verify()["ok"]


def test_cli_contract_inspect_json_and_errors(tmp_path, catalog_dir):
    w = tmp_path / "w"
    ok = cli("extract", "title_bpe", "--catalog", str(catalog_dir), "--workdir", str(w), "--config",
             "configs/tiny.toml", "--backend", "hdf5")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(cli("inspect", str(w / "features" / "title_bpe.h5"), "--json", "--verify",
                            "--item", "0").stdout)
    assert report["items"] == 800 and report["verify"]["ok"]
    assert report["arrays"]["tokens/values"]["dtype"] == "int16"
    assert report["provenance"]["kind"] == "title_bpe" and report["item"]["item_id"] == 0
    sharded = cli("extract", "title_bpe", "--catalog", str(catalog_dir), "--workdir", str(w), "--config",
                  "configs/tiny.toml", "--backend", "hdf5", "--shard", "1/2")
    assert sharded.returncode == 1 and "use --backend zarr for --shard" in sharded.stderr
    missing = cli("extract", "title_bpe", "--catalog", str(tmp_path / "none"), "--workdir", str(w))
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: catalogue not found: ")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
