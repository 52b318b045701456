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
import shutil
from pathlib import Path

from stores.errors import StoreError, StoreWriteError
from stores.paths import is_hdf5, is_url, local_path, suffix

__all__ = ["backend_for", "room_for"]


def backend_for(path: str | Path):
    """The backend class of a store path (`stores.zarr_backend.ZarrBackend`, `stores.hdf5_backend.H5Backend`),
    its library (zarr, h5py: 0.15 s of imports on 2 cores) imported with the first store that needs it."""
    if suffix(path) == ".zarr":
        from stores.zarr_backend import ZarrBackend

        return ZarrBackend
    if is_hdf5(path):
        if is_url(path):
            raise StoreError(f"{path}: an HDF5 store must be a local file; a store URL must end in .zarr")
        from stores.hdf5_backend import H5Backend

        return H5Backend
    raise StoreError(f"{path}: a store path must end in .zarr (Zarr directory) or .h5 (HDF5 file)")


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
