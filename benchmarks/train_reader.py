"""A training epoch fed from a feature store through the training reader vs the same epoch fed from memory.

    python benchmarks/train_reader.py [--items 3000] [--backend zarr|hdf5] [--config configs/default.toml]
                                      [--channels N] [--threads N] [--repeats 2]

title_cam-shaped data: float16 token features, 768 wide (CamemBERT-base), titles of 10-40 tokens, written
to a store in a temporary directory (blocks of 256 items). The network is the title_cam network of the
config (TextCNN -> trainable EMDE -> head; ``--channels`` makes it narrower for a quick CPU run), trained
with Adam; CUDA + bf16 autocast when there is a GPU.

For each reader path -- ``memory`` (the share loaded once, one sequential pass) and ``stream`` (blocks in a
shuffled order, shuffled within groups of 4 blocks, read while the model trains) -- the same epoch is
timed twice: fed by the reader straight from the store, and fed from the very same batches materialised
beforehand as tensors in memory (the lower bound: no reading, no assembling). Runs alternate and the best
of ``--repeats`` is kept (other processes share this machine). One JSON line per path:
``store_epoch_s``, ``memory_epoch_s``, ``ratio`` (target <= 1.1), ``load_s`` (memory path's one-off
read), tokens, batches, device; on CUDA also ``gpu_busy`` (GPU time of the steps / wall time).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import load_config  # noqa: E402
from pipeline.checkpoint import build_model  # noqa: E402
from pipeline.train_reader import TrainReader  # noqa: E402
from stores import ArraySpec, FeatureStore, fingerprint  # noqa: E402


def build_store(path: Path, n: int, hidden: int, classes: int, rng, stores) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    labels = rng.integers(0, classes, n)
    lengths = rng.integers(10, 41, n)
    store = FeatureStore.create(path, "title_cam", {"tokens": ArraySpec("float16", (hidden,), ragged=True)},
                                {"model": "benchmark"}, ids, fingerprint([str(i) for i in ids]),
                                {"tokens": lengths}, block_rows=256,
                                chunk_bytes=stores.chunk_bytes, gzip_level=stores.gzip_level)
    for b in store.pending_blocks():
        k = int(lengths[b * 256 : (b + 1) * 256].sum())
        store.write_block(b, {"tokens": rng.standard_normal((k, hidden), dtype=np.float32).astype(np.float16)})
    store.close()
    return ids, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--backend", choices=["zarr", "hdf5"], default="zarr")
    ap.add_argument("--config", default=None, help="config whose [pretrain.title_cam] network is trained")
    ap.add_argument("--channels", type=int, default=0, help="override the TextCNN channels (0: the config's)")
    ap.add_argument("--batch-size", type=int, default=0, help="override the batch size (0: the config's)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    opts = cfg.train_options("title_cam")
    channels = args.channels or opts.channels
    batch_size = args.batch_size or opts.batch_size
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    classes = 27
    model_config = {"modality": "title_cam", "coder": "trainable", "num_classes": classes,
                    "encoder": {"type": "TextCNN", "in_dim": args.hidden, "kernel_sizes": opts.kernel_sizes,
                                "channels": channels, "dropout": opts.dropout},
                    "emde": {"depth": opts.depth, "width": opts.width, "inner_dim": opts.inner_dim}}
    torch.manual_seed(0)
    model = build_model(model_config).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)

    def step(batch):
        batch = batch.to(device)
        with amp():
            logits = model(*batch.inputs)
        loss = F.cross_entropy(logits.float(), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def run(batches) -> tuple[float, float | None]:
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            gpu = 0.0
        t = time.perf_counter()
        for batch in batches:
            if cuda:
                start.record()
            step(batch)
            if cuda:
                end.record()
                end.synchronize()
                gpu += start.elapsed_time(end) / 1e3
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        return wall, (gpu / wall if cuda else None)

    rng = np.random.default_rng(0)
    suffix = ".zarr" if args.backend == "zarr" else ".h5"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"title_cam{suffix}"
        ids, labels = build_store(path, args.items, args.hidden, classes, rng, cfg.stores)
        store_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
        for mode in ("memory", "stream"):
            settings = cfg.train_reader.model_copy(update={"mode": mode, "buffer_blocks": 4, "prefetch_batches": 8,
                                                           "length_sort_window": 16, "max_tokens": 0})
            reader = TrainReader(path, "tokens", "tokens", ids, labels, settings, batch_size=batch_size,
                                 pin_memory=cuda, seed=0)
            load_s = reader.load() if mode == "memory" else 0.0
            epoch = 1
            in_memory = list(reader.epoch(epoch))  # the same epoch, materialised: tensors already in memory
            tokens = int(sum(int(b.inputs[1].sum()) for b in in_memory))
            run(in_memory[: max(len(in_memory) // 4, 1)])  # warm-up (allocator, kernels)
            store_s, memory_s, busy = [], [], []
            for _ in range(args.repeats):
                s, u = run(reader.epoch(epoch))
                store_s.append(s)
                busy.append(u)
                memory_s.append(run(in_memory)[0])
            best_store, best_memory = min(store_s), min(memory_s)
            line = {"path": mode, "backend": args.backend, "items": args.items, "tokens": tokens,
                    "hidden": args.hidden, "batches": len(in_memory), "batch_size": batch_size, "channels": channels,
                    "store_mb_on_disk": round(store_mb, 1), "store_epoch_s": round(best_store, 3),
                    "memory_epoch_s": round(best_memory, 3), "ratio": round(best_store / best_memory, 3),
                    "load_s": round(load_s, 3), "runs_store_s": [round(x, 3) for x in store_s],
                    "runs_memory_s": [round(x, 3) for x in memory_s],
                    "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"}
            if cuda:
                line["gpu_busy"] = round(max(busy), 3)
            print(json.dumps(line), flush=True)
            reader.close()


if __name__ == "__main__":
    main()
