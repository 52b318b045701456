"""Stage 4, fuse (paper 3.5, Figure 2): linear heads over the input sketches, trained jointly, logits summed.

"We feed these sketches to separate linear layers, which are trained jointly. Obtained per-class
logits for each modality are summed and argmax operation on the vector of length 27 defines the
final prediction." Which sketches each head reads is configuration (`[fusion] heads`); heads that
share a name share one set of weights, which is how the paper counts the CamemBERT title head
twice. Adam 1e-3 with decay 0.9 per epoch (Table 1); the best epoch by validation macro-F1 is kept.

Writes W/fusion/ (or `[fusion] output`): model.pt, metrics.json, predictions.csv (the challenge's
submission format, one row per test item), valid_predictions.csv, confusion_worst.png (Table 4)
and per_class_f1.png.

Under torchrun (WORLD_SIZE > 1) the heads train with DistributedDataParallel (gloo, on the CPU): each
rank reads the sketches of its share of the split only (every WORLD_SIZE-th row of each part), the
validation and test predictions of every rank are gathered before the metrics, and rank 0 alone writes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.catalog import SPLIT_FILE, class_codes, write_submission
from pipeline.config import section
from pipeline.distributed import Dist
from pipeline.errors import PipelineError
from pipeline.extract.title_bpe import sha256_file
from pipeline.metrics import PAPER_TABLE3, class_weights, classification_metrics, save_pictures
from pipeline.pretrain import model_dir
from pipeline.sketch import sketch_store_path
from pipeline.workdir import MODALITIES
from stores import FeatureStore


class FusionHeads(nn.Module):
    """Linear heads over (concatenated) sketches; the fused logits are their sum (Figure 2).

    heads: [{"name": str, "inputs": [modality, ...]}, ...]; a name used twice is one nn.Linear.
    """

    def __init__(self, heads: list[dict], dims: dict[str, int], num_classes: int):
        super().__init__()
        self.heads = [(h["name"], list(h["inputs"])) for h in heads]
        self.linears = nn.ModuleDict()
        for name, inputs in self.heads:
            in_dim = sum(dims[m] for m in inputs)
            if name in self.linears:
                if self.linears[name].in_features != in_dim:
                    raise PipelineError(f"[fusion] heads: two heads named '{name}' read sketches of different sizes")
                continue
            self.linears[name] = nn.Linear(in_dim, num_classes)

    def head_logits(self, sketches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One (B, num_classes) logit tensor per head, in config order."""
        return [self.linears[name](torch.cat([sketches[m] for m in inputs], dim=-1)) for name, inputs in self.heads]

    def forward(self, sketches: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self.head_logits(sketches)).sum(0)  # (B, num_classes)


def _load_sketches(workdir: Path, cfg: dict, modalities: list[str], ids: np.ndarray) -> tuple[dict, dict]:
    """The sketch of each modality of the items `ids`, refusing stores older than the modality's checkpoint."""
    sketches, checkpoints = {}, {}
    for m in modalities:
        path = sketch_store_path(workdir, cfg, m)
        checkpoint = model_dir(workdir, m) / "model.pt"
        if not FeatureStore.exists(path) or not checkpoint.exists():
            raise PipelineError(f"{path} not found: run `pipeline pretrain {m} --workdir {workdir}` and "
                                f"`pipeline sketch {m} --workdir {workdir}` first")
        with FeatureStore(path) as store:
            sha = sha256_file(checkpoint)
            if store.provenance["producer"]["checkpoint_sha256"] != sha:
                raise PipelineError(f"{path} was sketched by an older checkpoint than {checkpoint}: "
                                    f"run `pipeline sketch {m} --workdir {workdir}` again")
            have = store.contains(ids)
            if not have.all():
                raise PipelineError(f"{path}: {int((~have).sum())} item(s) of the split have no sketch "
                                    f"(e.g. {ids[~have][:3].tolist()}): run `pipeline sketch {m} --workdir {workdir}`")
            sketches[m] = torch.from_numpy(store.read("sketch", ids))
            checkpoints[m] = sha
    return sketches, checkpoints


