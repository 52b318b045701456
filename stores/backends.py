"""The two storage backends: a Zarr directory and an HDF5 file, behind the same small surface.

A backend knows arrays, chunks and attributes; it knows nothing about items, blocks or models
(that is `stores.store.FeatureStore`). Both expose arrays that slice like numpy (`a[i:j]`,
`a[i:j] = x`) and have `.shape`, `.dtype`, `.chunks` and `.resize(shape)`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import PipelineError


class StoreBusyError(PipelineError):
    """Another process holds the store for writing."""


def backend_for(path: Path) -> type[ZarrBackend] | type[H5Backend]:
    suffix = Path(str(path)).suffix
    if suffix == ".zarr":
        return ZarrBackend
    if suffix in (".h5", ".hdf5"):
        return H5Backend
    raise PipelineError(f"{path}: a store path must end in .zarr (Zarr directory) or .h5 (HDF5 file)")


class ZarrBackend:
    name = "zarr"

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        # "r" reads, "a" writes; several processes may write disjoint chunks at the same time.
        self.group = zarr.open_group(str(self.path), mode="r" if mode == "r" else "a")

    @staticmethod
    def exists(path: Path) -> bool:
        return (Path(path) / "zarr.json").exists()

    @staticmethod
    def remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def create_array(self, name: str, shape: tuple, dtype, chunks: tuple, fill_value):
        # write_empty_chunks: an all-fill chunk (a block of empty masks, say) is still a file, so
        # "chunk file present" means "written" and verify can tell a deleted chunk from a blank one.
        self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value)

    def array(self, name: str):
        # The setting is not kept in the array's metadata: apply it on every open.
        return self.group[name].with_config({"write_empty_chunks": True})

    def has_array(self, name: str) -> bool:
        return name in self.group

    def get_attr(self, key: str, default=None):
        return self.group.attrs.get(key, default)

    def set_attr(self, key: str, value) -> None:
        self.group.attrs[key] = value

    def chunk_exists(self, name: str, chunk_index: int) -> bool:
        """Whether chunk number `chunk_index` along axis 0 of array `name` was ever written."""
        arr = self.group[name]
        key = arr.metadata.encode_chunk_key((chunk_index,) + (0,) * (arr.ndim - 1))
        return sync(arr.store_path.store.exists(f"{arr.path}/{key}"))

    def flush(self) -> None:
        pass  # every chunk write is a complete file

    def close(self) -> None:
        pass

    def nbytes_stored(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


class H5Backend:
    name = "hdf5"

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r" if mode == "r" else "a")
        except (BlockingIOError, OSError) as err:
            if "lock" in str(err).lower():
                raise StoreBusyError(
                    f"{self.path}: another process has this HDF5 store open for writing; an HDF5 store "
                    "takes one writer at a time (use a .zarr store for --shard K/N workers)"
                ) from None
            raise PipelineError(f"{self.path}: cannot open HDF5 store ({err})") from None

    @staticmethod
    def exists(path: Path) -> bool:
        return Path(path).is_file()

    @staticmethod
    def remove(path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def create_array(self, name: str, shape: tuple, dtype, chunks: tuple, fill_value):
        return self.file.create_dataset(
            name, shape=shape, maxshape=(None,) + tuple(shape[1:]), dtype=dtype, chunks=chunks,
            fillvalue=fill_value, compression="lzf", shuffle=np.dtype(dtype).itemsize > 1,
        )

    def array(self, name: str):
        return self.file[name]

    def has_array(self, name: str) -> bool:
        return name in self.file

    def get_attr(self, key: str, default=None):
        # HDF5 attributes hold no nested mappings: they are stored as JSON text.
        raw = self.file.attrs.get(key)
        return default if raw is None else json.loads(raw)

    def set_attr(self, key: str, value) -> None:
        self.file.attrs[key] = json.dumps(value)

    def chunk_exists(self, name: str, chunk_index: int) -> bool:
        ds = self.file[name]
        offset = (chunk_index * ds.chunks[0],) + (0,) * (ds.ndim - 1)
        return ds.id.get_chunk_info_by_coord(offset).byte_offset is not None

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def nbytes_stored(self) -> int:
        return self.path.stat().st_size
