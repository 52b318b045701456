"""Runs that never lose the last good result: bad configs refused before anything is touched, one runner per
output, a killed run leaving the previous model in place, a finished run continued with more epochs, a work
directory that remembers its settings."""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.modalities import camembert
from pipeline.sketch import sketch
from tests.conftest import Log, cli, process, quiet

from .conftest import TRAINED, Tiny, copy_workdir, snapshot


def config_over(tiny: Tiny, directory: Path, text: str, name: str = "over.toml") -> Path:
    path = directory / name
    path.write_text(f'base = "{tiny.config}"\n{text}')
    return path


@pytest.mark.parametrize("text, expected", [
    ("[pretrian.title_bpe]\nepochs = 1\n", r"\[pretrian\]: unknown table or key \(did you mean 'pretrain'\?\)"),
    ("[pretrain.title_bpe]\nepohcs = 1\n", r"\[pretrain.title_bpe\] epohcs: unknown key \(did you mean 'epochs'\?\)"),
    ('[pretrain.title_bpe]\nlr = "fast"\n', r"\[pretrain.title_bpe\] lr: input should be a valid number, got 'fast'"),
    ("[pretrain.title_bpe]\nepochs = -3\n", r"\[pretrain.title_bpe\] epochs: input should be greater than or equal "
                                            r"to 1, got -3"),
])
def test_a_bad_config_is_refused_in_one_line_before_the_model_is_touched(tmp_path, tiny: Tiny, text, expected):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    before = snapshot(w)
    bad = config_over(tiny, tmp_path, text)
    done = cli("pretrain", "title_bpe", "--workdir", w, "--config", bad)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: {bad}: ")
    assert re.search(expected, lines[0]), lines[0]
    assert snapshot(w) == before


@pytest.mark.slow
def test_a_second_runner_is_refused_at_once_and_a_killed_run_leaves_the_previous_model(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    model = snapshot(w / "models" / "title_bpe")
    longer = config_over(tiny, tmp_path, "[pretrain.title_bpe]\nepochs = 500\n")  # another model: trains anew
    first = process("pretrain", "title_bpe", "--workdir", w, "--config", longer)
    try:
        deadline = time.monotonic() + 90
        while not (w / "models" / ".title_bpe.partial" / "last.pt").exists():  # an epoch done: mid-training
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.1)
        started = time.monotonic()
        second = cli("pretrain", "title_bpe", "--workdir", w, "--config", longer)
        assert second.returncode == 1 and time.monotonic() - started < 30, second.stderr
        assert f"is being written by process {first.pid} on " in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert snapshot(w / "models" / "title_bpe") == model  # the last good model, untouched
    done = cli("sketch", "title_bpe", "--workdir", w)  # and still the one every later stage uses
    assert done.returncode == 0 and "nothing to do" in done.stderr, done.stderr


def test_the_work_directory_remembers_its_configuration_and_hints_repeat_it(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    done = cli("fuse", "--workdir", w)  # no --config: the one W was built with, so nothing changed
    assert done.returncode == 0 and "nothing to do" in done.stderr, done.stderr
    done = cli("pretrain", "desc_cam", "--workdir", w)
    catalog = tiny.catalog.resolve()
    assert done.returncode == 1, done.stderr
    assert f"`pipeline extract desc_cam --catalog {catalog} --workdir {w}`" in done.stderr, done.stderr
    other = config_over(tiny, tmp_path, "[fusion]\nepochs = 2\n")
    done = cli("pretrain", "desc_cam", "--workdir", w, "--config", other)
    assert f"`pipeline extract desc_cam --catalog {catalog} --workdir {w} --config {other}`" in done.stderr, \
        done.stderr


@pytest.mark.usefixtures("one_torch_thread")
def test_a_fusion_continued_with_more_epochs_ends_as_an_uninterrupted_one(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("sketches", "models", "split.parquet", "config.json"))
    fuse(w, tiny.cfg.merged({"fusion": {"epochs": 1}}), progress=False, log=quiet)
    log = Log()
    got = fuse(w, tiny.cfg, progress=False, log=log)  # 3 epochs: the trainer resumes from the first one
    assert f"fuse: resuming from {w / 'fusion' / 'last.pt'} after epoch 1/3" in log.text(), log.text()
    assert "fuse epoch 1/3" not in log.text() and "fuse epoch 3/3" in log.text()
    ref = json.loads((tiny.workdir / "fusion" / "metrics.json").read_text())
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(got["history"]) == strip(ref["history"]) and got["macro_f1"] == ref["macro_f1"]
    a, b = (checkpoint.load(d / "fusion" / "model.pt", "fusion").state_dict for d in (w, tiny.workdir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_with_nothing_to_do_loads_no_model(tmp_path, tiny: Tiny, monkeypatch):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded by a stage with nothing to do")

    monkeypatch.setattr(camembert, "load_text_model", refuse)  # the text model of title_cam
    monkeypatch.setattr(checkpoint, "load", refuse)  # the networks the sketch stage runs
    log = Log()
    extract("title_cam", tiny.catalog, w, tiny.cfg, progress=False, log=log)
    sketch("all", w, tiny.cfg, progress=False, log=log)
    assert log.text().count("nothing to do") == 2, log.text()
