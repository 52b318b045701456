"""How long the command line takes when it has nothing to compute, beside its baselines.

    python benchmarks/cli_speed.py [--runs 10] [--workdir W --catalog PATH]

Each command runs `--runs` times as a subprocess (median and min wall seconds): `pipeline --version` (the
floor: Python, typer), a refused argument and a refused config key (both must be refused before torch,
transformers or timm are imported: under 2x `--version`), and `python -c "import torch"`. With `--workdir`
and `--catalog` (a trained work directory), also an unchanged `pipeline train` on it, whose every stage
says "nothing to do" (the target: at most 3x `import torch`).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(argv: list[str], runs: int) -> tuple[float, float, int]:
    """(median, min) wall seconds of `runs` runs of argv, and its exit status."""
    seconds, code = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        code = subprocess.run(argv, capture_output=True, cwd=ROOT).returncode
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), min(seconds), code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--catalog", type=Path)
    args = ap.parse_args()
    pipeline = [sys.executable, str(ROOT / "cli.py")]
    cases = {
        "pipeline --version": pipeline + ["--version"],
        "refused argument (--bakend)": pipeline + ["extract", "title_bpe", "--catalog", "c", "--workdir", "w",
                                                   "--bakend", "zarr"],
        "refused config key (--set)": pipeline + ["train", "--catalog", "c", "--workdir", "w", "--set",
                                                  "pretrain.epohcs=3"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    if args.workdir and args.catalog:
        cases["unchanged pipeline train"] = pipeline + ["train", "--catalog", str(args.catalog), "--workdir",
                                                        str(args.workdir)]
    print(f"{'command':<30} {'median s':>9} {'min s':>7}  exit")
    for name, argv in cases.items():
        runs = 1 if name.startswith("unchanged") and args.runs > 3 else args.runs
        median, best, code = timed(argv, runs)
        print(f"{name:<30} {median:9.3f} {best:7.3f}  {code}", flush=True)


if __name__ == "__main__":
    main()
