"""`pipeline inspect`: look into any store offline: shapes, chunks, provenance, one item, integrity; and its two
maintenance tasks, a schema upgrade and clearing the writer claims of hosts that are gone."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stores import FeatureStore, clear_claims, upgrade

if TYPE_CHECKING:
    from pipeline.config import Config


def _item_view(store: FeatureStore, item_id: int) -> dict:
    """Every feature of one item: its shape and dtype, values when small, a summary when not."""
    view = {"item_id": item_id, "missing": int(store.read_missing([item_id])[0])}
    for name in store.specs:
        value = store.read(name, [item_id])
        arr = value[0]  # one item's array (Ragged rows index the same way)
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


def summary(report: dict) -> str:
    """A few lines for people: what the store holds, how complete it is, who made it (`--json` has it all)."""
    prov = report["provenance"]
    producer = prov.get("producer", {})
    made_by = ", ".join(f"{k} {str(v)[:24]}" for k, v in producer.items() if not isinstance(v, dict))  # a glance; --json has all
    lines = [f"{report['path']}: {prov.get('kind')} features, {report['items']} items "
             f"({report['blocks']['complete']}/{report['blocks']['total']} blocks complete, "
             f"{report['missing_inputs']} missing inputs), {report['bytes_on_disk'] / 1e6:.1f} MB, "
             f"{prov.get('backend')} schema {prov.get('schema_version')}, created {prov.get('created')}",
             f"  made by: {made_by}"]
    for name, a in report["arrays"].items():
        lines.append(f"  {name:<16} {str(tuple(a['shape'])):<22} {a['dtype']:<8} chunks {tuple(a['chunks'])}")
    if "item" in report:
        item = report["item"]
        lines.append(f"  item {item['item_id']} (missing code {item['missing']}): " + "; ".join(
            f"{k} {v['shape']} {v['dtype']}" for k, v in item.items() if isinstance(v, dict)))
    if "verify" in report:
        v = report["verify"]
        lines.append("  verify: ok, every chunk read" if v["ok"] else
                     f"  verify: {len(v['problems'])} problem(s), {len(v['damaged_items'])} damaged item(s), "
                     f"{len(v['incomplete_blocks'])} incomplete block(s): " + "; ".join(v["problems"][:5]))
    return "\n".join(lines)


def maintain(store: str, clear: bool, upgrade_schema: bool, cfg: Config, log) -> bool:
    """`--clear-claims` and `--upgrade`; whether there is a store to inspect afterwards."""
    if clear:
        cleared = clear_claims(store)
        log(f"{store}: cleared {len(cleared)} writer claim(s)" + "".join(
            f"; process {c['pid']} on {c['host']} ({c['k']}/{c['n']})" for c in cleared))
        if not FeatureStore.exists(store):  # a writer that died before laying the store out
            return False
    if upgrade_schema:
        done = upgrade(store, cfg.stores.gzip_level)
        log(f"{store}: upgraded to schema version 2" if done else f"{store}: schema version 2 already")
    return True
