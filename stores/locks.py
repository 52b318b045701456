"""Locks kept beside a store (`.locks/`): the layout lock, writer claims, and an HDF5 store's one writer.

- `store_lock`: held while the layout changes (create, append items); blocking, and held briefly.
- `writer_claim`: registers shard K/N's writer for its whole run; a second writer of the same blocks is
  refused. Writers of disjoint shards of one Zarr store run side by side.
- `sole_writer`: an HDF5 store takes one writer process at a time. It is non-blocking, so a second
  writer is refused at once with the process that holds it, never left waiting on the layout lock.

A store on object storage (s3://, gs://, memory://) has no file beside it: every lock is a no-op there.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

from stores.errors import StoreBusyError, StoreError, WriterConflictError
from stores.paths import is_hdf5, sidecar


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


# The sole-writer locks this process holds: lock file -> [open file, holders]. flock treats two open
# files of one process as two owners, so a process that claims the store and then opens it for
# writing must reuse its lock, not take a second one.
_held: dict[Path, list] = {}
_held_guard = threading.Lock()


def acquire_sole_writer(path: str | Path) -> Path | None:
    """Take the store's writer lock for this process (re-entrant); refused at once if another holds it.

    Returns the lock file to give to `release_sole_writer`. Only HDF5 stores have one (None otherwise).
    """
    lock_path = sidecar(path, "writer") if is_hdf5(path) else None
    if lock_path is None:
        return None
    with _held_guard:
        if lock_path not in _held:
            _held[lock_path] = [_lock_or_refuse(path, lock_path), 0]
        _held[lock_path][1] += 1
    return lock_path


def release_sole_writer(lock_path: Path | None) -> None:
    if lock_path is None:
        return
    with _held_guard:
        entry = _held[lock_path]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[lock_path]
            entry[0].truncate(0)
            entry[0].close()  # closing the file releases the flock


def _lock_or_refuse(path, lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StoreBusyError(f"{path}: {holder} is writing this HDF5 store, and an HDF5 store takes one "
                             "writer at a time: wait for it to end, or use a .zarr store for --shard K/N "
                             "workers") from None
    fh.truncate(0)
    fh.write(f"process {os.getpid()} on {socket.gethostname()}")
    fh.flush()
    return fh


def writer_of(path: str | Path) -> str | None:
    """Who holds the store's writer lock ("process PID on HOST"), or None when nobody does."""
    lock_path = sidecar(path, "writer") if is_hdf5(path) else None
    if lock_path is None or not lock_path.exists() or lock_path in _held:
        return None
    with open(lock_path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return fh.read().strip() or "another process"


@contextmanager
def sole_writer(path: str | Path):
    """Hold the writer lock of an HDF5 store (a no-op for a Zarr store) for the duration of the block."""
    lock = acquire_sole_writer(path)
    try:
        yield
    finally:
        release_sole_writer(lock)


@contextmanager
def writer_claim(path: str | Path, shard: tuple[int, int]):
    """Register this process as the writer of shard K/N of the store for as long as it runs.

    A second writer of the same shard, or a writer whose shards would overlap a running one's
    (another N), is refused: two processes never fill the same blocks. Claims live in
    `.locks/<store>.writers.json` (updated under the store lock); a claim whose process died on this host
    is dropped. (Claims from other hosts sharing the filesystem cannot be checked for liveness; a
    crashed remote worker's claim is dropped by `--rebuild` or by deleting that file.)
    An HDF5 store's writer lock is taken first, without waiting: a second writer is refused at once,
    even while the first one holds the layout lock to plan its blocks.
    """
    claims_path = sidecar(path, "writers.json")
    if claims_path is None:  # object storage: no claims (nor liveness) to keep; shards are trusted to differ
        yield
        return
    me = {"host": socket.gethostname(), "pid": os.getpid(), "k": shard[0], "n": shard[1]}
    with sole_writer(path):
        with store_lock(path):
            claims = _live_claims(claims_path)
            for c in claims:
                if c["n"] != me["n"] or c["k"] == me["k"]:
                    what = "the same shard" if c["n"] == me["n"] else f"shards of another split (K/{c['n']})"
                    raise WriterConflictError(
                        f"{path}: process {c['pid']} on {c['host']} is writing {what} "
                        f"({c['k']}/{c['n']}); wait for it, or give each worker its own --shard K/{me['n']}")
            _write_claims(claims_path, claims + [me])
        try:
            yield
        finally:
            with store_lock(path):
                _write_claims(claims_path, [c for c in _live_claims(claims_path)
                                            if c["pid"] != me["pid"] or c["host"] != me["host"]])


def _write_claims(claims_path: Path, claims: list[dict]) -> None:
    """Replace the claims file in one rename: a writer killed mid-write never leaves half a file."""
    tmp = claims_path.with_name(f".{claims_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(claims))
    os.replace(tmp, claims_path)


def _live_claims(claims_path: Path) -> list[dict]:
    try:
        claims = json.loads(claims_path.read_text())
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError):
        claims = None
    if not isinstance(claims, list) or not all(isinstance(c, dict) and isinstance(c.get("host"), str) and
                                               type(c.get("pid")) is int and type(c.get("k")) is int and
                                               type(c.get("n")) is int for c in claims):
        raise StoreError(f"{claims_path}: damaged writers file (who is writing this store); delete it once no "
                         "extraction or sketch of the store runs, then run the command again")
    return [c for c in claims if _alive(c)]


def _alive(claim: dict) -> bool:
    if claim["host"] != socket.gethostname():
        return True  # another host's process: no way to tell from here
    try:
        os.kill(claim["pid"], 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
