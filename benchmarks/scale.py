"""How each stage's time and memory grow with the catalogue: synthetic catalogues of N items, every stage.

    python benchmarks/scale.py --items 10000 30000 100000 [--workdir /tmp/scale] [--config benchmarks/scale.toml]
                               [--plot docs/scaling_curve.png]
    python benchmarks/scale.py --table W/scale.jsonl    # a finished run's lines as a markdown table

For each N: `pipeline data synth` (N items, and N new ones for predict), `models`, `extract` of each modality,
`pretrain` of each (features held in memory, the reader's `auto` mode), `pretrain title_cam` again streaming
from the store (`[train_reader] mode = "stream"`), `sketch all`, `fuse`, `predict` on the N new items. Each
stage is its own process (`cli.py`), so its peak RSS is its own (`os.wait4`'s ru_maxrss); `bytes` is what it
added to its output folder. benchmarks/scale.toml: the tiny models (tiny CamemBERT, lite0 at 32 px, 2 epochs):
the run measures the pipeline's costs, not the models'. Each stage runs with one torch intra-op thread.

Prints one JSON line per size and stage (`items`, `stage`, `seconds`, `cpu_seconds`: user + system time of the
stage's process, less sensitive than wall time to a machine shared with other work, `items_per_s`,
`peak_rss_mb`, `bytes`; pretrain adds `reader_mb`, the features its reader holds, and `epoch_s`; the stream run
adds `memory_epoch_s` and `stream_ratio`; predict adds `items_per_s_first_tenth` and `items_per_s_last_tenth`),
then one per stage (`stage`, `time_exponent`: the least-squares slope of log seconds on log items,
`cpu_time_exponent`: the same of CPU seconds, `memory_ratio`: peak RSS at the largest size over the smallest,
and for pretrain `memory_ratio_outside_reader`: the same less `reader_mb`).
Writes every line to <workdir>/scale.jsonl and, with --plot, time and memory per stage against items, log-log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "benchmarks" / "scale.toml"
MODALITIES = ("title_bpe", "title_cam", "desc_cam", "image")
# One intra-op thread per stage: on a shared machine, idle OpenMP threads spin and bill CPU time that is not
# work, which would blur the growth this measures (decode and writer threads are the stages' own).
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# `pipeline predict` with a progress line after every batch (its rate counts from the loop's start).
PREDICT = ("import sys, cli, pipeline.progress as p; p.LINE_EVERY_S = 0.0; "
           "sys.argv = ['pipeline', *sys.argv[1:]]; cli.main()")


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run_stage(args: list[str], out: Path, python: tuple[str, ...] = ("cli.py",)) -> dict:
    """One stage in its own process: seconds, peak RSS (MB), bytes added under `out`, its stderr lines with the
    time each arrived."""
    before = tree_bytes(out) if out.exists() else 0
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **THREADS}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *python, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = [(time.perf_counter() - t, line.rstrip()) for line in proc.stderr]
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"error: `{' '.join(map(str, args))}` failed:\n" + "\n".join(line for _, line in lines[-20:]))
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "bytes": tree_bytes(out) - before, "lines": lines}


def reader_mb(lines) -> float:
    """The features a pretraining run's readers hold in memory (its "train ...; valid ..." line)."""
    return round(sum(float(mb) for _, line in lines for mb in re.findall(r"([\d.]+) MB, memory mode", line)), 1)


def epoch_seconds(metrics: Path) -> float:
    history = json.loads(metrics.read_text())["history"]
    return round(float(np.mean([h["seconds"] for h in history])), 2)


