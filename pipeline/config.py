"""Configuration: TOML files in configs/, read once into typed, validated tables.

`configs/default.toml` is the root of every config: a file says only what differs, and may name a `base`
file (relative to itself) that it is merged over, key by key; several `--config` files are merged in
order, then every `--set section.key=value` (a TOML value). A `[pretrain]` key applies to every modality:
a file that sets it overrides what earlier files set for that key in `[pretrain.<modality>]` tables,
while a modality's own table in the same or a later file still wins (`merge`). Every value is then
checked against pipeline.schema (and the modality
registry for the `[<modality>]` and `[pretrain.<modality>]` tables) before any stage reads it: an
unknown table or key, a wrong type or an out-of-range value is refused in one line naming the file,
the key, what is expected, and the near miss when there is one.
"""
from __future__ import annotations

import difflib
import importlib.resources
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from pipeline import modalities, schema
from pipeline.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# configs/ beside the code in a checkout (even when another checkout is the one installed in editable mode:
# importlib would then find that one's), the package data in a wheel
CONFIG_DIR = (PROJECT_ROOT / "configs" if (PROJECT_ROOT / "configs" / "default.toml").is_file()
              else Path(str(importlib.resources.files("pipeline.configs"))))
DEFAULT_CONFIG = CONFIG_DIR / "default.toml"
DEMO_CONFIG = CONFIG_DIR / "demo.toml"  # `pipeline demo`: multilingual-e5-small features, every stage in minutes
TINY_CONFIG = CONFIG_DIR / "tiny.toml"  # the same synthetic setup with a tiny text model: every stage in seconds
ROOT_KEYS = {"seed": int}


class ConfigError(PipelineError):
    """A config that cannot be used: the message names the file and the key."""


# ---------------------------------------------------------------------- reading files
def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, tables recursively, everything else replaced.

    A key `over` sets in `[pretrain]` is the new value for every modality: it first drops that key from
    `base`'s `[pretrain.<modality>]` tables (a modality's own table in `over` still sets its own value)."""
    pretrain, common = base.get("pretrain"), over.get("pretrain")
    if isinstance(pretrain, dict) and isinstance(common, dict):
        keys = {k for k, v in common.items() if not isinstance(v, dict)}
        base = base | {"pretrain": {m: {k: v for k, v in t.items() if k not in keys} if isinstance(t, dict) else t
                                    for m, t in pretrain.items()}}
    return _merge_tables(base, over)


def _merge_tables(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (_merge_tables(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def _origins(table: dict, source: str, prefix: tuple = ()) -> dict[tuple, str]:
    """Which file set each key (and table) of `table`: {("pretrain", "title_bpe", "lr"): "x.toml", ...}."""
    out = {}
    for key, value in table.items():
        out[prefix + (key,)] = source
        if isinstance(value, dict):
            out |= _origins(value, source, prefix + (key,))
    return out


def find_config(path: str | Path) -> Path:
    """A config file by path; `configs/demo.toml` (or just `demo.toml`) also from any directory."""
    path = Path(path).expanduser()
    for candidate in (path, PROJECT_ROOT / path, CONFIG_DIR / path.name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def _read_chain(path: Path, seen: tuple = ()) -> tuple[dict, dict]:
    """The tables of `path` merged over its `base` chain, and the origin of every key."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: its `base` chain comes back to itself")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    base = raw.pop("base", None)
    if base is None:
        return raw, _origins(raw, str(path))
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    tables, origins = _read_chain((path.parent / base) if (path.parent / base).is_file() else find_config(base),
                                  seen + (path.resolve(),))
    return merge(tables, raw), origins | _origins(raw, str(path))


def read_tables(paths: list[Path]) -> tuple[dict, dict]:
    """default.toml, then every file (with its base chain) merged in order: (tables, origins)."""
    tables, origins = _read_chain(DEFAULT_CONFIG)
    for path in paths:
        more, more_origins = _read_chain(path)
        tables, origins = merge(tables, more), origins | more_origins
    return tables, origins


