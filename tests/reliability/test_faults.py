"""Recoverable after any fault: a full disk ends a stage with one line and leaves a state that the same command
(or the command the line names) recovers from, on both store backends and in pretrain and fuse; a crash-cut
HDF5 file is named damaged with its rebuild, never "busy"; damaged metadata of every kind is one line naming
the fix, and that fix works; arguments and configs are refused before anything is laid out or converted."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from stores import FeatureStore

from .conftest import ROOT, TRAINED, Tiny, copy_workdir, one_error_line, run_main, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKENDS = {"zarr": ".zarr", "hdf5": ".h5"}


def same_store(path: Path, reference: Path) -> None:
    """Both stores hold the same items with the same inputs and tokens."""
    with FeatureStore(path) as got, FeatureStore(reference) as want:
        ids = np.sort(want.ids)
        assert np.array_equal(np.sort(got.ids), ids) and got.verify()["ok"]
        np.testing.assert_array_equal(got.input_hashes(ids), want.input_hashes(ids))
        np.testing.assert_array_equal(got.read("tokens", ids).values, want.read("tokens", ids).values)


def fresh_workdir(tiny: Tiny, directory: Path) -> Path:
    """A work directory with the split, record and tokenizer of the reference, and no stores yet."""
    return copy_workdir(tiny.workdir, directory, ("split.parquet", "config.json", "tokenizers"))


def extract_args(tiny: Tiny, w: Path, backend: str) -> tuple:
    return ("extract", "title_bpe", "--catalog", tiny.catalog, "--workdir", w, "--backend", backend)


# ---------------------------------------------------------------------- damaged, not busy
def test_a_truncated_hdf5_store_is_named_damaged_with_its_rebuild_and_a_busy_one_busy(tmp_path, tiny):
    w = fresh_workdir(tiny, tmp_path / "w")
    assert run_main(*extract_args(tiny, w, "hdf5"))[0] == 0
    store = w / "features" / "title_bpe.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); time.sleep(60)", str(store)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        line = one_error_line(*run_main("inspect", store))
        assert "another process has this HDF5 store open" in line, line
    finally:
        holder.kill()
        holder.wait()
    os.truncate(store, store.stat().st_size // 2)  # what a crash mid-write can leave
    line = one_error_line(*run_main(*extract_args(tiny, w, "hdf5")[:-2]))
    assert line.startswith(f"error: {store}: damaged: not a readable HDF5 file (") and "busy" not in line, line
    assert line.endswith(f"only a rebuild restores it: `pipeline extract title_bpe --catalog "
                         f"{tiny.catalog.resolve()} --workdir {w} --rebuild`"), line
    code, err = run_main(*extract_args(tiny, w, "hdf5")[:-2], "--rebuild")
    assert code == 0, err
    same_store(store, tiny.workdir / "features" / "title_bpe.zarr")


# ---------------------------------------------------------------------- damaged metadata: one line, the fix
def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def provenance(w: Path, change) -> None:
    path = w / "features" / "title_bpe.zarr" / "zarr.json"
    data = json.loads(path.read_text())
    change(data["attributes"]["provenance"])
    path.write_text(json.dumps(data))


DAMAGE = {
    "store zarr.json cut": lambda w: cut(w / "features" / "title_bpe.zarr" / "zarr.json"),
    "array zarr.json cut": lambda w: cut(w / "features" / "title_bpe.zarr" / "tokens" / "values" / "zarr.json"),
    "provenance of a wrong type": lambda w: provenance(w, lambda p: p["layout"].update(block_rows="16")),
    "provenance without its producer": lambda w: provenance(w, lambda p: p.pop("producer")),
    "tokenizer model cut": lambda w: cut(w / "tokenizers" / "title_bpe.model"),
    "tokenizer record cut": lambda w: cut(w / "tokenizers" / "title_bpe.json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_metadata_is_one_line_naming_the_rebuild_which_restores_the_store(tmp_path, tiny, damage):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    DAMAGE[damage](w)
    args = ("extract", "title_bpe", "--catalog", tiny.catalog, "--workdir", w)
    line = one_error_line(*run_main(*args))
    fix = line.rsplit("`", 2)[1]
    assert fix.startswith(f"pipeline extract title_bpe --catalog {tiny.catalog.resolve()} --workdir {w}") and \
        fix.endswith("--rebuild"), line
    code, err = run_main(*fix.split()[1:])
    assert code == 0, err
    same_store(w / "features" / "title_bpe.zarr", tiny.workdir / "features" / "title_bpe.zarr")


@pytest.mark.parametrize("text", ['{"a": 1}', "[1]", '[{"pid": 1', ""])
def test_a_damaged_writers_file_is_one_line_naming_the_file_to_delete(tmp_path, tiny, text):
    w = fresh_workdir(tiny, tmp_path / "w")
    claims = w / "features" / ".locks" / "title_bpe.zarr.writers.json"
    claims.parent.mkdir(parents=True)
    claims.write_text(text)
    line = one_error_line(*run_main(*extract_args(tiny, w, "zarr")))
    assert line == (f"error: {claims}: damaged writers file (who is writing this store); delete it once no "
                    "extraction or sketch of the store runs, then run the command again"), line
    claims.unlink()
    assert run_main(*extract_args(tiny, w, "zarr"))[0] == 0


@pytest.mark.parametrize("where", ["models/title_bpe", "fusion"])
def test_a_stamp_of_the_wrong_shape_is_one_line(tmp_path, tiny, where):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    (w / where / "stamp.json").write_text("[1, 2]")
    args = ["pretrain", "title_bpe"] if where.startswith("models") else ["fuse"]
    line = one_error_line(*run_main(*args, "--workdir", w))
    assert line == f"error: {w / where / 'stamp.json'}: damaged stage stamp (not a stamp's JSON object); delete " \
                   "it and run the stage again", line
