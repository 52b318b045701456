"""Locks kept beside a store or an output (`.locks/`), all made of one primitive: `file_lock`.

- `file_lock`: an flock on a small file that says who holds it; blocking or refused at once, re-entrant
  within a thread, released by the kernel when the process dies (a killed run never leaves a stale lock).
- `store_lock`: held while a store's layout changes (create, append items); blocking, held briefly.
- `sole_writer`: an HDF5 store takes one writer process at a time; a second is refused at once, naming
  the first, never left waiting on the layout lock.
- `writer_claim`: registers shard K/N's writer for its whole run; a second writer of the same blocks is
  refused. A claim whose process died on this host is dropped; one from another host cannot be checked
  from here, and `clear_claims` drops it once that host is known to be gone (a restarted pod or job).

A store on object storage (s3://, gs://, memory://) has no file beside it: every lock is a no-op there.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

from stores.errors import StoreBusyError, StoreError, WriterConflictError
from stores.paths import is_hdf5, sidecar

# The locks this process holds: (lock file, thread) -> [open file, depth]. flock treats two open files of one
# process as two owners, so a thread that takes a lock it holds already reuses it; two threads do not.
_held: dict[tuple[Path, int], list] = {}
_held_guard = threading.Lock()


def _me() -> str:
    since = dt.datetime.now().isoformat(timespec="seconds")
    return f"process {os.getpid()} on {socket.gethostname()} (`{' '.join(sys.argv)}`, since {since})"


def _acquire(path: Path, wait: bool, busy: Callable[[str], Exception] | None):
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise (busy(holder) if busy else StoreBusyError(f"{path}: held by {holder}")) from None
    fh.truncate(0)
    fh.write(_me())
    fh.flush()
    return fh


@contextmanager
def file_lock(path: Path, wait: bool = True, busy: Callable[[str], Exception] | None = None):
    """Hold an exclusive lock on the file `path` (made with its folder) for the block; the file then says who
    holds it. `wait=False`: a lock another process (or thread) holds is refused at once with `busy(holder)`."""
    key = (Path(path), threading.get_ident())
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        fh = _acquire(key[0], wait, busy)
        with _held_guard:
            _held[key] = [fh, 1]
    try:
        yield
    finally:
        with _held_guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                entry[0].truncate(0)
                entry[0].close()  # closing the file releases the flock


def holder(path: Path) -> str | None:
    """Who holds the lock on `path` (as its file says), or None when nobody does, or this process does."""
    if not path.exists() or any(p == path for p, _ in _held):
        return None
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return fh.read().strip() or "another process"


@contextmanager
def _beside(path: str | Path, what: str, wait: bool, busy=None):
    lock = sidecar(path, what)
    if lock is None:  # object storage: no file beside the store
        yield
        return
    with file_lock(lock, wait, busy):
        yield


def store_lock(path: str | Path):
    """Hold an exclusive lock beside the store while its layout changes (create, append items).

    A local path or a file:// URL gets a file lock (every process of this machine, and of other machines
    where the shared filesystem honours flock). A store on object storage has no lock to take: layout
    changes must then be made by one process before the shard workers start; the store filler does that
    itself (worker 0 plans, the others wait for the plan). Writers of disjoint shards need no lock: each
    block owns whole chunks of every array.
    """
    return _beside(path, "lock", wait=True)


def sole_writer(path: str | Path):
    """Hold the writer lock of an HDF5 store (nothing for a Zarr store) for the duration of the block."""
    def busy(who: str) -> StoreBusyError:
        return StoreBusyError(f"{path}: {who} is writing this HDF5 store, and an HDF5 store takes one writer at a "
                              "time: wait for it to end, or use a .zarr store for --shard K/N workers")
    return _beside(path, "writer", wait=False, busy=busy) if is_hdf5(path) else nullcontext()


def writer_of(path: str | Path) -> str | None:
    """Who holds the store's writer lock, or None when nobody does (or this process does)."""
    lock = sidecar(path, "writer") if is_hdf5(path) else None
    return None if lock is None else holder(lock)


@contextmanager
def writer_claim(path: str | Path, shard: tuple[int, int]):
    """Register this process as the writer of shard K/N of the store for as long as it runs.

    A second writer of the same shard, or a writer whose shards would overlap a running one's (another
    N), is refused: two processes never fill the same blocks. Claims live in `.locks/<store>.writers.json`,
    updated under the store lock. An HDF5 store's writer lock is taken first, without waiting: a second
    writer is refused at once, even while the first one holds the layout lock to plan its blocks.
    """
    claims_path = sidecar(path, "writers.json")
    if claims_path is None:  # object storage: no claims (nor liveness) to keep; shards are trusted to differ
        yield
        return
    me = {"host": socket.gethostname(), "pid": os.getpid(), "k": shard[0], "n": shard[1],
          "since": dt.datetime.now().isoformat(timespec="seconds")}
    with sole_writer(path):
        with store_lock(path):
            claims = [c for c in _claims(claims_path) if _alive(c)]
            for c in claims:
                if c["n"] != me["n"] or c["k"] == me["k"]:
                    raise WriterConflictError(path, c, me["n"])
            _write_claims(claims_path, claims + [me])
        try:
            yield
        finally:
            with store_lock(path):
                _write_claims(claims_path, [c for c in _claims(claims_path)
                                            if _alive(c) and (c["pid"], c["host"]) != (me["pid"], me["host"])])


def clear_claims(path: str | Path) -> list[dict]:
    """Drop the writer claims that cannot be live from here: every claim of another host (whose process this
    host cannot see: clear them only once that host is gone) and those of dead processes of this one.
    Returns the claims dropped."""
    claims_path = sidecar(path, "writers.json")
    if claims_path is None or not claims_path.exists():
        return []
    with store_lock(path):
        claims = _claims(claims_path)
        kept = [c for c in claims if c.get("host") == socket.gethostname() and _alive(c)]
        _write_claims(claims_path, kept)
    return [c for c in claims if c not in kept]


def _claims(claims_path: Path) -> list[dict]:
    """The claims on file (none without a file); a damaged file is refused, naming the file to delete."""
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
    return claims


def _write_claims(claims_path: Path, claims: list[dict]) -> None:
    """Replace the claims file in one rename: a writer killed mid-write never leaves half a file."""
    tmp = claims_path.with_name(f".{claims_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(claims))
    os.replace(tmp, claims_path)


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
