"""The two storage backends: a Zarr directory and an HDF5 file, behind the same small surface.

A backend knows arrays, chunks and attributes; it knows nothing about items, blocks or models
(that is `stores.store.FeatureStore`). Both expose arrays that slice like numpy (`a[i:j]`,
`a[i:j] = x`) and have `.shape`, `.dtype`, `.chunks` and `.resize(shape)`.

A Zarr store may also be a URL read and written through fsspec: `memory://`, `file://`, `s3://`
(needs `s3fs`), `gs://` (needs `gcsfs`), any protocol fsspec knows. A local path stays a `Path`; a
URL stays the string it is (`Path("s3://b/x")` would eat a slash). An HDF5 store is a local file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import PipelineError


class StoreBusyError(PipelineError):
    """Another process holds the store for writing."""


def is_url(path) -> bool:
    """Whether `path` names a store by URL (`memory://...`, `file://...`, `s3://...`), not a local path."""
    return isinstance(path, str) and "://" in path


def store_location(path: str | Path) -> Path | str:
    """A local store path as a Path; a store URL as its string (no trailing slash)."""
    return path.rstrip("/") if is_url(path) else Path(path)


def local_path(path: str | Path) -> Path | None:
    """Where the store lies on this machine's filesystem: a path, a file:// URL's path; None for other URLs."""
    loc = store_location(path)
    if isinstance(loc, Path):
        return loc
    if loc.startswith("file://"):
        return Path(_url_to_fs(loc)[1])
    return None


def _url_to_fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **_storage_options(url))
    except (ImportError, ValueError) as err:  # no s3fs/gcsfs installed, an unknown protocol
        raise PipelineError(f"{url}: cannot open this URL ({err})") from None


def _storage_options(url: str) -> dict:
    # A local filesystem through fsspec does not create parent folders unless asked.
    return {"auto_mkdir": True} if url.startswith("file://") else {}


def backend_for(path: str | Path) -> type[ZarrBackend] | type[H5Backend]:
    loc = store_location(path)
    suffix = PurePosixPath(loc.split("?", 1)[0]).suffix if isinstance(loc, str) else loc.suffix
    if suffix == ".zarr":
        return ZarrBackend
    if suffix in (".h5", ".hdf5"):
        if isinstance(loc, str):
            raise PipelineError(f"{path}: an HDF5 store must be a local file; a store URL must end in .zarr")
        return H5Backend
    raise PipelineError(f"{path}: a store path must end in .zarr (Zarr directory) or .h5 (HDF5 file)")


class ZarrBackend:
    name = "zarr"

    def __init__(self, path: str | Path, mode: str):
        self.path = store_location(path)
        # "r" reads, "a" writes; several processes may write disjoint chunks at the same time.
        # A URL opens an fsspec store (zarr.storage.FsspecStore.from_url under zarr.open_group).
        url = self.path if isinstance(self.path, str) else None
        self.group = zarr.open_group(url or str(self.path), mode="r" if mode == "r" else "a",
                                     storage_options=_storage_options(url) if url else None)

    @staticmethod
    def exists(path: str | Path) -> bool:
        loc = store_location(path)
        if isinstance(loc, Path):
            return (loc / "zarr.json").exists()
        fs, root = _url_to_fs(loc)
        return fs.exists(f"{root}/zarr.json")

    @staticmethod
    def remove(path: str | Path) -> None:
        loc = store_location(path)
        if isinstance(loc, Path):
            shutil.rmtree(loc, ignore_errors=True)
            return
        fs, root = _url_to_fs(loc)
        if fs.exists(root):
            fs.rm(root, recursive=True)

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
        if isinstance(self.path, Path):
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        fs, root = _url_to_fs(self.path)  # one listing of every object: slow on a big bucket
        return int(fs.du(root, total=True))


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
            # lzf is skipped for a chunk it cannot shrink (float16 states mostly): without a checksum
            # such a chunk overwritten with garbage reads back as data; with it, verify() catches it.
            fletcher32=True,
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
