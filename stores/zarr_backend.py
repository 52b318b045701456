"""The Zarr backend (`stores.backends`): a directory, or a URL through fsspec; zstd then CRC32C on every chunk."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from stores.paths import storage_options, store_location, url_to_fs

__all__ = ["ZarrBackend"]


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

class ZarrBackend:
    name = "zarr"

    def __init__(self, path: str | Path, mode: str, gzip_level: int | None = None):  # (an HDF5 setting)
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
