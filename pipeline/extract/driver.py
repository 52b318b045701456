"""The extraction driver: one modality's features into its store, block by block.

A modality (title_bpe, title_cam, desc_cam, image) is an `Extractor`: it says which arrays it
writes, who produced them (model, weights and tokenizer hashes, config), each item's input
fingerprint and token lengths, and how to process a block of items in two steps: `prepare`
(CPU work: tokenising, JPEG decoding) and `compute` (the model). Everything else is the same for
every modality and lives here: lay out the store, skip what is already there, refuse a stale cache,
split blocks among shards, show progress, report, and keep the model busy: block b+1 is prepared
and block b-1 written in background threads while the model computes block b.
"""
from __future__ import annotations

import ctypes
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.errors import PipelineError
from stores import ArraySpec, FeatureStore, store_lock, writer_claim
from stores.backends import local_path, store_location
from stores.store import sidecar

# A store on object storage has no lock: workers K > 0 wait this long for worker 0's layout.
PLAN_WAIT_S = float(os.environ.get("EMDE_PLAN_WAIT_S", 900))


def keep_freed_memory() -> None:
    """Let glibc keep the big blocks a CPU forward frees instead of giving each back to the OS.

    By default every allocation above 32 MiB is a fresh mmap, page-faulted (zeroed) on first touch and
    unmapped when freed, so each large activation of a forward costs page faults: measured on 2 cores,
    tf_efficientnet_lite0 at 224, batch 32, runs 41 -> 114 img/s without them.
    Served from the heap and never trimmed, the model's working set (a few hundred MB) stays mapped and
    is reused. Process-wide and idempotent; where there is no glibc `mallopt` it does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    if not mallopt(M_MMAP_THRESHOLD, 1 << 30):  # a glibc that caps the threshold: no mmap at all then
        mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


class StaleStoreError(PipelineError):
    """A store built from other inputs, another model or another config than this run's."""


class Extractor(Protocol):
    name: str
    arrays: dict[str, ArraySpec]
    producer: dict  # model, weights_sha256, tokenizer_sha256, config: what the features depend on

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray: ...

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]: ...

    def prepare(self, items: pl.DataFrame): ...  # -> whatever compute takes

    def compute(self, prepared) -> tuple[dict[str, np.ndarray], np.ndarray | None]: ...


@dataclass
class Summary:
    modality: str
    store: Path
    items: int  # in the store once this run is done
    computed: int  # items extracted by this run
    skipped: int  # items of this run's shard already in the store
    missing: int  # computed items whose input was missing or unreadable
    seconds: float
    bytes_written: int

    def line(self) -> str:
        if self.computed == 0:
            return (f"{self.modality}: nothing to do, {self.items} items already in {self.store} "
                    f"(inputs and config unchanged)")
        rate = self.computed / max(self.seconds, 1e-9)
        return (f"{self.modality}: {self.computed} items extracted ({rate:.1f} items/s), {self.skipped} "
                f"already stored, {self.missing} missing inputs, {self.seconds:.1f} s, "
                f"{self.bytes_written / 1e6:.1f} MB written -> {self.store} ({self.items} items)")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N); without one, torchrun's RANK/WORLD_SIZE if set, else (0, 1)."""
    if shard is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise PipelineError(f"--shard must look like K/N (e.g. 0/4), not '{shard}'") from None
    if not 0 <= k < n:
        raise PipelineError(f"--shard {shard}: K must be in 0..N-1")
    return k, n


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _check_producer(store: FeatureStore, extractor: Extractor, rebuild_hint: str) -> None:
    old, new = store.provenance["producer"], extractor.producer
    if _canonical(old) == _canonical(new):
        return
    keys = sorted(k for k in set(old) | set(new) if _canonical(old.get(k)) != _canonical(new.get(k)))
    raise StaleStoreError(f"{store.path} was built with another {', '.join(keys)} than this run's "
                          f"(store: {_canonical({k: old.get(k) for k in keys})}); refusing to mix them: "
                          f"rebuild with `{rebuild_hint}`")


def plan(store_path: Path, extractor: Extractor, items: pl.DataFrame, block_rows: int,
         rebuild_hint: str) -> FeatureStore:
    """Open (or create) the store with a row for every item; new items get new blocks.

    Runs under a lock so that shard workers starting together agree on one layout.
    """
    fp = extractor.fingerprints(items)
    ids = items["item_id"].to_numpy()
    with store_lock(store_path):
        if not FeatureStore.exists(store_path):
            return FeatureStore.create(store_path, extractor.name, extractor.arrays, extractor.producer,
                                       ids, fp, extractor.lengths(items), block_rows=block_rows)
        store = FeatureStore(store_path, "a")
        if store.provenance["kind"] != extractor.name:
            raise StaleStoreError(f"{store_path} holds '{store.provenance['kind']}' features, not "
                                  f"'{extractor.name}'")
        _check_producer(store, extractor, rebuild_hint)
        planned_ids, planned_fp = store.planned()
        order = np.argsort(planned_ids)
        pos = np.minimum(np.searchsorted(planned_ids[order], ids), max(len(order) - 1, 0))
        known = planned_ids[order][pos] == ids if len(order) else np.zeros(len(ids), bool)
        changed = known & (planned_fp[order][pos] != fp)
        if changed.any():
            raise StaleStoreError(f"{store_path}: the input of {int(changed.sum())} stored item(s) changed "
                                  f"since extraction (e.g. item {int(ids[changed][0])}); refusing to mix "
                                  f"versions: rebuild with `{rebuild_hint}`")
        new = items.filter(pl.Series(~known))
        if len(new):
            store.add_items(new["item_id"].to_numpy(), fp[~known], extractor.lengths(new))
        return store


