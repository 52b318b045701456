"""Item-keyed feature stores: one layout, two backends (Zarr directory, HDF5 file).

Layout (the same arrays in both backends; R rows, in blocks of B = `block_rows`):

    ids            (R,)          int64   item id of each row (any int64; unused rows read -1, but only
                                         `counts` tells them apart: a real id may be -1 too)
    input_hash     (R,)          uint64  fingerprint of the item's input (title text, image file, ...)
    missing        (R,)          uint8   0 = present, otherwise a reason code (see provenance)
    counts         (n_blocks,)   int32   items in each block: they fill its first rows, the rest is unused
    complete       (n_blocks,)   uint8   1 once every array of the block is written (one chunk each)
    <name>         (R, *shape)           a fixed-shape feature (an image feature map, a sketch)
    <name>/values  (T, *shape)           a ragged feature (tokens): all items' tokens back to back
    <name>/starts  (R,)          int64   first token of each row in values
    <name>/lengths (R,)          int32   number of tokens of each row

The real items are the first `counts[b]` rows of each block b whose `complete[b]` is 1.

Rows are grouped in blocks. A block is the unit of work and of resumption: its data is written
first, its `complete` flag last, and readers only see items of complete blocks, so a killed writer
leaves at worst a block that the next run writes again. Each block owns whole chunks of every array
it writes (a ragged block's tokens start at a chunk boundary), so processes working on different
blocks never write the same chunk: that is what lets `--shard K/N` workers fill one Zarr store at
once. New items are appended as new blocks. A damaged block can be marked incomplete
(`invalidate_blocks`) and written again in place: its rows and token range were fixed when planned.

Schema versions: 2 (this code writes it) checksums every chunk (Zarr: CRC32C; HDF5: Fletcher-32 with
gzip) and keeps `counts`. Version 1 had no `counts` (id -1 marked an unused row, so it holds no
negative ids), no checksum in Zarr and lzf in HDF5: it is still read, and appended to.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stores.backends import backend_for, room_for, store_location
from stores.errors import DamagedStoreError, StoreError, StoreWriteError, UnreadableStoreError, WriterConflictError
from stores.locks import acquire_sole_writer, release_sole_writer, sole_writer, store_lock, writer_claim
from stores.metadata import check_arrays, check_provenance
from stores.paths import sidecar

# Old import paths that callers use: `from stores.store import sidecar, store_lock, ...`.
__all__ = ["ArraySpec", "FeatureStore", "Ragged", "StoreError", "WriterConflictError", "DamagedStoreError",
           "fingerprint", "sidecar", "store_lock", "writer_claim", "SCHEMA_VERSION", "MISSING_REASONS"]

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
CHUNK_BYTES = 1 << 21  # aim for chunks of about 2 MiB
COUNTS_CHUNK = 1024  # blocks per chunk of `counts`: only the planner writes it, never a shard worker
MISSING_REASONS = {0: "present", 1: "no input (file not found)", 2: "input unreadable",
                   3: "input refused (not a regular file, or over the size limit)"}
INT64_MAX = np.iinfo(np.int64).max


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


def fingerprint(texts) -> np.ndarray:
    """A stable 64-bit fingerprint per input string (blake2b; stable across runs and versions)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
         for t in texts),
        dtype=np.uint64, count=len(texts),
    )


def _pow2_at_most(n: float) -> int:
    return 1 << max(int(np.floor(np.log2(max(n, 1)))), 0)


