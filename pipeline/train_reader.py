"""The training reader: batches from a feature store, fast enough that the model never waits.

Random row reads over row-chunked, compressed stores are slow (docs/design.md), so the reader never reads by
random id: it reads the store block by block, each block one sequential slice, and shuffles in memory:

* **memory** -- this rank's share fits the budget: loaded once, every epoch draws shuffled batches from RAM;
* **stream** -- otherwise the blocks of an epoch go in a shuffled order, in groups of ``buffer_blocks`` read by a
  loader thread one group ahead, rows shuffled within a group (the rows left over carried to the next).

A background thread assembles batches ``prefetch_batches`` ahead (pipeline.batches), length-sorted within
windows of ``length_sort_window`` batches when asked. Under torchrun each rank reads its own blocks (or rows
modulo the world size when blocks would share them unevenly) and every rank makes the same number of steps
per epoch. Shuffling is a function of (seed, epoch, rank) only: the same run gives the same batches.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.batches import Batch, Pool, assemble, check_spec, read_pool
from pipeline.errors import PipelineError
from pipeline.schema import ReaderSettings
from stores import FeatureStore

__all__ = ["TrainReader"]


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

    `settings` is [train_reader]: ``mode`` "auto" (memory when this rank's share takes at most its memory
    budget, else stream), "memory" or "stream"; ``buffer_blocks``, ``prefetch_batches``,
    ``length_sort_window`` and ``max_tokens`` as above; the budget is ``memory_gb`` unless ``memory_bytes``
    gives this reader's own. Iterate ``reader.epoch(e)`` once per epoch; ``len(reader)`` is the number of
    batches every rank gets per epoch. ``shuffle=False`` serves the rows in store order (with the length sort
    still applied within windows: evaluation does not care about order); ``cut`` counts this share's ragged
    rows read up to ``max_tokens``.
    """

    def __init__(self, store: FeatureStore | str | Path, name: str, kind: str, ids, labels,
                 settings: ReaderSettings, *, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, memory_bytes: float | None = None):
        self._own_store = not isinstance(store, FeatureStore)
        self.store = FeatureStore(store) if self._own_store else store
        self.spec = check_spec(self.store, name, kind)
        if batch_size < 1:
            raise PipelineError(f"batch_size must be positive, not {batch_size}")
        self.name, self.kind = name, kind
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.buffer_blocks, self.prefetch = settings.buffer_blocks, settings.prefetch_batches
        self.sort_window = settings.length_sort_window if self.spec.ragged else 0
        self.max_tokens = settings.max_tokens if self.spec.ragged else 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.pin_memory = bool(pin_memory)
        self._take_share(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64))
        if self.spec.ragged:
            self.lengths = self.store.lengths(name, self.ids)
            self.nbytes = int(self.lengths.sum()) * self.spec.row_bytes + 16 * len(self.ids)
            self.cut = int((self.lengths > self.max_tokens).sum()) if self.max_tokens else 0
        else:
            self.lengths = None
            self.nbytes = len(self.ids) * self.spec.row_bytes + 24 * len(self.ids)
            self.cut = 0
        budget = settings.memory_gb * 1e9 if memory_bytes is None else memory_bytes
        self.mode = settings.mode if settings.mode != "auto" else ("memory" if self.nbytes <= budget else "stream")
        self._pool: Pool | None = None
        self.load_seconds = 0.0

    def _take_share(self, ids: np.ndarray, labels: np.ndarray) -> None:
        """This rank's items, in store order: whole blocks when that is fair enough, rows modulo world size
        otherwise; and the batch sizes of its `steps` batches per epoch (the same count on every rank)."""
        if ids.shape != labels.shape:
            raise PipelineError(f"{len(ids)} ids but {len(labels)} labels")
        rows = self.store.rows(ids)  # StoreError names absent items
        order = np.argsort(rows, kind="stable")
        rows, ids, labels = rows[order], ids[order], labels[order]
        blocks = rows // self.store.block_rows
        self.total_items = len(ids)
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

    def __len__(self) -> int:
        return self.steps

    def describe(self) -> str:
        share = f", rank {self.rank}/{self.world_size} by {self.shard_by}" if self.world_size > 1 else ""
        cut = f", {self.cut} read up to {self.max_tokens} tokens" if self.cut else ""
        return (f"{len(self.ids)} items, {self.nbytes / 1e6:.1f} MB, {self.mode} mode, "
                f"{self.steps} batches of <= {self.batch_size}{share}{cut}")

    # ------------------------------------------------------------------ reading
    def _read_blocks(self, blocks: np.ndarray) -> Pool:
        """The rows of this share that lie in `blocks`, in store order: one sequential slice per block."""
        blocks = np.sort(blocks)  # self.blocks is sorted: each block's rows are one range, found by binary search
        lo, hi = np.searchsorted(self.blocks, blocks, "left"), np.searchsorted(self.blocks, blocks, "right")
        parts = [read_pool(self.store, self.name, self.ids[a:b], self.labels[a:b]) for a, b in zip(lo, hi) if b > a]
        return Pool.concat(parts) if len(parts) != 1 else parts[0]

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

    def _assemble(self, parts: list[tuple[Pool, np.ndarray]]) -> Batch:
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
        carry: Pool | None = None
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
                    carry = parts[0] if len(parts) == 1 else Pool.concat(parts)
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


