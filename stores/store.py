"""Item-keyed feature stores: one layout, two backends (Zarr directory, HDF5 file).

Layout (the same arrays in both backends):

    ids          (R,)          int64   item id of each row slot, -1 for an unused slot
    input_hash   (R,)          uint64  fingerprint of the item's input (title text, image file, ...)
    missing      (R,)          uint8   0 = present, otherwise a reason code (see provenance)
    complete     (n_blocks,)   uint8   1 once every array of the block is written (one chunk each)
    <name>       (R, *shape)           a fixed-shape feature (an image feature map, a sketch)
    <name>/values  (T, *shape)         a ragged feature (tokens): all items' tokens back to back
    <name>/starts  (R,)        int64   first token of each row in values
    <name>/lengths (R,)        int32   number of tokens of each row

Rows are grouped in blocks of `block_rows` slots. A block is the unit of work and of resumption:
its data is written first, its `complete` flag last, and readers only see items of complete
blocks, so a killed writer leaves at worst a block that the next run writes again. Each block owns
whole chunks of every array (a ragged block's tokens start at a chunk boundary), so processes
working on different blocks never write the same chunk: that is what lets `--shard K/N` workers
fill one Zarr store at once. New items are appended as new blocks; nothing stored is rewritten.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.errors import PipelineError
from stores.backends import backend_for, local_path, store_location

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 21  # aim for chunks of about 2 MiB
MISSING_REASONS = {0: "present", 1: "no input (file not found)", 2: "input unreadable"}


class StoreError(PipelineError):
    """A store that cannot serve the request: unknown items, incomplete or corrupt data."""


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


def sidecar(path: str | Path, what: str) -> Path | None:
    """A small file about the store kept beside it, out of sight: <dir>/.locks/<store name>.<what>.

    None for a store on object storage (a non-file URL): there is no local file beside it.
    """
    local = local_path(path)
    return None if local is None else local.parent / ".locks" / f"{local.name}.{what}"


@contextmanager
def store_lock(path: str | Path):
    """Hold an exclusive lock beside the store while its layout changes (create, append items).

    A local path or a file:// URL gets a file lock (flock: every process of this machine, and of
    other machines where the shared filesystem honours flock). A store on object storage (s3://,
    gs://, memory://, ...) has no lock to take: this is then a no-op, and layout changes (creating
    the store, appending new items) must be made by one process before the shard workers start.
    The extraction driver does that itself (worker 0 plans, the others wait for the plan); writers of
    disjoint shards need no lock, since each block owns whole chunks of every array.
    """
    lock_path = sidecar(path, "lock")
    if lock_path is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class WriterConflictError(PipelineError):
    """Another live process is writing the same blocks of this store."""


@contextmanager
def writer_claim(path: Path, shard: tuple[int, int]):
    """Register this process as the writer of shard K/N of the store for as long as it runs.

    A second writer of the same shard, or a writer whose shards would overlap a running one's
    (another N), is refused: two processes never fill the same blocks. Claims live in
    `.locks/<store>.writers.json` (updated under the store lock); a claim whose process died on this host
    is dropped. (Claims from other hosts sharing the filesystem cannot be checked for liveness; a
    crashed remote worker's claim is dropped by `--rebuild` or by deleting that file.)
    """
    import json
    import os
    import socket

    claims_path = sidecar(path, "writers.json")
    if claims_path is None:  # object storage: no claims (nor liveness) to keep; shards are trusted to differ
        yield
        return
    me = {"host": socket.gethostname(), "pid": os.getpid(), "k": shard[0], "n": shard[1]}

    def alive(c: dict) -> bool:
        if c["host"] != me["host"]:
            return True
        try:
            os.kill(c["pid"], 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def load() -> list[dict]:
        try:
            return [c for c in json.loads(claims_path.read_text()) if alive(c)]
        except (FileNotFoundError, ValueError):
            return []

    with store_lock(path):
        claims = load()
        for c in claims:
            if c["n"] != me["n"] or c["k"] == me["k"]:
                what = "the same shard" if c["n"] == me["n"] else f"shards of another split (K/{c['n']})"
                raise WriterConflictError(
                    f"{path}: process {c['pid']} on {c['host']} is writing {what} "
                    f"({c['k']}/{c['n']}); wait for it, or give each worker its own --shard K/{me['n']}")
        claims_path.write_text(json.dumps(claims + [me]))
    try:
        yield
    finally:
        with store_lock(path):
            claims_path.write_text(json.dumps([c for c in load() if c["pid"] != me["pid"] or c["host"] != me["host"]]))


def _pow2_at_most(n: float) -> int:
    return 1 << max(int(np.floor(np.log2(max(n, 1)))), 0)


def _round_up(x: np.ndarray | int, m: int):
    return -(-x // m) * m


class FeatureStore:
    """A feature store keyed by item id. Open with `FeatureStore(path)`; build with `create`."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = store_location(path)  # a Path, or a URL string (a Zarr store through fsspec)
        backend = backend_for(self.path)
        if not backend.exists(self.path):
            raise StoreError(f"{self.path}: no such store")
        self.backend = backend(self.path, mode)
        self.mode = mode
        prov = self.backend.get_attr("provenance")
        if not prov or "layout" not in prov:
            raise StoreError(f"{self.path}: not a feature store (no provenance attributes); rebuild it")
        if prov.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {prov.get('schema_version')} is not "
                             f"{SCHEMA_VERSION}; rebuild the store")
        self.provenance = prov
        self.block_rows = int(prov["layout"]["block_rows"])
        self.specs = {k: ArraySpec.from_json(v) for k, v in prov["layout"]["arrays"].items()}
        self._index = None

    @staticmethod
    def exists(path: str | Path) -> bool:
        return backend_for(path).exists(store_location(path))

    @staticmethod
    def remove(path: str | Path) -> None:
        backend_for(path).remove(store_location(path))

    # ------------------------------------------------------------------ building
    @classmethod
    def create(cls, path: str | Path, kind: str, arrays: dict[str, ArraySpec], producer: dict,
               ids: np.ndarray, input_hash: np.ndarray, lengths: dict[str, np.ndarray] | None = None,
               block_rows: int = 1024, chunk_bytes: int = CHUNK_BYTES) -> FeatureStore:
        """Create a store laid out for `ids` (rows planned, nothing computed yet)."""
        path = store_location(path)
        backend = backend_for(path)
        if backend.exists(path):
            raise StoreError(f"{path}: already exists")
        if block_rows <= 0 or block_rows & (block_rows - 1):
            raise PipelineError(f"block_rows must be a power of two, not {block_rows}")
        lengths = lengths or {}
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        b = backend(path, "w")
        layout = {"block_rows": block_rows, "arrays": {}}
        for name, spec in arrays.items():
            if spec.ragged:
                # Token chunks small enough that aligning each block to a chunk boundary wastes
                # at most ~1/16 of a block's tokens, large enough to stay near `chunk_bytes`.
                mean_len = float(np.mean(lengths[name])) if len(ids) else 16.0
                chunk = min(_pow2_at_most(chunk_bytes / max(spec.row_bytes, 1)),
                            _pow2_at_most(block_rows * max(mean_len, 1.0) / 16))
                b.create_array(f"{name}/values", (0,) + spec.shape, spec.dtype, (chunk,) + spec.shape, 0)
                b.create_array(f"{name}/starts", (0,), "int64", (block_rows,), 0)
                b.create_array(f"{name}/lengths", (0,), "int32", (block_rows,), 0)
            else:
                chunk = min(block_rows, _pow2_at_most(chunk_bytes / max(spec.row_bytes, 1)))
                b.create_array(name, (0,) + spec.shape, spec.dtype, (chunk,) + spec.shape, 0)
            layout["arrays"][name] = spec.to_json() | {"chunk": chunk}
        b.create_array("ids", (0,), "int64", (block_rows,), -1)
        b.create_array("input_hash", (0,), "uint64", (block_rows,), 0)
        b.create_array("missing", (0,), "uint8", (block_rows,), 0)
        b.create_array("complete", (0,), "uint8", (1,), 0)
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
        fixed before any worker writes (workers then never touch each other's chunks).
        """
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return []
        lengths = lengths or {}
        B, b = self.block_rows, self.backend
        nb0 = b.array("complete").shape[0]
        n_new_blocks = -(-len(ids) // B)
        r0, r1 = nb0 * B, (nb0 + n_new_blocks) * B
        for name in ("ids", "input_hash", "missing"):
            b.array(name).resize((r1,))
        b.array("ids")[r0 : r0 + len(ids)] = ids
        b.array("input_hash")[r0 : r0 + len(ids)] = np.asarray(input_hash, dtype=np.uint64)
        for name, spec in self.specs.items():
            if not spec.ragged:
                b.array(name).resize((r1,) + spec.shape)
                continue
            lens = np.zeros(r1 - r0, dtype=np.int64)
            lens[: len(ids)] = lengths[name]
            chunk = self.chunk_len(name)
            block_tokens = lens.reshape(n_new_blocks, B).sum(1)
            block_span = _round_up(block_tokens, chunk)  # each block starts on a chunk boundary
            values = b.array(f"{name}/values")
            t0 = values.shape[0]
            block_start = t0 + np.concatenate([[0], np.cumsum(block_span)[:-1]])
            within = np.cumsum(lens) - lens - np.repeat(np.cumsum(block_tokens) - block_tokens, B)
            starts = np.repeat(block_start, B) + within
            for part, data in (("starts", starts), ("lengths", lens.astype(np.int32))):
                b.array(f"{name}/{part}").resize((r1,))
                b.array(f"{name}/{part}")[r0:r1] = data
            values.resize((t0 + int(block_span.sum()),) + spec.shape)
        b.array("complete").resize((nb0 + n_new_blocks,))
        b.flush()
        self._index = None
        return list(range(nb0, nb0 + n_new_blocks))

    def write_block(self, block: int, data: dict[str, np.ndarray], missing: np.ndarray | None = None) -> None:
        """Write every array of one block (rows in store order), then mark the block complete.

        `data[name]` is (n, *shape) for a fixed array, or the block's tokens back to back
        (sum of its items' lengths, *shape) for a ragged one.
        """
        B, b = self.block_rows, self.backend
        r0 = block * B
        n = int((b.array("ids")[r0 : r0 + B] >= 0).sum())
        for name, spec in self.specs.items():
            arr = np.asarray(data[name], dtype=spec.dtype)
            if spec.ragged:
                start = int(b.array(f"{name}/starts")[r0])
                total = int(b.array(f"{name}/lengths")[r0 : r0 + n].sum())
                if arr.shape != (total,) + spec.shape:
                    raise StoreError(f"{self.path}: block {block} of '{name}' expects "
                                     f"{(total,) + spec.shape} tokens, got {arr.shape}")
                if total:
                    b.array(f"{name}/values")[start : start + total] = arr
            else:
                if arr.shape != (n,) + spec.shape:
                    raise StoreError(f"{self.path}: block {block} of '{name}' expects "
                                     f"{(n,) + spec.shape}, got {arr.shape}")
                b.array(name)[r0 : r0 + n] = arr
        b.array("missing")[r0 : r0 + B] = np.pad(
            np.zeros(n, np.uint8) if missing is None else np.asarray(missing, np.uint8), (0, B - n))
        b.flush()
        b.array("complete")[block] = 1  # last: a block is valid only once all its data is down
        b.flush()
        self._index = None

    # ------------------------------------------------------------------ layout queries
    def chunk_len(self, name: str) -> int:
        return int(self.provenance["layout"]["arrays"][name]["chunk"])

    @property
    def n_blocks(self) -> int:
        return self.backend.array("complete").shape[0]

    def block_ids(self, block: int) -> np.ndarray:
        ids = self.backend.array("ids")[block * self.block_rows : (block + 1) * self.block_rows]
        return ids[ids >= 0]

    def block_counts(self) -> np.ndarray:
        """Number of items planned in each block."""
        ids = self.backend.array("ids")[:]
        return (ids >= 0).reshape(-1, self.block_rows).sum(1)

    def block_lengths(self, name: str, block: int) -> np.ndarray:
        r0 = block * self.block_rows
        return self.backend.array(f"{name}/lengths")[r0 : r0 + len(self.block_ids(block))]

    def pending_blocks(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Blocks not yet complete that belong to shard k of n (round robin over blocks)."""
        k, n = shard
        complete = self.backend.array("complete")[:]
        return [int(blk) for blk in np.flatnonzero(complete == 0) if blk % n == k]

    def planned(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, input_hash) of every planned row, complete or not."""
        ids = self.backend.array("ids")[:]
        keep = ids >= 0
        return ids[keep], self.backend.array("input_hash")[:][keep]

    # ------------------------------------------------------------------ reading
    def _load_index(self):
        if self._index is None:
            ids = self.backend.array("ids")[:]
            complete = self.backend.array("complete")[:].astype(bool)
            valid = (ids >= 0) & np.repeat(complete, self.block_rows)[: len(ids)]
            rows = np.flatnonzero(valid)
            order = np.argsort(ids[rows], kind="stable")
            self._index = (ids[rows][order], rows[order])
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

    def contains(self, ids: np.ndarray) -> np.ndarray:
        sorted_ids, _ = self._load_index()
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), max(len(sorted_ids) - 1, 0))
        return (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)

    def rows(self, ids) -> np.ndarray:
        """Row of each id, in the order given (vectorised; unknown ids raise StoreError)."""
        ids = np.asarray(ids, dtype=np.int64)
        found = self.contains(ids)
        if not found.all():
            bad = ids[~found]
            raise StoreError(f"{self.path}: {len(bad)} item(s) not in the store (or in an incomplete "
                             f"block), e.g. {bad[:5].tolist()}")
        sorted_ids, rows = self._load_index()
        return rows[np.searchsorted(sorted_ids, ids)]

    def read(self, name: str, ids) -> np.ndarray | Ragged:
        """Feature `name` of the items `ids`, in that order: an array, or Ragged for tokens."""
        if name not in self.specs:
            raise StoreError(f"{self.path}: no feature '{name}' (has {sorted(self.specs)})")
        rows = self.rows(ids)
        if not self.specs[name].ragged:
            return _gather(self.backend.array(name), rows, self.chunk_len(name))
        starts = _gather(self.backend.array(f"{name}/starts"), rows, self.block_rows)
        lengths = _gather(self.backend.array(f"{name}/lengths"), rows, self.block_rows).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Ragged(_gather(self.backend.array(f"{name}/values"), positions, self.chunk_len(name)), offsets)

    def read_missing(self, ids) -> np.ndarray:
        return _gather(self.backend.array("missing"), self.rows(ids), self.block_rows)

    # ------------------------------------------------------------------ reporting
    def array_names(self) -> list[str]:
        names = ["ids", "input_hash", "missing", "complete"]
        for name, spec in self.specs.items():
            names += [f"{name}/values", f"{name}/starts", f"{name}/lengths"] if spec.ragged else [name]
        return names

    def info(self) -> dict:
        arrays = {}
        for name in self.array_names():
            a = self.backend.array(name)
            arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
        complete = self.backend.array("complete")[:]
        missing = self.backend.array("missing")[:]
        return {
            "path": str(self.path),
            "items": len(self),
            "planned_items": int((self.backend.array("ids")[:] >= 0).sum()),
            "blocks": {"complete": int(complete.sum()), "total": len(complete)},
            "missing_inputs": int((missing > 0).sum()),
            "bytes_on_disk": self.backend.nbytes_stored(),
            "arrays": arrays,
            "provenance": self.provenance,
        }

    def verify(self) -> dict:
        """Read every chunk of every array; report missing or unreadable chunks and the items they hold."""
        B = self.block_rows
        ids = self.backend.array("ids")[:]
        complete = self.backend.array("complete")[:].astype(bool)
        row_complete = np.repeat(complete, B)[: len(ids)] & (ids >= 0)
        bad_rows = np.zeros(len(ids), bool)
        problems = []
        for name in self.array_names():
            arr = self.backend.array(name)
            clen = arr.chunks[0]
            rows_of_chunk = self._rows_of_chunks(name, clen, len(ids))
            for c in range(-(-arr.shape[0] // clen)):
                rows = rows_of_chunk(c)
                if not row_complete[rows].any() and name != "complete":
                    continue  # nothing valid lives here (yet)
                if name == "complete" and not complete[c]:
                    continue
                if not self.backend.chunk_exists(name, c):
                    problems.append(f"{name}: chunk {c} is missing")
                else:
                    try:
                        arr[c * clen : (c + 1) * clen]
                        continue
                    except Exception as err:  # a decoder error of any kind means a corrupt chunk
                        problems.append(f"{name}: chunk {c} is unreadable ({type(err).__name__})")
                bad_rows[rows] = True
        bad_items = ids[bad_rows & row_complete]
        return {
            "ok": not problems and bool(complete.all()),
            "items": int(row_complete.sum()),
            "incomplete_blocks": np.flatnonzero(~complete).tolist(),
            "problems": problems,
            "damaged_items": bad_items.tolist(),
        }

    def _rows_of_chunks(self, name: str, clen: int, n_rows: int):
        """A function: chunk index of array `name` -> the rows whose data lies in it."""
        if name == "complete":
            return lambda c: slice(c * self.block_rows, (c + 1) * self.block_rows)
        if name.endswith("/values"):
            feature = name.rsplit("/", 1)[0]
            starts = self.backend.array(f"{feature}/starts")[:]
            ends = starts + self.backend.array(f"{feature}/lengths")[:]
            return lambda c: np.flatnonzero((starts < (c + 1) * clen) & (ends > c * clen))
        return lambda c: slice(c * clen, min((c + 1) * clen, n_rows))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _gather(arr, positions: np.ndarray, chunk_len: int) -> np.ndarray:
    """arr[positions] for any order of positions, reading each touched chunk once.

    Positions are sorted, the chunks they touch are grouped into runs of consecutive chunks, each
    run is one slice read, and the values go back to the order asked: a loop over runs, never
    over items.
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
        out[order[i:j]] = arr[lo:hi][sorted_pos[i:j] - lo]
    return out
