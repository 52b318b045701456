"""Configuration: TOML files in configs/, one home for every hyperparameter.

A config may name a `base` file (relative to itself); its tables are merged over the base's, key by
key, so `demo.toml` says only what differs from the paper's `default.toml`.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from pipeline.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.toml"
DEMO_CONFIG = CONFIG_DIR / "demo.toml"


def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, tables recursively, everything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | list | None = None) -> dict:
    """Read a config (default: configs/default.toml), following its `base` chain.

    A list of configs is merged in order, each over the ones before (`--config a --config b`).
    """
    if isinstance(path, (list, tuple)):
        if len(path) <= 1:
            return load_config(path[0] if path else None)
        cfg = load_config(path[0])
        for more in path[1:]:
            cfg = merge(cfg, load_config(more))
        cfg["config_path"] = " --config ".join(str(p) for p in path)
        return cfg
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        path = PROJECT_ROOT / path  # `--config configs/demo.toml` works from any directory
    if not path.is_file():
        raise PipelineError(f"config file not found: {path}")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise PipelineError(f"{path}: not valid TOML ({err})") from None
    base = cfg.pop("base", None)
    if base is not None:
        cfg = merge(load_config(path.parent / base), cfg)
    cfg["config_path"] = str(path)
    return cfg


def section(cfg: dict, *keys: str) -> dict:
    """cfg[k1][k2]..., with a clear message naming the missing table."""
    node = cfg
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise PipelineError(f"{cfg.get('config_path', 'config')}: missing table [{'.'.join(keys[: i + 1])}]")
        node = node[key]
    return node
