"""`pipeline inspect --verify` end to end, and stale or foreign caches refused with the rebuild command.

verify: a store the pipeline wrote reports ok (exit 0); a Zarr store with a chunk file deleted and an
HDF5 store with a chunk overwritten by garbage exit 1 and name exactly the damaged items. (The HDF5
backend checksums every chunk with fletcher32: lzf leaves a chunk it cannot shrink uncompressed, so
without a checksum garbage there would read back as features.)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from pipeline.extract import extract
from pipeline.errors import StaleStoreError
from pipeline.weights.tiny_camembert import build_tiny_camembert
from stores import FeatureStore

from tests.conftest import cli

from .conftest import Tiny, copy_workdir, quiet


# Tiny tensors: a second intra-op thread only spins (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def items_in_token_chunk(store_path: Path, chunk: int) -> set[int]:
    """Items whose tokens lie (partly) in chunk `chunk` of tokens/values."""
    with FeatureStore(store_path) as store:
        clen = store.chunk_len("tokens")
        ids = store.backend.array("ids")[:]
        starts = store.backend.array("tokens/starts")[:]
        ends = starts + store.backend.array("tokens/lengths")[:]
    hit = (ids >= 0) & (starts < (chunk + 1) * clen) & (ends > chunk * clen)
    return set(ids[hit].tolist())


def verify_cli(store: Path) -> tuple[int, dict, str]:
    done = cli("inspect", store, "--verify", "--json")
    return done.returncode, json.loads(done.stdout), done.stderr


def test_verify_reports_a_pipeline_store_complete_and_names_the_items_of_a_deleted_zarr_chunk(tmp_path, tiny: Tiny):
    rc, report, _ = verify_cli(tiny.workdir / "features" / "title_cam.zarr")
    assert rc == 0 and report["verify"]["ok"] and report["verify"]["items"] == 300

    store = tmp_path / "title_cam.zarr"
    shutil.copytree(tiny.workdir / "features" / "title_cam.zarr", store)
    (store / "tokens" / "values" / "c" / "5" / "0").unlink()  # chunk 5 of the token states
    expected = items_in_token_chunk(store, 5)
    assert expected
    rc, report, stderr = verify_cli(store)
    v = report["verify"]
    assert rc == 1 and not v["ok"] and v["problems"] == ["tokens/values: chunk 5 is missing"]
    assert set(v["damaged_items"]) == expected
    assert f"{store}: NOT complete: 0 incomplete block(s), 1 problem(s), {len(expected)} damaged item(s)" in stderr


def test_verify_detects_garbage_in_an_hdf5_chunk(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("upstream", "split.parquet"))
    extract("title_cam", tiny.catalog, w, tiny.cfg, backend="hdf5", progress=False, log=quiet)
    store = w / "features" / "title_cam.h5"
    rc, report, _ = verify_cli(store)
    assert rc == 0 and report["verify"]["ok"]

    with h5py.File(store, "r") as f:
        values = f["tokens/values"]
        assert values.fletcher32
        info = values.id.get_chunk_info(7)
        chunk = info.chunk_offset[0] // values.chunks[0]
    with open(store, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(np.random.default_rng(0).integers(0, 256, info.size, dtype=np.uint8).tobytes())
    rc, report, stderr = verify_cli(store)
    v = report["verify"]
    assert rc == 1 and v["problems"] == [f"tokens/values: chunk {chunk} is unreadable (OSError)"], v
    assert set(v["damaged_items"]) == items_in_token_chunk(store, chunk) != set()
    assert "NOT complete" in stderr


# ---------------------------------------------------------------------- stale and foreign caches
def test_a_store_built_with_another_tokenizer_is_refused(tmp_path, tiny: Tiny):
    # A new catalogue version: its tokenizer, retrained with --rebuild in a copy of the work directory ...
    catalog = tmp_path / "catalog-v2"
    catalog.mkdir()
    for name in ("Y_train.csv", "X_test.csv"):
        shutil.copy(tiny.catalog / name, catalog / name)
    x = pl.read_csv(tiny.catalog / "X_train.csv", infer_schema=False)
    x.with_columns(pl.col("designation").str.replace_all("e", "é")).write_csv(catalog / "X_train.csv")
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "tokenizers", "split.parquet"))
    old_tokenizer = (w / "tokenizers" / "title_bpe.model").read_bytes()
    extract("title_bpe", catalog, w, tiny.cfg, rebuild=True, progress=False, log=quiet)
    assert (w / "tokenizers" / "title_bpe.model").read_bytes() != old_tokenizer
    # ... and the old store put back in its place: ids from another vocabulary, refused.
    FeatureStore.remove(w / "features" / "title_bpe.zarr")
    shutil.copytree(tiny.workdir / "features" / "title_bpe.zarr", w / "features" / "title_bpe.zarr")
    with pytest.raises(StaleStoreError, match=r"title_bpe.zarr was built with another tokenizer_sha256 than "
                                              r".*rebuild with `pipeline extract title_bpe .*--rebuild`"):
        extract("title_bpe", catalog, w, tiny.cfg, progress=False, log=quiet)


def test_a_store_built_with_another_text_model_is_refused(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "split.parquet"))
    other = build_tiny_camembert(["un autre modèle de texte", "entraîné ailleurs"] * 20, tmp_path / "other-model",
                                 seed=1)
    cfg = tiny.cfg.merged({"text_model": {"path": str(other)}})
    with pytest.raises(StaleStoreError, match=r"title_cam.zarr was made with the title_cam model "
                                              r"'camembert:tiny-camembert', the configuration names 'other-model'; "
                                              r"refusing to mix them: rebuild with `pipeline extract title_cam "
                                              r".*--rebuild`"):
        extract("title_cam", tiny.catalog, w, cfg, progress=False, log=quiet)
    with FeatureStore(w / "features" / "title_cam.zarr") as store:  # refused, and left as it was
        assert len(store) == 300 and store.provenance["producer"]["model"] == "camembert:tiny-camembert"


def test_damage_met_by_a_stage_names_the_repair_which_extracts_only_the_damaged_blocks(tmp_path, tiny: Tiny):
    from tests.reliability.test_store_damage import damage

    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "models", "split.parquet", "config.json",
                                                     "tokenizers", "upstream"))
    store = w / "features" / "title_bpe.zarr"
    damage(store, "tokens/values", 3)  # 8 bytes in the middle of one chunk of token ids
    rc, report, _ = verify_cli(store)
    assert rc == 1 and report["verify"]["damaged_blocks"] and report["verify"]["repairable"], report["verify"]
    done = cli("sketch", "title_bpe", "--workdir", w)  # reads every item's features
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    repair = f"pipeline extract title_bpe --catalog {tiny.catalog.resolve()} --workdir {w} --repair"
    assert "title_bpe.zarr: array 'tokens/values' is damaged" in done.stderr and f"`{repair}`" in done.stderr
    done = cli(*repair.split()[1:])
    assert done.returncode == 0, done.stderr
    damaged_items = len(report["verify"]["damaged_blocks"]) * 16  # blocks of 16 items (the suite's config)
    assert f"title_bpe: {damaged_items} items extracted" in done.stderr, done.stderr
    with FeatureStore(store) as repaired, FeatureStore(tiny.workdir / "features" / "title_bpe.zarr") as good:
        assert repaired.verify()["ok"]
        ids = good.ids
        a, b = repaired.read("tokens", ids), good.read("tokens", ids)
        np.testing.assert_array_equal(a.values, b.values) and np.testing.assert_array_equal(a.offsets, b.offsets)
    assert cli("sketch", "title_bpe", "--workdir", w).returncode == 0


def test_damage_to_a_store_layout_names_the_rebuild_which_restores_it(tmp_path, tiny: Tiny):
    """The ragged lengths are the layout, which no block rewrite mends: the stage's line names --rebuild, and
    `sketch --rebuild` writes the sketch store anew."""
    from tests.reliability.test_store_damage import damage

    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "models", "sketches", "split.parquet", "config.json",
                                                     "tokenizers", "upstream"))
    damage(w / "features" / "title_bpe.zarr", "tokens/lengths", 0)
    done = cli("sketch", "title_bpe", "--workdir", w, "--rebuild")  # reads every item's features
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    rebuild = f"pipeline extract title_bpe --catalog {tiny.catalog.resolve()} --workdir {w} --rebuild"
    assert "'tokens/lengths' is damaged" in done.stderr and f"`{rebuild}`" in done.stderr, done.stderr

    sketches = w / "sketches" / "title_bpe.zarr"
    with FeatureStore(sketches) as good:
        before = good.read("sketch", good.ids)
    damage(sketches, "ids", 0)
    done = cli("fuse", "--workdir", w)
    assert done.returncode == 1 and f"`pipeline sketch title_bpe --workdir {w} --rebuild`" in done.stderr, done.stderr
    assert cli("sketch", "title_bpe", "--workdir", w, "--repair").returncode == 1  # a repair cannot mend it
    shutil.rmtree(w / "features" / "title_bpe.zarr")
    shutil.copytree(tiny.workdir / "features" / "title_bpe.zarr", w / "features" / "title_bpe.zarr")
    done = cli("sketch", "title_bpe", "--workdir", w, "--rebuild")
    assert done.returncode == 0 and "items sketched" in done.stderr, done.stderr
    with FeatureStore(sketches) as rebuilt:
        assert rebuilt.verify()["ok"]
        np.testing.assert_array_equal(rebuilt.read("sketch", rebuilt.ids), before)
