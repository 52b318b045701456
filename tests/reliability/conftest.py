"""Shared setup of the reliability suite: one tiny trained work directory.

`tiny` is built once per session, in-process, with the demo config and small overrides (blocks of 16
items, a small title_bpe network, a fusion head over title_bpe alone): a synthetic catalogue of 300
items, title_bpe and title_cam features, the title_bpe model, its sketches and the fusion heads. It is
the uninterrupted reference the killed runs are compared with; tests that change a work directory
change a copy of it.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.pretrain import pretrain
from pipeline.sketch import sketch
from pipeline.synth import synthesize
from tests.conftest import Log, quiet  # noqa: F401  (re-exported to the reliability tests)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "tiny.toml"
ITEMS = 300
OVERRIDES = """
[stores]
block_items = 16

[title_bpe]
block_items = 16

[pretrain.title_bpe]
epochs = 10
embed_dim = 32
channels = 32

[sketch]
block_items = 16
batch_size = 64

[fusion]
heads = [{ name = "bpe", inputs = ["title_bpe"] }]
epochs = 3
"""


def write_config(directory: Path, extra: str = "") -> Path:
    """A TOML config over the demo one (`base` by absolute path), with this suite's small overrides."""
    path = Path(directory) / "reliability.toml"
    path.write_text(f'base = "{DEMO}"\n{OVERRIDES}\n{extra}')
    return path


TRAINED = ("features", "models", "sketches", "fusion", "split.parquet", "config.json", "tokenizers", "upstream")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (links as their target's path), to compare before and after a command."""
    return {str(p.relative_to(directory)): (str(p.readlink()).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file() or p.is_symlink()}


def copy_workdir(src: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """A copy of the work directory `src` holding only the entries named in `keep`."""
    dst.mkdir(parents=True)
    for name in keep:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
        elif (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst


@dataclass(frozen=True)
class Tiny:
    catalog: Path
    workdir: Path  # the uninterrupted reference: never changed by a test
    config: Path
    cfg: dict


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    synthesize(root / "catalog", items=ITEMS, seed=21)
    config = write_config(root)
    cfg = load_config(config)
    w = root / "work"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI runs under OMP_NUM_THREADS=1: the same floats to the last bit
    try:
        extract("title_bpe", root / "catalog", w, cfg, progress=False, log=quiet)
        extract("title_cam", root / "catalog", w, cfg, progress=False, log=quiet)
        pretrain("title_bpe", w, cfg, progress=False, log=quiet)
        sketch("title_bpe", w, cfg, progress=False, log=quiet)
        fuse(w, cfg, progress=False, log=quiet)
    finally:
        torch.set_num_threads(threads)
    return Tiny(root / "catalog", w, config, cfg)
