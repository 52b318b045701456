"""Checkpoints are data, not code, and are what was trained: a model file that would run code when unpickled
is refused unrun, a flipped bit is refused, and a modality model retrained after the fusion is refused by
everything that reads the fusion."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline import Predictor, checkpoint
from pipeline.errors import PipelineError
from tests.conftest import cli, one_error_line

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


def flip_a_bit(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor of a torch checkpoint (a zip of stored entries);
    return the entry's name."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)  # the entry's local header
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return info.filename


@pytest.mark.parametrize("where, command", [("models/title_bpe/model.pt", "pipeline pretrain title_bpe"),
                                            ("fusion/model.pt", "pipeline fuse")])
def test_a_checkpoint_with_one_bit_flipped_is_refused_naming_the_command_that_trains_it(tmp_path, tiny: Tiny, where,
                                                                                        command):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "sketches", "models", "fusion", "split.parquet",
                                                     "config.json", "tokenizers"))
    flip_a_bit(w / where)
    line = one_error_line(cli("export", "--workdir", w, "--out", tmp_path / "export"))
    assert f"{w / where}: damaged checkpoint: tensor '" in line and f"write it again with `{command}" in line, line
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def test_a_modality_retrained_after_fuse_is_refused_by_every_consumer_of_the_fusion(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", ("features", "sketches", "models", "fusion", "split.parquet",
                                                     "config.json", "tokenizers"))
    path = w / "models" / "title_bpe" / "model.pt"
    ckpt = checkpoint.load_model(path)
    ckpt.state_dict["head.bias"] += 1  # another model: what a retrain in place leaves
    checkpoint.save(ckpt, path)
    with pytest.raises(PipelineError, match=rf"{path} is not the title_bpe model the fusion was trained over .*"
                                            rf"pipeline sketch title_bpe .*pipeline fuse"):
        Predictor.load(w)
    line = one_error_line(cli("export", "--workdir", w, "--out", tmp_path / "export"))
    assert f"{path} is not the title_bpe model the fusion was trained over" in line
    catalog = tiny.catalog
    line = one_error_line(cli("predict", "--catalog", catalog, "--workdir", w, "--out", tmp_path / "p.csv"))
    assert "is not the title_bpe model the fusion was trained over" in line and not (tmp_path / "p.csv").exists()
