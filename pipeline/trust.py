"""Files that come from elsewhere load as data, never as code.

A model directory, a work directory or an exported program may be received from someone else, so nothing this
project loads may run code from it:

* a Hugging Face directory (`[text_model] path`, `--text-model`) loads with `trust_remote_code=False`, and one
  whose `config.json` or `tokenizer_config.json` asks for its own code (`auto_map`) or names a `model_type`
  this transformers does not know (which only custom code could build) is refused in one line, before
  transformers reads it (never a "run the custom code? [y/N]" prompt);
* a `torch.export` program (`.pt2`) loads through `pipeline.export.load_program`, which refuses an archive
  holding anything `torch.export.load` would unpickle or run (pickled tensors or objects, example inputs
  that are not plain tensors, AOTInductor libraries, symbolic shapes or guards that are not plain arithmetic);
* checkpoints and weights files load with `torch.load(weights_only=True)` (pipeline.checkpoint,
  pipeline.weights), Zarr stores decode with the codecs of their layout only (stores).
"""
from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from pathlib import Path

from pipeline.errors import PipelineError

HF_CONFIGS = ("config.json", "tokenizer_config.json")


class CodeRefusedError(PipelineError):
    """A file that would run code (or unpickle objects) when loaded."""


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CodeRefusedError(f"{path}: damaged JSON ({type(err).__name__}); restore the model directory") from None
    if not isinstance(data, dict):
        raise CodeRefusedError(f"{path}: expected a JSON object, got {type(data).__name__}; restore the model directory")
    return data


def check_hf_directory(directory: str | Path) -> None:
    """Refuse a Hugging Face directory that would need its own code to load (before transformers reads it)."""
    directory = Path(directory)
    for name in HF_CONFIGS:
        path = directory / name
        if not path.is_file():
            continue
        data = _json_object(path)
        if "auto_map" in data:
            raise CodeRefusedError(f"{directory}: its {name} asks to run code of its own (auto_map: "
                                   f"{sorted(data['auto_map'])[:3]}); this project never runs code from a model "
                                   "directory: use a model of an architecture transformers ships")
        model_type = data.get("model_type")
        if name == "config.json" and not _known(model_type):
            raise CodeRefusedError(f"{directory}: config.json names model_type {model_type!r}, which this "
                                   "transformers does not know (only custom code could build it); use a model of "
                                   "an architecture transformers ships (camembert, xlm-roberta, bert, ...)")


def _known(model_type) -> bool:
    """An architecture transformers ships (those the project builds itself without importing transformers)."""
    from pipeline.weights.bert import ARCHITECTURES

    if not isinstance(model_type, str):
        return False
    if model_type in ARCHITECTURES:
        return True
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


# ---------------------------------------------------------------------- torch.export programs
# Strings of a program that torch.export.load or ExportedProgram.module() evaluate: symbolic shapes go to
# sympy.sympify (an eval; torch writes them as srepr: `Add(Mul(Integer(32), Symbol('s27', positive=True,
# integer=True)), Integer(1))`), guards to exec (`L['x'].size()[1] == L['mask'].size()[1]`). Either may hold
# symbols, numbers, arithmetic, comparisons and the names below: nothing else.
SYMBOL = re.compile(r"[a-z]+\d+")
SHAPE_NAMES = {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt",
               "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality",
               "Unequality", "And", "Or", "Not", "BooleanTrue", "BooleanFalse", "true", "false", "True", "False",
               "oo", "Infinity", "NegativeInfinity", "positive", "negative", "nonnegative", "integer", "real",
               "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
               "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
               "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "floor", "ceiling",
               "and", "or", "not"}
INPUT_SIZE = re.compile(r"L(\['[A-Za-z_][A-Za-z0-9_]*'\]|\[\d+\])+(\.(size|stride)\(\)\[\d+\]|\.storage_offset\(\))?")


MAX_MEMBER_BYTES = 1 << 31  # one tensor of a program: 2 GiB (a zip bomb stops here)


def _plain_shape(expr: str) -> bool:
    """Whether `expr` (a symbolic shape or a guard) is plain arithmetic over symbols and input sizes."""
    rest = re.sub(r"'[a-z]+\d+'", " ", INPUT_SIZE.sub(" ", expr))  # inputs' sizes, quoted symbol names
    if not re.fullmatch(r"[A-Za-z0-9_+\-*/%<>=!&|~(), .]*", rest) or "__" in rest or re.search(r"\.[A-Za-z_]", rest):
        return False
    return all(SYMBOL.fullmatch(w) or w in SHAPE_NAMES for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", rest))


def _shape_exprs(node) -> list[str]:
    """Every `expr_str` of a serialized program (its symbolic shapes)."""
    if isinstance(node, dict):
        found = [node["expr_str"]] if isinstance(node.get("expr_str"), str) else []
        return found + [e for v in node.values() for e in _shape_exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _shape_exprs(v)]
    return []


def _refuse(path, what: str) -> CodeRefusedError:
    return CodeRefusedError(f"{path}: refused: {what}, which loading would run as code; load only programs "
                            "`pipeline export` wrote")


def check_program(data: bytes, path) -> None:
    """Refuse a `.pt2` archive (its bytes) holding anything `torch.export.load` would unpickle or run."""
    import torch

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as err:
        raise CodeRefusedError(f"{path}: not a torch.export program ({err})") from None
    for name in names:
        if archive.getinfo(name).file_size > MAX_MEMBER_BYTES:
            raise CodeRefusedError(f"{path}: {name} unpacks to {archive.getinfo(name).file_size} bytes, past the "
                                   f"{MAX_MEMBER_BYTES} this loader reads; not a program `pipeline export` wrote")
        inner = name.split("/", 1)[-1]
        if inner.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")) or inner.endswith((".so", ".dll")):
            raise _refuse(path, f"it holds compiled code ({name})")
        if inner.startswith("data/sample_inputs/"):  # torch.export.load falls back to a full unpickling
            try:
                with warnings.catch_warnings():  # (the weights-only unpickler warns about protocols)
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
            except Exception:  # noqa: BLE001 - anything that is not plain tensors
                raise _refuse(path, f"its example inputs ({name}) are not plain tensors") from None
        elif inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".json"):
            for key, meta in json.loads(archive.read(name)).get("config", {}).items():
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise _refuse(path, f"{key} in {name} is a pickled object, not raw tensor bytes")
        elif inner.startswith(("data/weights/", "data/constants/")) and not re.fullmatch(
                r"data/(weights/weight|constants/tensor)_\d+", inner):
            raise _refuse(path, f"it holds {name}, not raw tensor bytes")
        elif inner.startswith("models/") and inner.endswith(".json"):
            program = json.loads(archive.read(name))
            guards = program.get("guards_code", []) if isinstance(program, dict) else []
            bad = [e for e in _shape_exprs(program) + list(guards) if not _plain_shape(str(e))]
            if bad:
                raise _refuse(path, f"a shape or guard in {name} is not plain arithmetic ({str(bad[0])[:80]!r})")
        elif inner.startswith("serialized_") or inner == "version":
            raise _refuse(path, f"it is in the old format (pickled {name})")
