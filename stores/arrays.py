"""What a store holds, in the store layer's own terms: array specs, ragged rows, id lookups, fingerprints."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

MISSING_REASONS = {0: "present", 1: "no input (file not found)", 2: "input unreadable",
                   3: "input refused (not a regular file, or over the size limit)"}


@dataclass(frozen=True)
class ArraySpec:
    """What one feature array holds per item: `shape` per item, or per token when `ragged`."""

    dtype: str
    shape: tuple[int, ...] = ()
    ragged: bool = False

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "ragged": self.ragged}

    @classmethod
    def from_json(cls, d: dict) -> ArraySpec:
        return cls(d["dtype"], tuple(d["shape"]), d["ragged"])

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))


class Ragged(NamedTuple):
    """Variable-length rows: row i is values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray  # (total_tokens, *shape)
    offsets: np.ndarray  # (n + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def padded(self, pad_value=0) -> tuple[np.ndarray, np.ndarray]:
        """(n, max_len, *shape) array padded with `pad_value`, and the (n,) lengths."""
        lengths = self.lengths
        out = np.full((len(self), max(int(lengths.max(initial=0)), 1)) + self.values.shape[1:],
                      pad_value, dtype=self.values.dtype)
        row = np.repeat(np.arange(len(self)), lengths)
        col = np.arange(len(self.values)) - np.repeat(self.offsets[:-1], lengths)
        out[row, col] = self.values
        return out, lengths


class IdIndex:
    """Keys sorted once and looked up many at a time, vectorised (no Python loop per key): the one sorted
    lookup of the project (item ids to rows, planned ids to input hashes, fingerprints to stored items)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self.order = np.argsort(keys, kind="stable")
        self.sorted = keys[self.order]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the `keys` found, the position in `self.keys` of each found one)."""
        if not len(self.sorted):
            return np.zeros(len(keys), bool), np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.sorted, keys), len(self.sorted) - 1)
        found = self.sorted[pos] == keys
        return found, self.order[pos[found]]


def fingerprint(texts) -> np.ndarray:
    """A stable 64-bit fingerprint per input string (blake2b; stable across runs and versions)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
         for t in texts),
        dtype=np.uint64, count=len(texts),
    )
