"""The store filler: an `Extractor`'s features of every item into a store, block by block.

The extract stage (each modality's extractor), the sketch stage (a pretrained encoder as the "model") and
the predictor's cache all fill their stores here. An extractor (pipeline.extractor) says which arrays it
writes, who produced them (model, weights and tokenizer hashes, settings), each item's input fingerprint
and token lengths, and how to process a block in two steps: `prepare` (CPU work: tokenising, decoding)
and `compute` (the model). The rest lives here: lay out the store, skip what is already there, refuse a
stale cache, split blocks among shards, show progress, report, and keep the model busy: block b+1 is
prepared and block b-1 written in background threads while the model computes block b.

A store whose inputs and producer are unchanged is left alone without taking any lock (a read-only
work directory works). `--rebuild` builds the new store beside the old one and swaps it in when it is
complete, so a killed rebuild leaves the old store as it was (a second `--rebuild` resumes it).
"""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.distributed import torchrun
from pipeline.errors import PipelineError, StaleStoreError
from pipeline.extractor import Extractor
from pipeline.malloc import keep_freed_memory
from pipeline.progress import Progress
from pipeline.provenance import Stamp, canonical_json, recover, swap_in
from pipeline.schema import Stores
from stores import (FeatureStore, IdIndex, StoreError, UnreadableStoreError, WriterConflictError, local_path, partial_path,
                    store_location, store_lock, writer_claim, writer_of)

MAX_SHARDS = 1 << 20  # --shard K/N: N workers at most


@dataclass
class Summary:
    modality: str
    store: Path | str
    items: int  # in the store once this run is done
    computed: int  # items extracted by this run
    skipped: int  # items of this run's shard already in the store
    missing: int  # computed items whose input was missing or unreadable
    seconds: float
    bytes_written: int
    verb: str = "extracted"  # what the stage did to each item ("sketched" for the sketch stage)

    def line(self) -> str:
        if self.computed == 0:
            return (f"{self.modality}: nothing to do, {self.items} items already in {self.store} "
                    f"(inputs and config unchanged)")
        rate = self.computed / max(self.seconds, 1e-9)
        return (f"{self.modality}: {self.computed} items {self.verb} ({rate:.1f} items/s), {self.skipped} "
                f"already stored, {self.missing} missing inputs, {self.seconds:.1f} s, "
                f"{self.bytes_written / 1e6:.1f} MB written -> {self.store} ({self.items} items)")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N); without one, torchrun's RANK/WORLD_SIZE (0/1 without torchrun)."""
    if shard is None:
        env = torchrun()
        return env.rank, env.world
    try:
        k, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise PipelineError(f"--shard must look like K/N (e.g. 0/4), not '{shard}'") from None
    if not 0 <= k < n:
        raise PipelineError(f"--shard {shard}: K must be in 0..N-1")
    if n > MAX_SHARDS:  # a typo: more workers than blocks any store has (and past what numpy slices take)
        raise PipelineError(f"--shard {shard}: N must be at most {MAX_SHARDS} workers")
    return k, n


def check_writers(store_path: Path | str, shard: tuple[int, int], rebuild: bool) -> None:
    """Refuse the shard and rebuild settings a store cannot take, before anything is read or written."""
    if shard[1] > 1 and not str(store_path).endswith(".zarr"):
        raise PipelineError(f"{store_path}: an HDF5 store takes one writer; use --backend zarr for --shard")
    if rebuild and shard[1] > 1:
        raise PipelineError(f"{store_path}: run --rebuild with one worker (it replaces the whole store), then "
                            f"start the {shard[1]} workers")
    if (who := writer_of(store_path)) is not None:  # a second HDF5 writer: refused before any model loads
        raise PipelineError(f"{store_path}: {who} is writing this HDF5 store, and an HDF5 store takes one writer at "
                            "a time: wait for it to end")