def tenth_rates(lines, total: int) -> tuple[float, float]:
    """items/s over the first and the last tenth of the predict loop, from its per-batch progress lines
    ("predict: done/total items, rate items/s": done / rate = seconds since the loop started)."""
    points = [(0, 0.0)]
    for _, line in lines:
        m = re.match(r"predict: (\d+)/\d+ items, ([\d.]+) items/s", line)
        if m and float(m.group(2)) > 0:
            points.append((int(m.group(1)), int(m.group(1)) / float(m.group(2))))
    first = next(p for p in points[1:] if p[0] >= total / 10)
    last = [p for p in points if p[0] <= total * 0.9][-1]
    if points[-1][0] < total:
        raise RuntimeError(f"predict's progress lines stop at {points[-1][0]} of {total} items")
    end = points[-1]
    return round(first[0] / first[1], 1), round((end[0] - last[0]) / (end[1] - last[1]), 1)


def one_size(n: int, root: Path, config: Path) -> list[dict]:
    """Every stage on a catalogue of n items (and n new ones for predict): one record per stage."""
    cat, new, w = root / f"cat-{n}", root / f"new-{n}", root / f"w-{n}"
    for old in (cat, new, w, root / f"w-{n}-stream"):  # every stage starts from nothing
        shutil.rmtree(old, ignore_errors=True)
    cfg = ["--config", str(config)]
    stages: list[tuple[str, list[str], Path]] = [
        ("synth", ["data", "synth", cat, "--items", n, "--seed", 0], cat),
        ("models", ["models", "--catalog", cat, "--workdir", w, *cfg], w),
        *((f"extract {m}", ["extract", m, "--catalog", cat, "--workdir", w, *cfg], w) for m in MODALITIES),
        *((f"pretrain {m}", ["pretrain", m, "--workdir", w, *cfg], w) for m in MODALITIES),
        ("sketch", ["sketch", "all", "--workdir", w, *cfg], w),
        ("fuse", ["fuse", "--workdir", w, *cfg], w),
    ]
    records = []
    for stage, args, out in stages:
        r = run_stage(args, out)
        rec = {"items": n, "stage": stage, **stage_figures(n, r)}
        if stage.startswith("pretrain"):
            m = stage.split()[1]
            rec |= {"reader_mb": reader_mb(r["lines"]), "epoch_s": epoch_seconds(w / "models" / m / "metrics.json")}
        records.append(emit(rec))
    records.append(emit(stream_stage(n, w, root, config, records)))
    run_stage(["data", "synth", new, "--items", n, "--seed", 1], new)
    r = run_stage(["predict", "--catalog", new, "--workdir", w, "--out", root / f"predict-{n}.csv", *cfg], root,
                  python=("-c", PREDICT))
    first, last = tenth_rates(r["lines"], n)
    records.append(emit({"items": n, "stage": "predict", **stage_figures(n, r), "items_per_s_first_tenth": first,
                         "items_per_s_last_tenth": last}))
    return records


def stream_stage(n: int, w: Path, root: Path, config: Path, records: list[dict]) -> dict:
    """title_cam pretrained again, streaming its features from the store: epoch time against the memory run's."""
    ws = root / f"w-{n}-stream"
    (ws / "features").mkdir(parents=True, exist_ok=True)
    for name in ("split.parquet", "features/title_cam.zarr", "upstream", "tokenizers"):
        if not (ws / name).is_symlink():
            (ws / name).symlink_to(w / name)
    stream_cfg = ws / "stream.toml"
    stream_cfg.write_text(f'base = "{config}"\n[train_reader]\nmode = "stream"\n')
    r = run_stage(["pretrain", "title_cam", "--workdir", ws, "--config", stream_cfg], ws)
    memory = next(x for x in records if x["stage"] == "pretrain title_cam")
    epoch = epoch_seconds(ws / "models" / "title_cam" / "metrics.json")
    return {"items": n, "stage": "pretrain title_cam (stream)", **stage_figures(n, r),
            "reader_mb": reader_mb(r["lines"]), "epoch_s": epoch, "memory_epoch_s": memory["epoch_s"],
            "stream_ratio": round(epoch / memory["epoch_s"], 2)}


def stage_figures(n: int, r: dict) -> dict:
    return {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "items_per_s": round(n / r["seconds"], 1),
            "peak_rss_mb": r["peak_rss_mb"], "bytes": r["bytes"]}


