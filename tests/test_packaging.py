"""The project as users get it: a wheel installed into a clean folder runs from anywhere, configs included."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # a wheel built and installed, its entry point run in processes


def test_the_wheel_runs_a_stage_from_another_directory(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("emde_pipeline-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.relative_to(ROOT)) for top in ("pipeline", "stores") for p in (ROOT / top).rglob("__init__.py")}
    assert packages - shipped == set() and {"pipeline/serve/page.html", "pipeline/configs/default.toml"} <= shipped
    target = tmp_path / "installed"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = os.environ | {"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def pipeline(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True)

    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert where.stdout.startswith(str(target)), where.stdout  # the wheel's code, not the checkout's
    assert pipeline("--version").stdout.startswith("emde-pipeline ")
    assert pipeline("data", "synth", "cat", "--items", "120").returncode == 0
    # configs/demo.toml is not in this folder: it is found in the installed package
    done = pipeline("extract", "title_bpe", "--catalog", "cat", "--workdir", "w", "--config", "configs/demo.toml")
    assert done.returncode == 0 and "120 items extracted" in done.stderr, done.stderr
