"""Checkpoints are data, not code: a model file that would run code when unpickled is refused, unrun."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import cli

from .conftest import Tiny, copy_workdir


class RunsCode:
    """Unpickling this calls Path.touch(marker): what a hostile model.pt could do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "models", "split.parquet", "config.json",
                                                     "tokenizers", "upstream"))
    marker = tmp_path / "the-code-ran"
    path = w / "models" / "title_bpe" / "model.pt"
    ckpt = torch.load(path, weights_only=True)
    torch.save(ckpt | {"note": RunsCode(marker)}, path)
    done = cli("sketch", "title_bpe", "--workdir", w)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{path}: refused: it holds Python objects" in done.stderr
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the pipeline never does: the danger was real
    assert marker.exists()
