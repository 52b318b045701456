"""Where each stage's outputs live in a work directory (the paths outside scripts rely on)."""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError

MODALITIES = ("title_cam", "desc_cam", "title_bpe", "image")
SUFFIX = {"zarr": ".zarr", "hdf5": ".h5"}


def backend_suffix(backend: str) -> str:
    if backend not in SUFFIX:
        raise PipelineError(f"unknown store backend '{backend}' (use one of {sorted(SUFFIX)})")
    return SUFFIX[backend]


def store_path(workdir: str | Path, kind: str, name: str, backend: str | None = None) -> Path:
    """W/<kind>/<name>.zarr|h5. With no backend, the one that exists (zarr first), else zarr."""
    base = Path(workdir) / kind / name
    if backend is not None:
        return base.with_name(name + backend_suffix(backend))
    for suffix in SUFFIX.values():
        if base.with_name(name + suffix).exists():
            return base.with_name(name + suffix)
    return base.with_name(name + SUFFIX["zarr"])


def feature_store_path(workdir, modality: str, backend: str | None = None) -> Path:
    return store_path(workdir, "features", modality, backend)


def tokenizer_dir(workdir) -> Path:
    return Path(workdir) / "tokenizers"