def emit(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def growth(records: list[dict]) -> list[dict]:
    """Per stage: the log-log slope of seconds on items, and the memory ratio largest / smallest size."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in records):
        rows = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["items"])
        if len(rows) < 2:
            continue
        x = np.log([r["items"] for r in rows])
        slope = lambda key: round(float(np.polyfit(x, np.log([r[key] for r in rows]), 1)[0]), 2)  # noqa: E731
        rec = {"stage": stage, "time_exponent": slope("seconds"), "cpu_time_exponent": slope("cpu_seconds"),
               "memory_ratio": round(rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"], 2)}
        if "reader_mb" in rows[0]:
            outside = [r["peak_rss_mb"] - r["reader_mb"] for r in (rows[0], rows[-1])]
            rec["memory_ratio_outside_reader"] = round(outside[1] / outside[0], 2)
        out.append(rec)
    return out


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=80)
    stages = list(dict.fromkeys(r["stage"] for r in records))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, len(stages)))
    for stage, colour in zip(stages, colours):
        rows = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["items"])
        x = [r["items"] for r in rows]
        axes[0].plot(x, [r["seconds"] for r in rows], "o-", color=colour, label=stage)
        axes[1].plot(x, [r["cpu_seconds"] for r in rows], "o-", color=colour, label=stage)
        axes[2].plot(x, [r["peak_rss_mb"] for r in rows], "o-", color=colour, label=stage)
    for ax, what in zip(axes, ("wall seconds", "CPU seconds (user + system)", "peak RSS (MB)")):
        ax.set(xscale="log", yscale="log", xlabel="items", ylabel=what)
        ax.grid(True, which="both", alpha=0.3)
    lo, hi = min(r["items"] for r in records), max(r["items"] for r in records)
    for ax, key in zip(axes, ("seconds", "cpu_seconds")):
        ref = min(r[key] for r in records if r["items"] == lo)
        ax.plot([lo, hi], [ref, ref * hi / lo], "k--", lw=0.8, label="slope 1")
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("benchmarks/scale.py: each stage's time and peak memory against catalogue size (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path)


def table(records: list[dict]) -> str:
    """The records as markdown: per stage, CPU seconds and peak RSS at each size, then the growth figures."""
    sizes = sorted({r["items"] for r in records if "items" in r})
    growth_of = {r["stage"]: r for r in records if "items" not in r}
    head = ["stage", *(f"CPU s at {n:,}" for n in sizes), *(f"peak MB at {n:,}" for n in sizes),
            "time exp. (wall)", "time exp. (CPU)", "memory ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, g in growth_of.items():
        rows = {r["items"]: r for r in records if r.get("stage") == stage and "items" in r}
        cells = [stage, *(f"{rows[n]['cpu_seconds']:.1f}" if n in rows else "" for n in sizes),
                 *(f"{rows[n]['peak_rss_mb']:.0f}" if n in rows else "" for n in sizes),
                 f"{g['time_exponent']:.2f}", f"{g['cpu_time_exponent']:.2f}",
                 f"{g['memory_ratio']:.2f}" + (f" ({g['memory_ratio_outside_reader']:.2f} outside the reader)"
                                               if "memory_ratio_outside_reader" in g else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, nargs="+", default=[10000, 30000, 100000])
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "scale")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--plot", type=Path, default=None, help="a PNG of time and memory per stage against items")
    ap.add_argument("--table", type=Path, default=None, help="print a scale.jsonl as a markdown table, run nothing")
    a = ap.parse_args()
    if a.table:
        print(table([json.loads(line) for line in a.table.read_text().splitlines()]))
        return
    a.workdir.mkdir(parents=True, exist_ok=True)
    records = []
    for n in sorted(a.items):
        records += one_size(n, a.workdir.resolve(), a.config.resolve())
    records += [emit(g) for g in growth(records)]
    with (a.workdir / "scale.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if a.plot:
        plot([r for r in records if "items" in r], a.plot)


if __name__ == "__main__":
    main()