def _predict(model: FusionHeads, sketches: dict, rows: np.ndarray, batch: int = 4096) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return np.concatenate([model({m: s[rows[i : i + batch]] for m, s in sketches.items()}).argmax(-1).numpy()
                               for i in range(0, len(rows), batch)]) if len(rows) else np.zeros(0, np.int64)


def _shares(parts: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's split rows of each part: every `world`-th row from `rank` on.

    The train rows are first repeated cyclically up to a multiple of `world` (as torch's DistributedSampler
    pads), so every rank has as many rows, makes as many steps per epoch, and DDP never waits on a missing
    batch. Valid and test rows are not padded: their predictions are gathered back in order (`_gathered`).
    """
    train = parts["train"]
    train = np.resize(train, -(-len(train) // world) * world)  # (ceil(n / world) * world,)
    return {"train": train[rank::world], "valid": parts["valid"][rank::world], "test": parts["test"][rank::world]}


def _gathered(ctx: Dist, mine: np.ndarray) -> np.ndarray:
    """Every rank's predictions of its rows `part[rank::world]`, put back in the part's order."""
    shares = ctx.gather(mine)
    out = np.empty(sum(len(p) for p in shares), np.int64)
    for rank, p in enumerate(shares):
        out[rank :: len(shares)] = p
    return out


def fuse(workdir: str | Path, cfg: dict, *, progress: bool = True, log=print) -> dict:
    """`pipeline fuse`: train the fusion heads over the sketch stores; metrics, pictures, predictions."""
    started = time.perf_counter()
    workdir = Path(workdir)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    opts = section(cfg, "fusion")
    out = workdir / opts["output"]
    if not (workdir / SPLIT_FILE).exists():
        raise PipelineError(f"{workdir / SPLIT_FILE} not found: run the extract, pretrain and sketch stages first")
    split = pl.read_parquet(workdir / SPLIT_FILE)
    codes = class_codes(split)
    modalities = sorted({m for h in opts["heads"] for m in h["inputs"]}, key=MODALITIES.index)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise PipelineError(f"{cfg.get('config_path')}: [fusion] heads name unknown modalities {unknown}")
    ids = split["item_id"].to_numpy()
    parts = {name: np.flatnonzero(split["split"].to_numpy() == name) for name in ("train", "valid", "test")}
    shares = _shares(parts, rank, world)
    mine = np.unique(np.concatenate(list(shares.values())))  # split rows whose sketches this rank reads
    sketches, checkpoints = _load_sketches(workdir, cfg, modalities, ids[mine])
    fingerprint = json.dumps({"fusion": opts, "checkpoints": checkpoints, "seed": cfg.get("seed", 0),
                              "items": len(ids)}, sort_keys=True)
    metrics_path = out / "metrics.json"
    if metrics_path.exists() and json.loads(metrics_path.read_text()).get("fingerprint") == fingerprint:
        if rank == 0:
            log(f"fuse: nothing to do, {out} is up to date (same sketches and config)")
        return json.loads(metrics_path.read_text())

    label_index = {c: i for i, c in enumerate(codes)}
    labels = np.array([label_index.get(c, -1) if c is not None else -1 for c in split["label"].to_list()])
    local = {name: np.searchsorted(mine, rows) for name, rows in shares.items()}  # rows of `sketches`
    ctx = Dist("cpu")  # a few linear layers: the CPU, gloo
    try:
        return _train(workdir, cfg, opts, ctx, sketches, checkpoints, codes, ids, labels, parts, local, mine,
                      fingerprint, started, log if ctx.main else (lambda *_a, **_k: None))
    finally:
        ctx.close()


def _train(workdir, cfg, opts, ctx, sketches, checkpoints, codes, ids, labels, parts, local, mine, fingerprint,
           started, say) -> dict:
    """Train the heads on this rank's share (DDP under torchrun), score the gathered predictions, write."""
    out = workdir / opts["output"]
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)  # the same initial heads on every rank
    rng = np.random.default_rng(seed if ctx.world == 1 else [seed, ctx.rank])  # one process: its usual stream
    model = FusionHeads(opts["heads"], {m: s.shape[1] for m, s in sketches.items()}, len(codes))
    net = DDP(model) if ctx.active else model
    optimizer = torch.optim.Adam(model.parameters(), lr=float(opts["lr"]))
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(opts["decay"]))
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels[parts["train"]], len(codes), opts["loss"]))
    y = torch.from_numpy(labels[mine])  # (rows of `sketches`,)
    valid_labels = labels[parts["valid"]]
    if ctx.active:
        say(f"fuse: {ctx.world} processes (DistributedDataParallel, gloo), {len(local['train'])} of "
            f"{len(parts['train'])} train items per rank")
    best = {"macro_f1": -1.0}
    for epoch in range(1, int(opts["epochs"]) + 1):
        model.train()
        order = rng.permutation(local["train"])
        total = 0.0
        for i in range(0, len(order), int(opts["batch_size"])):
            rows = order[i : i + int(opts["batch_size"])]
            loss = loss_fn(net({m: s[rows] for m, s in sketches.items()}), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        schedule.step()
        total, seen = ctx.all_sum([total, len(order)])
        valid_pred = _gathered(ctx, _predict(model, sketches, local["valid"]))  # (len(parts["valid"]),)
        scores = classification_metrics(valid_labels, valid_pred, codes)
        say(f"fuse epoch {epoch}: loss {total / max(seen, 1):.4f}, valid macro-F1 {scores['macro_f1']:.4f}")
        if scores["macro_f1"] > best["macro_f1"]:
            best = scores | {"best_epoch": epoch}
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            best_valid = valid_pred
    model.load_state_dict(best_state)
    test_pred = _gathered(ctx, _predict(model, sketches, local["test"]))  # (len(parts["test"]),)
    support = np.bincount(valid_labels, minlength=len(codes))
    metrics = best | {"epochs": int(opts["epochs"]), "seconds": round(time.perf_counter() - started, 2),
                      "heads": opts["heads"], "valid_items": len(parts["valid"]), "test_items": len(parts["test"]),
                      "valid_support": {str(c): int(n) for c, n in zip(codes, support) if n},
                      "world_size": ctx.world, "fingerprint": fingerprint}
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        code_of = np.array(codes)
        write_submission(out / "predictions.csv", ids[parts["test"]], code_of[test_pred])
        pl.DataFrame({"item_id": ids[parts["valid"]], "label": code_of[valid_labels],
                      "predicted": code_of[best_valid]}).write_csv(out / "valid_predictions.csv")
        save_pictures(out, valid_labels, best_valid, codes, best, int(opts["worst_classes"]))
        torch.save({"state_dict": model.state_dict(), "heads": opts["heads"], "codes": codes,
                    "dims": {m: s.shape[1] for m, s in sketches.items()}, "checkpoints": checkpoints},
                   out / "model.pt")
        metrics_path = out / "metrics.json"
        metrics_path.write_text(json.dumps(metrics, indent=1))  # last: its fingerprint marks the stage done
        say(summary_table(workdir, metrics))
    ctx.barrier()  # every rank returns once the outputs are written
    return metrics


def summary_table(workdir: Path, fused: dict) -> str:
    """Table 3 of the paper beside this run: validation macro-F1 of every modality and of the fusion."""
    rows = [("modality", "this run", "paper (Table 3)")]
    for m in MODALITIES:
        path = model_dir(workdir, m) / "metrics.json"
        if path.exists():
            rows.append((m, f"{100 * json.loads(path.read_text())['macro_f1']:.2f}", f"{100 * PAPER_TABLE3[m]:.2f}"))
    rows.append(("fused", f"{100 * fused['macro_f1']:.2f}", f"{100 * PAPER_TABLE3['fusion']:.2f}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "validation macro-F1 (%)\n" + "\n".join(lines)
