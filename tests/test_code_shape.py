"""The shape of the code, held by tests: functions that fit on a screen, stages that do not reach into
each other, a store layer that knows nothing of the pipeline."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "cli.py", *sorted((ROOT / "pipeline").rglob("*.py")), *sorted((ROOT / "stores").rglob("*.py"))]
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in `path`: module-level, in functions and under TYPE_CHECKING alike."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from .y import x
                package = module_name(path).split(".")
                package = package if path.name == "__init__.py" else package[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


MODULES = {module_name(p): p for p in SOURCES}


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports: `from pipeline import registry` is pipeline.registry, `from
    pipeline.x import f` is pipeline.x (a package's own __init__ is not counted for its submodules)."""
    out = set()
    for module, names in imports(path):
        subs = {f"{module}.{n}" for n in names} & MODULES.keys()
        out |= subs
        if len(subs) < len(names) or not names:  # names that are not modules: the module that holds them
            parts = module.split(".")
            out |= next(({".".join(parts[:k])} for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in MODULES),
                        set())
    return out - {module_name(path)}


GRAPH = {name: project_imports(path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    """Every project module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in GRAPH.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_sketch_and_predict_use_no_training_code():
    for stage in ("pipeline.sketch", "pipeline.predict"):
        assert not reachable(stage) & {"pipeline.pretrain", "pipeline.trainer", "pipeline.train_reader"}, stage


def test_no_module_takes_another_modules_private_names():
    private = [f"{path.relative_to(ROOT)}: {name} from {module}" for path in SOURCES
               for module, names in imports(path) if module.split(".")[0] in ("pipeline", "stores")
               for name in names if name.startswith("_") and not name.endswith("__") and module != module_name(path)]
    assert not private, private


def test_the_store_layer_knows_nothing_of_the_pipeline():
    for path in sorted((ROOT / "stores").rglob("*.py")):
        assert not [m for m, _ in imports(path) if m.split(".")[0] == "pipeline"], path


def test_no_import_circle():
    """No module reaches itself through imports, counting those made in functions and under TYPE_CHECKING: a
    circle is a dependency that works only by the accident of import order."""
    circles = sorted(m for m in GRAPH if m in reachable(m))
    assert not circles, f"modules in an import circle: {circles}"


# The stage modules: each is one command's work. Add a stage here when it is written.
STAGES = ["pipeline.extract", "pipeline.pretrain", "pipeline.sketch", "pipeline.fuse", "pipeline.predict",
          "pipeline.evaluate", "pipeline.serve", "pipeline.bundle"]
# Composers run stages in order through their entry points (`pipeline train`, `pipeline demo`).
COMPOSERS = ["pipeline.train", "pipeline.demo"]


def test_no_stage_reaches_another_stage():
    """What two stages share is a module of its own (the store filler, batches, checkpoints), never a stage, nor
    a composer of stages."""
    assert set(STAGES + COMPOSERS) <= GRAPH.keys()
    reached = {stage: sorted(reachable(stage) & set(STAGES + COMPOSERS)) for stage in STAGES}
    assert not any(reached.values()), {stage: others for stage, others in reached.items() if others}
