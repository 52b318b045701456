"""Store reads against the same arrays in RAM: random batches of 256 ids and a sequential scan.

    python benchmarks/store_read.py [--items 3000] [--repeats 20]

Two feature shapes, both backends: title_cam-like token features (ragged, 768 x float16 per
token, 10-40 tokens per title) and image-like maps (fixed, 1280 x 7 x 7 float16, EfficientNet-lite0
at 224). Prints one JSON line per (feature, backend, access) with MB/s, items/s and the ratio to
the same access on numpy arrays already in memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import DEFAULT_CONFIG, load_config  # noqa: E402
from stores import ArraySpec, FeatureStore, Ragged, fingerprint  # noqa: E402

STORES = load_config(DEFAULT_CONFIG).stores  # chunk size and HDF5 compression, as the pipeline writes stores


def build(path: Path, kind: str, n: int, rng) -> tuple[np.ndarray, list | np.ndarray]:
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    if kind == "tokens":
        lengths = rng.integers(10, 41, n)
        truth = [rng.standard_normal((k, 768)).astype(np.float16) for k in lengths]
        spec, lens = {"tokens": ArraySpec("float16", (768,), ragged=True)}, {"tokens": lengths}
    else:
        truth = rng.standard_normal((n, 1280, 7, 7)).astype(np.float16)
        spec, lens = {"maps": ArraySpec("float16", (1280, 7, 7))}, None
    store = FeatureStore.create(path, kind, spec, {}, ids, fingerprint([str(i) for i in ids]), lens,
                                block_rows=256, chunk_bytes=STORES.chunk_bytes, gzip_level=STORES.gzip_level)
    pos = {int(i): k for k, i in enumerate(ids)}
    for b in store.pending_blocks():
        rows = [pos[int(i)] for i in store.block_ids(b)]
        data = np.concatenate([truth[r] for r in rows]) if kind == "tokens" else truth[rows]
        store.write_block(b, {kind: data})
    store.close()
    return ids, truth


def ram_read(kind, truth, rows):
    if kind == "tokens":
        parts = [truth[r] for r in rows]
        return Ragged(np.concatenate(parts), np.concatenate([[0], np.cumsum([len(p) for p in parts])]))
    return truth[np.sort(rows)][np.argsort(np.argsort(rows))]


def nbytes(x) -> int:
    return x.values.nbytes if isinstance(x, Ragged) else x.nbytes


def timed(fn, repeats):
    best_total, total_bytes = 0.0, 0
    for _ in range(repeats):
        t = time.perf_counter()
        got = fn()
        best_total += time.perf_counter() - t
        total_bytes += nbytes(got)
    return best_total, total_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, n in (("tokens", args.items), ("maps", args.items // 3)):
            for suffix in (".zarr", ".h5"):
                ids, truth = build(Path(tmp) / f"{kind}{suffix}", kind, n, rng)
                store = FeatureStore(Path(tmp) / f"{kind}{suffix}")
                batches = [rng.choice(n, 256, replace=False) for _ in range(args.repeats)]
                it = iter(batches)
                s_rand, b_rand = timed(lambda: store.read(kind, ids[next(it)]), args.repeats)
                it = iter(batches)
                m_rand, _ = timed(lambda: ram_read(kind, truth, next(it)), args.repeats)
                s_seq, b_seq = timed(lambda: store.read(kind, ids), 2)
                m_seq, _ = timed(lambda: ram_read(kind, truth, np.arange(n)), 2)
                for access, s, m, b, items in (("random256", s_rand, m_rand, b_rand, 256 * args.repeats),
                                               ("sequential", s_seq, m_seq, b_seq, 2 * n)):
                    print(json.dumps({
                        "feature": kind, "backend": suffix[1:], "access": access,
                        "store_mb_per_s": round(b / s / 1e6, 1), "ram_mb_per_s": round(b / m / 1e6, 1),
                        "store_items_per_s": round(items / s), "ram_items_per_s": round(items / m),
                        "store_over_ram_time": round(s / m, 2),
                        "disk_mb": round(store.bytes_stored() / 1e6, 1),
                    }), flush=True)
                store.close()


if __name__ == "__main__":
    main()
