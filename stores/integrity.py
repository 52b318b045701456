"""A store's integrity: every chunk carries a checksum, and damage is named by the blocks and items it hits.

`verify` reads every chunk that the planned and complete blocks use; a read that meets a damaged chunk
raises `DamagedStoreError` naming the array, the items whose data lies there and their blocks, which
`invalidate_blocks` makes the next extraction write again (damage to the layout itself: a rebuild).
"""
from __future__ import annotations

import numpy as np

from stores.errors import DamagedStoreError, StoreError


class Integrity:
    """FeatureStore's damage reports and verification (a part of it; see stores.store)."""

    def _damaged(self, array: str, chunks, cause: str) -> DamagedStoreError:
        """The error for damaged chunks of `array`, naming the blocks and items whose data lies there."""
        blocks, items = [], np.zeros(0, np.int64)
        if not self._naming_damage:  # more damage met while naming these items: say what is known
            self._naming_damage = True
            try:
                blocks = self._blocks_of_chunks(array, chunks)
                items = self._items_in_chunks(array, chunks, blocks)
            except StoreError:  # the arrays that say what lies there are damaged too
                pass
            finally:
                self._naming_damage = False
        return DamagedStoreError(self.path, array, chunks, blocks, items, cause,
                                 repairable=array not in self._plan_arrays())

    def _blocks_of_chunks(self, array: str, chunks) -> list[int]:
        """The blocks whose data lies in the given chunks of `array`."""
        clen = self.backend.array(array).chunks[0]
        if array in ("complete", "counts"):  # one value per block
            return sorted({b for c in chunks for b in range(c * clen, min((c + 1) * clen, self.n_blocks))})
        if array.endswith("/values"):  # a block's tokens start on a chunk boundary and fill whole chunks
            return sorted({self._block_of_token(array.rsplit("/", 1)[0], c * clen) for c in chunks})
        return sorted({c * clen // self.block_rows for c in chunks})  # row chunks never straddle blocks

    def _block_of_token(self, feature: str, token: int) -> int:
        """The block whose token range holds `token`: a binary search over the blocks' first tokens."""
        B = self.block_rows
        lo, hi = 0, self.n_blocks  # the last block starting at or before `token` lies in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            first = int(self._read_range(f"{feature}/starts", mid * B, mid * B + 1)[0])
            lo, hi = (mid, hi) if first <= token else (lo, mid)
        return lo

    def _items_in_chunks(self, array: str, chunks, blocks) -> np.ndarray:
        """Ids of the items of `blocks` with data in the given chunks of `array`."""
        if array == "ids":
            return np.zeros(0, np.int64)  # the ids themselves are what is lost
        B, chunks = self.block_rows, np.asarray(list(chunks))
        rows = np.concatenate([np.arange(b * B, b * B + self._block_count(b)) for b in blocks]
                              + [np.zeros(0, np.int64)])
        clen = self.backend.array(array).chunks[0]
        if array.endswith("/values"):
            feature = array.rsplit("/", 1)[0]
            first = self._read_at(f"{feature}/starts", rows)
            last = first + self._read_at(f"{feature}/lengths", rows) - 1  # last < first: no tokens
            hit = (first[:, None] // clen <= chunks) & (last[:, None] // clen >= chunks)
            rows = rows[hit.any(1) & (last >= first)]
        elif array not in ("complete", "counts"):
            rows = rows[np.isin(rows // clen, chunks)]
        return self._read_at("ids", rows)

    def verify(self) -> dict:
        """Read every chunk the planned and complete blocks use; report missing or unreadable chunks.

        Returns `ok`, `items` (of complete blocks), `incomplete_blocks`, `problems` (one line each),
        `damaged_items` (items of complete blocks with data in a damaged chunk), `damaged_blocks` (give
        them to invalidate_blocks, then extract again: they are written anew) and `repairable` (False
        when damage lies in what was planned, ids or token ranges: only a rebuild restores those).
        """
        n = self.n_blocks
        found, kept = {}, {}  # array -> {chunk: what is wrong}; array -> its values, damaged chunks zeroed
        found["complete"], complete = self._scan("complete", range(n), keep=True, missing_ok=True)
        complete = complete[:n].astype(bool)  # a damaged flag reads 0: its block is written again anyway
        for name in self._plan_arrays():
            found[name], kept[name] = self._scan(name, range(self._n_chunks(name, n)), keep=name != "input_hash")
        counts = kept["counts"][:n]
        for name in self._data_arrays():
            found[name], _ = self._scan(name, self._chunks_used(name, np.flatnonzero(complete), counts, kept))
        problems, blocks, items = [], set(), []
        for name in self.array_names():
            bad = sorted(found[name])
            problems += [f"{name}: chunk {c} is {found[name][c]}" for c in bad]
            if bad:
                hit = self._blocks_of_chunks(name, bad)
                blocks.update(hit)
                items.append(self._items_in_chunks(name, bad, [b for b in hit if complete[b]]))
        return {
            "ok": not problems and bool(complete.all()),
            "items": int(counts[complete].sum()),
            "incomplete_blocks": np.flatnonzero(~complete).tolist(),
            "problems": problems,
            "damaged_items": np.unique(np.concatenate(items + [np.zeros(0, np.int64)])).tolist(),
            "damaged_blocks": sorted(blocks),
            "repairable": not any(found[name] for name in self._plan_arrays()),
        }

    def _n_chunks(self, name: str, n_blocks: int) -> int:
        """Chunks of `name` that the first n_blocks blocks use (an array may run past them while planned)."""
        clen = self.backend.array(name).chunks[0]
        return -(-(n_blocks if name in ("counts", "complete") else n_blocks * self.block_rows) // clen)

    def _chunks_used(self, name: str, blocks: np.ndarray, counts: np.ndarray, kept: dict) -> np.ndarray:
        """Chunks of data array `name` holding data of the given blocks."""
        B, clen = self.block_rows, self.backend.array(name).chunks[0]
        if name.endswith("/values"):
            feature = name.rsplit("/", 1)[0]
            first = kept[f"{feature}/starts"][blocks * B]
            size = kept[f"{feature}/lengths"][: len(counts) * B].reshape(-1, B).sum(1)[blocks]
        else:
            first, size = blocks * B, counts[blocks]
        spans = [np.arange(lo, hi) for lo, hi in zip(first // clen, -(-(first + size) // clen))]
        return np.unique(np.concatenate(spans + [np.zeros(0, np.int64)])).astype(np.int64)

    def _scan(self, name: str, chunks, keep: bool = False, missing_ok: bool = False):
        """Read the given chunks of array `name` one at a time. Returns ({chunk: what is wrong}, values):
        `values` (keep=True) is the whole array with the damaged chunks left zero."""
        arr, bad = self.backend.array(name), {}
        clen = arr.chunks[0]
        values = np.zeros(arr.shape, arr.dtype) if keep else None
        for c in chunks:
            c = int(c)
            try:
                if not self.backend.chunk_exists(name, c):
                    if not missing_ok:
                        bad[c] = "missing"
                    continue
                part = arr[c * clen : (c + 1) * clen]
            except Exception as err:  # a decoder error of any kind means a damaged chunk
                bad[c] = f"unreadable ({type(err).__name__})"
                continue
            if keep:
                values[c * clen : c * clen + len(part)] = part
        return bad, values
