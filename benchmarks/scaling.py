"""Extraction scaling: N worker processes (`--shard K/N`) filling one Zarr store, N = 1, 2, ...

    python benchmarks/scaling.py [--modality title_cam] [--items 4000] [--workers 1 2]

Each run starts from a fresh work directory whose upstream models and split are already built
(`pipeline models`), so the timing is the extraction alone. Every worker gets cores / N threads.
Prints one JSON line per worker count: wall seconds, aggregate items/s, each worker's items/s
(from its summary line), and the speed-up over one worker.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modality", default="title_cam")
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    args = ap.parse_args()
    from pipeline.synth import synthesize

    cores = os.cpu_count() or 1
    base_rate = None
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog"
        synthesize(catalog, items=args.items, seed=0)
        ready = Path(tmp) / "ready"
        p = run(["models", "--catalog", str(catalog), "--workdir", str(ready), "--config", args.config])
        if p.wait() != 0:
            sys.exit(p.stderr.read())
        for n in args.workers:
            work = Path(tmp) / f"w{n}"
            shutil.copytree(ready, work)
            env = os.environ | {"OMP_NUM_THREADS": str(max(cores // n, 1)), "HF_HUB_OFFLINE": "1"}
            started = time.perf_counter()
            procs = [run(["extract", args.modality, "--catalog", str(catalog), "--workdir", str(work),
                          "--config", args.config, "--shard", f"{k}/{n}"], env) for k in range(n)]
            rates = []
            for proc in procs:
                _, stderr = proc.communicate()
                if proc.returncode != 0:
                    sys.exit(stderr)
                rates += [float(x) for x in re.findall(r"\(([\d.]+) items/s\)", stderr)]
            wall = time.perf_counter() - started
            rate = args.items / wall
            base_rate = base_rate or rate
            print(json.dumps({"modality": args.modality, "workers": n, "threads_per_worker": max(cores // n, 1),
                              "items": args.items, "wall_s": round(wall, 2), "items_per_s": round(rate, 1),
                              "worker_items_per_s": rates, "speedup": round(rate / base_rate, 2)}), flush=True)


if __name__ == "__main__":
    main()
