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

The real items' rows are planned and written by `stores.layout`, read by `stores.read`, checked by
`stores.integrity` and described by `stores.report`; `FeatureStore` is all four.

Schema version 2 (this code reads and writes it) checksums every chunk (Zarr: CRC32C; HDF5: Fletcher-32 with
gzip) and keeps `counts`. A store of version 1 (no `counts`: id -1 marked an unused row; no checksum in
Zarr, lzf in HDF5) is refused with the command that upgrades it once (`stores.upgrade`).
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from stores.arrays import ArraySpec
from stores.backends import backend_for
from stores.errors import StoreError, UnreadableStoreError
from stores.integrity import Integrity
from stores.layout import SCHEMA_VERSION, Layout
from stores.locks import sole_writer
from stores.metadata import check_arrays, check_provenance
from stores.paths import store_location
from stores.read import Reader
from stores.report import Report


class FeatureStore(Layout, Reader, Integrity, Report):
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
        self._locks = ExitStack()  # an HDF5 store opened for writing holds its one-writer lock until closed
        if mode != "r":
            self._locks.enter_context(sole_writer(self.path))
        self.backend = None
        try:
            self.backend, prov = _open_backend(backend, self.path, mode)
            if not prov:
                raise StoreError(f"{self.path}: not a feature store (no provenance attributes); rebuild it")
            if isinstance(prov, dict) and prov.get("schema_version") == 1:
                raise StoreError(f"{self.path}: a store of schema version 1, and this code reads version "
                                 f"{SCHEMA_VERSION}: upgrade it once with `pipeline inspect {self.path} --upgrade`")
            check_provenance(self.path, prov, SCHEMA_VERSION)
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

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self._locks.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_backend(backend, path, mode: str):
    """(the backend of the store at `path`, its provenance); metadata it cannot parse (a truncated zarr.json,
    an attribute that is not JSON) is UnreadableStoreError."""
    opened = None
    try:
        opened = backend(path, mode)
        return opened, opened.get_attr("provenance")
    except Exception as err:  # noqa: BLE001 - zarr and h5py meet damaged metadata with errors of every kind
        if opened is not None:
            opened.close()
        if isinstance(err, StoreError):
            raise
        raise UnreadableStoreError(path, f"its metadata cannot be read ({type(err).__name__}: {str(err)[:120]})") \
            from None
