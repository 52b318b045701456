"""The training reader: batches from a feature store, fast enough that the model never waits.

Random row access over row-chunked, compressed stores is the trap (random 256-row batches read at
5-42 MB/s against 9,200 MB/s from RAM, docs/design.md), so a reader never reads by random id. It reads the
store in its own order, block by block (each block one sequential slice), and shuffles in memory:

* **memory** -- when this rank's share of the features fits the budget, one sequential pass loads it
  into RAM (tokens back to back with offsets, no padding) and every epoch draws shuffled batches from
  there;
* **stream** -- otherwise, per epoch, the blocks go in a shuffled order, groups of ``buffer_blocks``
  blocks are read (the next group is read by a loader thread while the current one is served), and
  rows are shuffled within the group; rows left over at the end of a group are carried to the next.

In both modes a background thread assembles batches ahead of the model (``prefetch`` batches deep):
each batch is padded to its own longest row, and within windows of ``sort_window`` batches rows are
sorted by length before being cut into batches (the batches themselves are then shuffled), so little
is spent on padding. With ``max_tokens`` set, a row is read up to that many tokens, so that one
pathological item (a 200,000-character title) cannot make its batch cost batch_size x its length. On
CUDA the batches are built in pinned memory and ``Batch.to`` copies them with ``non_blocking=True``;
token features stay float16 until they are on the device. Each batch owns its pinned tensors
(allocated by torch, never reused while a copy from them may be in flight).

Batches (``Batch.inputs`` matches the encoders of ``pipeline.encoders``), by the modality's batch kind:

* ``ids``    (ragged integer ids, title_bpe):    ids (B, L) int64, mask (B, L) bool;
* ``tokens`` (ragged float vectors, *_cam):      x (B, L, H) float, mask (B, L) bool (an empty row,
  e.g. a missing description, is all False);
* ``fixed``  (one array per item, image):        x (B, *shape) float, present (B,) bool (False where
  the store's ``missing`` flag is set: the zeros stored for it are not data);

plus ``labels`` (B,) int64 and the item ``ids`` (B,) int64.

Distributed training: the items are shared among ranks by store block (each rank reads only its own
blocks), or by row modulo the world size when blocks would share them too unevenly. Every rank makes
the same number of steps per epoch (``len(reader)``): a rank's items are spread over that many batches
of near-equal size (at most ``batch_size``), so no rank waits in a collective for a missing batch and
no item is dropped. Shuffling is a function of (seed, epoch, rank) only: the same run gives the same
batches.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import PipelineError
from stores import FeatureStore

__all__ = ["Batch", "TrainReader", "inference_batches"]
KINDS = ("ids", "tokens", "fixed")


class Batch(NamedTuple):
    inputs: tuple[Tensor, Tensor]  # (ids|x|maps, mask|present)
    labels: Tensor  # (B,) int64 class indices
    ids: Tensor  # (B,) int64 item ids

    def to(self, device: torch.device | str, non_blocking: bool = True, float_dtype=torch.float32) -> Batch:
        """On `device`; floating inputs (float16 from the store) become `float_dtype` there."""
        def move(t: Tensor) -> Tensor:
            t = t.to(device, non_blocking=non_blocking)
            return t.to(float_dtype) if t.is_floating_point() and t.dtype != float_dtype else t
        return Batch(tuple(move(t) for t in self.inputs), move(self.labels), move(self.ids))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class _Pool:
    """Rows held in memory: ragged (values back to back + offsets) or fixed (one row per item)."""

    ids: np.ndarray
    labels: np.ndarray
    values: np.ndarray
    offsets: np.ndarray | None = None  # ragged: (n + 1,)
    present: np.ndarray | None = None  # fixed maps: (n,) bool

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets) if self.offsets is not None else np.ones(len(self.ids), np.int64)

    def take(self, idx: np.ndarray) -> _Pool:
        """A copy holding rows `idx` only (the few rows carried from one stream group to the next)."""
        if self.offsets is None:
            return _Pool(self.ids[idx], self.labels[idx], self.values[idx], None,
                         None if self.present is None else self.present[idx])
        lens = self.lengths[idx]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        pos = np.repeat(self.offsets[idx] - offsets[:-1], lens) + np.arange(offsets[-1])
        return _Pool(self.ids[idx], self.labels[idx], self.values[pos], offsets, None)


class _Prefetch:
    """Runs a generator in a daemon thread, `depth` items ahead; errors surface in the consumer."""

    _END = object()

    def __init__(self, gen: Iterator, depth: int):
        self._gen = gen
        self._q: queue.Queue = queue.Queue(maxsize=max(int(depth), 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="train-reader")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._gen:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(_Failure(err))
        finally:
            close = getattr(self._gen, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if item is self._END:
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Failure):
            self._thread.join()
            raise item.err
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


class _Failure(NamedTuple):
    err: BaseException


def _split_sizes(n: int, steps: int) -> np.ndarray:
    """n rows into `steps` batches of near-equal size (the first n % steps one larger)."""
    base, extra = divmod(n, steps)
    return np.array([base + 1] * extra + [base] * (steps - extra), dtype=np.int64)


class TrainReader:
    """Batches of one feature array of a store for the items `ids` (with class indices `labels`).

    ``mode`` is "auto" (memory when this rank's share takes at most ``memory_bytes``, else stream),
    "memory" or "stream". Iterate ``reader.epoch(e)`` once per epoch; ``len(reader)`` is the number of
    batches every rank gets per epoch. ``shuffle=False`` serves the rows in store order (with the
    length sort still applied within windows: evaluation does not care about order). ``max_tokens`` > 0:
    a ragged row longer than that is read up to it (``cut`` counts this share's rows that are).
    """

    def __init__(self, store: FeatureStore | str | Path, name: str, kind: str, ids, labels, *, batch_size: int,
                 shuffle: bool = True, seed: int = 0, mode: str = "auto", memory_bytes: float = 8e9,
                 buffer_blocks: int = 8, prefetch: int = 8, sort_window: int = 16, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, max_tokens: int = 0):
        self._own_store = not isinstance(store, FeatureStore)
        self.store = FeatureStore(store) if self._own_store else store
        self.spec = _spec(self.store, name, kind)
        if mode not in ("auto", "memory", "stream"):
            raise PipelineError(f"train_reader mode must be auto, memory or stream, not '{mode}'")
        if batch_size < 1:
            raise PipelineError(f"batch_size must be positive, not {batch_size}")
        self.name, self.kind = name, kind
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.buffer_blocks = max(int(buffer_blocks), 1)
        self.prefetch = max(int(prefetch), 1)
        self.sort_window = max(int(sort_window), 0) if self.spec.ragged else 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.pin_memory = bool(pin_memory)
        self.max_tokens = max(int(max_tokens), 0) if self.spec.ragged else 0

        ids = np.asarray(ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if ids.shape != labels.shape:
            raise PipelineError(f"{len(ids)} ids but {len(labels)} labels")
        rows = self.store.rows(ids)  # StoreError names absent items
        order = np.argsort(rows, kind="stable")
        rows, ids, labels = rows[order], ids[order], labels[order]
        blocks = rows // self.store.block_rows
        self.total_items = len(ids)

        # This rank's share: whole blocks when that is fair enough, rows modulo world size otherwise.
        W = self.world_size
        if W > 1:
            ublocks, counts = np.unique(blocks, return_counts=True)
            per_rank = np.array([counts[r::W].sum() for r in range(W)]) if len(ublocks) else np.zeros(W)
            self.shard_by = "block" if per_rank.min() >= 0.75 * per_rank.max() > 0 else "row"
            if self.shard_by == "block":
                mine = np.isin(blocks, ublocks[self.rank :: W])
            else:
                mine = np.arange(len(ids)) % W == self.rank
                per_rank = np.array([len(range(r, len(ids), W)) for r in range(W)])
            largest = int(per_rank.max())
        else:
            self.shard_by = "none"
            mine = np.ones(len(ids), bool)
            largest = len(ids)
        self.rows, self.ids, self.labels, self.blocks = rows[mine], ids[mine], labels[mine], blocks[mine]
        self.steps = max(-(-largest // self.batch_size), 1) if largest else 0
        self.sizes = _split_sizes(len(self.ids), self.steps) if self.steps else np.zeros(0, np.int64)
        if self.steps and self.sizes.min() < 1:
            raise PipelineError(f"rank {self.rank} has {len(self.ids)} items for {self.steps} steps: "
                                "too few items for this many processes")

        if self.spec.ragged:
            self.lengths = self.store.lengths(name, self.ids)
            self.nbytes = int(self.lengths.sum()) * self.spec.row_bytes + 16 * len(self.ids)
            self.cut = int((self.lengths > self.max_tokens).sum()) if self.max_tokens else 0
        else:
            self.lengths = None
            self.nbytes = len(self.ids) * self.spec.row_bytes + 24 * len(self.ids)
            self.cut = 0
        self.mode = mode if mode != "auto" else ("memory" if self.nbytes <= memory_bytes else "stream")
        self._pool: _Pool | None = None
        self.load_seconds = 0.0

    def __len__(self) -> int:
        return self.steps

    def describe(self) -> str:
        share = f", rank {self.rank}/{self.world_size} by {self.shard_by}" if self.world_size > 1 else ""
        cut = f", {self.cut} read up to {self.max_tokens} tokens" if self.cut else ""
        return (f"{len(self.ids)} items, {self.nbytes / 1e6:.1f} MB, {self.mode} mode, "
                f"{self.steps} batches of <= {self.batch_size}{share}{cut}")

    # ------------------------------------------------------------------ reading
    def _read_blocks(self, blocks: np.ndarray) -> _Pool:
        """The rows of this share that lie in `blocks`, in store order: one sequential slice per block."""
        blocks = np.sort(blocks)  # self.blocks is sorted: each block's rows are one range, found by binary search
        lo, hi = np.searchsorted(self.blocks, blocks, "left"), np.searchsorted(self.blocks, blocks, "right")
        parts = [read_pool(self.store, self.name, self.ids[a:b], self.labels[a:b]) for a, b in zip(lo, hi) if b > a]
        return _concat(parts) if len(parts) != 1 else parts[0]

    def load(self) -> float:
        """Memory mode: read this share once, block after block in store order (idempotent)."""
        if self._pool is None:
            t = time.perf_counter()
            self._pool = self._read_blocks(np.unique(self.blocks))
            self.load_seconds = time.perf_counter() - t
        return self.load_seconds

    # ------------------------------------------------------------------ batching
    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), self.rank, 0x7EAD])

    def _plan(self, order: np.ndarray, sizes: np.ndarray, lengths: np.ndarray,
              rng: np.random.Generator | None) -> list[np.ndarray]:
        """Cut `order` (row indices) into batches of `sizes`; length-sorted within windows of batches."""
        if not len(sizes):  # a buffer group with fewer rows than the next batch: all carried over
            return []
        cuts = np.cumsum(sizes)[:-1]
        if not self.sort_window:
            return np.split(order, cuts)
        batches = []
        for w in range(0, len(sizes), self.sort_window):
            win_sizes = sizes[w : w + self.sort_window]
            lo = int(sizes[:w].sum())
            rows = order[lo : lo + int(win_sizes.sum())]
            rows = rows[np.argsort(lengths[rows], kind="stable")]
            win = np.split(rows, np.cumsum(win_sizes)[:-1])
            if rng is not None:
                win = [win[i] for i in rng.permutation(len(win))]
            batches += win
        return batches

    def _assemble(self, parts: list[tuple[_Pool, np.ndarray]]) -> Batch:
        return assemble(parts, self.kind, self.spec, self.pin_memory, self.max_tokens)

    def _memory_batches(self, epoch: int) -> Iterator[Batch]:
        pool = self._pool
        rng = self._rng(epoch) if self.shuffle else None
        order = rng.permutation(len(pool)) if rng is not None else np.arange(len(pool))
        for idx in self._plan(order, self.sizes, pool.lengths, rng):
            yield self._assemble([(pool, idx)])

    def _stream_batches(self, epoch: int) -> Iterator[Batch]:
        rng = self._rng(epoch) if self.shuffle else None
        blocks = np.unique(self.blocks)
        if rng is not None:
            blocks = rng.permutation(blocks)
        groups = [blocks[i : i + self.buffer_blocks] for i in range(0, len(blocks), self.buffer_blocks)]
        sizes = list(self.sizes)
        carry: _Pool | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-reader-io") as io:
            ahead = io.submit(self._read_blocks, groups[0]) if groups else None
            for g in range(len(groups)):
                pool = ahead.result()
                ahead = io.submit(self._read_blocks, groups[g + 1]) if g + 1 < len(groups) else None
                nc = len(carry) if carry is not None else 0
                n = nc + len(pool)
                # virtual rows: [0, nc) are the carried rows, [nc, n) this group's
                vlen = np.concatenate([carry.lengths if nc else np.zeros(0, np.int64), pool.lengths])
                order = rng.permutation(n) if rng is not None else np.arange(n)
                last = g + 1 == len(groups)
                k = len(sizes) if last else int(np.searchsorted(np.cumsum(sizes), n, side="right"))
                used = int(np.sum(sizes[:k]))
                assert used <= n and (used == n or not last), "batch plan does not cover the share"
                for v in self._plan(order[:used], np.asarray(sizes[:k], np.int64), vlen, rng):
                    parts = [(carry, v[v < nc]), (pool, v[v >= nc] - nc)] if nc else [(pool, v)]
                    yield self._assemble([(p, i) for p, i in parts if len(i)])
                del sizes[:k]
                rest = order[used:]
                if len(rest):
                    parts = []
                    if nc and (rest < nc).any():
                        parts.append(carry.take(rest[rest < nc]))
                    if (rest >= nc).any():
                        parts.append(pool.take(rest[rest >= nc] - nc))
                    carry = parts[0] if len(parts) == 1 else _concat(parts)
                else:
                    carry = None

    def epoch(self, epoch: int = 0) -> _Prefetch:
        """An iterator over this rank's `len(self)` batches of epoch `epoch` (assembled ahead)."""
        if self.mode == "memory":
            self.load()
            gen = self._memory_batches(epoch)
        else:
            gen = self._stream_batches(epoch)
        return _Prefetch(gen, self.prefetch)

    def __iter__(self):
        return iter(self.epoch(0))

    def close(self) -> None:
        self._pool = None
        if self._own_store:
            self.store.close()


def _spec(store: FeatureStore, name: str, kind: str):
    """The spec of array `name`, checked against the batch kind the modality declares."""
    if kind not in KINDS:
        raise PipelineError(f"batch kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if name not in store.specs:
        raise PipelineError(f"{store.path}: no feature array '{name}' (has {sorted(store.specs)})")
    spec = store.specs[name]
    if spec.ragged != (kind != "fixed"):
        raise PipelineError(f"{store.path}: array '{name}' is {'ragged' if spec.ragged else 'fixed-shape'}, "
                            f"which a '{kind}' modality cannot read; rebuild the store")
    return spec


def read_pool(store: FeatureStore, name: str, ids: np.ndarray, labels: np.ndarray | None = None) -> _Pool:
    """Array `name` of the items `ids` into memory (ragged: values back to back with offsets)."""
    labels = np.zeros(len(ids), np.int64) if labels is None else labels
    got = store.read(name, ids)
    if store.specs[name].ragged:
        return _Pool(ids, labels, got.values, np.asarray(got.offsets, np.int64), None)
    return _Pool(ids, labels, got, None, store.read_missing(ids) == 0)


def _alloc(shape: tuple, dtype, pin: bool) -> tuple[Tensor, np.ndarray]:
    """A zeroed tensor (pinned when `pin`) and a numpy view to fill it through. The batch keeps the tensor
    itself: torch's pinned-memory cache then knows when a non-blocking copy from it has finished, and
    never hands the memory to the next batch before that."""
    t = torch.zeros(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, pin_memory=pin)
    return t, t.numpy()


def assemble(parts: list[tuple[_Pool, np.ndarray]], kind: str, spec, pin: bool = False,
             max_tokens: int = 0) -> Batch:
    """One batch from rows `idx` of each pool: ragged rows (their first `max_tokens` tokens when > 0) padded
    to the batch's longest.

    On the CPU float16 features become float32 here (off the training thread); on CUDA (`pin`) they stay
    float16, half the bytes to copy, and `Batch.to` converts them on the device."""
    b = sum(len(idx) for _, idx in parts)
    ids = np.concatenate([p.ids[i] for p, i in parts])
    labels = np.concatenate([p.labels[i] for p, i in parts])
    out_float = np.dtype(spec.dtype) if pin else np.dtype(np.float32)
    if kind != "fixed":
        cap = max_tokens or np.iinfo(np.int64).max
        L = max(1, max(min(int(p.lengths[i].max(initial=0)), cap) for p, i in parts))
        xt, x = _alloc((b, L) + spec.shape, np.int64 if kind == "ids" else out_float, pin)
        mt, mask = _alloc((b, L), np.bool_, pin)
        r = 0
        for pool, idx in parts:
            lens = np.minimum(pool.lengths[idx], cap)
            row = np.repeat(np.arange(r, r + len(idx)), lens)
            col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            x[row, col] = pool.values[np.repeat(pool.offsets[idx], lens) + col]
            mask[row, col] = True
            r += len(idx)
        return Batch((xt, mt), torch.from_numpy(labels), torch.from_numpy(ids))
    xt, x = _alloc((b,) + spec.shape, out_float, pin)
    pt, present = _alloc((b,), np.bool_, pin)
    r = 0
    for pool, idx in parts:
        np.copyto(x[r : r + len(idx)], pool.values[idx], casting="unsafe")
        present[r : r + len(idx)] = pool.present[idx]
        r += len(idx)
    x[~present] = 0  # whatever the store holds for a missing input, it is not data
    return Batch((xt, pt), torch.from_numpy(labels), torch.from_numpy(ids))


def inference_batches(store: FeatureStore, name: str, kind: str, ids, batch_size: int,
                      pin_memory: bool = False, max_tokens: int = 0) -> Iterator[Batch]:
    """Batches of the items `ids` in the order given, for inference (labels are zeros); each batch is read
    with one store read (give ids in store row order for sequential reads). Ragged rows are read up to
    `max_tokens` tokens (> 0), as the network was trained."""
    spec = _spec(store, name, kind)
    ids = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(ids), batch_size):
        pool = read_pool(store, name, ids[start : start + batch_size])
        yield assemble([(pool, np.arange(len(pool)))], kind, spec, pin_memory, max_tokens)


def _concat(pools: list[_Pool]) -> _Pool:
    ids = np.concatenate([p.ids for p in pools])
    labels = np.concatenate([p.labels for p in pools])
    values = np.concatenate([p.values for p in pools])
    if pools[0].offsets is None:
        return _Pool(ids, labels, values, None, np.concatenate([p.present for p in pools]))
    offsets = np.concatenate([[0], np.cumsum(np.concatenate([p.lengths for p in pools]))]).astype(np.int64)
    return _Pool(ids, labels, values, offsets, None)