# ---------------------------------------------------------------------- the typed config
@dataclass(frozen=True)
class Config:
    """Every table of a config, validated. `raw` is the merged TOML (what a work dir records)."""

    raw: dict
    sources: tuple[str, ...]
    seed: int
    catalog: schema.Catalog
    split: schema.Split
    stores: schema.Stores
    extract: schema.Extract
    text_model: schema.TextModel
    train_reader: schema.TrainReader
    sketch: schema.Sketch
    fusion: schema.Fusion
    demo: schema.Demo | None
    real_data: schema.RealData | None
    serve: schema.Serve
    modality_tables: dict = field(repr=False)  # name -> its [<name>] options
    train_tables: dict = field(repr=False)  # name -> its [pretrain.<name>] options, [pretrain] applied
    origins: dict = field(repr=False, compare=False, default_factory=dict)
    sets: tuple[str, ...] = ()  # the command's `--set` arguments (hints repeat them)

    @property
    def source(self) -> str:
        return " --config ".join(self.sources) or str(DEFAULT_CONFIG)

    @property
    def modality_names(self) -> list[str]:
        """The registered modalities this config has a table for ("all" on the command line)."""
        return [m for m in modalities.names() if m in self.modality_tables]

    def options(self, modality: str):
        """The `[<modality>]` table (how its features are extracted)."""
        if modality not in self.modality_tables:
            modalities.get(modality)  # an unknown name: say so
            raise ConfigError(f"{self.source}: no [{modality}] table")
        return self.modality_tables[modality]

    def train_options(self, modality: str, coder: str | None = None) -> schema.TrainOptions:
        """`[pretrain.<modality>]` over `[pretrain]`, with --coder applied."""
        if modality not in self.train_tables:
            modalities.get(modality)
            raise ConfigError(f"{self.source}: no [pretrain.{modality}] table")
        opts = self.train_tables[modality]
        if coder is None or coder == opts.coder:
            return opts
        values = opts.model_dump() | {"coder": coder}
        return _validate(type(opts), values, ("pretrain", modality), self.origins, f"--coder {coder}")

    def block_items(self, modality: str) -> int:
        return getattr(self.options(modality), "block_items", None) or self.stores.block_items

    def merged(self, over: dict, source: str | None = None) -> Config:
        """This config with `over` merged into its tables (validated again)."""
        origins = self.origins | _origins(over, source or "(override)")
        return build(merge(self.raw, over), self.sources + ((source,) if source else ()), origins, self.sets)

    def digest(self) -> str:
        return json.dumps(self.raw, sort_keys=True)


def _suggest(key: str, known) -> str:
    near = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _where(path: tuple, origins: dict, default: str) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in origins:
            return origins[path[:n]]
    return default


def _key_text(path: tuple) -> str:
    """("pretrain", "title_bpe", "lr") -> "[pretrain.title_bpe] lr"; ("fusion", "heads", 0, "name") ->
    "[fusion] heads[0].name": the key starts at the last name before the first list index."""
    first_int = next((i for i, p in enumerate(path) if isinstance(p, int)), len(path))
    table, key = path[: first_int - 1], path[first_int - 1 :]
    text = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if n else str(p)) for n, p in enumerate(key))
    return f"[{'.'.join(table)}] {text}" if table else text


