"""The store layer's errors. Each message is one line naming the store (and the items where relevant),
so that a command line can print it as it is."""
from __future__ import annotations

import errno
import os
import re

import numpy as np


class StoreError(Exception):
    """A store that cannot serve the request: unknown items, refused input, damaged or busy store."""


class StoreBusyError(StoreError):
    """Another process holds the store for writing."""


class WriterConflictError(StoreError):
    """Another live process is writing the same blocks of this store."""


class UnreadableStoreError(StoreError):
    """The store's own metadata cannot be read or is not what its layout says: a truncated `zarr.json`, a
    damaged provenance, an HDF5 file left unreadable by a crash. No block rewrite mends it; only a rebuild."""

    def __init__(self, path, what: str):
        self.path, self.what = path, what
        super().__init__(f"{path}: damaged: {what}")


class StoreWriteError(StoreError, OSError):
    """A write the disk refused (full, gone, read-only). `intact`: the store on disk is still consistent and the
    same run resumes it (a Zarr store, or a write refused before it began); an HDF5 file cut mid-write may not
    be, and is rebuilt."""

    def __init__(self, path, cause: BaseException, intact: bool):
        code = getattr(cause, "errno", None) or _errno_in(str(cause)) or errno.EIO
        lines = (cause.strerror if isinstance(cause, OSError) else str(cause) or "").splitlines()
        detail = lines[0][:160] if lines and lines[0] != os.strerror(code) else ""
        super().__init__(code, os.strerror(code) + (f" ({detail})" if detail else ""), str(path))
        self.path, self.intact = path, intact

    def __str__(self) -> str:
        return f"{self.path}: writing failed ({self.strerror})"


def _errno_in(text: str) -> int | None:
    """The errno an HDF5 error text names (`errno = 28`), if any."""
    found = re.search(r"errno = (\d+)", text)
    return int(found.group(1)) if found else None


class DamagedStoreError(StoreError):
    """Chunks of an array failed their checksum or could not be decoded.

    `blocks` are the blocks whose data lies in those chunks: `FeatureStore.invalidate_blocks(blocks)`
    makes the next extraction rewrite exactly them. `item_ids` are the items with data there (empty
    when the damaged array is `ids` itself). `repairable` is False when the array is part of the layout
    (ids, input hashes, counts, ragged starts and lengths), which no block rewrite mends: only a rebuild.
    """

    def __init__(self, path, array: str, chunks, blocks, item_ids, cause: str, repairable: bool = True):
        self.path, self.array, self.cause, self.repairable = path, array, cause, repairable
        self.chunks = sorted(int(c) for c in chunks)
        self.blocks = sorted(int(b) for b in blocks)
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        shown = ", ".join(str(i) for i in self.item_ids[:5]) + (", ..." if len(self.item_ids) > 5 else "")
        items = f"{len(self.item_ids)} item(s) [{shown}] lie there" if len(self.item_ids) else "its items are unknown"
        super().__init__(f"{path}: array '{array}' is damaged: chunk(s) {_few(self.chunks)} cannot be read "
                         f"({cause}); {items}, in block(s) {_few(self.blocks)}")


def _few(values: list[int], n: int = 5) -> str:
    return ", ".join(map(str, values[:n])) + (f", ... ({len(values)} in all)" if len(values) > n else "")
