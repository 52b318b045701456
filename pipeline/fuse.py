"""Stage 4, fuse (paper 3.5, Figure 2): linear heads over the input sketches, trained jointly, logits summed.

The heads are `[fusion] heads` (pipeline.heads); Adam 1e-3 with decay 0.9 per epoch (Table 1); the
best epoch by validation macro-F1 is kept. With `[fusion] method = "average"` nothing is trained: each
head is its modality's pretrained head (from the modality's checkpoint) and the prediction is the mean
of their class probabilities (the late fusion paper 3.5 compares with); the outputs are the same.
Writes W/fusion/ (or `[fusion] output`): model.pt, metrics.json, predictions.csv (the challenge's
submission format, one row per test item), predictions.parquet (item id, code, probability of every
class), valid_predictions.csv, confusion_worst.png (Table 4), per_class_f1.png and stamp.json. The
directory is built beside the old one and swapped in when complete; one fuse per output at a time.

Under torchrun (WORLD_SIZE > 1) the heads train with DistributedDataParallel (gloo, on the CPU): each
rank reads the sketches of its share of the split only (every WORLD_SIZE-th row of each part), the
validation and test predictions of every rank are gathered before the metrics, and rank 0 alone writes.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import checkpoint, modalities, workdir as wd
from pipeline.catalog import class_codes, probabilities_table, read_split, write_submission
from pipeline.config import Config
from pipeline.distributed import Dist, torchrun
from pipeline.errors import PipelineError
from pipeline.heads import FusionHeads
from pipeline.metrics import PAPER_TABLE2, PAPER_TABLE3, class_weights, classification_metrics, save_pictures
from pipeline.provenance import (Stamp, digest, output_lock, partial_dir, read_json, recover, sha256_file, swap_in,
                                 write_json, write_parquet)
from stores import FeatureStore

PARTS = ("train", "valid", "test")


@dataclass
class FuseJob:
    """What a fusion run is computed from, resolved before anything is written."""

    cfg: Config
    workdir: Path
    out: Path
    ids: np.ndarray  # (items of the split,) in split order
    labels: np.ndarray  # class index per item, -1 for test items
    parts: dict[str, np.ndarray]  # part -> positions in `ids`
    codes: list[int]
    modalities: list[str]
    checkpoints: dict[str, str]  # modality -> sha256 of its model.pt
    stamp: Stamp


def prepare(workdir: Path, cfg: Config) -> FuseJob:
    split = read_split(workdir)
    codes = class_codes(split)
    heads = [h.model_dump() for h in cfg.fusion.heads]
    used = {m for h in heads for m in h["inputs"]}
    names = [m for m in modalities.names() if m in used]
    checkpoints = {}
    for m in names:
        path = wd.model_dir(workdir, m) / checkpoint.MODEL_FILE
        if not path.is_file():
            raise PipelineError(f"{path} not found: run `{wd.command(cfg, workdir, f'pretrain {m}')}` and "
                                f"`{wd.command(cfg, workdir, f'sketch {m}')}` first")
        checkpoints[m] = sha256_file(path)
    index = {c: i for i, c in enumerate(codes)}
    labels = np.array([index.get(c, -1) if c is not None else -1 for c in split["label"].to_list()], np.int64)
    kind = split["split"].to_numpy()
    parts = {p: np.flatnonzero(kind == p) for p in PARTS}
    ids = split["item_id"].to_numpy()
    stamp = Stamp("fuse", {"fusion": cfg.fusion.model_dump(), "checkpoints": checkpoints, "seed": cfg.seed,
                           "items": digest([ids.tolist(), labels.tolist(), kind.tolist()])})
    return FuseJob(cfg, workdir, wd.fusion_dir(workdir, cfg), ids, labels, parts, codes, names, checkpoints, stamp)


def _load_sketches(job: FuseJob, ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The sketch of each modality of the items `ids`, refusing stores older than the modality's checkpoint."""
    out = {}
    for m in job.modalities:
        path = wd.sketch_store_path(job.workdir, job.cfg, m)
        again = f"run `{wd.command(job.cfg, job.workdir, f'sketch {m}')}`"
        if not FeatureStore.exists(path):
            raise PipelineError(f"{path} not found: {again} first")
        with FeatureStore(path) as store:
            if store.provenance["producer"].get("checkpoint_sha256") != job.checkpoints[m]:
                raise PipelineError(f"{path} was sketched by another checkpoint than "
                                    f"{wd.model_dir(job.workdir, m) / checkpoint.MODEL_FILE}: {again} again")
            have = store.contains(ids)
            if not have.all():
                raise PipelineError(f"{path}: {int((~have).sum())} item(s) of the split have no sketch "
                                    f"(e.g. {ids[~have][:3].tolist()}): {again}")
            out[m] = torch.from_numpy(store.read("sketch", ids))
    return out


