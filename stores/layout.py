"""Planning and writing a store's layout: rows in blocks, each block owning whole chunks of every array.

Rows are grouped in blocks. A block is the unit of work and of resumption: its data is written first, its
`complete` flag last, and readers only see items of complete blocks, so a killed writer leaves at worst a
block that the next run writes again. Each block owns whole chunks of every array it writes (a ragged
block's tokens start at a chunk boundary), so processes working on different blocks never write the same
chunk: that is what lets `--shard K/N` workers fill one Zarr store at once. New items are appended as new
blocks. A damaged block can be marked incomplete (`invalidate_blocks`) and written again in place: its rows
and token range were fixed when planned.
"""
from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import numpy as np

from stores.arrays import MISSING_REASONS, ArraySpec, IdIndex
from stores.backends import backend_for, room_for
from stores.errors import StoreError, StoreWriteError
from stores.locks import sole_writer
from stores.paths import store_location

SCHEMA_VERSION = 2
COUNTS_CHUNK = 1024  # blocks per chunk of `counts`: only the planner writes it, never a shard worker
INDEX_ARRAYS = ("ids", "input_hash", "missing", "counts", "complete")  # the layout's own, beside the features
INT64_MAX = np.iinfo(np.int64).max


def _pow2_at_most(n: float) -> int:
    return 1 << max(int(np.floor(np.log2(max(n, 1)))), 0)


def _round_up(x: np.ndarray | int, m: int):
    return -(-x // m) * m


def used_rows(counts: np.ndarray, block_rows: int) -> np.ndarray:
    """(len(counts) * B,) bool: the rows holding an item (the first counts[b] rows of each block b)."""
    return np.arange(len(counts) * block_rows) % block_rows < np.repeat(counts, block_rows)


def as_ids(where, ids) -> np.ndarray:
    """Item ids as a 1-d int64 array; refuses what would not survive the cast (floats, uint64 past
    2**63 - 1) instead of silently turning it into another id."""
    try:
        arr = np.asarray(ids)
    except OverflowError:
        arr = np.asarray(ids, dtype=object)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr.dtype.kind == "u" and arr.max() > INT64_MAX):
        raise StoreError(f"{where}: item ids must be a 1-d array of 64-bit signed integers, "
                         f"not {arr.dtype} of shape {arr.shape}")
    return arr.astype(np.int64)


def _check_new_items(where, specs: dict[str, ArraySpec], ids, input_hash, lengths, planned: np.ndarray):
    """The new items' (ids, input_hash, lengths), checked before anything is written: a refused call
    leaves the store as it was."""
    ids = as_ids(where, ids)
    input_hash = np.asarray(input_hash, dtype=np.uint64)
    if input_hash.shape != ids.shape:
        raise StoreError(f"{where}: {len(ids)} item ids but {input_hash.shape} input hashes")
    lengths = dict(lengths or {})
    for name in [n for n, spec in specs.items() if spec.ragged]:
        if name not in lengths:
            raise StoreError(f"{where}: '{name}' is ragged: give the token count of every new item")
        lengths[name] = np.asarray(lengths[name], dtype=np.int64)
        if lengths[name].shape != ids.shape or (lengths[name] < 0).any():
            raise StoreError(f"{where}: '{name}' needs one token count >= 0 per item ({len(ids)}), "
                             f"got shape {lengths[name].shape}")
    unique, seen = np.unique(ids, return_counts=True)
    twice = np.union1d(unique[seen > 1], ids[np.isin(ids, planned)])
    if len(twice):
        raise StoreError(f"{where}: {len(twice)} item id(s) given twice or already in the store, "
                         f"e.g. {twice[:5].tolist()}")
    return ids, input_hash, lengths


