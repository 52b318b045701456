"""configs/rakuten-real-tuned.toml's choices, made without the validation split: networks and fusions on a
held-out part of the train items.

    python benchmarks/rakuten_real_sweep.py [--workdir work/rakuten-real] [--jobs 2] [--seeds 0]
                                            [--only NAME ...] [--fusions-only]

Needs the work directory of `python benchmarks/rakuten_real.py` (its split, tokenizers, upstream models,
title_bpe and image stores) and its `tuned-s0/` (the title_cam and desc_cam stores of e5's layer 11, which
`rakuten_real.py --systems tuned` extracts).

1. Inner split: the *train* items of W/split.parquet, a fifth of each class held out (title_bpe_sweep.py's
   `inner_split`, seed 0). The validation items take no part.
2. Every network of ``CANDIDATES`` trains on the inner train part, its best epoch chosen on the inner held-out
   part, and sketches the inner split (W/sweep/<name>-s<seed>/).
3. Every fusion of ``FUSIONS`` (a network per modality, and [fusion] overrides) fuses those sketches as
   Figure 2, scored on the inner held-out part.

The base of every run is ``BASE``: configs/rakuten-real.toml with e5's layer 11 stored. Runs go ``--jobs`` at
a time, one torch thread each, each in a process of its own. Writes W/sweep/networks.jsonl and fusions.jsonl and prints both tables.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor, as_completed
import json
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from title_bpe_sweep import inner_split  # noqa: E402

BASE = ROOT / "configs" / "rakuten-real.toml"
BASE_OVER = {"text_model": {"layers": 11}}
PAPER = {"depth": 16, "width": 128}  # the paper's EMDE size (configs/default.toml)
TUNED = {"tune_layers": 1}
# name -> (modality, overrides of [pretrain.<modality>]); the text stores are e5's layer 11. title_bpe and image
# keep configs/rakuten-real.toml's networks: title_bpe_sweep.py tried 16 x 128 and others for title_bpe (none
# better beyond the seed spread), and the image modality sees a photo for 11% of the items.
CANDIDATES = {
    "title_cam tuned": ("title_cam", TUNED),
    "title_cam tuned 16x128": ("title_cam", TUNED | PAPER),
    "desc_cam frozen": ("desc_cam", {}),
    "desc_cam tuned": ("desc_cam", TUNED),
    "title_bpe": ("title_bpe", {}),
    "image": ("image", {}),
    "desc_cam tuned 16x128": ("desc_cam", TUNED | PAPER),
}
SMALL = {"title_cam": "title_cam tuned", "desc_cam": "desc_cam tuned", "title_bpe": "title_bpe", "image": "image"}
# name -> (network per modality, overrides of [fusion]); "best" takes each modality's best inner network.
FUSIONS = {
    "32x16": (SMALL, {}),
    "32x16, desc frozen": (SMALL | {"desc_cam": "desc_cam frozen"}, {}),
    "title 16x128": (SMALL | {"title_cam": "title_cam tuned 16x128"}, {}),
    "text 16x128": (SMALL | {"title_cam": "title_cam tuned 16x128", "desc_cam": "desc_cam tuned 16x128"}, {}),
    "best": ("best", {}),
    "best, fusion batch 64": ("best", {"batch_size": 64}),
    "best, fusion lr 3e-3": ("best", {"lr": 3e-3}),
}
STORES = {"title_cam": "tuned-s0", "desc_cam": "tuned-s0", "title_bpe": ".", "image": "."}


def link(run_dir: Path, links: dict[str, Path]) -> Path:
    for name, target in links.items():
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_symlink():
            path.symlink_to(target.resolve())
    return run_dir


def common_links(w: Path, inner_file: Path) -> dict[str, Path]:
    return {"split.parquet": inner_file, "tokenizers": w / "tokenizers", "upstream": w / "upstream",
            **{f"features/{m}.zarr": w / d / "features" / f"{m}.zarr" for m, d in STORES.items()}}


def config(seed: int, over: dict):
    from pipeline.config import load_config, merge

    return load_config(BASE, merge(BASE_OVER, {"seed": seed, **over}))


def network(name: str, seed: int, w: Path, inner_file: Path) -> dict:
    """One candidate network trained on the inner split, then its sketches of the inner split."""
    import torch

    from pipeline.pretrain import pretrain
    from pipeline.sketch import sketch

    torch.set_num_threads(1)
    modality, over = CANDIDATES[name]
    run_dir = link(w / "sweep" / f"{name.replace(' ', '_')}-s{seed}", common_links(w, inner_file))
    cfg = config(seed, {"pretrain": {modality: over}})
    t = time.perf_counter()
    quiet = lambda *_a, **_k: None  # noqa: E731
    m = pretrain(modality, run_dir, cfg, progress=False, log=quiet)
    sketch(modality, run_dir, cfg, progress=False, log=quiet)
    return {"name": name, "modality": modality, "seed": seed, "macro_f1": round(100 * m["macro_f1"], 2),
            "best_epoch": m["best_epoch"], "seconds": round(time.perf_counter() - t, 1), "overrides": over}


def fusion(name: str, nets: dict[str, str], over: dict, seed: int, w: Path, inner_file: Path) -> dict:
    """Figure 2 over the sketches of the networks `nets` (modality -> candidate), scored on the inner split."""
    from pipeline.fuse import fuse

    runs = {m: w / "sweep" / f"{n.replace(' ', '_')}-s{seed}" for m, n in nets.items()}
    links = common_links(w, inner_file) | {f"models/{m}": r / "models" / m for m, r in runs.items()} \
        | {f"sketches/{m}.zarr": r / "sketches" / f"{m}.zarr" for m, r in runs.items()}
    run_dir = link(w / "sweep" / f"fusion-{name.replace(' ', '_').replace(',', '')}-s{seed}", links)
    t = time.perf_counter()
    m = fuse(run_dir, config(seed, {"fusion": over}), progress=False, log=lambda *_a, **_k: None)
    return {"name": name, "seed": seed, "macro_f1": round(100 * m["macro_f1"], 2), "networks": nets,
            "overrides": over, "seconds": round(time.perf_counter() - t, 1)}


def run_all(jobs: list, n_jobs: int, out: Path) -> list[dict]:
    """Each job in a process of its own (a process that ran a stage keeps the memory it freed: the extraction
    driver's `keep_freed_memory`), `n_jobs` at a time; the results as they come, appended to `out`."""
    results = []
    with out.open("a") as f, ProcessPoolExecutor(n_jobs, max_tasks_per_child=1) as pool:
        for done in as_completed([pool.submit(fn, *a, **kw) for fn, a, kw in jobs]):
            r = done.result()
            results.append(r)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(f"  {r['name']} seed {r['seed']}: {r['macro_f1']:.2f} ({r['seconds']} s)", flush=True)
    return results


def best_networks(results: list[dict]) -> dict[str, str]:
    """Each modality's candidate with the best mean inner macro-F1 over the seeds."""
    means: dict[str, list[float]] = {}
    for r in results:
        means.setdefault(r["name"], []).append(r["macro_f1"])
    best: dict[str, tuple[float, str]] = {}
    for name, values in means.items():
        m = CANDIDATES[name][0]
        best[m] = max(best.get(m, (-1.0, "")), (sum(values) / len(values), name))
    return {m: best[m][1] for m in SMALL}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "work" / "rakuten-real")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="*", help="candidate networks (default: all)")
    ap.add_argument("--fusions-only", action="store_true", help="fuse the networks already trained")
    a = ap.parse_args()
    w = a.workdir
    if not (w / "tuned-s0" / "features" / "desc_cam.zarr").exists():
        sys.exit(f"no layer-11 text stores in {w / 'tuned-s0'}: run `python benchmarks/rakuten_real.py "
                 "--systems tuned` first")
    (w / "sweep").mkdir(parents=True, exist_ok=True)
    inner_file = w / "sweep" / "inner_split.parquet"
    inner = inner_split(pl.read_parquet(w / "split.parquet"))
    inner.write_parquet(inner_file)
    print(f"inner split of the train items: {dict(inner.group_by('split').len().iter_rows())}", flush=True)
    names = [n for n in CANDIDATES if not a.only or n in a.only]
    if not a.fusions_only:
        run_all([(network, (n, s, w, inner_file), {}) for n in names for s in a.seeds], a.jobs,
                w / "sweep" / "networks.jsonl")
    done = [json.loads(line) for line in (w / "sweep" / "networks.jsonl").read_text().splitlines()]
    trained = {(r["name"], r["seed"]) for r in done}
    best = best_networks([r for r in done if r["seed"] in a.seeds])
    print(f"best network per modality (inner held-out part): {best}", flush=True)
    jobs = []
    for name, (nets, over) in FUSIONS.items():
        nets = best if nets == "best" else nets
        for s in a.seeds:
            if all((n, s) in trained for n in nets.values()):
                jobs.append((fusion, (name, nets, over, s, w, inner_file), {}))
    run_all(jobs, a.jobs, w / "sweep" / "fusions.jsonl")


if __name__ == "__main__":
    main()
