"""Zarr v3 sharding against plain chunks, for image-map-like rows: objects written, write and read MB/s.

    python benchmarks/sharding.py [--rows 1024] [--channels 1408] [--url file:///tmp/x or memory://x]

The store layer's policy gives EfficientNet-b2 maps (1408 x 9 x 9 float16, 228 KB a row) chunks of
8 rows (~1.8 MB): one object per 8 items. With `shards=` (zarr.create_array) the same chunks are
packed into one object per block of `--block` rows, with an index at its end; a reader still fetches
single chunks (byte-range reads). Writes here go block by block, as the extraction driver writes.
Prints one JSON line per layout: objects, write MB/s, random 256-row read MB/s, sequential MB/s.
"""
from __future__ import annotations

import argparse
import json
import time
import uuid

import sys
from pathlib import Path

import fsspec
import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stores.read import gather  # noqa: E402  (the store's reader: each touched chunk once, runs as slices)
import stores.zarr_backend  # noqa: E402,F401  (the store's zstd codec, registered on import)


def run(url: str, rows: int, channels: int, block: int, chunk: int, shard: int | None, rng) -> dict:
    shape = (rows, channels, 9, 9)
    arr = zarr.create_array(url, shape=shape, dtype="float16", chunks=(chunk,) + shape[1:],
                            shards=None if shard is None else (shard,) + shape[1:], fill_value=0,
                            storage_options={"auto_mkdir": True} if url.startswith("file://") else None)
    data = rng.standard_normal((block,) + shape[1:]).astype(np.float16)
    t = time.perf_counter()
    for r0 in range(0, rows, block):
        arr[r0 : r0 + block] = data
    write_s = time.perf_counter() - t
    fs, root = fsspec.core.url_to_fs(url)
    objects = len(fs.find(root))
    picks = [rng.choice(rows, 256, replace=False) for _ in range(5)]
    t = time.perf_counter()
    for p in picks:
        gather(arr, p, chunk)
    rand_s = time.perf_counter() - t
    t = time.perf_counter()
    arr[:]
    seq_s = time.perf_counter() - t
    mb = data[:1].nbytes / 1e6
    fs.rm(root, recursive=True)
    return {"layout": "plain chunks" if shard is None else f"shards of {shard} rows", "chunk_rows": chunk,
            "rows": rows, "objects": objects, "write_mb_per_s": round(rows * mb / write_s, 1),
            "random256_mb_per_s": round(5 * 256 * mb / rand_s, 1), "sequential_mb_per_s": round(rows * mb / seq_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--channels", type=int, default=1408)
    ap.add_argument("--block", type=int, default=256, help="rows written at once (the store's block)")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--url", default=None, help="where to write (default: a file:// folder under /tmp)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    base = args.url or f"file:///tmp/sharding-{uuid.uuid4().hex}"
    for shard in (None, args.block):
        url = f"{base.rstrip('/')}/{'plain' if shard is None else 'sharded'}.zarr"
        print(json.dumps({"url": url} | run(url, args.rows, args.channels, args.block, args.chunk, shard, rng)),
              flush=True)
    fs, root = fsspec.core.url_to_fs(base)
    if fs.exists(root):
        fs.rm(root, recursive=True)


if __name__ == "__main__":
    main()
