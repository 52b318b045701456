"""Provenance: how an output is identified, written and guarded, in one place for every stage.

* ``canonical_json`` / ``digest``: one serialisation of settings, so equal settings give equal digests.
* ``sha256_file(s)``: streaming file hashes (a weights file is never read into memory whole).
* ``remembered``: a value derived from files (a weights file's hash, a model's config as a library reads it)
  kept in the user's cache, keyed by everything it depends on, so a run with nothing to do recomputes none.
* ``atomic_path``: write a file beside its destination, then rename it over (never a torn file).
* ``Stamp``: what an output was computed from (settings, upstream digests); a stage whose stamp is
  unchanged does nothing, and a changed one names what changed.
* ``staged_dir``: a stage's output directory is built next to the current one and swapped in whole
  when complete, so a refused, failed or killed run leaves the last good result as it was.
* ``output_lock``: one runner per output; a second is refused at once, naming the first.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

STAMP_FILE = "stamp.json"


def canonical_json(obj) -> str:
    """One text per value: sorted keys, no spaces, tuples as lists, anything else by its str()."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_files(paths) -> str:
    """One digest of several files' bytes, in the order given."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """The user's cache of remembered values: $EMDE_CACHE_DIR, else $XDG_CACHE_HOME/emde-pipeline (~/.cache)."""
    if os.environ.get("EMDE_CACHE_DIR"):
        return Path(os.environ["EMDE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emde-pipeline"


def file_state(path: str | Path) -> list:
    """What changes whenever a file's bytes do, as git's index keeps it: its identity, size and times. The
    change time (ctime) is set by the kernel on every write and cannot be set back, so a file rewritten with
    its old modification time still reads as changed."""
    info = os.stat(path)
    return [str(Path(path).resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def remembered(kind: str, key, compute):
    """`compute()` (a JSON value), remembered in `cache_dir()` under `kind` and the digest of `key`: the same
    key gives the stored value without computing it. A failed computation is never stored; a cache that cannot
    be read or written is recomputed (it only ever saves time)."""
    path = cache_dir() / kind / f"{digest(key)}.json"
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    try:
        write_json(path, {"key": key, "value": value})
    except OSError:
        pass
    return json.loads(canonical_json(value))  # what a later call reads back


def sha256_files_remembered(paths) -> str:
    """`sha256_files(paths)`, remembered while no file changes (see `file_state`): a model's weights are hashed
    once, not on every run that checks them."""
    paths = list(paths)
    return remembered("sha256", [file_state(p) for p in paths], lambda: sha256_files(paths))


def replaceable(path: Path) -> None:
    """Refuse to replace anything but a regular file (or nothing): a rename would swap out a symlink, a
    device, a FIFO or a folder, not write to it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a FIFO" if stat.S_ISFIFO(mode) else "a device or special file")
        raise PipelineError(f"{path}: is {kind}, not a regular file; refusing to replace it (give another path, "
                            "or remove it first)")


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; once the block succeeds it replaces `path` in one rename
    (only a regular file or nothing: see `replaceable`)."""
    path = Path(path)
    replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # a new file of ours, never a link
    try:
        yield tmp
        replaceable(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """`data` into `path` atomically, through Python's own write: a full disk is an OSError (ENOSPC) whatever
    made the bytes (polars and torch report it as errors of their own when they write files themselves)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_parquet(table, path: str | Path) -> None:
    """A polars table as a parquet file, atomically (see `write_bytes`)."""
    buffer = io.BytesIO()
    table.write_parquet(buffer)
    write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path, what: str = "file"):
    """The JSON in `path`, or a one-line error saying the file is damaged and what it is."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: damaged {what} ({type(err).__name__}); delete it and run the stage again") from None


class Stamp:
    """What a stage output was computed from: named inputs (settings, digests of upstream outputs)."""

    def __init__(self, stage: str, inputs: dict):
        self.stage = stage
        self.inputs = json.loads(canonical_json(inputs))  # plain JSON values: compares equal after a round trip

    @property
    def digest(self) -> str:
        return digest({"stage": self.stage, "inputs": self.inputs})

    def without(self, *keys: str) -> Stamp:
        return Stamp(self.stage, {k: v for k, v in self.inputs.items() if k not in keys})

    def changed(self, other: Stamp | dict | None) -> list[str]:
        """The input names whose values differ from `other`'s (every name when there is no other)."""
        theirs = other.inputs if isinstance(other, Stamp) else (other or {})
        keys = set(self.inputs) | set(theirs)
        return sorted(k for k in keys if canonical_json(self.inputs.get(k)) != canonical_json(theirs.get(k)))

    def to_json(self) -> dict:
        return {"stage": self.stage, "inputs": self.inputs, "digest": self.digest}

    def write(self, directory: str | Path) -> None:
        write_json(Path(directory) / STAMP_FILE, self.to_json())

    @classmethod
    def read(cls, directory: str | Path) -> Stamp | None:
        path = Path(directory) / STAMP_FILE
        if not path.is_file():
            return None
        data = read_json(path, "stage stamp")
        if not isinstance(data, dict) or not isinstance(data.get("inputs", {}), dict):
            raise PipelineError(f"{path}: damaged stage stamp (not a stamp's JSON object); delete it and run the "
                                "stage again")
        return cls(data.get("stage", ""), data.get("inputs", {}))

    def matches(self, directory: str | Path) -> bool:
        """Whether `directory` holds a complete output of exactly these inputs."""
        old = Stamp.read(directory)
        return old is not None and old.digest == self.digest


# ---------------------------------------------------------------------- whole outputs, swapped in
def partial_dir(final: Path) -> Path:
    """Where the output `final` is built (and a killed run's progress waits to be resumed)."""
    return final.parent / f".{final.name}.partial"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover(final: Path) -> None:
    """Finish a swap that a kill interrupted between its two renames (the old output is put back)."""
    old = final.parent / f".{final.name}.old"
    if old.exists() and not final.exists():
        os.rename(old, final)
    elif old.exists():
        _remove(old)


def swap_in(partial: Path, final: Path) -> None:
    """Replace `final` (a directory or a file) by the complete `partial` (two renames, recoverable)."""
    old = final.parent / f".{final.name}.old"
    if final.exists():
        os.rename(final, old)
    os.rename(partial, final)
    _remove(old)


@contextmanager
def staged_dir(final: str | Path, fresh: bool = True):
    """Yield the partial directory of `final`; swap it in when the block completes, else leave all as is.

    fresh: start from an empty partial directory (False keeps what a killed run left there to resume)."""
    final = Path(final)
    recover(final)
    partial = partial_dir(final)
    if fresh and partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    yield partial
    swap_in(partial, final)


# ---------------------------------------------------------------------- one runner per output
def output_lock(target: str | Path):
    """Hold the lock of output `target` (beside it, in `.locks/`) for this process; a second runner is refused at
    once, naming the first (pid, host, command, since when). The kernel releases it when the process dies, so a
    killed run never leaves a stale lock."""
    from stores import file_lock, sidecar  # here, not at import: a refused argument never loads the store layer

    def busy(holder: str) -> PipelineError:
        return PipelineError(f"{target} is being written by {holder}; wait for it to finish (or stop it) before "
                             "running this again")
    return file_lock(sidecar(target, "lock"), wait=False, busy=busy)
