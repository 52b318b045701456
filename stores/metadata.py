"""A store's own metadata, checked when it is opened, before any chunk is read.

The provenance says what the store holds (its layout: rows per block, each array's dtype, row shape and
chunk); each array's own metadata (a Zarr `zarr.json`, an HDF5 dataset header) must say the same. A
damaged or hostile file (a truncated `zarr.json`, a provenance of the wrong type, an array declaring a chunk
of gigabytes over a small compressed frame) is refused on open with `UnreadableStoreError`, before it can
decode anything, so no read allocates more than the layout's chunks.
"""
from __future__ import annotations

import numpy as np

from stores.errors import UnreadableStoreError

MAX_BLOCK_ROWS = 1 << 20  # [stores] block_items at most
MAX_CHUNK_BYTES = 1 << 26  # 64 MiB: the layout's chunks are about 2 MiB (a chunk of one row may be larger)
NUMERIC_KINDS = "biuf"


def check_provenance(path, prov, readable_schemas: tuple[int, ...]) -> None:
    """The provenance's own shape: a schema this code reads, and a layout of sane numbers."""
    def bad(what: str) -> UnreadableStoreError:
        return UnreadableStoreError(path, f"its provenance is damaged ({what})")

    if not isinstance(prov, dict) or not isinstance(prov.get("layout"), dict):
        raise bad("no layout")
    if prov.get("schema_version") not in readable_schemas:
        raise bad(f"schema version {prov.get('schema_version')!r}, not one this code reads {readable_schemas}")
    if not isinstance(prov.get("kind"), str) or not isinstance(prov.get("producer"), dict):
        raise bad("no kind or producer")
    rows, arrays = prov["layout"].get("block_rows"), prov["layout"].get("arrays")
    if type(rows) is not int or not 0 < rows <= MAX_BLOCK_ROWS or rows & (rows - 1):
        raise bad(f"block_rows {rows!r}")
    if not isinstance(arrays, dict) or not arrays:
        raise bad("no arrays")
    for name, spec in arrays.items():
        if not _sane_array(spec):
            raise bad(f"array {name!r}: {spec!r}")


def _sane_array(spec) -> bool:
    if not isinstance(spec, dict) or not isinstance(spec.get("ragged"), bool):
        return False
    shape, chunk = spec.get("shape"), spec.get("chunk")
    if not isinstance(shape, list) or not all(type(n) is int and n > 0 for n in shape):
        return False
    try:
        dtype = np.dtype(spec.get("dtype"))
    except (TypeError, ValueError):
        return False
    row_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    return dtype.kind in NUMERIC_KINDS and type(chunk) is int and chunk > 0 and \
        (chunk == 1 or chunk * row_bytes <= MAX_CHUNK_BYTES)


def expected_arrays(store) -> dict[str, tuple[np.dtype, tuple, int | None]]:
    """Every array the layout of `store` (a FeatureStore) implies: name -> (dtype, row shape, chunk rows).
    The chunk is None where a schema 1 store may have chunked otherwise."""
    B, exact = store.block_rows, store.schema_version >= 2
    chunks = store.provenance["layout"]["arrays"]
    out = {"ids": (np.dtype("int64"), (), B if exact else None),
           "input_hash": (np.dtype("uint64"), (), B if exact else None),
           "missing": (np.dtype("uint8"), (), B if exact else None),
           "complete": (np.dtype("uint8"), (), 1 if exact else None)}
    if exact:
        out["counts"] = (np.dtype("int32"), (), None)
    for name, spec in store.specs.items():
        data = f"{name}/values" if spec.ragged else name
        out[data] = (np.dtype(spec.dtype), tuple(spec.shape), int(chunks[name]["chunk"]))
        if spec.ragged:
            out[f"{name}/starts"] = (np.dtype("int64"), (), B if exact else None)
            out[f"{name}/lengths"] = (np.dtype("int32"), (), B if exact else None)
    return out


def check_arrays(store) -> None:
    """Each array's metadata against the layout: it reads, with the dtype, row shape and chunk planned, and
    `complete` is no longer than the rows laid out (so no read is larger than the layout's)."""
    lengths = {}
    for name, (dtype, row, chunk) in expected_arrays(store).items():
        try:
            arr = store.backend.array(name)
            got = (np.dtype(arr.dtype), tuple(arr.shape[1:]), tuple(arr.chunks))
            lengths[name] = int(arr.shape[0])
        except Exception as err:  # noqa: BLE001 - unparsable metadata of any kind, a missing array
            raise UnreadableStoreError(store.path, f"array '{name}' cannot be opened ({type(err).__name__}: "
                                                   f"{str(err)[:120]})") from None
        rows = got[2][0] if got[2] else 0
        if got[:2] != (dtype, row) or (chunk is not None and got[2] != (chunk,) + row) or \
                rows * dtype.itemsize * int(np.prod(row, dtype=np.int64)) > MAX_CHUNK_BYTES and rows != 1:
            raise UnreadableStoreError(store.path, f"array '{name}' is {got[0]} {got[1]} in chunks of {got[2]}, "
                                                   f"not what its layout says ({dtype} {row}, chunks of {chunk})")
    blocks = lengths["complete"]
    short = [n for n in ("ids", "input_hash", "missing", "counts") if n in lengths and
             lengths[n] < blocks * (1 if n == "counts" else store.block_rows)]
    if short:
        raise UnreadableStoreError(store.path, f"array '{short[0]}' holds {lengths[short[0]]} rows, fewer than the "
                                               f"{blocks} blocks of 'complete' need")
