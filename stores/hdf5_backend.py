"""The HDF5 backend (`stores.backends`): one local file; shuffle, gzip and Fletcher-32 on every chunk."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import h5py
import numpy as np

from stores.errors import StoreBusyError, StoreError, UnreadableStoreError
from stores.locks import writer_of

__all__ = ["H5Backend"]


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

    def __init__(self, path: Path, mode: str, gzip_level: int | None = None):
        self.path = Path(path)
        self.gzip_level = gzip_level  # of the arrays it creates ([stores] gzip_level)
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
            fillvalue=fill_value, compression="gzip", compression_opts=self.gzip_level,
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
