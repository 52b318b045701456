"""The command line itself: readable help, --set on every command, a refusal that costs no heavy import."""
from __future__ import annotations

import runpy
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cli, one_error_line

COMMANDS = [["train"], ["extract"], ["models"], ["pretrain"], ["sketch"], ["fuse"], ["predict"], ["evaluate"],
            ["bundle"], ["serve"], ["export"], ["inspect"], ["demo"], ["data", "synth"], []]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "pipeline")
def test_help_names_values_not_python_types(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    done = cli(*command, "--help")
    out = done.stdout
    assert done.returncode == 0 and out.startswith("Usage:"), out
    for unreadable in ("<bool>", "<list", "<Path", "<int>", "9223372036854775807", "\\["):
        assert unreadable not in out, (unreadable, out)
    if command:
        assert "--set SECTION.KEY=VALUE" in out


def test_set_is_taken_by_every_command_and_refused_like_a_config_file(tmp_path):
    c, w = ["--catalog", tmp_path], ["--workdir", tmp_path / "w"]
    arguments = {"train": c + w, "extract": ["title_bpe"] + c + w, "models": c + w, "pretrain": ["all"] + w,
                 "sketch": w, "fuse": w, "predict": c + w + ["--out", tmp_path / "o.csv"], "evaluate": c + w,
                 "bundle": w + ["--out", tmp_path / "b"], "serve": ["--model", tmp_path / "w"], "export": w, "inspect": [tmp_path / "x.zarr"], "demo": w, "data synth": [tmp_path / "w"]}
    for command in COMMANDS[:-1]:
        done = cli(*command, *arguments[" ".join(command)], "--set", "pretrain.epohcs=3")
        line = one_error_line(done)
        assert line == "error: --set pretrain.epohcs=3: [pretrain] epohcs: unknown key (did you mean 'epochs'?)", \
            (command, line)
    assert not (tmp_path / "w").exists()


def test_a_refused_config_imports_no_torch(tmp_path):
    """Arguments and configs are checked before any stage module (torch, transformers, timm) is imported."""
    probe = ("import sys, cli\nsys.argv = ['pipeline', 'train', '--catalog', 'c', '--workdir', 'w', '--set', "
             "'pretrain.epohcs=3']\ntry:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code == 1\n"
             "print(sorted(m for m in ('torch', 'transformers', 'timm', 'zarr', 'h5py') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    assert "epohcs: unknown key" in done.stderr


def test_version_is_one_line():
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("emde-pipeline ")


def test_python_dash_m_pipeline_is_the_same_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pipeline", "--version"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("pipeline", run_name="__main__")
    assert done.value.code == 0 and capsys.readouterr().out.startswith("emde-pipeline ")


def test_demo_refuses_a_config_without_a_demo_table_before_writing_anything(tmp_path):
    done = cli("demo", "--workdir", tmp_path / "w", "--config", "configs/default.toml")
    assert one_error_line(done) == ("error: configs/default.toml: no [demo] table (the demo runs with "
                                    "configs/demo.toml)"), done.stderr
    assert not (tmp_path / "w").exists()
