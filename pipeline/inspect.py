"""`pipeline inspect`: look into any store offline: shapes, chunks, provenance, one item, integrity."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stores import FeatureStore, Ragged


def _item_view(store: FeatureStore, item_id: int) -> dict:
    """Every feature of one item: its shape and dtype, values when small, a summary when not."""
    view = {"item_id": item_id, "missing": int(store.read_missing([item_id])[0])}
    for name in store.specs:
        value = store.read(name, [item_id])
        arr = value[0] if isinstance(value, Ragged) else value[0]
        entry = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        if arr.size <= 64:
            entry["values"] = arr.tolist()
        else:
            a = arr.astype(np.float64)
            entry |= {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()),
                      "first": arr.reshape(-1)[:8].tolist()}
        view[name] = entry
    return view


def inspect_store(path: str | Path, item: int | None = None, verify: bool = False) -> dict:
    with FeatureStore(path) as store:
        report = store.info()
        if item is not None:
            report["item"] = _item_view(store, item)
        if verify:
            report["verify"] = store.verify()
    return report
