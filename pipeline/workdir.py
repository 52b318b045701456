"""A work directory: where each stage's outputs live (the paths outside scripts rely on), and the
configuration and catalogue it was built with.

    W/config.json                 the resolved configuration (and catalogue) W was built with
    W/split.parquet               item_id, split, label
    W/features/<modality>.zarr|h5 feature stores          (under [stores] root when it is set)
    W/sketches/<modality>.zarr|h5 sketch stores           (under [stores] root when it is set)
    W/tokenizers/, W/upstream/    title_bpe's SentencePiece model, tiny or converted upstream models
    W/models/<modality>/          model.pt, metrics.json, valid_predictions.parquet, last.pt, stamp.json
    W/<[fusion] output>/          the fusion heads, metrics, pictures, predictions

The first command that writes into W records its configuration there; a later command on W without
`--config` uses it, so a work directory is always read with the settings it was built with. Hints
that send the user to another command repeat the options it needs (`command`).
"""
from __future__ import annotations

import re
import shlex
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from pipeline import config as config_module
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.provenance import read_json, write_json

SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}
RECORD = "config.json"
# W's own entries: what the stages write there (`evaluations/`: the per-model evaluations). `[fusion] output`
# names a folder beside them, never one of them; `--out` arguments never point into them.
ENTRIES = (RECORD, "split.parquet", "features", "sketches", "models", "tokenizers", "upstream", "export", "evaluations")


# ---------------------------------------------------------------------- paths
def stores_root(workdir: str | Path, cfg: Config) -> Path | str:
    """`[stores] root` (a local directory as a Path, a URL as its string), or the work directory if empty."""
    from stores.paths import is_url  # here, not at import: a refused argument never loads the store layer

    root = cfg.stores.root
    if not root:
        return Path(workdir)
    return root.rstrip("/") if is_url(root) else Path(root).expanduser()


def store_path(root: str | Path, kind: str, name: str, backend: str | None = None) -> Path | str:
    """<root>/<kind>/<name>.zarr|h5. With no backend, the one that exists (zarr first), else zarr.

    A URL root holds Zarr stores only (an HDF5 store is a local file).
    """
    from stores.paths import is_url

    if is_url(root):
        if backend is not None and backend != "zarr":
            raise PipelineError(f"[stores] root = {root!r} is a URL, and an HDF5 store must be a local file: "
                                f"use [stores] backend = \"zarr\" (or --backend zarr) with it, or a local root")
        return f"{root.rstrip('/')}/{kind}/{name}{SUFFIX['zarr']}"
    if backend is not None and backend not in SUFFIX:
        raise PipelineError(f"unknown store backend '{backend}' (use one of {sorted(SUFFIX)})")
    base = Path(root) / kind
    if backend is not None:
        return base / (name + SUFFIX[backend])
    for suffix in SUFFIX.values():
        if (base / (name + suffix)).exists():
            return base / (name + suffix)
    return base / (name + SUFFIX["zarr"])


def feature_store_path(workdir, cfg: Config, modality: str, backend: str | None = None) -> Path | str:
    return store_path(stores_root(workdir, cfg), "features", modality, backend)


def sketch_store_path(workdir, cfg: Config, modality: str, backend: str | None = None) -> Path | str:
    return store_path(stores_root(workdir, cfg), "sketches", modality, backend)


def model_dir(workdir, modality: str) -> Path:
    return Path(workdir) / "models" / modality


def fusion_dir(workdir, cfg: Config) -> Path:
    return Path(workdir) / cfg.fusion.output


def check_output_name(name: str) -> str:
    """`[fusion] output`: a plain folder name inside W that no other stage writes (ValueError otherwise)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError("expected a plain folder name inside the work directory (letters, digits, '_', '-', '.'; "
                         "no path, not hidden)")
    if name.casefold() in {e.casefold() for e in ENTRIES}:
        raise ValueError(f"'{name}' is another stage's output in the work directory ({', '.join(ENTRIES)}); "
                         "name a folder of its own (e.g. \"fusion\")")
    return name


def check_output_path(path: str | Path, workdir, cfg: Config, flag: str, allow: tuple[str, ...] = ()) -> None:
    """Refuse an output path (`--out`) inside W's own entries (the split, the stores, the models, the
    fusion, ...: `allow` names the command's own), before anything runs."""
    target = Path(path).expanduser().resolve()
    if target == Path(workdir).expanduser().resolve():
        raise PipelineError(f"{flag}: {path} is the work directory itself; write into a folder of its own")
    own = [Path(workdir) / e for e in ENTRIES if e not in allow] + [fusion_dir(workdir, cfg)]
    root = stores_root(workdir, cfg)
    own += [root / kind for kind in ("features", "sketches")] if isinstance(root, Path) else []  # a URL: elsewhere
    for entry in own:
        entry = entry.expanduser().resolve()
        if target == entry or target.is_relative_to(entry):
            raise PipelineError(f"{flag}: writing {path} would replace or enter {entry}, an output of the work "
                                "directory's stages; write it elsewhere (e.g. beside the work directory)")