# ---------------------------------------------------------------------- planning
class _Plan:
    """What a run has to do with a store: nothing, new items to lay out, or a store to create."""

    def __init__(self, extractor: Extractor, items: pl.DataFrame, block_rows: int, stores: Stores):
        self.extractor, self.items = extractor, items
        self.block_rows, self.stores = block_rows, stores  # the layout of a store it creates
        self.ids = items["item_id"].to_numpy()
        self.fp = extractor.fingerprints(items)  # (n,) uint64, each item's input
        self.stamp = Stamp(extractor.name, extractor.producer)

    def check(self, store: FeatureStore, rebuild_hint: str) -> np.ndarray:
        """Refuse a store of other features, producer or inputs; return the mask of items it lacks."""
        if store.provenance["kind"] != self.extractor.name:
            raise StaleStoreError(f"{store.path} holds '{store.provenance['kind']}' features, not "
                                  f"'{self.extractor.name}'")
        changed = self.stamp.changed(store.provenance["producer"])
        if changed:
            old = store.provenance["producer"]
            raise StaleStoreError(f"{store.path} was built with another {', '.join(changed)} than this run's "
                                  f"(store: {canonical_json({k: old.get(k) for k in changed})}); refusing to mix "
                                  f"them: rebuild with `{rebuild_hint}`")
        known, stored_fp = store.planned_hashes(self.ids)
        changed_items = np.zeros(len(self.ids), bool)
        changed_items[known] = stored_fp != self.fp[known]
        if changed_items.any():
            raise StaleStoreError(f"{store.path}: the input of {int(changed_items.sum())} stored item(s) changed "
                                  f"since extraction (e.g. item {int(self.ids[changed_items][0])}); refusing to "
                                  f"mix versions: rebuild with `{rebuild_hint}`")
        return ~known

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]:
        """The extractor's token lengths of `items`, a block at a time: tokenising a whole catalogue at once
        would hold every item's token lists in memory (peak memory growing with the catalogue)."""
        rows = self.block_rows
        parts = [self.extractor.lengths(items.slice(start, rows)) for start in range(0, max(len(items), 1), rows)]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def open(self, path, rebuild_hint: str) -> FeatureStore:
        """The store with a row for every item (created, or new items appended), under the store lock so
        that shard workers starting together agree on one layout."""
        with store_lock(path):
            if not FeatureStore.exists(path):
                return FeatureStore.create(path, self.extractor.name, self.extractor.arrays, self.stamp.inputs,
                                           self.ids, self.fp, self.lengths(self.items),
                                           block_rows=self.block_rows, chunk_bytes=self.stores.chunk_bytes,
                                           gzip_level=self.stores.gzip_level)
            store = FeatureStore(path, "a")
            new = self.check(store, rebuild_hint)
            if new.any():
                added = self.items.filter(pl.Series(new))
                store.add_items(self.ids[new], self.fp[new], self.lengths(added))
            return store


def _up_to_date(path, plan: _Plan, rebuild_hint: str) -> int | None:
    """The store's item count when every item is in it already (complete), else None.

    Without a lock (a read-only work directory works), so it may look while another worker lays the store
    out or writes its blocks: anything short of "every item complete" answers None, and the locked path
    decides (and refuses a really stale store)."""
    if not FeatureStore.exists(path):
        return None
    try:
        with FeatureStore(path, "r") as store:
            if not store.contains(plan.ids).all() or plan.check(store, rebuild_hint).any():
                return None
            return len(store)
    except (PipelineError, StoreError):  # half laid out, or stale: the locked path says which
        return None


def _wait_for_plan(store_path: str, ids: np.ndarray, shard: tuple[int, int], wait_s: float) -> None:
    """On object storage (no lock), wait until worker 0 has laid out a row for every item.

    Worker 0 creates the store or appends the new items; the others only start once every id is planned
    and the `complete` array covers every row (add_items resizes it last), so their own planning finds
    nothing to change and no two processes ever change the layout at once.
    """
    deadline, last = time.monotonic() + wait_s, "the store does not exist yet"
    while True:
        try:
            if FeatureStore.exists(store_path):
                with FeatureStore(store_path, "r") as store:
                    planned, _ = store.planned()
                    if np.isin(ids, planned).all():  # planned(): the rows of blocks fully laid out
                        return
                    last = "some items are not laid out yet"
        except Exception as err:  # a store caught half created: look again
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() > deadline:
            raise PipelineError(f"{store_path}: worker {shard[0]}/{shard[1]} waited {wait_s:.0f} s for "
                                f"worker 0/{shard[1]} to lay out the store ({last}); a store on object storage "
                                f"has no lock, so worker 0 (or one run with --shard 0/{shard[1]}) plans it first "
                                f"([stores] plan_wait_s)")
        time.sleep(0.2)


# ---------------------------------------------------------------------- running
def fill_store(extractor: Extractor, items: pl.DataFrame, store_path: Path | str, *, block_rows: int,
               stores: Stores, shard: tuple[int, int] = (0, 1), rebuild: bool = False, repair: bool = False,
               rebuild_hint: str = "", progress: bool = True) -> Summary:
    """Extract every item's features into `store_path`, only what is not there yet (`repair`: first mark
    the blocks whose chunks fail their checksum as not written, so that they are extracted again). A store it
    creates has blocks of `block_rows` and the chunks and compression of `stores` ([stores])."""
    started = time.perf_counter()
    store_path = store_location(store_path)  # a local Path, or a Zarr URL (s3://, gs://, file://, memory://)
    check_writers(store_path, shard, rebuild)
    plan = _Plan(extractor, items, block_rows, stores)
    target = store_path
    if repair:
        _mark_damaged(store_path, rebuild_hint)
    if rebuild:
        target = _prepare_rebuild(store_path, plan, rebuild_hint)
    else:
        if local_path(store_path) is not None:
            recover(local_path(store_path))
        stored = _up_to_date(store_path, plan, rebuild_hint)
        if stored is not None:
            return Summary(extractor.name, store_path, stored, 0, int(len(items)), 0,
                           time.perf_counter() - started, 0)
    keep_freed_memory()  # CPU forwards: no page faults on every big activation (3x on EfficientNet)
    with _claimed(target, shard):
        summary = _fill(plan, target, shard, rebuild_hint, progress, started)
    if target != store_path:
        with store_lock(store_path):
            swap_in(local_path(target), local_path(store_path))
        summary.store = store_path
    return summary


