"""The store layer's errors. Each message is one line naming the store (and the items where relevant),
so that a command line can print it as it is."""
from __future__ import annotations

import numpy as np


class StoreError(Exception):
    """A store that cannot serve the request: unknown items, refused input, damaged or busy store."""


class StoreBusyError(StoreError):
    """Another process holds the store for writing."""


class WriterConflictError(StoreError):
    """Another process, live or on another host, is writing the same blocks of this store (`claim`: its
    writer claim: host, pid, shard k of n, since when)."""

    def __init__(self, path, claim: dict, n: int):
        self.path, self.claim, self.host = path, claim, claim["host"]
        what = "the same shard" if claim["n"] == n else f"shards of another split (K/{claim['n']})"
        since = f", since {claim['since']}" if "since" in claim else ""
        super().__init__(f"{path}: process {claim['pid']} on {claim['host']} is writing {what} ({claim['k']}/"
                         f"{claim['n']}{since}); wait for it, or give each worker its own --shard K/{n}")


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
