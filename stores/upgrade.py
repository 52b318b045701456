"""Schema 1 to 2, once per store: the one place that reads schema 1 (`pipeline inspect STORE --upgrade`).

Schema 1 had no `counts` (id -1 marked an unused row), no checksum in Zarr and lzf in HDF5. The upgrade
copies every array into a new store of the same layout (the same blocks, rows and chunks: ragged blocks
stay aligned) with checksums (Zarr: CRC32C; HDF5: gzip + Fletcher-32), adds `counts`, and swaps it in:
killed midway, the old store is as it was (or is put back at the next upgrade).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stores.arrays import ArraySpec
from stores.backends import backend_for
from stores.errors import StoreError
from stores.layout import SCHEMA_VERSION, create_arrays
from stores.locks import sole_writer, store_lock
from stores.paths import local_path, partial_path, store_location

COPY_BYTES = 1 << 26  # copied at most this many bytes at a time


def upgrade(path: str | Path, gzip_level: int) -> bool:
    """Upgrade the schema 1 store at `path` to schema 2 (HDF5 chunks gzip-compressed at `gzip_level`); False
    when it is schema 2 already. A store on object storage is rebuilt instead."""
    local = local_path(store_location(path))
    if local is None:
        raise StoreError(f"{path}: a store on object storage has no rename to swap an upgrade in: rebuild it")
    _recover(local)
    backend = backend_for(local)
    if not backend.exists(local):
        raise StoreError(f"{local}: no such store")
    partial = Path(partial_path(local))
    with sole_writer(local), store_lock(local):
        old = backend(local, "r")
        try:
            prov = old.get_attr("provenance") or {}
            if prov.get("schema_version") == SCHEMA_VERSION:
                return False
            if prov.get("schema_version") != 1 or "layout" not in prov:
                raise StoreError(f"{local}: not a feature store of schema version 1 or 2; rebuild it")
            backend.remove(partial)
            new = backend(partial, "w", gzip_level)
            try:
                _copy(old, new, prov)
            except Exception as err:  # a decoder error of any kind: the old store is damaged
                backend.remove(partial)
                raise StoreError(f"{local}: cannot be read whole to upgrade it ({type(err).__name__}); rebuild it "
                                 "(the stage that wrote it, with --rebuild)") from None
            finally:
                new.close()
        finally:
            old.close()
        _swap(partial, local, backend)
    return True


def _copy(old, new, prov: dict) -> None:
    """Every array of `old` into `new` (created with the same layout), `counts` added, provenance last."""
    layout = prov["layout"]
    specs = {k: ArraySpec.from_json(v) for k, v in layout["arrays"].items()}
    block_rows = int(layout["block_rows"])
    create_arrays(new, specs, {k: int(v["chunk"]) for k, v in layout["arrays"].items()}, block_rows)
    names = ["ids", "input_hash", "missing", "complete"]
    for name, spec in specs.items():
        names += [f"{name}/values", f"{name}/starts", f"{name}/lengths"] if spec.ragged else [name]
    for name in names:
        src, dst = old.array(name), new.array(name)
        dst.resize(src.shape)
        row = max(int(np.prod(src.shape[1:], dtype=np.int64)) * src.dtype.itemsize, 1)
        step = src.chunks[0] * max(1, COPY_BYTES // (src.chunks[0] * row))  # whole chunks at a time
        for lo in range(0, src.shape[0], step):
            dst[lo : lo + step] = src[lo : lo + step]
    n = old.array("complete").shape[0]
    ids = old.array("ids")[: n * block_rows]
    new.array("counts").resize((n,))
    new.array("counts")[:] = (ids >= 0).reshape(n, block_rows).sum(1)  # schema 1: id -1 marked an unused row
    new.flush()
    new.set_attr("provenance", prov | {"schema_version": SCHEMA_VERSION})
    new.flush()


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _swap(partial: Path, path: Path, backend) -> None:
    os.rename(path, _old(path))
    os.rename(partial, path)
    backend.remove(_old(path))


def _recover(path: Path) -> None:
    """Put back a store that a kill left between the two renames of `_swap`."""
    if _old(path).exists() and not path.exists():
        os.rename(_old(path), path)
