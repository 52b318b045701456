"""No code from files: a model directory that asks for its own code, and an exported program crafted to unpickle
or evaluate code, are refused in one line without running anything (never a "[y/N]" prompt); no path of the
project unpickles."""
from __future__ import annotations

import ast
import io
import json
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.export import export, load_program
from pipeline.trust import CodeRefusedError
from pipeline.weights.text import load_text_model

from tests.conftest import process

from .conftest import ROOT, TRAINED, Tiny, copy_workdir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Boom:
    """Unpickled, it writes its marker file: the code a crafted file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def hostile_model_dir(directory: Path, marker: Path, config: dict, tokenizer_config: dict | None = None) -> Path:
    """A Hugging Face directory whose own module writes `marker` when imported."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (directory / "tokenizer.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"x")
    return directory


AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel", "AutoTokenizer": ["evil.Tok", None]}


def pipeline_with_stdin(*args) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in a process of its own with "y" on stdin: what a prompt would read as consent."""
    proc = process(*args, stdin=subprocess.PIPE)
    out, err = proc.communicate(input="y\ny\ny\n", timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_a_model_directory_asking_for_its_own_code_is_refused_without_a_prompt(tmp_path, tiny: Tiny):
    marker = tmp_path / "ran"
    evil = hostile_model_dir(tmp_path / "evil", marker, {"model_type": "evilbert", "auto_map": AUTO_MAP})
    w = copy_workdir(tiny.workdir, tmp_path / "w", TRAINED)
    shutil.rmtree(w / "features" / "title_cam.zarr")  # no store of another model: the new one is loaded
    record = json.loads((w / "config.json").read_text())
    record["tables"]["text_model"]["path"] = str(evil)  # a received work directory names it
    (w / "config.json").write_text(json.dumps(record))
    for args in (["--text-model", evil, "--config", tiny.config], []):
        done = pipeline_with_stdin("extract", "title_cam", "--catalog", tiny.catalog, "--workdir", w, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and lines[-1].startswith(f"error: {evil}: its config.json asks to run code"), \
            done.stderr[-2000:]
        assert "[y/N]" not in done.stdout + done.stderr and not marker.exists(), args


@pytest.mark.parametrize("config, tokenizer_config, expected", [
    ({"model_type": "camembert"}, {"auto_map": AUTO_MAP}, "its tokenizer_config.json asks to run code of its own"),
    ({"model_type": "evilbert"}, None, "config.json names model_type 'evilbert', which this transformers does not know"),
    ({"auto_map": AUTO_MAP}, None, "its config.json asks to run code of its own"),
    ([1, 2], None, "config.json: expected a JSON object, got list"),
])
def test_text_models_load_without_code_of_their_own(tmp_path, config, tokenizer_config, expected):
    marker = tmp_path / "ran"
    evil = hostile_model_dir(tmp_path / "evil", marker, config, tokenizer_config)
    with pytest.raises(CodeRefusedError, match=expected):
        load_text_model(evil)
    assert not marker.exists()


# ---------------------------------------------------------------------- exported programs
def rewritten(program: Path, out: Path, change) -> Path:
    """`program` with each member's bytes passed through change(name, bytes)."""
    src, buffer = zipfile.ZipFile(program), io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, change(info.filename, src.read(info.filename)))
    out.write_bytes(buffer.getvalue())
    return out


def crafted(program: Path, directory: Path, marker: Path) -> dict[str, Path]:
    """Copies of a genuine program, each made to run code through one path of torch.export.load."""
    boom = io.BytesIO()
    torch.save(Boom(marker), boom)
    code = f"__import__('os').system('touch {marker}') == 0"

    def sample_inputs(name, data):  # torch.export.load retries a failed weights-only load with full unpickling
        return pickle.dumps(Boom(marker)) if "/data/sample_inputs/" in name else data

    def pickled_weight(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            config["config"][next(iter(config["config"]))]["use_pickle"] = True
            return json.dumps(config).encode()
        return boom.getvalue() if name.endswith("/data/weights/weight_0") else data

    def shape(name, data):  # a symbolic shape goes to sympy.sympify, an eval
        return data.replace(b"Symbol('", f"__import__('os').system('touch {marker}') and Symbol('".encode(), 1) \
            if "/models/" in name else data

    def guard(name, data):  # guards become the code of ExportedProgram.module()
        if "/models/" not in name:
            return data
        return json.dumps(json.loads(data) | {"guards_code": [code]}).encode()

    changes = {"sample_inputs": sample_inputs, "pickled_weight": pickled_weight, "shape": shape, "guard": guard}
    return {name: rewritten(program, directory / f"{name}.pt2", change) for name, change in changes.items()}


@pytest.mark.slow
def test_exported_programs_load_safely_and_crafted_ones_are_refused_unrun(tmp_path, tiny: Tiny):
    files = export(tiny.workdir, tiny.cfg, tmp_path / "export", log=lambda *_: None)
    sketches = torch.rand(3, 16 * 16)
    genuine = load_program(files["fusion"]).module()(({"title_bpe": sketches}))
    assert torch.equal(genuine, torch.export.load(files["fusion"]).module()({"title_bpe": sketches}))
    load_program(files["title_bpe"])
    marker = tmp_path / "ran"
    for name, path in crafted(files["fusion"], tmp_path, marker).items():
        with pytest.raises(CodeRefusedError, match=rf"^{path}: refused: .*, which loading would run as code"):
            load_program(path)
        assert not marker.exists(), name
        try:  # the crafted file is really hostile: torch.export.load alone runs its code
            torch.export.load(path).module()({"title_bpe": sketches})
        except Exception:  # noqa: BLE001 - the payload ran, or the program broke after it did
            pass
        assert marker.exists(), f"{name}: the crafted program did not run its code under torch.export.load"
        marker.unlink()


# ---------------------------------------------------------------------- no unpickling path
def unpickling_calls(path: Path) -> list[str]:
    """Calls that may unpickle: torch.load without weights_only=True, pickle/joblib loads, np.load with
    allow_pickle=True, torch.export.load (but in pipeline.export.load_program, after its checks)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name == "torch.load" and kwargs.get("weights_only") != "True" \
                or name in ("pickle.load", "pickle.loads", "joblib.load", "torch._C._pickle_load_obj") \
                or name.endswith("np.load") and kwargs.get("allow_pickle") == "True" \
                or name == "torch.export.load" and path.name != "export.py" and "test_no_code" not in path.name:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:80]}")
    return found


def test_no_path_of_the_project_unpickles():
    sources = [ROOT / "cli.py", *ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stores/**/*.py"),
               *ROOT.glob("benchmarks/**/*.py"), *ROOT.glob("tests/**/*.py")]
    allowed = {"tests/reliability/test_checkpoints.py"}  # it shows the danger on purpose
    found = [f for p in sources if str(p.relative_to(ROOT)) not in allowed for f in unpickling_calls(p)]
    assert not found, found