def _wait_for_plan(store_path: str, ids: np.ndarray, shard: tuple[int, int]) -> None:
    """On object storage (no lock), wait until worker 0 has laid out a row for every item.

    Worker 0 creates the store or appends the new items (`plan`); the others only start once every
    id is planned and the `complete` array covers every row (add_items resizes it last), so their
    own `plan` finds nothing to change and no two processes ever change the layout at once.
    """
    deadline, last = time.monotonic() + PLAN_WAIT_S, "the store does not exist yet"
    while True:
        try:
            if FeatureStore.exists(store_path):
                with FeatureStore(store_path, "r") as store:
                    planned, _ = store.planned()
                    covered = store.n_blocks * store.block_rows >= store.backend.array("ids").shape[0]
                    if covered and np.isin(ids, planned).all():
                        return
                    last = "some items are not laid out yet"
        except Exception as err:  # a store caught half created: look again
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() > deadline:
            raise PipelineError(f"{store_path}: worker {shard[0]}/{shard[1]} waited {PLAN_WAIT_S:.0f} s for "
                                f"worker 0/{shard[1]} to lay out the store ({last}); a store on object storage "
                                f"has no lock, so worker 0 (or one run with --shard 0/{shard[1]}) plans it first")
        time.sleep(0.2)


def run_extraction(extractor: Extractor, items: pl.DataFrame, store_path: Path, *, block_rows: int,
                   shard: tuple[int, int] = (0, 1), rebuild: bool = False, rebuild_hint: str = "",
                   progress: bool = True) -> Summary:
    """Extract every item's features into `store_path`, only what is not there yet."""
    keep_freed_memory()  # CPU forwards: no page faults on every big activation (3x on EfficientNet)
    store_path = store_location(store_path)  # a local Path, or a Zarr URL (s3://, gs://, file://, memory://)
    if shard[1] > 1 and not str(store_path).endswith(".zarr"):
        raise PipelineError(f"{store_path}: an HDF5 store takes one writer; use --backend zarr for --shard")
    unlocked = local_path(store_path) is None
    if rebuild and unlocked and shard[1] > 1:
        raise PipelineError(f"{store_path}: --rebuild of a store on object storage: run it with one worker, "
                            f"then start the {shard[1]} workers")
    if rebuild:
        with store_lock(store_path):
            FeatureStore.remove(store_path)
            claims = sidecar(store_path, "writers.json")
            if claims is not None:
                claims.unlink(missing_ok=True)
    with writer_claim(store_path, shard):
        try:
            return _extract(extractor, items, store_path, block_rows, shard, rebuild_hint, progress)
        except OSError as err:  # a full disk, a lost mount, a permission change mid-run
            raise PipelineError(
                f"{store_path}: writing failed ({err.strerror or err}{': ' + str(err.filename) if err.filename else ''}); "
                f"every block written before is kept: fix the cause and run the same command to resume"
            ) from None


def _extract(extractor: Extractor, items: pl.DataFrame, store_path: Path, block_rows: int,
             shard: tuple[int, int], rebuild_hint: str, progress: bool) -> Summary:
    started = time.perf_counter()
    if shard[0] > 0 and local_path(store_path) is None:
        _wait_for_plan(store_path, items["item_id"].to_numpy(), shard)
    store = plan(store_path, extractor, items, block_rows, rebuild_hint)
    bytes_before = store.backend.nbytes_stored()
    pending = store.pending_blocks(shard)
    counts = store.block_counts()
    todo = int(counts[pending].sum())
    skipped = int(counts[shard[0] :: shard[1]].sum()) - todo
    by_id = items.with_row_index("_row").select("item_id", "_row")

    def block_items(block: int) -> pl.DataFrame:
        rows = by_id.join(pl.DataFrame({"item_id": store.block_ids(block)}), on="item_id", how="right")
        return items[rows["_row"].to_numpy()]

    computed = missing = 0
    columns = [TextColumn(f"[bold]{extractor.name}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} items/s"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar, \
            ThreadPoolExecutor(max_workers=1) as preparer, ThreadPoolExecutor(max_workers=1) as writer:
        task = bar.add_task("extract", total=todo, rate="-")
        next_prepared = preparer.submit(lambda b: extractor.prepare(block_items(b)), pending[0]) if pending else None
        written = None
        for i, block in enumerate(pending):
            prepared = next_prepared.result()
            if i + 1 < len(pending):
                next_prepared = preparer.submit(lambda b: extractor.prepare(block_items(b)), pending[i + 1])
            data, miss = extractor.compute(prepared)
            if written is not None:
                written.result()  # at most one block waiting to be written
            written = writer.submit(store.write_block, block, data, miss)
            n = len(store.block_ids(block))
            computed += n
            missing += 0 if miss is None else int((np.asarray(miss) > 0).sum())
            bar.update(task, advance=n, rate=f"{computed / max(time.perf_counter() - started, 1e-9):.1f}")
        if written is not None:
            written.result()
    total = len(store)
    bytes_written = store.backend.nbytes_stored() - bytes_before
    store.close()
    return Summary(extractor.name, store_path, total, computed, skipped, missing,
                   time.perf_counter() - started, max(bytes_written, 0))
