"""Shared setup of the reliability suite: the shared helpers its tests import, and partial copies of work directories.

`tiny` (tests/conftest.py) is the uninterrupted reference the killed runs are compared with; tests that change
a work directory change a copy of it."""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import DEMO, ITEMS, Log, Tiny, quiet, snapshot, write_config  # noqa: F401  (re-exported here)

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ("features", "models", "sketches", "fusion", "split.parquet", "config.json", "tokenizers", "upstream")


def copy_workdir(src: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """A copy of the work directory `src` holding only the entries named in `keep`."""
    dst.mkdir(parents=True)
    for name in keep:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
        elif (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst
