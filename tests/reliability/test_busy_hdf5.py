"""A second writer of an HDF5 store is refused at once, before any catalogue is fingerprinted or model loaded."""
from __future__ import annotations

import subprocess
import sys

import pipeline.extract

from tests.conftest import cli, one_error_line

from .conftest import ROOT, Tiny

HOLD = "import sys, time\nfrom stores.locks import sole_writer\nwith sole_writer(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(120)\n"


def test_a_second_hdf5_writer_is_refused_before_any_model_loads(tmp_path, tiny: Tiny, monkeypatch):
    store = tmp_path / "w" / "features" / "title_cam.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    try:
        assert holder.stdout.readline().strip() == "held"

        def models_loaded(*_a, **_k):
            raise AssertionError("the extractors (and their models) were made before the refusal")

        monkeypatch.setattr(pipeline.extract, "extract_items", models_loaded)
        done = cli("extract", "title_cam", "--catalog", tiny.catalog, "--workdir", tmp_path / "w",
                   "--backend", "hdf5", "--config", tiny.config)
        line = one_error_line(done)  # the holder named by its lock: process, host, command, since when
        assert line.startswith(f"error: {store}: process {holder.pid} on {__import__('socket').gethostname()} (") \
            and line.endswith(") is writing this HDF5 store, and an HDF5 store takes one writer at a time: wait for "
                              "it to end"), line
        assert not (tmp_path / "w" / "split.parquet").exists()
    finally:
        holder.kill()
        holder.wait()
