"""The two storage backends: a Zarr directory and an HDF5 file, behind the same small surface.

A backend knows arrays, chunks and attributes; it knows nothing about items, blocks or models
(that is `stores.store.FeatureStore`). Both expose arrays that slice like numpy (`a[i:j]`,
`a[i:j] = x`) and have `.shape`, `.dtype`, `.chunks` and `.resize(shape)`.

Every chunk carries a checksum, so that a damaged byte fails the read instead of coming back as data:
Zarr chunks are zstd-compressed then CRC32C-checksummed; HDF5 chunks are shuffled, gzip-compressed and
Fletcher-32-checksummed, filters that every HDF5 reader has (h5dump, R, MATLAB: lzf is h5py's own).
Stores written before schema version 2 have no checksum in Zarr and lzf in HDF5; they read as before.

A Zarr store may also be a URL read and written through fsspec (see `stores.paths`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from stores.errors import StoreBusyError, StoreError, StoreWriteError, UnreadableStoreError
from stores.locks import writer_of
from stores.paths import is_hdf5, is_url, local_path, storage_options, store_location, suffix, url_to_fs

__all__ = ["H5Backend", "ZarrBackend", "backend_for", "is_url", "local_path", "store_location"]

# gzip level 1: float16 features gain ~1% more at level 4 and 6, for half the write speed (see the README).
GZIP_LEVEL = 1


def backend_for(path: str | Path) -> type[ZarrBackend] | type[H5Backend]:
    if suffix(path) == ".zarr":
        return ZarrBackend
    if is_hdf5(path):
        if is_url(path):
            raise StoreError(f"{path}: an HDF5 store must be a local file; a store URL must end in .zarr")
        return H5Backend
    raise StoreError(f"{path}: a store path must end in .zarr (Zarr directory) or .h5 (HDF5 file)")


class BoundedZstdCodec(ZstdCodec):
    """zstd that decodes a chunk into a buffer of the chunk's own size (the layout's, checked on open): a frame
    that would decompress past it (a "bomb": gigabytes of zeros in a few kilobytes) fails as a damaged chunk
    instead of taking the memory. It reads every "zstd" of this process's zarr.json files (registered below);
    zarr's own allocates whatever size the frame declares. A dtype without a fixed size decodes as zarr does."""

    def _decode_sync(self, chunk_bytes, chunk_spec):
        dtype = chunk_spec.dtype.to_native_dtype()
        if dtype.hasobject or not dtype.itemsize:
            return super()._decode_sync(chunk_bytes, chunk_spec)
        out = np.empty(int(np.prod(chunk_spec.shape, dtype=np.int64)) * dtype.itemsize, np.uint8)
        self._zstd_codec.decode(chunk_bytes.as_numpy_array(), out=out)  # a frame larger than `out` is refused
        return chunk_spec.prototype.buffer.from_array_like(out)


zarr.registry.register_codec("zstd", BoundedZstdCodec)
zarr.config.set({"codecs.zstd": f"{BoundedZstdCodec.__module__}.{BoundedZstdCodec.__qualname__}"})

ROOM_MARGIN = 1 << 20  # metadata, chunk headers, and the estimate's slack


def room_for(path: str | Path, nbytes: int) -> None:
    """Refuse a write of about `nbytes` (uncompressed: more than it takes) that the local disk has no room for,
    before anything is written: a store never meets a full disk mid-block, and an HDF5 file never mid-write
    (which HDF5 cannot undo). Object storage is not checked."""
    local = local_path(path)
    if local is None:
        return
    folder = next((p for p in (local, *local.parents) if p.exists()), None)
    free = shutil.disk_usage(folder).free if folder is not None else None
    if free is not None and free < nbytes + ROOM_MARGIN:
        raise StoreWriteError(local, OSError(errno.ENOSPC, f"{free} bytes free, a block needs up to "
                                                           f"{nbytes + ROOM_MARGIN}"), intact=True)