class Layout:
    """FeatureStore's planning and writing (a part of it; see stores.store)."""

    @classmethod
    def create(cls, path: str | Path, kind: str, arrays: dict[str, ArraySpec], producer: dict,
               ids: np.ndarray, input_hash: np.ndarray, lengths: dict[str, np.ndarray] | None = None, *,
               block_rows: int, chunk_bytes: int, gzip_level: int) -> Self:
        """Create a store laid out for `ids` (rows planned, nothing computed yet): rows in blocks of `block_rows`,
        chunks of about `chunk_bytes`, HDF5 chunks gzip-compressed at `gzip_level` ([stores] in the config)."""
        path = store_location(path)
        backend = backend_for(path)
        if block_rows <= 0 or block_rows & (block_rows - 1):
            raise StoreError(f"{path}: block_rows must be a power of two, not {block_rows}")
        taken = sorted(set(arrays) & set(INDEX_ARRAYS))
        if taken:
            raise StoreError(f"{path}: a feature array may not be called {', '.join(taken)} (the store's own arrays: "
                             f"{', '.join(INDEX_ARRAYS)})")
        ids, input_hash, lengths = _check_new_items(path, arrays, ids, input_hash, lengths, np.zeros(0, np.int64))
        room_for(path, len(ids) * 32)  # the layout's own arrays; each block checks for its data
        with sole_writer(path):
            if backend.exists(path):
                raise StoreError(f"{path}: already exists")
            if isinstance(path, Path):
                path.parent.mkdir(parents=True, exist_ok=True)
            b = backend(path, "w", gzip_level)
            layout = {"block_rows": block_rows,
                      "arrays": create_arrays(b, arrays, chunk_lengths(arrays, lengths, block_rows, chunk_bytes),
                                              block_rows)}
            b.set_attr("provenance", {
                "schema_version": SCHEMA_VERSION,
                "kind": kind,
                "producer": producer,
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "backend": backend.name,
                "layout": layout,
                "missing_reasons": {str(k): v for k, v in MISSING_REASONS.items()},
            })
            b.close()
            store = cls(path, "a")
        store.add_items(ids, input_hash, lengths)
        return store

    def add_items(self, ids: np.ndarray, input_hash: np.ndarray,
                  lengths: dict[str, np.ndarray] | None = None) -> list[int]:
        """Plan rows for new items in fresh blocks after the existing ones; return the new blocks.

        Ragged arrays need each new item's length now, so that every block's token range is
        fixed before any worker writes (workers then never touch each other's chunks). Ids given
        twice, or already planned, are refused, and the store is left as it was.
        """
        self._writable()
        ids, input_hash, lengths = _check_new_items(self.path, self.specs, ids, input_hash, lengths,
                                                    self.planned()[0])
        if len(ids) == 0:
            return []
        B, b = self.block_rows, self.backend
        nb0 = self.n_blocks
        n_new = -(-len(ids) // B)
        r0, r1 = nb0 * B, (nb0 + n_new) * B
        room_for(self.path, (r1 - r0) * 32)  # ids, hashes, missing flags, token ranges
        for name in ("ids", "input_hash", "missing"):
            b.array(name).resize((r1,))
        b.array("ids")[r0 : r0 + len(ids)] = ids
        b.array("input_hash")[r0 : r0 + len(ids)] = input_hash
        for name, spec in self.specs.items():
            if spec.ragged:
                self._plan_tokens(name, lengths[name], r0, r1)
            else:
                b.array(name).resize((r1,) + spec.shape)
        b.array("counts").resize((nb0 + n_new,))
        b.array("counts")[nb0:] = np.minimum(len(ids) - B * np.arange(n_new), B)
        b.array("complete").resize((nb0 + n_new,))  # last: readers and workers see whole blocks only
        b.flush()
        self._index = None
        return list(range(nb0, nb0 + n_new))

    def _plan_tokens(self, name: str, new_lengths: np.ndarray, r0: int, r1: int) -> None:
        """Give rows r0..r1 of ragged `name` their token ranges: each block starts on a chunk boundary."""
        B, b, chunk = self.block_rows, self.backend, self.chunk_len(name)
        lens = np.zeros(r1 - r0, dtype=np.int64)  # (rows,): the new items, then the last block's unused rows
        lens[: len(new_lengths)] = new_lengths
        block_tokens = lens.reshape(-1, B).sum(1)
        block_span = _round_up(block_tokens, chunk)
        values = b.array(f"{name}/values")
        t0 = values.shape[0]
        block_start = t0 + np.concatenate([[0], np.cumsum(block_span)[:-1]])
        within = np.cumsum(lens) - lens - np.repeat(np.cumsum(block_tokens) - block_tokens, B)
        starts = np.repeat(block_start, B) + within
        for part, data in (("starts", starts), ("lengths", lens.astype(np.int32))):
            b.array(f"{name}/{part}").resize((r1,))
            b.array(f"{name}/{part}")[r0:r1] = data
        values.resize((t0 + int(block_span.sum()),) + values.shape[1:])

    def write_block(self, block: int, data: dict[str, np.ndarray], missing: np.ndarray | None = None) -> None:
        """Write every array of one block (rows in store order), then mark the block complete.

        `data[name]` is (n, *shape) for a fixed array, or the block's tokens back to back
        (sum of its items' lengths, *shape) for a ragged one. Everything is checked before the
        first write: refused data leaves the store as it was.
        """
        self._writable()
        if not 0 <= block < self.n_blocks:
            raise StoreError(f"{self.path}: no block {block} (the store has {self.n_blocks})")
        B, b = self.block_rows, self.backend
        r0, n = block * B, self._block_count(block)
        writes = self._block_writes(block, r0, n, data)
        missing = np.zeros(n, np.uint8) if missing is None else np.asarray(missing, np.uint8)
        if missing.shape != (n,):
            raise StoreError(f"{self.path}: block {block} expects {n} missing codes, got {missing.shape}")
        room_for(self.path, sum(arr.nbytes for _, _, arr in writes) + B)
        with self._writing():
            for target, start, arr in writes:
                if len(arr):  # a block of empty descriptions has no tokens to write
                    b.array(target)[start : start + len(arr)] = arr
            b.array("missing")[r0 : r0 + B] = np.pad(missing, (0, B - n))
            b.flush()
            b.array("complete")[block] = 1  # last: a block is valid only once all its data is down
            b.flush()
        self._index = None

    @contextmanager
    def _writing(self):
        """A write the disk refuses (full, gone, read-only) is a StoreWriteError; an HDF5 file is then let go as
        the disk has it (closing it would write again: HDF5 1.14 crashes there), and may need a rebuild."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            self.backend.abandon()
            raise StoreWriteError(self.path, err, intact=self.backend.name == "zarr") from err

    def _block_writes(self, block: int, r0: int, n: int, data: dict) -> list[tuple[str, int, np.ndarray]]:
        """(array, first position, values) of each array of the block, every shape checked."""
        if set(data) != set(self.specs):
            raise StoreError(f"{self.path}: block {block} needs arrays {sorted(self.specs)}, got {sorted(data)}")
        writes = []
        for name, spec in self.specs.items():
            arr = np.asarray(data[name], dtype=spec.dtype)
            if spec.ragged:
                start = int(self._read_range(f"{name}/starts", r0, r0 + 1)[0])
                expected = (int(self._read_range(f"{name}/lengths", r0, r0 + n).sum()),) + spec.shape
                writes.append((f"{name}/values", start, arr))
            else:
                expected = (n,) + spec.shape
                writes.append((name, r0, arr))
            if arr.shape != expected:
                raise StoreError(f"{self.path}: block {block} of '{name}' expects {expected}, got {arr.shape}")
        return writes

    def invalidate_blocks(self, blocks) -> None:
        """Mark blocks incomplete (the `damaged_blocks` of verify(), say): readers stop serving their
        items, and the next extraction writes them again, in place."""
        self._writable()
        blocks = np.unique(np.asarray(blocks, dtype=np.int64))
        if len(blocks) and (blocks[0] < 0 or blocks[-1] >= self.n_blocks):
            raise StoreError(f"{self.path}: no block {int(blocks[0] if blocks[0] < 0 else blocks[-1])} "
                             f"(the store has {self.n_blocks})")
        complete = self.backend.array("complete")
        for block in blocks:
            complete[int(block)] = 0
        self.backend.flush()
        self._index = None

    def _writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.path}: opened for reading; open it with mode 'a' to write")

    def chunk_len(self, name: str) -> int:
        return int(self.provenance["layout"]["arrays"][name]["chunk"])

    @property
    def n_blocks(self) -> int:
        return self.backend.array("complete").shape[0]

    def _counts(self) -> np.ndarray:
        """(n_blocks,) items in each block."""
        return self._read_range("counts", 0, self.n_blocks).astype(np.int64)

    def _block_count(self, block: int) -> int:
        return int(self._read_range("counts", block, block + 1)[0])

    def block_ids(self, block: int) -> np.ndarray:
        r0 = block * self.block_rows
        return self._read_range("ids", r0, r0 + self._block_count(block))

    def block_counts(self) -> np.ndarray:
        """Number of items planned in each block."""
        return self._counts()

    def pending_blocks(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Blocks not yet complete that belong to shard k of n (round robin over blocks)."""
        k, n = shard
        complete = self._read_range("complete", 0, self.n_blocks)
        return [int(blk) for blk in np.flatnonzero(complete == 0) if blk % n == k]

    def planned_hashes(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the `ids` planned in the store, complete or not; the input hash stored for each of them)."""
        planned_ids, planned_hash = self.planned()
        found, at = IdIndex(planned_ids).find(as_ids(self.path, ids))
        return found, planned_hash[at]

    def planned(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, input_hash) of every planned row, complete or not, in row order.

        Only blocks that are wholly laid out count: an id listed here has its row and token range.
        """
        counts = self._counts()
        used = used_rows(counts, self.block_rows)
        return (self._read_range("ids", 0, len(used))[used], self._read_range("input_hash", 0, len(used))[used])

    def _plan_arrays(self) -> list[str]:
        """Arrays written when items are planned, never by write_block: a block rewrite cannot mend them."""
        names = ["ids", "input_hash", "counts"]
        return names + [f"{n}/{part}" for n, s in self.specs.items() if s.ragged for part in ("starts", "lengths")]

    def _data_arrays(self) -> list[str]:
        """Arrays write_block writes (besides `complete`)."""
        return ["missing"] + [f"{n}/values" if s.ragged else n for n, s in self.specs.items()]

    def array_names(self) -> list[str]:
        names = ["ids", "input_hash", "missing", "counts", "complete"]
        for name, spec in self.specs.items():
            names += [f"{name}/values", f"{name}/starts", f"{name}/lengths"] if spec.ragged else [name]
        return names


def chunk_lengths(arrays: dict[str, ArraySpec], lengths: dict[str, np.ndarray], block_rows: int,
                  chunk_bytes: int) -> dict[str, int]:
    """Rows (tokens, for a ragged array) per chunk of each feature array: about `chunk_bytes`; a fixed array's
    chunks never straddle blocks, and a ragged one's are small enough that aligning each block's tokens to a
    chunk boundary wastes at most ~1/16 of them."""
    chunks = {}
    for name, spec in arrays.items():
        by_bytes = _pow2_at_most(chunk_bytes / max(spec.row_bytes, 1))
        if spec.ragged:
            mean_len = float(np.mean(lengths[name])) if len(lengths[name]) else 16.0
            chunks[name] = min(by_bytes, _pow2_at_most(block_rows * max(mean_len, 1.0) / 16))
        else:
            chunks[name] = min(block_rows, by_bytes)
    return chunks


def create_arrays(b, arrays: dict[str, ArraySpec], chunks: dict[str, int], block_rows: int) -> dict:
    """Create every array of an empty store in backend `b`; return the layout's `arrays` (spec and chunk of each)."""
    for name, spec in arrays.items():
        axes = tuple(f"{name}_dim{k}" for k in range(1, len(spec.shape) + 1))  # unique: a dataset shares names
        if spec.ragged:
            b.create_array(f"{name}/values", (0,) + spec.shape, spec.dtype, (chunks[name],) + spec.shape, 0,
                           ("token",) + axes)
            b.create_array(f"{name}/starts", (0,), "int64", (block_rows,), 0, ("item",))
            b.create_array(f"{name}/lengths", (0,), "int32", (block_rows,), 0, ("item",))
        else:
            b.create_array(name, (0,) + spec.shape, spec.dtype, (chunks[name],) + spec.shape, 0, ("item",) + axes)
    b.create_array("ids", (0,), "int64", (block_rows,), -1, ("item",))
    b.create_array("input_hash", (0,), "uint64", (block_rows,), 0, ("item",))
    b.create_array("missing", (0,), "uint8", (block_rows,), 0, ("item",))
    b.create_array("counts", (0,), "int32", (COUNTS_CHUNK,), 0, ("block",))
    b.create_array("complete", (0,), "uint8", (1,), 0, ("block",))  # one chunk per block: shard workers write it
    return {name: spec.to_json() | {"chunk": chunks[name]} for name, spec in arrays.items()}
