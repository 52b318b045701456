"""Outputs stay where they belong: `[fusion] output` is a folder of its own inside the work directory, `--out`
never points into a stage's output, a file is replaced only when it is a regular file, and a work directory's
recorded configuration (which may come from someone else) cannot send outputs elsewhere. Each refusal is one
line, before anything is written."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.provenance import atomic_path

from tests.conftest import cli, one_error_line

from .conftest import TRAINED, Tiny, copy_workdir, snapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config_over(tiny: Tiny, directory: Path, text: str) -> Path:
    path = directory / "over.toml"
    path.write_text(f'base = "{tiny.config}"\n{text}')
    return path


@pytest.mark.parametrize("output", [".", "..", "/tmp/elsewhere", "features", "models/title_bpe", "Sketches",
                                    "split.parquet", "config.json", "upstream", ".fusion.partial", "", "a/../.."])
def test_fusion_output_is_a_folder_of_its_own_inside_the_work_directory(tmp_path, tiny: Tiny, output):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    bad = config_over(tiny, tmp_path, f'[fusion]\noutput = "{output}"\n')
    before = snapshot(tmp_path)
    line = one_error_line(cli("fuse", "--workdir", w, "--config", bad))
    assert line.startswith(f"error: {bad}: [fusion] output: ") and repr(output) in line, line
    assert snapshot(tmp_path) == before


def test_a_received_record_cannot_send_outputs_outside_the_work_directory(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    record = json.loads((w / "config.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    for table, key, value in (("fusion", "output", "."), ("stores", "root", str(elsewhere)),
                              ("stores", "root", "file:///tmp/elsewhere")):
        hostile = json.loads(json.dumps(record))
        hostile["tables"][table][key] = value
        (w / "config.json").write_text(json.dumps(hostile))
        before = snapshot(tmp_path)
        for args in (["fuse"], ["extract", "title_bpe", "--catalog", tiny.catalog], ["sketch", "title_bpe"]):
            line = one_error_line(cli(*args, "--workdir", w))
            assert f"[{table}] {key}" in line and "config.json" in line, (args, line)
        assert snapshot(tmp_path) == before and not elsewhere.exists()
    # The user's own --config may put the stores elsewhere; the record alone may put them inside W only.
    inside = json.loads(json.dumps(record))
    inside["tables"]["stores"]["root"] = str(w)
    (w / "config.json").write_text(json.dumps(inside))
    done = cli("fuse", "--workdir", w)
    assert done.returncode == 0 and "nothing to do" in done.stderr, done.stderr


def special_files(directory: Path) -> dict[str, Path]:
    """A symlink to a file that must stay untouched, a FIFO, a folder and (as root) a character device."""
    directory.mkdir()
    victim = directory / "victim.txt"
    victim.write_text("keep me")
    files = {"link": directory / "link.csv", "fifo": directory / "fifo.csv", "folder": directory / "folder.csv"}
    files["link"].symlink_to(victim)
    os.mkfifo(files["fifo"])
    files["folder"].mkdir()
    try:
        os.mknod(directory / "device.csv", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
        files["device"] = directory / "device.csv"
    except PermissionError:
        pass
    return files


def test_atomic_writes_replace_only_a_regular_file_or_nothing(tmp_path):
    for kind, path in special_files(tmp_path / "special").items():
        with pytest.raises(PipelineError, match=r"is a (symbolic link|FIFO|folder|device or special file), not a "
                                                r"regular file; refusing to replace it"):
            with atomic_path(path) as tmp:
                tmp.write_text("x")
        assert not list(path.parent.glob(".*.tmp")), kind
    assert (tmp_path / "special" / "victim.txt").read_text() == "keep me"
    plain = tmp_path / "plain.txt"
    for text in ("one", "two"):  # a regular file, or nothing, is replaced
        with atomic_path(plain) as tmp:
            tmp.write_text(text)
        assert plain.read_text() == text and not plain.is_symlink()


def test_predict_out_never_replaces_a_special_file_or_the_work_directorys_own(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    special = special_files(tmp_path / "special")
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "p.parquet").symlink_to(special["link"])  # p.csv is free, its .parquet is a link
    outs = [special["link"], special["fifo"], special.get("device"), tmp_path / "sibling" / "p.csv",
            w / "split.csv", w / "features" / "p.csv", w / "models" / "title_bpe" / "model.csv",
            w / "fusion" / "predictions.csv", w / "config.json", w / "upstream"]
    before = snapshot(tmp_path)
    for out in filter(None, outs):
        line = one_error_line(cli("predict", "--catalog", tiny.catalog, "--workdir", w, "--out", out))
        assert line.startswith("error: "), line
        assert snapshot(tmp_path) == before, out
    assert stat.S_ISFIFO(os.lstat(special["fifo"]).st_mode) and special["link"].is_symlink()


def test_export_out_never_points_into_another_stages_output(tmp_path, tiny: Tiny):
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    before = snapshot(tmp_path)
    for out, entry in ((w / "models", w / "models"), (w / "features" / "title_bpe.zarr", w / "features"),
                       (w / "fusion", w / "fusion"), (w / "split.parquet", w / "split.parquet"),
                       (w / "tokenizers" / "x", w / "tokenizers")):
        line = one_error_line(cli("export", "--workdir", w, "--out", out))
        assert line == (f"error: --out {out}: writing {out} would replace or enter {entry}, an output of the work "
                        "directory's stages; write it elsewhere (e.g. beside the work directory)"), line
    line = one_error_line(cli("export", "--workdir", w, "--out", w))
    assert line == f"error: --out {w}: {w} is the work directory itself; write into a folder of its own", line
    assert snapshot(tmp_path) == before
