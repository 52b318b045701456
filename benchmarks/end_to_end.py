"""A synthetic catalogue of N items through every stage with the paper-size models, random weights.

    python benchmarks/end_to_end.py --items N [--epochs E] [--workdir W]

The paper's setup (configs/default.toml: 16 x 128 EMDE, 256-channel CNNs, Table 1's rates) with a
CamemBERT-base-shaped text model (12 layers x 768, random weights, a tokenizer trained on the catalogue)
and efficientnet_b2 at 260 px (random weights): what a run on real models costs, without them. Prints each
stage's seconds and items/s, then one JSON line. `--epochs` caps every training run (the paper trains 10-30).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.extract import extract  # noqa: E402
from pipeline.fuse import fuse  # noqa: E402
from pipeline.pretrain import pretrain  # noqa: E402
from pipeline.sketch import sketch  # noqa: E402
from pipeline.synth import synthesize  # noqa: E402

CAMEMBERT_BASE = {"vocab_size": 8000, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                  "intermediate_size": 3072}


def paper_config(epochs: int, items: int):
    over = {"text_model": {"path": "tiny", "tiny": CAMEMBERT_BASE},
            "image": {"model": "efficientnet_b2", "weights": "random"},
            "split": {"reference_train_items": max(items, 4000 * 5)},  # a fifth held out, as the demo does
            "pretrain": {m: {"epochs": epochs} for m in ("title_cam", "desc_cam", "title_bpe", "image")},
            "fusion": {"epochs": epochs}}
    return load_config(None, over)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = ap.parse_args()
    cfg = paper_config(args.epochs, args.items)
    with tempfile.TemporaryDirectory() as tmp:
        w = args.workdir or Path(tmp) / "w"
        catalog = w.parent / f"{w.name}-catalog"
        synthesize(catalog, items=args.items, seed=0)
        seconds: dict[str, float] = {}

        def timed(name: str, fn, *a) -> None:
            t = time.perf_counter()
            fn(*a, progress=False, log=lambda *_a, **_k: None)
            seconds[name] = time.perf_counter() - t
            print(f"{name}: {seconds[name]:.1f} s, {args.items / seconds[name]:.1f} items/s", flush=True)

        for m in cfg.modality_names:
            timed(f"extract {m}", extract, m, catalog, w, cfg)
        for m in cfg.modality_names:
            timed(f"pretrain {m}", pretrain, m, w, cfg)
        timed("sketch", sketch, "all", w, cfg)
        timed("fuse", fuse, w, cfg)
    total = sum(seconds.values())
    print(json.dumps({"items": args.items, "epochs": args.epochs, "total_s": round(total, 1),
                      "stages_s": {k: round(v, 1) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