def _validate(cls, values, path: tuple, origins: dict, default_source: str, inherited=()):
    """cls(**values), or a ConfigError naming the file, the key, what is expected and the near miss (a key
    the table took from `[pretrain]`, one of `inherited`, is named there)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{_where(path, origins, default_source)}: {_key_text(path)}: expected a table, "
                          f"got {values!r}")
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        # an unknown key first: a misspelt key also shows as the missing key it was meant to be
        e = sorted(err.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = path + tuple(e["loc"])
        if e["loc"] and e["loc"][0] in inherited:
            loc = path[:1] + tuple(e["loc"])
        where = _where(loc, origins, default_source)
        if e["type"] == "extra_forbidden":
            known = getattr(_table_class_at(cls, e["loc"][:-1]), "model_fields", {})
            what = f"unknown key{_suggest(loc[-1], known)}"
        elif e["type"] == "missing":
            what = "missing key"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            what = f"{msg[0].lower()}{msg[1:]}, got {e['input']!r}" if e["loc"] else msg
        key = _key_text(loc) if e["loc"] else f"[{'.'.join(map(str, path))}]"
        raise ConfigError(f"{where}: {key}: {what}") from None


def _table_class_at(cls, loc: tuple):
    """The Section class of the table at `loc` inside `cls` (to suggest its keys)."""
    for part in loc:
        if isinstance(part, int) or not hasattr(cls, "model_fields") or part not in cls.model_fields:
            return cls
        ann = cls.model_fields[part].annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, schema.Section)]
        cls = inner[-1] if inner else ann
    return cls


def _train_tables(raw: dict, origins: dict, default: str) -> dict:
    """[pretrain.<modality>] over the [pretrain] keys that modality knows, validated per modality."""
    pretrain = raw.get("pretrain", {})
    common = {k: v for k, v in pretrain.items() if not isinstance(v, dict)}
    known = set().union(*(m.train_options.model_fields for m in modalities.REGISTRY.values()))
    for key in common:
        if key not in known:
            where = _where(("pretrain", key), origins, default)
            raise ConfigError(f"{where}: [pretrain] {key}: unknown key{_suggest(key, known)}")
    tables = {}
    for name, table in pretrain.items():
        if not isinstance(table, dict):
            continue
        if name not in modalities.REGISTRY:
            where = _where(("pretrain", name), origins, default)
            raise ConfigError(f"{where}: [pretrain.{name}]: unknown modality{_suggest(name, modalities.REGISTRY)}")
        cls = modalities.REGISTRY[name].train_options
        inherited = {k: v for k, v in common.items() if k in cls.model_fields and k not in table}
        # a refused value names the file that set it: [pretrain] for the keys this table inherits
        where = origins | {("pretrain", name, k): origins[("pretrain", k)] for k in inherited
                           if ("pretrain", k) in origins}
        tables[name] = _validate(cls, inherited | table, ("pretrain", name), where, default, set(inherited))
    return tables


def build(raw: dict, sources: tuple[str, ...] = (), origins: dict | None = None, sets: tuple = ()) -> Config:
    """Validate merged tables into a Config (refusing unknown tables, keys, types and values)."""
    origins = origins or {}
    default = sources[-1] if sources else str(DEFAULT_CONFIG)
    known = set(schema.TABLES) | set(modalities.REGISTRY) | set(ROOT_KEYS) | {"pretrain"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{_where((key,), origins, default)}: [{key}]: unknown table or key{_suggest(key, known)}")
    seed = raw.get("seed")
    if type(seed) is not int:
        raise ConfigError(f"{_where(('seed',), origins, default)}: seed: expected an integer, got {seed!r}")
    tables = {name: _validate(cls, raw.get(name), (name,), origins, default) for name, cls in schema.TABLES.items()
              if name in raw or name not in schema.OPTIONAL_TABLES}
    tables |= {name: None for name in schema.OPTIONAL_TABLES if name not in raw}
    modality_tables = {name: _validate(m.options, raw[name], (name,), origins, default)
                       for name, m in modalities.REGISTRY.items() if name in raw}
    train_tables = _train_tables(raw, origins, default)
    for head in tables["fusion"].heads:
        for m in head.inputs:
            if m not in modalities.REGISTRY:
                raise ConfigError(f"{_where(('fusion', 'heads'), origins, default)}: [fusion] heads: unknown modality "
                                  f"'{m}'{_suggest(m, modalities.REGISTRY)}")
    return Config(raw=raw, sources=tuple(sources), seed=seed, modality_tables=modality_tables,
                  train_tables=train_tables, origins=origins, sets=tuple(sets), **tables)


def parse_set(arg: str) -> dict:
    """`--set section.key=value` as the tables it sets: the text read as one TOML line, so the value is typed
    and written exactly as in a config file (`3`, `1e-3`, `true`, `"text"`, `[1, 2]`, `{ name = "x" }`)."""
    if "=" not in arg or "\n" in arg or "\r" in arg:
        raise ConfigError(f"--set {arg}: expected one section.key=value (a TOML value: 3, 1e-3, true, \"text\", "
                          f"[1, 2])")
    key, _, value = arg.partition("=")
    try:
        return tomllib.loads(arg)
    except tomllib.TOMLDecodeError as err:
        bare = value.strip()
        hint = (f"; a string needs quotes: {key.strip()}=\"{bare}\"" if bare and bare[0] not in "\"'[{"
                and not bare[0].isdigit() else "")
        raise ConfigError(f"--set {arg}: not a TOML key = value ({err}){hint}") from None


def with_overrides(tables: dict, origins: dict, overrides: dict | None = None,
                   sets: list[str] | tuple = ()) -> tuple[dict, dict]:
    """`overrides` (the command's model flags), then every `--set`, merged over the tables in order."""
    layers = ([(overrides, "(command line)")] if overrides else []) + [(parse_set(a), f"--set {a}") for a in sets]
    for over, source in layers:
        tables, origins = merge(tables, over), origins | _origins(over, source)
    return tables, origins


def load_config(paths: str | Path | list | tuple | None = None, overrides: dict | None = None,
                sets: list[str] | tuple = ()) -> Config:
    """Read, merge and validate configs (default.toml alone when none is given); `overrides`, then `--set`
    arguments (`section.key=value`), go last."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    files = [find_config(p) for p in paths]
    tables, origins = with_overrides(*read_tables(files), overrides, sets)
    return build(tables, tuple(str(p) for p in paths), origins, sets)
