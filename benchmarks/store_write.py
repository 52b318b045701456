"""Store writes: blocks of image-like maps written by 1..N threads at once, against zstd alone on the same bytes.

    python benchmarks/store_write.py [--blocks 8] [--writers 1 2] [--backend zarr]

The maps are efficientnet_b2's at 260 px (1408 x 9 x 9 float16 per item, post-activation-like: half zeros),
in blocks of 256 items, the extraction driver's write unit. Prints one JSON line per writer count with
items/s and raw MB/s, and one for numcodecs' Zstd compressing the same block in as many threads: what the
codec alone allows, so a write path that does not scale with threads shows as the gap between the two.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import DEFAULT_CONFIG, load_config  # noqa: E402
from stores import ArraySpec, FeatureStore, fingerprint  # noqa: E402

STORES = load_config(DEFAULT_CONFIG).stores  # chunk size and HDF5 compression, as the pipeline writes stores

BLOCK, SHAPE = 256, (1408, 9, 9)


def write(path: Path, block: np.ndarray, blocks: int, writers: int) -> float:
    """Seconds to write `blocks` copies of `block` into a fresh store, `writers` blocks at a time."""
    ids = np.arange(blocks * BLOCK, dtype=np.int64)
    store = FeatureStore.create(path, "image", {"maps": ArraySpec("float16", SHAPE)}, {},
                                ids, fingerprint([str(i) for i in ids]), block_rows=BLOCK,
                                chunk_bytes=STORES.chunk_bytes, gzip_level=STORES.gzip_level)
    start = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(lambda b: store.write_block(b, {"maps": block}), range(blocks)))
    return time.perf_counter() - start


def zstd_alone(block: np.ndarray, blocks: int, threads: int) -> float:
    from numcodecs import Zstd

    codec, start = Zstd(level=0), time.perf_counter()  # the stores' zarr ZstdCodec(): level 0, i.e. zstd's default (3)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: codec.encode(block), range(blocks)))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--backend", choices=["zarr", "hdf5"], default="zarr")
    args = ap.parse_args()
    block = np.maximum(np.random.default_rng(0).standard_normal((BLOCK, *SHAPE)), 0).astype(np.float16)
    mb = args.blocks * block.nbytes / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.writers:
            path = Path(tmp) / f"w{w}.{'zarr' if args.backend == 'zarr' else 'h5'}"
            seconds = write(path, block, args.blocks, w)
            print(json.dumps({"what": f"{args.backend} store", "writers": w, "items_per_s": round(
                args.blocks * BLOCK / seconds, 1), "raw_mb_s": round(mb / seconds, 1)}))
            seconds = zstd_alone(block, args.blocks, w)
            print(json.dumps({"what": "zstd alone", "threads": w, "raw_mb_s": round(mb / seconds, 1)}))


if __name__ == "__main__":
    main()
