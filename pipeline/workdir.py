"""Where each stage's outputs live in a work directory (the paths outside scripts rely on).

The feature and sketch stores go under `[stores] root` when it is set (a local directory, or a URL
such as s3://bucket/emde or file:///mnt/shared/emde: <root>/features/<name>.zarr,
<root>/sketches/<name>.zarr), else under the work directory; everything else stays in the work directory.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import section
from pipeline.errors import PipelineError
from stores.backends import is_url

MODALITIES = ("title_cam", "desc_cam", "title_bpe", "image")
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


def backend_suffix(backend: str) -> str:
    if backend not in SUFFIX:
        raise PipelineError(f"unknown store backend '{backend}' (use one of {sorted(SUFFIX)})")
    return SUFFIX[backend]


def stores_root(workdir: str | Path, cfg: dict) -> Path | str:
    """`[stores] root` (a local directory as a Path, a URL as its string), or the work directory if empty."""
    root = str(section(cfg, "stores").get("root", "") or "")
    if not root:
        return Path(workdir)
    return root.rstrip("/") if is_url(root) else Path(root).expanduser()


def store_path(root: str | Path, kind: str, name: str, backend: str | None = None) -> Path | str:
    """<root>/<kind>/<name>.zarr|h5. With no backend, the one that exists (zarr first), else zarr.

    A URL root holds Zarr stores only (an HDF5 store is a local file).
    """
    if is_url(root):
        if backend is not None and backend_suffix(backend) != SUFFIX["zarr"]:
            raise PipelineError(f"[stores] root = {root!r} is a URL, and an HDF5 store must be a local file: "
                                f"use [stores] backend = \"zarr\" (or --backend zarr) with it, or a local root")
        return f"{root.rstrip('/')}/{kind}/{name}{SUFFIX['zarr']}"
    base = Path(root) / kind / name
    if backend is not None:
        return base.with_name(name + backend_suffix(backend))
    for suffix in SUFFIX.values():
        if base.with_name(name + suffix).exists():
            return base.with_name(name + suffix)
    return base.with_name(name + SUFFIX["zarr"])


def feature_store_path(workdir, cfg: dict, modality: str, backend: str | None = None) -> Path | str:
    """<root>/features/<modality>.zarr|h5, root being `[stores] root` or the work directory."""
    return store_path(stores_root(workdir, cfg), "features", modality, backend)


def tokenizer_dir(workdir) -> Path:
    return Path(workdir) / "tokenizers"
