"""Ctrl-C: one line saying what the command left and how to resume, exit status 130; the same command resumes."""
from __future__ import annotations

import shlex
import signal
import time

import pytest

from tests.conftest import cli, process

from .conftest import Tiny, copy_workdir
from .test_kills import complete_blocks

pytestmark = pytest.mark.slow  # a process interrupted mid-run, then the run resumed


def test_ctrl_c_says_what_it_left_and_the_same_command_resumes(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("upstream",))  # the tiny text model, built once
    store = w / "features" / "title_cam.zarr"
    proc = process("extract", "title_cam", "--catalog", tiny.catalog, "--workdir", w, "--config", tiny.config)
    deadline = time.monotonic() + 120
    while complete_blocks(store) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)
    last = err.strip().splitlines()[-1]
    again = f"pipeline extract title_cam --catalog {tiny.catalog} --workdir {w} --config {tiny.config}"
    assert last == ("interrupted: finished blocks, epochs and stages are kept, nothing half-written is used; run the "
                    f"same command to resume: {again}"), err
    kept = complete_blocks(store)
    assert 2 <= kept < 19, kept  # of 19 blocks
    resumed = cli(*shlex.split(last.rsplit(": ", 1)[1])[1:])  # the printed command, as printed
    assert resumed.returncode == 0, resumed.stderr
    assert "0 already stored" not in resumed.stderr and "already stored" in resumed.stderr, resumed.stderr
    assert complete_blocks(store) == 19
