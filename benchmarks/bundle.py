"""A bundle against its work directory: size, and load time against the time to import torch and read its weights.

    python benchmarks/bundle.py --workdir W --bundle B [--repeats 3]

Each load runs in a fresh process, alternated `repeats` times, the fastest kept (a shared machine disturbs
single runs): `Predictor.load(B)`, `Predictor.load(W)`, and the baseline: `import torch`, then every weight
file of B read whole (the text model's and image backbone's safetensors, every model.pt). Targets (issue 26):
B at most half of W's size (W without its catalogue), loading B at most 2x the baseline. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASELINE = """
import time, sys
t = time.perf_counter()
import torch
for f in sys.argv[1:]:
    open(f, "rb").read()
print(time.perf_counter() - t)
"""
LOAD = """
import time, sys
t = time.perf_counter()
from pipeline import Predictor
Predictor.load(sys.argv[1])
print(time.perf_counter() - t)
"""


def seconds(code: str, *args: str) -> float:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def size(path: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not set(p.relative_to(path).parts) & set(skip))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    weights = [str(p) for p in sorted(args.bundle.rglob("*")) if p.suffix in (".safetensors", ".pt")]
    runs: dict[str, list[float]] = {"baseline": [], "bundle": [], "workdir": []}
    for _ in range(args.repeats):
        runs["baseline"].append(seconds(BASELINE, *weights))
        runs["bundle"].append(seconds(LOAD, str(args.bundle)))
        runs["workdir"].append(seconds(LOAD, str(args.workdir)))
    best = {k: min(v) for k, v in runs.items()}
    w_bytes, b_bytes = size(args.workdir, ("catalog",)), size(args.bundle)
    report = {"workdir_mb": w_bytes / 2**20, "bundle_mb": b_bytes / 2**20, "size_ratio": b_bytes / w_bytes,
              "baseline_s": best["baseline"], "bundle_load_s": best["bundle"], "workdir_load_s": best["workdir"],
              "load_ratio": best["bundle"] / best["baseline"], "runs": runs, "load_average": os.getloadavg()}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}))


if __name__ == "__main__":
    main()
