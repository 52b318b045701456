"""The training loop of a network: each modality's (paper 3.4, Table 1) and the fusion heads (3.5).

Adam with the learning rate multiplied by `decay` after every epoch, cross-entropy (plain or class
weighted), validation macro-F1 after every epoch, the best epoch kept. After every epoch the whole run
state (model, optimiser, schedule, best so far, history, RNG states) goes to a resume file, so a killed
run continues from its last finished epoch and ends as an uninterrupted one would.

Devices and processes come in a `Dist` (pipeline.distributed): under torchrun the model is wrapped in
DistributedDataParallel, each rank reads its share, validation predictions are gathered from every
rank, and only rank 0 writes. On CUDA the training steps run under bf16 autocast; validation always
runs in float32, so the checkpoint is chosen on what `sketch` and `predict` compute with it. A reader
is anything with `len()` (its batches per epoch, the same on every rank) and `epoch(e)` (those batches, as
`pipeline.batches.Batch`): a `TrainReader` over a feature store, or fuse's sketches in memory.
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import checkpoint, workdir as wd
from pipeline.distributed import Dist
from pipeline.errors import PipelineError
from pipeline.metrics import classification_metrics
from pipeline.progress import Progress
from pipeline.provenance import partial_dir, staged_dir
from pipeline.train_reader import TrainReader


@dataclass(frozen=True)
class RunSettings:
    """How a network is trained (the settings of its [pretrain.<modality>] table that the loop uses)."""

    name: str  # what the log lines call the run (the modality)
    epochs: int
    lr: float
    decay: float
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = False  # bf16 autocast for the training steps (CUDA)
    lr_groups: tuple[tuple[str, float], ...] = ()  # (parameter-name prefix, its own learning rate): fine-tuned parts
    fitted: tuple[str, ...] = ()  # submodules that stay as fitted (eval mode, no gradients)
    stamp: str = ""  # the digest a resume file must carry to be resumed


@dataclass
class RunState:
    """Where a run stands: the epochs done, the best epoch so far (its weights and predictions), the history."""

    epoch: int = 0
    best_f1: float = -1.0
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    best_state: dict = field(default_factory=dict)
    best_predictions: dict = field(default_factory=dict)  # ids, labels, preds: (valid items,) int64 tensors
    history: list = field(default_factory=list)


# ---------------------------------------------------------------------- where a run lives
def find_resume(out: Path, stamp: str, epochs: int, name: str, say) -> checkpoint.ResumeState | None:
    """A killed run of this stamp (`out`'s partial directory), or a finished one with fewer epochs: resumable."""
    for where in (partial_dir(out), out):
        path = where / wd.RESUME_FILE
        if not path.is_file():
            continue
        try:
            state = checkpoint.load(path, "resume")
        except PipelineError as err:
            say(f"{name}: not resuming from {path} ({err}); starting afresh")
            continue
        if state.stamp != stamp:
            say(f"{name}: not resuming from {path}: the settings, split or inputs changed since it was written; "
                "starting afresh")
            continue
        p = state.progress
        if p["epoch"] > epochs:
            say(f"{name}: not resuming from {path}: it is {p['epoch']} epochs in, the config asks for {epochs}")
            continue
        say(f"{name}: resuming from {path} after epoch {p['epoch']}/{epochs} (best valid macro-F1 so far "
            f"{p['best_f1']:.4f} at epoch {p['best_epoch']})")
        return state
    return None


@contextmanager
def run_dir(out: Path, state: checkpoint.ResumeState | None, main: bool):
    """The directory a run writes into, swapped in over `out` when the block completes (`staged_dir`): a killed
    run's, resumed, or a fresh one, seeded with the finished run's resume file when that run is continued with
    more epochs. Other ranks than the main one get its path and change nothing."""
    partial = partial_dir(out)
    if not main:
        yield partial
        return
    resumed_here = state is not None and (partial / wd.RESUME_FILE).is_file()
    with staged_dir(out, fresh=not resumed_here) as partial:
        if state is not None and not resumed_here:
            shutil.copy2(out / wd.RESUME_FILE, partial / wd.RESUME_FILE)
        yield partial


# ---------------------------------------------------------------------- training
def evaluate(model: nn.Module, reader: TrainReader, dist: Dist) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item ids, true class, predicted class) over the whole split, every rank's share gathered, in float32."""
    model.eval()
    ids, labels, preds = [], [], []
    with torch.no_grad():
        for batch in reader.epoch(0):
            batch = batch.to(dist.device)
            preds.append(model(*batch.inputs).argmax(1).cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
            ids.append(batch.ids.cpu().numpy())
    mine = tuple(np.concatenate(x) if x else np.zeros(0, np.int64) for x in (ids, labels, preds))
    parts = dist.gather(mine)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _set_train_mode(model: nn.Module, run: RunSettings) -> None:
    model.train()
    for name in run.fitted:
        getattr(model, name).eval()


def _train_epoch(net: nn.Module, model: nn.Module, reader: TrainReader, optimizer, run: RunSettings, dist: Dist,
                 weights, epoch: int, progress: bool) -> float:
    """One pass over this rank's batches; the mean loss over every rank's items."""
    _set_train_mode(model, run)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if run.amp else nullcontext
    loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
    seen = 0
    with Progress(f"{run.name} epoch {epoch + 1}/{run.epochs}", len(reader), progress and dist.main, "batches",
                  transient=True) as bar:
        batches = reader.epoch(epoch)
        try:
            for step, batch in enumerate(batches, 1):
                batch = batch.to(dist.device)
                with autocast():
                    logits = net(*batch.inputs)  # (B, classes)
                loss = F.cross_entropy(logits.float(), batch.labels, weight=weights,
                                       label_smoothing=run.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach().double() * len(batch)
                seen += len(batch)
                bar.advance(1, **({"loss": f"{float(loss_sum) / seen:.4f}"} if step % 10 == 0 else {}))
        finally:
            batches.close()
    total, n = dist.all_sum([float(loss_sum), float(seen)])
    return total / max(n, 1)


def train(model: nn.Module, train_reader: TrainReader, valid_reader: TrainReader, run: RunSettings, dist: Dist,
          codes: list[int], weights, resume_file: Path, state: checkpoint.ResumeState | None, say,
          progress: bool = False) -> RunState:
    """Train `model` for `run.epochs` (from `state`, a resume file's, when given); return the best."""
    optimizer = torch.optim.Adam(_param_groups(model, run), lr=run.lr, weight_decay=run.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=run.decay)
    done = _restore(state, model, optimizer, scheduler, dist) if state is not None else RunState()
    net = nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda"
                                              else None) if dist.active else model
    for epoch in range(done.epoch, run.epochs):
        t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        loss = _train_epoch(net, model, train_reader, optimizer, run, dist, weights, epoch, progress)
        scheduler.step()
        ids, labels, preds = evaluate(model, valid_reader, dist)
        m = classification_metrics(labels, preds, codes)
        improved = m["macro_f1"] > done.best_f1
        if improved:
            done.best_f1, done.best_epoch, done.best_metrics = m["macro_f1"], epoch + 1, m
            done.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            done.best_predictions = {k: torch.from_numpy(v) for k, v in zip(("ids", "labels", "preds"),
                                                                              (ids, labels, preds))}
        done.epoch = epoch + 1
        done.history.append({"epoch": epoch + 1, "loss": loss, "valid_macro_f1": m["macro_f1"],
                             "valid_accuracy": m["accuracy"], "lr": lr, "seconds": time.perf_counter() - t0,
                             "valid_items": int(len(ids))})
        _save(resume_file, done, model, optimizer, scheduler, run, dist)
        say(f"{run.name} epoch {epoch + 1}/{run.epochs}: loss {loss:.4f}, valid macro-F1 {m['macro_f1']:.4f}"
            f"{' (best)' if improved else ''}, accuracy {m['accuracy']:.4f}, {done.history[-1]['seconds']:.1f} s")
        dist.barrier()
    return done


def _param_groups(model: nn.Module, run: RunSettings) -> list[dict]:
    """Adam's groups: the trainable parameters at `run.lr`, those under a prefix of `run.lr_groups` at its rate."""
    own = {prefix: [] for prefix, _ in run.lr_groups}
    rest = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = next((q for q in own if name.startswith(q)), None)
            (own[prefix] if prefix else rest).append(p)
    return [{"params": rest}] + [{"params": own[q], "lr": lr} for q, lr in run.lr_groups if own[q]]


def _save(path: Path, done: RunState, model, optimizer, scheduler, run: RunSettings, dist: Dist) -> None:
    """The resume file: everything an interrupted run needs to go on as if it had not stopped."""
    rng = dist.gather({"torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state(dist.device) if dist.device.type == "cuda" else None})
    if dist.main:
        checkpoint.save(checkpoint.ResumeState(run.stamp, vars(done), model.state_dict(), optimizer.state_dict(),
                                               scheduler.state_dict(), rng), path)


def _restore(state: checkpoint.ResumeState, model, optimizer, scheduler, dist: Dist) -> RunState:
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    rng = state.rng[dist.rank % len(state.rng)]
    torch.set_rng_state(rng["torch"])
    if dist.device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], dist.device)
    return RunState(**state.progress)
