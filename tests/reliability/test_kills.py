"""Kill anywhere: SIGKILL `pipeline extract`, `pretrain` and `sketch` mid-run, twice in a row, then run
the same command again: it resumes, completes, and its result equals the uninterrupted run's.

Each kill lands at a random moment: after a random number of steps of visible progress (blocks in its
store, epoch checkpoints), plus a random few milliseconds. After every kill the partial store is checked:
no damaged chunk, and every item it serves equals the reference (a half-written block is never read
as valid). The last, completing run is the same stage called in-process (a CLI start-up costs seconds
of CPU on a 2-core box; the killed runs are real `pipeline` subprocesses).
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.extract import extract
from pipeline.pretrain import pretrain
from pipeline.sketch import sketch
from stores import FeatureStore

from tests.conftest import process

from .conftest import ITEMS, Log, Tiny, copy_workdir

RNG = np.random.default_rng()  # random moments on purpose; the delays are in the failure messages
KILLS = 2


# Tiny tensors: a second intra-op thread only spins (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # processes killed mid-run


def complete_blocks(store: Path) -> int:
    """Blocks marked complete in a Zarr store (the `complete` array has one chunk file per block)."""
    chunks = store / "complete" / "c"
    return len(list(chunks.iterdir())) if chunks.is_dir() else 0


class Epochs:
    """Epochs finished by the running process: how many times last.pt was replaced since it started."""

    def __init__(self, path: Path):
        self.path, self.n = path, 0
        self.last = self._mtime()

    def _mtime(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def __call__(self) -> int:
        now = self._mtime()
        if now != self.last:
            self.n, self.last = self.n + 1, now
        return self.n


def kill_at_random_progress(args: list, progress, most_steps: int, timeout: float = 120) -> None:
    """Start `pipeline ARGS`; SIGKILL it once progress() has advanced by a random 1..most_steps steps
    (blocks written, epochs finished), after a further random 0-30 ms (so mostly mid-block or mid-epoch).

    Fails if the process ended before the kill could land.
    """
    steps = int(RNG.integers(1, most_steps + 1))
    before = progress()
    proc = process(*args)
    deadline = time.monotonic() + timeout
    while progress() - before < steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    delay = float(RNG.uniform(0, 0.03))
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()  # reaped: its writer claim now names a dead process
    assert alive, f"`pipeline {' '.join(map(str, args))}` ended before the kill ({steps} steps + {delay:.3f} s; " \
                  f"rc {proc.returncode}):\n{stderr}"
    assert proc.returncode == -signal.SIGKILL


def assert_partial_store_is_sound(path: Path, reference: Path, array: str) -> int:
    """The killed run's store: no damaged chunk, and what it serves equals the reference."""
    with FeatureStore(path) as partial, FeatureStore(reference) as ref:
        report = partial.verify()
        assert report["problems"] == [] and report["damaged_items"] == [], report
        ids = partial.ids
        assert 0 < len(ids) < ITEMS, f"{len(ids)} items: the kill should land mid-run"
        a, b = partial.read(array, ids), ref.read(array, ids)
        np.testing.assert_array_equal(getattr(a, "values", a), getattr(b, "values", b))
        np.testing.assert_array_equal(partial.read_missing(ids), ref.read_missing(ids))
        return len(ids)


def assert_same_store(path: Path, reference: Path, array: str) -> None:
    """Item by item: the same ids, the same features and missing codes."""
    with FeatureStore(path) as got, FeatureStore(reference) as ref:
        assert got.verify()["ok"]
        assert sorted(got.ids.tolist()) == sorted(ref.ids.tolist())
        ids = ref.ids
        a, b = got.read(array, ids), ref.read(array, ids)
        if hasattr(a, "offsets"):
            np.testing.assert_array_equal(a.offsets, b.offsets)
            for i in range(len(ids)):
                np.testing.assert_array_equal(a[i], b[i], err_msg=f"item {ids[i]}")
        else:
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got.read_missing(ids), ref.read_missing(ids))


@pytest.mark.parametrize("modality", ["title_bpe", "title_cam"])
def test_killed_extraction_resumes_to_the_same_store(tmp_path, tiny: Tiny, modality):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("upstream",))  # the tiny text model, built once
    store = w / "features" / f"{modality}.zarr"
    args = ["extract", modality, "--catalog", tiny.catalog, "--workdir", w, "--config", tiny.config]
    sizes = []
    for _ in range(KILLS):
        kill_at_random_progress(args, lambda: complete_blocks(store), 6)  # of 19 blocks
        sizes.append(assert_partial_store_is_sound(store, tiny.workdir / "features" / f"{modality}.zarr", "tokens"))
    assert sizes[0] < sizes[1], f"the second run should add blocks: {sizes}"
    log = Log()
    extract(modality, tiny.catalog, w, tiny.cfg, progress=False, log=log)
    assert f"{sizes[-1]} already stored" in log.text()
    assert_same_store(store, tiny.workdir / "features" / f"{modality}.zarr", "tokens")


def test_killed_pretraining_resumes_from_its_last_epoch_and_matches(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "split.parquet"))
    out, partial = w / "models" / "title_bpe", w / "models" / ".title_bpe.partial"
    args = ["pretrain", "title_bpe", "--workdir", w, "--config", tiny.config]
    epochs = []
    for _ in range(KILLS):
        kill_at_random_progress(args, Epochs(partial / "last.pt"), 3)  # of 10 epochs
        assert not out.exists()  # no model until a run completes
        epochs.append(torch.load(partial / "last.pt", weights_only=True)["progress"]["epoch"])  # never torn
    assert 1 <= epochs[0] < epochs[1] < 10, epochs
    log = Log()
    pretrain("title_bpe", w, tiny.cfg, progress=False, log=log)
    assert f"resuming from {partial / 'last.pt'} after epoch {epochs[-1]}/10" in log.text()
    assert f"epoch {epochs[-1]}/10:" not in log.text()  # it did not start over
    got = json.loads((out / "metrics.json").read_text())
    ref = json.loads((tiny.workdir / "models" / "title_bpe" / "metrics.json").read_text())
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(got["history"]) == strip(ref["history"])  # deterministic on the CPU: exactly equal
    assert (got["macro_f1"], got["best_epoch"]) == (ref["macro_f1"], ref["best_epoch"])
    a = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tiny.workdir / "models" / "title_bpe" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_killed_sketching_resumes_to_the_same_store(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "models", "split.parquet"))
    store = w / "sketches" / "title_bpe.zarr"
    args = ["sketch", "title_bpe", "--workdir", w, "--config", tiny.config]
    reference = tiny.workdir / "sketches" / "title_bpe.zarr"
    sizes = []
    for _ in range(KILLS):
        kill_at_random_progress(args, lambda: complete_blocks(store), 6)  # of 19 blocks
        sizes.append(assert_partial_store_is_sound(store, reference, "sketch"))
    log = Log()
    sketch("title_bpe", w, tiny.cfg, progress=False, log=log)
    assert f"{sizes[-1]} already stored" in log.text() and "rebuilding" not in log.text()
    assert_same_store(store, reference, "sketch")
