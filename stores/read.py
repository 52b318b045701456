"""Reading a store by item id: ids resolved to rows through one sorted index, each touched chunk read once."""
from __future__ import annotations

import numpy as np

from stores.arrays import ArraySpec, IdIndex, Ragged
from stores.errors import StoreError
from stores.layout import as_ids, used_rows


class Reader:
    """FeatureStore's reading (a part of it; see stores.store)."""

    def _load_index(self) -> tuple[IdIndex, np.ndarray]:
        """The ids of every complete row (in row order, indexed) and their rows."""
        if self._index is None:
            counts = self._counts()
            complete = self._read_range("complete", 0, len(counts)).astype(bool)
            valid = used_rows(counts, self.block_rows) & np.repeat(complete, self.block_rows)
            rows = np.flatnonzero(valid)
            self._index = (IdIndex(self._read_range("ids", 0, len(valid))[rows]), rows)
        return self._index

    @property
    def ids(self) -> np.ndarray:
        """Item ids of every complete row, in row order."""
        return self._load_index()[0].keys

    def __len__(self) -> int:
        return len(self._load_index()[1])

    def __contains__(self, item_id: int) -> bool:
        return bool(self.contains(np.array([item_id]))[0])

    def contains(self, ids) -> np.ndarray:
        return self._load_index()[0].find(as_ids(self.path, ids))[0]

    def rows(self, ids) -> np.ndarray:
        """Row of each id, in the order given (vectorised; unknown ids raise StoreError)."""
        ids = as_ids(self.path, ids)
        index, rows = self._load_index()
        found, at = index.find(ids)
        if not found.all():
            bad = ids[~found]
            raise StoreError(f"{self.path}: {len(bad)} item(s) not in the store (or in an incomplete "
                             f"block), e.g. {bad[:5].tolist()}")
        return rows[at]

    def read(self, name: str, ids) -> np.ndarray | Ragged:
        """Feature `name` of the items `ids`, in that order: an array, or Ragged for tokens.

        A chunk that fails its checksum raises DamagedStoreError naming the items and blocks it holds.
        """
        spec = self._spec(name)
        rows = self.rows(ids)
        if not spec.ragged:
            return self._read_at(name, rows)
        starts = self._read_at(f"{name}/starts", rows)
        lengths = self._read_at(f"{name}/lengths", rows).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])  # (tokens,)
        return Ragged(self._read_at(f"{name}/values", positions), offsets)

    def lengths(self, name: str, ids) -> np.ndarray:
        """(n,) int64: the number of tokens of ragged feature `name` for each item of `ids`."""
        if not self._spec(name).ragged:
            raise StoreError(f"{self.path}: '{name}' is not ragged: every item has shape {self.specs[name].shape}")
        return self._read_at(f"{name}/lengths", self.rows(ids)).astype(np.int64)

    def input_hashes(self, ids) -> np.ndarray:
        """(n,) uint64: the fingerprint of each item's input, as stored when it was planned."""
        return self._read_at("input_hash", self.rows(ids))

    def read_missing(self, ids) -> np.ndarray:
        return self._read_at("missing", self.rows(ids))

    def _spec(self, name: str) -> ArraySpec:
        if name not in self.specs:
            raise StoreError(f"{self.path}: no feature '{name}' (has {sorted(self.specs)})")
        return self.specs[name]

    def _read_at(self, array: str, positions: np.ndarray) -> np.ndarray:
        """array[positions] (through _gather), a damaged chunk raised as DamagedStoreError."""
        arr = self.backend.array(array)
        try:
            return gather(arr, positions, arr.chunks[0])
        except _UnreadableChunks as err:
            raise self._damaged(array, err.chunks, err.cause) from None

    def _read_range(self, array: str, lo: int, hi: int) -> np.ndarray:
        """array[lo:hi], a damaged chunk raised as DamagedStoreError."""
        try:
            return _read(self.backend.array(array), lo, hi)
        except _UnreadableChunks as err:
            raise self._damaged(array, err.chunks, err.cause) from None


class _UnreadableChunks(StoreError):
    """Chunks of a backend array that fail their checksum or cannot be decoded (FeatureStore adds the items)."""

    def __init__(self, arr, chunks: list[int], cause: str):
        self.chunks, self.cause = chunks, cause
        where = getattr(arr, "store_path", None) or f"{arr.file.filename}:{arr.name}"
        super().__init__(f"{where}: chunk(s) {chunks[:5]} cannot be read ({cause})")


def _read(arr, lo: int, hi: int) -> np.ndarray:
    """arr[lo:hi]; chunks that fail their checksum or cannot be decoded raise _UnreadableChunks."""
    try:
        return arr[lo:hi]
    except Exception as err:  # zstd, CRC32C, an HDF5 filter: the decoders raise many kinds
        clen = arr.chunks[0]
        bad = [c for c in range(lo // clen, -(-hi // clen)) if not _decodes(arr, c)]
        if not bad:
            raise  # every chunk reads on its own: not damage (a lost connection, say)
        raise _UnreadableChunks(arr, bad, type(err).__name__) from err


def _decodes(arr, chunk: int) -> bool:
    clen = arr.chunks[0]
    try:
        arr[chunk * clen : (chunk + 1) * clen]
        return True
    except Exception:
        return False


def gather(arr, positions: np.ndarray, chunk_len: int) -> np.ndarray:
    """arr[positions] for any order of positions, reading each touched chunk once.

    Positions are sorted, the chunks they touch are grouped into runs of consecutive chunks, each
    run is one slice read, and the values go back to the order asked: a loop over runs, never
    over items. A damaged chunk raises _UnreadableChunks (a StoreError).
    """
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty((len(positions),) + tuple(arr.shape[1:]), dtype=arr.dtype)
    if len(positions) == 0:
        return out
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    chunks = np.unique(sorted_pos // chunk_len)
    run_breaks = np.flatnonzero(np.diff(chunks) > 1) + 1
    for run in np.split(chunks, run_breaks):
        lo, hi = int(run[0]) * chunk_len, min((int(run[-1]) + 1) * chunk_len, arr.shape[0])
        i, j = np.searchsorted(sorted_pos, [lo, hi])
        out[order[i:j]] = _read(arr, lo, hi)[sorted_pos[i:j] - lo]
    return out
