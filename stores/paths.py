"""Where a store lies: a local path, or a URL read and written through fsspec, and the files beside it.

A Zarr store may be a URL: `memory://`, `file://`, `s3://` (needs `s3fs`), `gs://` (needs `gcsfs`), any
protocol fsspec knows. A local path stays a `Path`; a URL stays the string it is (`Path("s3://b/x")` would
eat a slash). An HDF5 store is a local file.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from stores.errors import StoreError


def is_url(path) -> bool:
    """Whether `path` names a store by URL (`memory://...`, `file://...`, `s3://...`), not a local path."""
    return isinstance(path, str) and "://" in path


def store_location(path: str | Path) -> Path | str:
    """A local store path as a Path; a store URL as its string (no trailing slash)."""
    return path.rstrip("/") if is_url(path) else Path(path)


def suffix(path: str | Path) -> str:
    loc = store_location(path)
    return PurePosixPath(loc.split("?", 1)[0]).suffix if isinstance(loc, str) else loc.suffix


def is_hdf5(path: str | Path) -> bool:
    return suffix(path) in (".h5", ".hdf5")


def local_path(path: str | Path) -> Path | None:
    """Where the store lies on this machine's filesystem: a path, a file:// URL's path; None for other URLs."""
    loc = store_location(path)
    if isinstance(loc, Path):
        return loc
    if loc.startswith("file://"):
        return Path(url_to_fs(loc)[1])
    return None


def url_to_fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as err:  # no s3fs/gcsfs installed, an unknown protocol
        raise StoreError(f"{url}: cannot open this URL ({err})") from None


def storage_options(url: str) -> dict:
    # A local filesystem through fsspec does not create parent folders unless asked.
    return {"auto_mkdir": True} if url.startswith("file://") else {}


def sidecar(path: str | Path, what: str) -> Path | None:
    """A small file about the store kept beside it, out of sight: <dir>/.locks/<store name>.<what>.

    None for a store on object storage (a non-file URL): there is no local file beside it.
    """
    local = local_path(path)
    return None if local is None else local.parent / ".locks" / f"{local.name}.{what}"


def partial_path(path: str | Path) -> Path | str:
    """Where a store is built (a rebuild, an upgrade) before it replaces the one at `path`:
    `.<name>.partial.<suffix>` beside it."""
    path = store_location(path)
    if isinstance(path, Path):
        return path.with_name(f".{path.stem}.partial{path.suffix}")
    head, _, name = path.rpartition("/")
    stem, _, suffix = name.rpartition(".")
    return f"{head}/.{stem}.partial.{suffix}"