class ZarrBackend:
    name = "zarr"

    def __init__(self, path: str | Path, mode: str):
        self.path = store_location(path)
        # "r" reads, "a" writes; several processes may write disjoint chunks at the same time.
        # A URL opens an fsspec store (zarr.storage.FsspecStore.from_url under zarr.open_group).
        url = self.path if isinstance(self.path, str) else None
        self.group = zarr.open_group(url or str(self.path), mode="r" if mode == "r" else "a",
                                     storage_options=storage_options(url) if url else None)

    @staticmethod
    def exists(path: str | Path) -> bool:
        loc = store_location(path)
        if isinstance(loc, Path):
            return (loc / "zarr.json").exists()
        fs, root = url_to_fs(loc)
        return fs.exists(f"{root}/zarr.json")

    @staticmethod
    def remove(path: str | Path) -> None:
        loc = store_location(path)
        if isinstance(loc, Path):
            shutil.rmtree(loc, ignore_errors=True)
            return
        fs, root = url_to_fs(loc)
        if fs.exists(root):
            fs.rm(root, recursive=True)

    def create_array(self, name: str, shape: tuple, dtype, chunks: tuple, fill_value, dims: tuple[str, ...]):
        # Dimension names let any Zarr v3 reader (xarray.open_zarr) label the axes. The checksum goes
        # last: it covers the compressed bytes as stored.
        self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill_value,
                                compressors=(ZstdCodec(), Crc32cCodec()), dimension_names=dims)

    def array(self, name: str):
        # write_empty_chunks: an all-fill chunk (a block of empty masks, say) is still a file, so "chunk
        # file present" means "written" and verify can tell a deleted chunk from a blank one. The
        # setting is not kept in the array's metadata: apply it on every open.
        return self.group[name].with_config({"write_empty_chunks": True})

    def checksummed(self, name: str) -> bool:
        return any(isinstance(c, Crc32cCodec) for c in self.group[name].metadata.codecs)

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

    def abandon(self) -> None:
        pass  # a chunk cut by a failed write belongs to a block not marked complete: written again

    def close(self) -> None:
        pass

    def nbytes_stored(self) -> int:
        if isinstance(self.path, Path):
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        fs, root = url_to_fs(self.path)  # one listing of every object: slow on a big bucket
        return int(fs.du(root, total=True))


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _locked(path: Path, mode: str) -> bool:
    """Whether another process holds HDF5's own lock on the file (flock: shared for readers, exclusive for
    a writer), tested by taking it, never guessed from an error's wording."""
    try:
        with open(path, "rb") as fh:
            fcntl.flock(fh, (fcntl.LOCK_SH if mode == "r" else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def _what_is_wrong(path: Path, err: Exception) -> str:
    """Why h5py cannot open `path`, in words: empty, not HDF5 at all, or cut or damaged (HDF5's own reason)."""
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if not head:
        return "the file is empty"
    if head != HDF5_SIGNATURE:
        return "no HDF5 signature at its start"
    reason = str(err).split("(", 1)[-1].rstrip(")") if "(" in str(err) else str(err)
    return f"{path.stat().st_size} bytes, cut or damaged: {reason[:120]}"


class H5Backend:
    name = "hdf5"

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r" if mode == "r" else "a")
        except (BlockingIOError, OSError) as err:
            if _locked(self.path, mode):
                # HDF5's own file lock: a writer excludes everyone, a reader excludes writers.
                writer = writer_of(self.path)
                who = f"{writer} is writing this HDF5 store" if writer else "another process has this HDF5 store open"
                raise StoreBusyError(f"{self.path}: {who}, and an HDF5 store takes one writer at a time, never "
                                     "beside readers (use a .zarr store for --shard K/N workers)") from None
            if isinstance(err, PermissionError):
                raise StoreError(f"{self.path}: cannot open HDF5 store ({err.strerror})") from None
            raise UnreadableStoreError(self.path, f"not a readable HDF5 file ({_what_is_wrong(self.path, err)})") \
                from None

    @staticmethod
    def exists(path: Path) -> bool:
        return Path(path).is_file()

    @staticmethod
    def remove(path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def create_array(self, name: str, shape: tuple, dtype, chunks: tuple, fill_value, dims: tuple[str, ...]):
        # (HDF5 has no dimension names short of dimension scales; the README's layout table names them.)
        self.file.create_dataset(
            name, shape=shape, maxshape=(None,) + tuple(shape[1:]), dtype=dtype, chunks=chunks,
            fillvalue=fill_value, compression="gzip", compression_opts=GZIP_LEVEL,
            shuffle=np.dtype(dtype).itemsize > 1, fletcher32=True,
        )

    def array(self, name: str):
        return self.file[name]

    def checksummed(self, name: str) -> bool:
        return self.file[name].fletcher32

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

    def abandon(self) -> None:
        """After a write the disk refused: point the file's descriptor at /dev/null, so that closing it (which
        writes HDF5's caches again, and crashes HDF5 1.14 once a write failed) ends cleanly and the file stays
        as the disk has it."""
        try:
            fd = self.file.id.get_vfd_handle()
        except Exception:  # noqa: BLE001 - closed already, or another driver: nothing to let go
            return
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)

    def close(self) -> None:
        """Close the file; one that cannot be written as it closes (a damaged file, a full disk) is let go as
        the disk has it (see `abandon`) rather than crash HDF5."""
        try:
            if self.file.mode != "r":
                self.file.flush()
        except (RuntimeError, OSError):
            self.abandon()
        try:
            self.file.close()
        except (RuntimeError, OSError):  # HDF5 could not finish a damaged file: the disk keeps it as it was
            pass

    def nbytes_stored(self) -> int:
        return self.path.stat().st_size