@contextmanager
def _claimed(store_path, shard: tuple[int, int]):
    """This process's writer claim on the store; a claim of another host (which this one cannot see alive or
    dead) is refused with the command that clears it once that host is known to be gone."""
    with ExitStack() as claim:
        try:
            claim.enter_context(writer_claim(store_path, shard))
        except WriterConflictError as err:
            if err.host == socket.gethostname():
                raise
            raise PipelineError(f"{err}; if {err.host} is gone (a restarted pod or job), clear its claim with "
                                f"`pipeline inspect {store_path} --clear-claims`") from None
        yield


def _mark_damaged(store_path, rebuild_hint: str) -> None:
    """Verify every chunk; the blocks with damaged data become pending (their layout is intact)."""
    if not FeatureStore.exists(store_path):
        raise PipelineError(f"{store_path}: no store to repair")
    with store_lock(store_path), FeatureStore(store_path, "a") as store:
        report = store.verify()
        if not report["repairable"]:
            raise PipelineError(f"{store_path}: damaged where its layout is kept ({'; '.join(report['problems'][:3])}"
                                f"): only a rebuild restores it: `{rebuild_hint}`")
        store.invalidate_blocks(report["damaged_blocks"])


def _prepare_rebuild(store_path, plan: _Plan, rebuild_hint: str):
    """Where `--rebuild` writes: beside the store (swapped in at the end), or in place on object storage."""
    local = local_path(store_path)
    if local is None:  # object storage has no rename: the old store goes first
        FeatureStore.remove(store_path)
        return store_path
    partial = partial_path(store_path)
    if FeatureStore.exists(partial):
        try:
            with FeatureStore(partial, "r") as old:
                plan.check(old, rebuild_hint)  # a killed rebuild of the same inputs: resume it
        except (PipelineError, UnreadableStoreError):  # another rebuild's, or left damaged: start afresh
            FeatureStore.remove(partial)
    return partial


def _fill(plan: _Plan, store_path, shard: tuple[int, int], rebuild_hint: str, progress: bool,
          started: float) -> Summary:
    try:
        if shard[0] > 0 and local_path(store_path) is None:
            _wait_for_plan(store_path, plan.ids, shard, plan.stores.plan_wait_s)
        store = plan.open(store_path, rebuild_hint)
        try:
            return _write_blocks(plan.extractor, plan.items, store, shard, progress, started)
        finally:
            store.close()
    except OSError as err:  # a full disk, a lost mount, a permission change mid-run
        failed = f"{store_path}: writing failed ({err.strerror or err}{': ' + str(err.filename) if err.filename else ''})"
        if not getattr(err, "intact", True):  # an HDF5 file cut mid-write
            raise PipelineError(f"{failed}; an HDF5 file cut mid-write cannot be trusted: fix the cause, then "
                                f"rebuild it with `{rebuild_hint}` (a .zarr store would resume)") from None
        raise PipelineError(f"{failed}; every block written before is kept: fix the cause and run the same "
                            "command to resume") from None


def _write_blocks(extractor: Extractor, items: pl.DataFrame, store: FeatureStore, shard: tuple[int, int],
                  progress: bool, started: float) -> Summary:
    """Prepare block b+1 and write block b-1 in background threads while the model computes block b."""
    bytes_before = store.bytes_stored()
    pending = store.pending_blocks(shard)
    counts = store.block_counts()
    todo = int(counts[pending].sum())
    skipped = int(counts[shard[0] :: shard[1]].sum()) - todo
    by_id = IdIndex(items["item_id"].to_numpy())  # a block's rows by binary search: no pass over every item

    def prepare(block: int):
        _, rows = by_id.find(store.block_ids(block))  # every id of a block is a catalogue item
        return extractor.prepare(items[rows])

    computed = missing = 0
    with Progress(extractor.name, todo, enabled=progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as preparer, ThreadPoolExecutor(max_workers=1) as writer:
        next_prepared = preparer.submit(prepare, pending[0]) if pending else None
        written = None
        try:
            for i, block in enumerate(pending):
                prepared = next_prepared.result()
                if i + 1 < len(pending):
                    next_prepared = preparer.submit(prepare, pending[i + 1])
                data, miss = extractor.compute(prepared)
                if written is not None:
                    written.result()  # at most one block waiting to be written
                written = writer.submit(store.write_block, block, data, miss)
                computed += int(counts[block])
                missing += 0 if miss is None else int((np.asarray(miss) > 0).sum())
                bar.advance(int(counts[block]))
            if written is not None:
                written.result()
        except Exception:
            # A write the disk refused lets the store go (an HDF5 file's reads fail from then on): that is the
            # error to report, not a read that failed after it in this or the preparing thread.
            if written is not None and written.exception() is not None:
                raise written.exception() from None
            raise
    bytes_written = store.bytes_stored() - bytes_before
    return Summary(extractor.name, store.path, len(store), computed, skipped, missing,
                   time.perf_counter() - started, max(bytes_written, 0))