def tokenizer_dir(workdir) -> Path:
    return Path(workdir) / "tokenizers"


def upstream_dir(workdir) -> Path:
    return Path(workdir) / "upstream"


# ---------------------------------------------------------------------- the recorded configuration
def recorded(workdir) -> dict | None:
    path = Path(workdir) / RECORD
    return read_json(path, "work-directory record") if path.is_file() else None


def remember(workdir, cfg: Config, catalog: str | Path | None = None) -> None:
    """Record `cfg` (and the catalogue) in W, if W has no record yet; add the catalogue if it lacks one."""
    record = recorded(workdir)
    if record is not None and (catalog is None or record.get("catalog")):
        return
    if record is None:
        record = {"sources": list(cfg.sources), "tables": cfg.raw}
    if catalog is not None:
        record["catalog"] = str(Path(catalog).resolve())
    Path(workdir).mkdir(parents=True, exist_ok=True)
    write_json(Path(workdir) / RECORD, record)


def load(workdir, configs: list | None = None, overrides: dict | None = None, sets: list | tuple = ()) -> Config:
    """The configuration of a command on W: `--config` files when given, else W's record, else default.toml;
    then `overrides` and the `--set` arguments."""
    record = recorded(workdir) if workdir is not None else None
    if configs or record is None:
        return config_module.load_config(configs, overrides, sets)
    source = str(Path(workdir) / RECORD)
    if not isinstance(record, dict) or not isinstance(record.get("tables"), dict):
        raise PipelineError(f"{source}: damaged work-directory record (no 'tables'); pass the configuration "
                            "with --config, or delete the file to record it again")
    # Keys added to default.toml since W was recorded take their default value.
    defaults, _ = config_module.read_tables([])
    tables, origins = config_module.with_overrides(config_module.merge(defaults, record["tables"]), {}, overrides, sets)
    cfg = config_module.build(tables, (source,), origins, sets)
    if cfg.stores.root and cfg.stores.root == (record["tables"].get("stores") or {}).get("root"):
        _confined(cfg, workdir, source)  # the record's own root; one from --set is the user's
    return cfg


def _confined(cfg: Config, workdir, source: str) -> None:
    """A record may have come from elsewhere: it may not send outputs outside W (`[fusion] output` is a name
    inside W already); a `[stores] root` elsewhere is used when the user's own --config sets it."""
    from stores.paths import is_url

    root, where = cfg.stores.root, stores_root(workdir, cfg)
    if (is_url(where) or not Path(where).resolve().is_relative_to(Path(workdir).resolve())):
        raise PipelineError(f"{source}: [stores] root = {root!r} puts stores outside the work directory, which a "
                            "recorded configuration may not do (it may come from elsewhere); pass the "
                            "configuration that sets it with --config")


def command(cfg: Config, workdir, verb: str, catalog: bool = False) -> str:
    """`pipeline VERB --workdir W` with the options that make it run as this command did: `--catalog` from
    W's record (when the command needs one) and `--config` unless `cfg` is W's own record."""
    parts = ["pipeline", verb]
    record = recorded(workdir) or {}
    if catalog:
        parts += ["--catalog", record.get("catalog", "DIR")]
    parts += ["--workdir", str(workdir)]
    own = str(Path(workdir) / RECORD)
    if cfg.sources and cfg.sources != (own,):
        parts += [arg for s in cfg.sources if not s.startswith("(") for arg in ("--config", s)]
    parts += [arg for s in cfg.sets for arg in ("--set", shlex.quote(s))]
    return " ".join(parts)


@contextmanager
def repair_hint(cfg: Config, workdir):
    """A damaged store met while reading ends the stage with one line naming the command that repairs it
    (the stage that wrote the store extracts its damaged blocks again, or rebuilds it when its layout is hit)."""
    from stores import DamagedStoreError, UnreadableStoreError

    try:
        yield
    except (DamagedStoreError, UnreadableStoreError) as err:
        where = PurePosixPath(str(err.path))
        name = where.name.rsplit(".", 1)[0].removeprefix(".").removesuffix(".partial")
        verb = f"extract {name}" if where.parent.name == "features" else f"sketch {name}"
        base = command(cfg, workdir, verb, catalog=verb.startswith("extract"))
        if isinstance(err, UnreadableStoreError):
            raise PipelineError(f"{err}; only a rebuild restores it: `{base} --rebuild`") from None
        if err.repairable:
            raise PipelineError(f"{err}; repair it with `{base} --repair`") from None
        raise PipelineError(f"{err}; that array is the store's layout, which only a rebuild restores: "
                            f"`{base} --rebuild`") from None