def _round_up(x: np.ndarray | int, m: int):
    return -(-x // m) * m


def _used_rows(counts: np.ndarray, block_rows: int) -> np.ndarray:
    """(len(counts) * B,) bool: the rows holding an item (the first counts[b] rows of each block b)."""
    return np.arange(len(counts) * block_rows) % block_rows < np.repeat(counts, block_rows)


def _as_ids(where, ids) -> np.ndarray:
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
    ids = _as_ids(where, ids)
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


class FeatureStore:
    """A feature store keyed by item id. Open with `FeatureStore(path)`; build with `create`.

    Mode "a" opens it for writing; an HDF5 store then takes its one-writer lock, refused at once
    (StoreBusyError naming the process) while another process writes it.
    """

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = store_location(path)  # a Path, or a URL string (a Zarr store through fsspec)
        backend = backend_for(self.path)
        if not backend.exists(self.path):
            raise StoreError(f"{self.path}: no such store")
        self.mode = mode
        self._writer_lock = None if mode == "r" else acquire_sole_writer(self.path)
        self.backend = None
        try:
            self.backend, prov = _open_backend(backend, self.path, mode)
            if not prov:
                raise StoreError(f"{self.path}: not a feature store (no provenance attributes); rebuild it")
            check_provenance(self.path, prov, READABLE_SCHEMAS)
            self.schema_version = prov["schema_version"]
            self.provenance = prov
            self.block_rows = int(prov["layout"]["block_rows"])
            self.specs = {k: ArraySpec.from_json(v) for k, v in prov["layout"]["arrays"].items()}
            check_arrays(self)  # every array as the layout says, before any chunk is read
        except BaseException:
            self.close()
            raise
        self._index = None
        self._naming_damage = False

    @staticmethod
    def exists(path: str | Path) -> bool:
        return backend_for(path).exists(store_location(path))

    @staticmethod
    def remove(path: str | Path) -> None:
        """Delete the store; an HDF5 store that another process is writing is refused (StoreBusyError)."""
        with sole_writer(path):
            backend_for(path).remove(store_location(path))

    @cached_property
    def checksummed(self) -> bool:
        """Whether every chunk of every array carries a checksum (schema 2; HDF5 stores of schema 1 too)."""
        return all(self.backend.checksummed(name) for name in self.array_names())

    # ------------------------------------------------------------------ building
    @classmethod
    def create(cls, path: str | Path, kind: str, arrays: dict[str, ArraySpec], producer: dict,
               ids: np.ndarray, input_hash: np.ndarray, lengths: dict[str, np.ndarray] | None = None,
               block_rows: int = 1024, chunk_bytes: int = CHUNK_BYTES) -> FeatureStore:
        """Create a store laid out for `ids` (rows planned, nothing computed yet)."""
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
            b = backend(path, "w")
            layout = {"block_rows": block_rows,
                      "arrays": _create_arrays(b, arrays, lengths, block_rows, chunk_bytes)}
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
        if self.schema_version == 1 and (ids < 0).any():
            raise StoreError(f"{self.path}: a schema 1 store marks unused rows with id -1 and cannot hold "
                             f"negative ids (e.g. {ids[ids < 0][:3].tolist()}); rebuild the store")
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
        if b.has_array("counts"):
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

    # ------------------------------------------------------------------ layout queries
    def chunk_len(self, name: str) -> int:
        return int(self.provenance["layout"]["arrays"][name]["chunk"])

    @property
    def n_blocks(self) -> int:
        return self.backend.array("complete").shape[0]

    def _counts(self) -> np.ndarray:
        """(n_blocks,) items in each block."""
        n, B = self.n_blocks, self.block_rows
        if self.schema_version == 1:  # no `counts` yet: id -1 marked the unused rows
            return (self._read_range("ids", 0, n * B) >= 0).reshape(n, B).sum(1)
        return self._read_range("counts", 0, n).astype(np.int64)

    def _block_count(self, block: int) -> int:
        if self.schema_version == 1:
            return int((self._read_range("ids", block * self.block_rows, (block + 1) * self.block_rows) >= 0).sum())
        return int(self._read_range("counts", block, block + 1)[0])

    def block_ids(self, block: int) -> np.ndarray:
        r0 = block * self.block_rows
        return self._read_range("ids", r0, r0 + self._block_count(block))

    def block_counts(self) -> np.ndarray:
        """Number of items planned in each block."""
        return self._counts()

    def block_lengths(self, name: str, block: int) -> np.ndarray:
        r0 = block * self.block_rows
        return self._read_range(f"{name}/lengths", r0, r0 + self._block_count(block))

    def pending_blocks(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Blocks not yet complete that belong to shard k of n (round robin over blocks)."""
        k, n = shard
        complete = self._read_range("complete", 0, self.n_blocks)
        return [int(blk) for blk in np.flatnonzero(complete == 0) if blk % n == k]

    def planned(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, input_hash) of every planned row, complete or not, in row order.

        Only blocks that are wholly laid out count: an id listed here has its row and token range.
        """
        counts = self._counts()
        used = _used_rows(counts, self.block_rows)
        return (self._read_range("ids", 0, len(used))[used], self._read_range("input_hash", 0, len(used))[used])

    # ------------------------------------------------------------------ reading
    def _load_index(self):
        if self._index is None:
            counts = self._counts()
            complete = self._read_range("complete", 0, len(counts)).astype(bool)
            valid = _used_rows(counts, self.block_rows) & np.repeat(complete, self.block_rows)
            rows = np.flatnonzero(valid)
            ids = self._read_range("ids", 0, len(valid))[rows]
            order = np.argsort(ids, kind="stable")
            self._index = (ids[order], rows[order])
        return self._index

    @property
    def ids(self) -> np.ndarray:
        """Item ids of every complete row, in row order."""
        sorted_ids, rows = self._load_index()
        return sorted_ids[np.argsort(rows)]

    def __len__(self) -> int:
        return len(self._load_index()[0])

    def __contains__(self, item_id: int) -> bool:
        return bool(self.contains(np.array([item_id]))[0])

    def contains(self, ids) -> np.ndarray:
        sorted_ids, _ = self._load_index()
        ids = _as_ids(self.path, ids)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        return (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)

    def rows(self, ids) -> np.ndarray:
        """Row of each id, in the order given (vectorised; unknown ids raise StoreError)."""
        ids = _as_ids(self.path, ids)
        found = self.contains(ids)
        if not found.all():
            bad = ids[~found]
            raise StoreError(f"{self.path}: {len(bad)} item(s) not in the store (or in an incomplete "
                             f"block), e.g. {bad[:5].tolist()}")
        sorted_ids, rows = self._load_index()
        return rows[np.searchsorted(sorted_ids, ids)]

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
            return _gather(arr, positions, arr.chunks[0])
        except _UnreadableChunks as err:
            raise self._damaged(array, err.chunks, err.cause) from None

    def _read_range(self, array: str, lo: int, hi: int) -> np.ndarray:
        """array[lo:hi], a damaged chunk raised as DamagedStoreError."""
        try:
            return _read(self.backend.array(array), lo, hi)
        except _UnreadableChunks as err:
            raise self._damaged(array, err.chunks, err.cause) from None

    # ------------------------------------------------------------------ damage
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

    # ------------------------------------------------------------------ reporting
    def _plan_arrays(self) -> list[str]:
        """Arrays written when items are planned, never by write_block: a block rewrite cannot mend them."""
        names = ["ids", "input_hash"] + (["counts"] if self.schema_version >= 2 else [])
        return names + [f"{n}/{part}" for n, s in self.specs.items() if s.ragged for part in ("starts", "lengths")]

    def _data_arrays(self) -> list[str]:
        """Arrays write_block writes (besides `complete`)."""
        return ["missing"] + [f"{n}/values" if s.ragged else n for n, s in self.specs.items()]

    def array_names(self) -> list[str]:
        names = ["ids", "input_hash", "missing"] + (["counts"] if self.schema_version >= 2 else []) + ["complete"]
        for name, spec in self.specs.items():
            names += [f"{name}/values", f"{name}/starts", f"{name}/lengths"] if spec.ragged else [name]
        return names

    def bytes_stored(self) -> int:
        """Bytes the store takes on disk (or on object storage: one listing of every object, slow there)."""
        return self.backend.nbytes_stored()

    def info(self) -> dict:
        arrays = {}
        for name in self.array_names():
            a = self.backend.array(name)
            arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
        report = {"path": str(self.path), "schema_version": self.schema_version, "checksummed": self.checksummed}
        try:
            counts = self._counts()
            complete = self._read_range("complete", 0, len(counts))
            report |= {
                "items": len(self),
                "planned_items": int(counts.sum()),
                "blocks": {"complete": int(complete.sum()), "total": len(complete)},
                "missing_inputs": int((self._read_range("missing", 0, len(counts) * self.block_rows) > 0).sum()),
            }
        except DamagedStoreError as err:  # still describe the rest; verify() says what is damaged
            report["damaged"] = str(err)
        return report | {"bytes_on_disk": self.bytes_stored(), "arrays": arrays, "provenance": self.provenance}

    def verify(self) -> dict:
        """Read every chunk the planned and complete blocks use; report missing or unreadable chunks.

        Returns `ok`, `items` (of complete blocks), `incomplete_blocks`, `problems` (one line each),
        `damaged_items` (items of complete blocks with data in a damaged chunk), `damaged_blocks` (give
        them to invalidate_blocks, then extract again: they are written anew) and `repairable` (False
        when damage lies in what was planned, ids or token ranges: only a rebuild restores those).
        """
        n, B = self.n_blocks, self.block_rows
        found, kept = {}, {}  # array -> {chunk: what is wrong}; array -> its values, damaged chunks zeroed
        found["complete"], complete = self._scan("complete", range(n), keep=True, missing_ok=True)
        complete = complete[:n].astype(bool)  # a damaged flag reads 0: its block is written again anyway
        for name in self._plan_arrays():
            found[name], kept[name] = self._scan(name, range(self._n_chunks(name, n)), keep=name != "input_hash")
        counts = kept["counts"][:n] if "counts" in kept else (kept["ids"][: n * B] >= 0).reshape(n, B).sum(1)
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

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        release_sole_writer(self._writer_lock)
        self._writer_lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


INDEX_ARRAYS = ("ids", "input_hash", "missing", "counts", "complete")  # the layout's own, beside the features


def _create_arrays(b, arrays: dict[str, ArraySpec], lengths: dict[str, np.ndarray], block_rows: int,
                   chunk_bytes: int) -> dict:
    """Create every array of an empty store; return the layout's `arrays` (spec and chunk of each)."""
    layout = {}
    for name, spec in arrays.items():
        axes = tuple(f"{name}_dim{k}" for k in range(1, len(spec.shape) + 1))  # unique: a dataset shares names
        if spec.ragged:
            # Token chunks small enough that aligning each block to a chunk boundary wastes
            # at most ~1/16 of a block's tokens, large enough to stay near `chunk_bytes`.
            mean_len = float(np.mean(lengths[name])) if len(lengths[name]) else 16.0
            chunk = min(_pow2_at_most(chunk_bytes / max(spec.row_bytes, 1)),
                        _pow2_at_most(block_rows * max(mean_len, 1.0) / 16))
            b.create_array(f"{name}/values", (0,) + spec.shape, spec.dtype, (chunk,) + spec.shape, 0,
                           ("token",) + axes)
            b.create_array(f"{name}/starts", (0,), "int64", (block_rows,), 0, ("item",))
            b.create_array(f"{name}/lengths", (0,), "int32", (block_rows,), 0, ("item",))
        else:
            chunk = min(block_rows, _pow2_at_most(chunk_bytes / max(spec.row_bytes, 1)))
            b.create_array(name, (0,) + spec.shape, spec.dtype, (chunk,) + spec.shape, 0, ("item",) + axes)
        layout[name] = spec.to_json() | {"chunk": chunk}
    b.create_array("ids", (0,), "int64", (block_rows,), -1, ("item",))
    b.create_array("input_hash", (0,), "uint64", (block_rows,), 0, ("item",))
    b.create_array("missing", (0,), "uint8", (block_rows,), 0, ("item",))
    b.create_array("counts", (0,), "int32", (COUNTS_CHUNK,), 0, ("block",))
    b.create_array("complete", (0,), "uint8", (1,), 0, ("block",))  # one chunk per block: shard workers write it
    return layout


def _open_backend(backend, path, mode: str):
    """(the backend of the store at `path`, its provenance); metadata it cannot parse (a truncated zarr.json,
    an attribute that is not JSON) is UnreadableStoreError."""
    opened = None
    try:
        opened = backend(path, mode)
        return opened, opened.get_attr("provenance")
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 - zarr and h5py meet damaged metadata with errors of every kind
        if opened is not None:
            opened.close()
        raise UnreadableStoreError(path, f"its metadata cannot be read ({type(err).__name__}: {str(err)[:120]})") \
            from None


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


def _gather(arr, positions: np.ndarray, chunk_len: int) -> np.ndarray:
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