def _shares(parts: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's split rows of each part: every `world`-th row from `rank` on.

    The train rows are first repeated cyclically up to a multiple of `world` (as torch's DistributedSampler
    pads), so every rank has as many rows, makes as many steps per epoch, and DDP never waits on a missing
    batch. Valid and test rows are not padded: their predictions are gathered back in order (`_gathered`).
    """
    train = np.resize(parts["train"], -(-len(parts["train"]) // world) * world)  # (ceil(n / world) * world,)
    return {"train": train[rank::world], "valid": parts["valid"][rank::world], "test": parts["test"][rank::world]}


def _gathered(ctx: Dist, mine: np.ndarray) -> np.ndarray:
    """Every rank's rows of `part[rank::world]` (predictions, logits), put back in the part's order."""
    shares = ctx.gather(mine)
    out = np.empty((sum(len(p) for p in shares),) + mine.shape[1:], mine.dtype)
    for rank, p in enumerate(shares):
        out[rank :: len(shares)] = p
    return out


def _logits(model: FusionHeads, sketches: dict, rows: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Fused logits (len(rows), classes) float32 of rows `rows` of `sketches`."""
    model.eval()
    with torch.inference_mode():
        parts = [model({m: s[rows[i : i + batch]] for m, s in sketches.items()}).numpy()
                 for i in range(0, len(rows), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, model.num_classes), np.float32)


def fuse(workdir: str | Path, cfg: Config, *, progress: bool = True, log=print) -> dict:
    """`pipeline fuse`: train the fusion heads over the sketch stores; metrics, pictures, predictions."""
    workdir = Path(workdir)
    job = prepare(workdir, cfg)
    main = torchrun().main
    if main:
        recover(job.out)
    if job.stamp.matches(job.out):
        if main:
            log(f"fuse: nothing to do, {job.out} is up to date (same sketches and config)")
        return read_json(job.out / "metrics.json", "metrics file")
    wd.remember(workdir, cfg)
    with output_lock(job.out) if main else nullcontext(), wd.repair_hint(cfg, workdir):
        ctx = Dist("cpu")  # a few linear layers: the CPU, gloo
        try:
            return _run(job, ctx, time.perf_counter(), log if ctx.main else (lambda *_a, **_k: None))
        finally:
            ctx.close()


def _run(job: FuseJob, ctx: Dist, started: float, say) -> dict:
    shares = _shares(job.parts, ctx.rank, ctx.world)
    mine = np.unique(np.concatenate(list(shares.values())))  # split rows whose sketches this rank reads
    sketches = _load_sketches(job, job.ids[mine])
    local = {name: np.searchsorted(mine, rows) for name, rows in shares.items()}  # rows of `sketches`
    joint = job.cfg.fusion.method == "joint"
    if joint:
        model, best = _train(job, ctx, sketches, job.labels[mine], local, say)
    else:
        model, best = _pretrained_heads(job, ctx, sketches, local, say)
    model.load_state_dict(best["state"])
    test_logits = _gathered(ctx, _logits(model, sketches, local["test"]))  # (len(parts["test"]), classes)
    metrics = {k: v for k, v in best.items() if k not in ("state", "valid_pred")}
    support = np.bincount(job.labels[job.parts["valid"]], minlength=len(job.codes))
    metrics |= {"method": job.cfg.fusion.method, "epochs": job.cfg.fusion.epochs if joint else 0,
                "seconds": round(time.perf_counter() - started, 2),
                "heads": [h.model_dump() for h in job.cfg.fusion.heads], "valid_items": len(job.parts["valid"]),
                "test_items": len(job.parts["test"]), "world_size": ctx.world, "fingerprint": job.stamp.digest,
                "valid_support": {str(c): int(n) for c, n in zip(job.codes, support) if n}}
    if ctx.main:
        dims = {m: s.shape[1] for m, s in sketches.items()}
        _write(job, model, dims, best["valid_pred"], test_logits, metrics)
        say(summary_table(job.workdir, metrics, job.cfg.fusion.output))
        say(f"fuse: valid macro-F1 {metrics['macro_f1']:.4f} (best epoch {metrics['best_epoch']}) -> {job.out}")
    ctx.barrier()  # every rank returns once the outputs are written
    return metrics


def _train(job: FuseJob, ctx: Dist, sketches: dict, y_rows: np.ndarray, local: dict, say) -> tuple[FusionHeads, dict]:
    """Train the heads on this rank's share (DDP under torchrun); the best epoch by gathered validation macro-F1."""
    opts, seed = job.cfg.fusion, job.cfg.seed
    torch.manual_seed(seed)  # the same initial heads on every rank
    rng = np.random.default_rng(seed if ctx.world == 1 else [seed, ctx.rank])  # one process: its usual stream
    model = FusionHeads([h.model_dump() for h in opts.heads], {m: s.shape[1] for m, s in sketches.items()},
                        len(job.codes))
    net = DDP(model) if ctx.active else model
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=opts.decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(job.labels[job.parts["train"]], len(job.codes), opts.loss))
    y = torch.from_numpy(y_rows)  # (rows of `sketches`,)
    valid_labels = job.labels[job.parts["valid"]]
    if ctx.active:
        say(f"fuse: {ctx.world} processes (DistributedDataParallel, gloo), {len(local['train'])} of "
            f"{len(job.parts['train'])} train items per rank")
    best = {"macro_f1": -1.0}
    for epoch in range(1, opts.epochs + 1):
        model.train()
        order = rng.permutation(local["train"])
        total = 0.0
        for i in range(0, len(order), opts.batch_size):
            rows = order[i : i + opts.batch_size]
            loss = loss_fn(net({m: s[rows] for m, s in sketches.items()}), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        schedule.step()
        total, seen = ctx.all_sum([total, len(order)])
        valid_pred = _gathered(ctx, _logits(model, sketches, local["valid"]).argmax(-1))  # (len(parts["valid"]),)
        scores = classification_metrics(valid_labels, valid_pred, job.codes)
        say(f"fuse epoch {epoch}: loss {total / max(seen, 1):.4f}, valid macro-F1 {scores['macro_f1']:.4f}")
        if scores["macro_f1"] > best["macro_f1"]:
            best = scores | {"best_epoch": epoch, "valid_pred": valid_pred,
                             "state": {k: v.clone() for k, v in model.state_dict().items()}}
    return model, best


def _pretrained_heads(job: FuseJob, ctx: Dist, sketches: dict, local: dict, say) -> tuple[FusionHeads, dict]:
    """`method = "average"`: each head is its modality's pretrained head (no training), scored on validation."""
    model = FusionHeads([h.model_dump() for h in job.cfg.fusion.heads], {m: s.shape[1] for m, s in sketches.items()},
                        len(job.codes), "average")
    for name, (modality,) in model.heads:
        path = wd.model_dir(job.workdir, modality) / checkpoint.MODEL_FILE
        ckpt = checkpoint.load(path)
        if [int(c) for c in ckpt["class_codes"]] != list(job.codes):
            raise PipelineError(f"{path} was trained on other classes than the split's: run "
                                f"`{wd.command(job.cfg, job.workdir, f'pretrain {modality}')}` again")
        model.linears[name].load_state_dict({"weight": ckpt["state_dict"]["head.weight"],
                                             "bias": ckpt["state_dict"]["head.bias"]})
    valid_pred = _gathered(ctx, _logits(model, sketches, local["valid"]).argmax(-1))  # (len(parts["valid"]),)
    scores = classification_metrics(job.labels[job.parts["valid"]], valid_pred, job.codes)
    say(f"fuse: the mean of {len(model.heads)} pretrained heads' probabilities, valid macro-F1 {scores['macro_f1']:.4f}")
    return model, scores | {"best_epoch": 0, "valid_pred": valid_pred, "state": model.state_dict()}


def _write(job: FuseJob, model: FusionHeads, dims: dict, valid_pred: np.ndarray, test_logits: np.ndarray,
           metrics: dict) -> None:
    """Every output into the partial directory, then the directory swapped in (stamp last)."""
    out = partial_dir(job.out)
    out.mkdir(parents=True, exist_ok=True)
    code_of = np.array(job.codes)
    test_ids = job.ids[job.parts["test"]]
    write_submission(out / "predictions.csv", test_ids, code_of[test_logits.argmax(-1)])
    test_probs = torch.softmax(torch.from_numpy(test_logits), dim=-1).numpy()  # (test items, classes)
    write_parquet(probabilities_table(test_ids, test_probs, job.codes), out / "predictions.parquet")
    valid_labels = job.labels[job.parts["valid"]]
    pl.DataFrame({"item_id": job.ids[job.parts["valid"]], "label": code_of[valid_labels],
                  "predicted": code_of[valid_pred]}).write_csv(out / "valid_predictions.csv")
    save_pictures(out, valid_labels, valid_pred, job.codes, metrics, job.cfg.fusion.worst_classes)
    checkpoint.save({"format": checkpoint.FORMAT, "state_dict": model.state_dict(), "method": model.method,
                     "heads": [h.model_dump() for h in job.cfg.fusion.heads], "codes": job.codes, "dims": dims,
                     "checkpoints": job.checkpoints}, out / checkpoint.MODEL_FILE)
    write_json(out / "metrics.json", metrics)
    job.stamp.write(out)
    swap_in(out, job.out)


TABLE_TITLE = "validation macro-F1 (%)"


def summary_table(workdir: Path, fused: dict, output: str = "fusion", data: str = "this catalogue") -> str:
    """This run (on `data`) beside the paper's full-data figures: validation macro-F1 of every modality (Table 3)
    and of the fusion (Table 2's row for its ablations' outputs, none for a system the paper does not score)."""
    rows = [("modality", f"this run ({data})", "paper (full Rakuten data, 84,916 items)")]
    for m in modalities.names():
        path = wd.model_dir(workdir, m) / "metrics.json"
        if path.exists():
            paper = f"{100 * PAPER_TABLE3[m]:.2f} (Table 3)" if m in PAPER_TABLE3 else "-"
            rows.append((m, f"{100 * read_json(path, 'metrics file')['macro_f1']:.2f}", paper))
    paper = f"{100 * PAPER_TABLE2[output]:.2f} (Table 2)" if output in PAPER_TABLE2 else "-"
    rows.append((f"fused ({output})", f"{100 * fused['macro_f1']:.2f}", paper))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    return f"{TABLE_TITLE}\n" + "\n".join(lines)
