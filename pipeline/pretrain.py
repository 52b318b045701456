"""Stage 2, pretrain: one classifier per modality, ``encoder -> EMDE coder -> linear head`` (paper 3.4).

``pipeline pretrain MODALITY --workdir W [--config F] [--coder trainable|static]`` reads the modality's
feature store and ``W/split.parquet`` and writes ``W/models/<modality>/``:

* ``model.pt`` -- the best epoch's weights (by validation macro-F1), the model config
  (pipeline.checkpoint rebuilds the network from it), class codes, what it was trained on;
* ``metrics.json`` -- ``macro_f1`` (0..1, validation split), ``per_class_f1`` (code -> F1), ``accuracy``,
  ``epochs``, ``best_epoch``, ``seconds``, ``coder``, ``device``, the per-epoch history, ...;
* ``valid_predictions.parquet`` -- item_id, label and predicted code of every validation item;
* ``last.pt`` -- the run state after its last epoch (raising ``epochs`` continues a finished run);
* ``stamp.json`` -- what the model was computed from (settings, features, split): unchanged, the stage
  does nothing.

A run trains in ``W/models/.<modality>.partial/`` and swaps the finished directory in, so a refused,
failed, killed or interrupted run leaves the last good model as it was; run again, a killed run resumes
from its last finished epoch. One run per modality at a time: a second is refused at once.

The networks: the modality's encoder (its registry record: n-gram CNNs over token features, a learned
BPE embedding + CNN, average pooling + BatchNorm over image maps), the trainable EMDE coder (paper 3.2)
and a linear head; Adam with Table 1's learning rate and per-epoch decay.

``--coder static`` is the paper's "Baseline (Static EMDE)" (Table 3): a fitted, non-trainable
:class:`~pipeline.emde.StaticEMDE` (data-dependent LSH of the original EMDE paper) cannot pass gradients
to an encoder, so the encoder in front of it trains nothing: the token features as a set (each token
sketched, the region counts normalised per depth; or their mean, ``static_pooling = "mean"``), a fixed
random embedding of the BPE ids (likewise), the pooled image map as one token; the coder is fitted on the
train items' vectors (every token of a set; all ranks'), then only the head is trained.

Over an image store cut at ``[image] cache_at``, the image network's encoder is the rest of the backbone
(:class:`~pipeline.encoders.ImageTail`), which starts from the extractor's weights file (`initial_model`)
and trains at ``[pretrain.image] backbone_lr``, the new layers at ``lr``. Likewise over a text store of a lower
layer (``[text_model] layers``) with ``tune_layers = k``: the text model's next k layers
(:class:`~pipeline.encoders.TextTail`) at that table's ``backbone_lr``.
"""
from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import checkpoint, modalities, workdir as wd
from pipeline.catalog import SPLIT_FILE, class_codes, read_split
from pipeline.config import Config
from pipeline.distributed import Dist, torchrun
from pipeline.encoders import vectors
from pipeline.errors import PipelineError
from pipeline.metrics import class_weights
from pipeline.provenance import (Stamp, digest, output_lock, partial_dir, read_json, recover, swap_in, write_json,
                                 write_parquet)
from pipeline.schema import RUN_ONLY_KEYS
from pipeline.train_reader import TrainReader
from pipeline.trainer import RunSettings, RunState, train
from stores import FeatureStore

__all__ = ["pretrain", "prepare", "initial_model"]


@dataclass
class Job:
    """Everything a pretraining run is computed from, resolved and checked before anything is written."""

    modality: modalities.Modality
    opts: object  # the modality's TrainOptions
    cfg: Config
    workdir: Path
    store: FeatureStore
    codes: list[int]
    parts: dict  # "train" / "valid" -> (item ids, class indices)
    model_config: dict
    stamp: Stamp
    warnings: list[str]  # degenerate data that trains, badly: said before training, kept in metrics.json

    @property
    def out(self) -> Path:
        return wd.model_dir(self.workdir, self.modality.name)


def _open_store(workdir: Path, cfg: Config, m: modalities.Modality) -> FeatureStore:
    path = wd.feature_store_path(workdir, cfg, m.name)
    if not FeatureStore.exists(path):
        raise PipelineError(f"no {m.name} features at {path}: build them with "
                            f"`{wd.command(cfg, workdir, f'extract {m.name}', catalog=True)}`")
    store = FeatureStore(path)
    if m.array not in store.specs:
        raise PipelineError(f"{path} holds '{store.provenance.get('kind')}' features without a '{m.array}' "
                            f"array; rebuild it with `{wd.command(cfg, workdir, f'extract {m.name}', True)} --rebuild`")
    return store


def _parts(split: pl.DataFrame, codes: list[int], store: FeatureStore, job_hint: str, where: Path) -> dict:
    code_index = {c: i for i, c in enumerate(codes)}
    parts = {}
    for name in ("train", "valid"):
        sub = split.filter(pl.col("split") == name)
        if len(sub) == 0:
            raise PipelineError(f"{where}: no '{name}' items: the catalogue is too small to train on")
        parts[name] = (sub["item_id"].to_numpy(), np.array([code_index[c] for c in sub["label"].to_list()]))
    if len(parts["train"][0]) < 2:
        raise PipelineError(f"{where}: 1 train item: a network needs 2 or more to train on (the BatchNorm of a "
                            "batch needs 2); the catalogue is too small")
    absent = sum(int((~store.contains(parts[n][0])).sum()) for n in parts)
    if absent:
        pending = len(store.pending_blocks())
        raise PipelineError(f"{store.path}: {absent} train/valid item(s) are not in the store"
                            f"{f' ({pending} block(s) still pending)' if pending else ''}; complete it with "
                            f"`{job_hint}`")
    return parts


def prepare(modality: str, workdir: Path, cfg: Config, coder: str | None) -> Job:
    """Resolve settings, split, features and the stamp; refuse bad input before anything is written."""
    m = modalities.get(modality)
    opts = cfg.train_options(modality, coder)
    extract_hint = wd.command(cfg, workdir, f"extract {modality}", catalog=True)
    split = read_split(workdir, extract_hint)
    store = _open_store(workdir, cfg, m)
    codes = class_codes(split)
    parts = _parts(split, codes, store, extract_hint, workdir / SPLIT_FILE)
    model_config = checkpoint.model_config(modality, opts, store.specs[m.array], store.provenance["producer"],
                                           len(codes), cfg.seed)
    used = np.concatenate([parts["train"][0], parts["valid"][0]])
    order = np.argsort(used)
    items = {"ids": used[order].tolist(), "labels": np.concatenate([parts["train"][1], parts["valid"][1]])[order]
             .tolist(), "valid": len(parts["valid"][0]), "inputs": _input_hashes(store, used[order])}
    settings = opts.model_dump(exclude=set(RUN_ONLY_KEYS) | {"epochs"})
    stamp = Stamp("pretrain", {"settings": settings, "model": model_config, "seed": cfg.seed,
                               "length_sort_window": cfg.train_reader.length_sort_window,
                               "max_tokens": cfg.train_reader.max_tokens,
                               "features": digest(store.provenance["producer"]), "items": digest(items),
                               "epochs": opts.epochs})
    return Job(m, opts, cfg, workdir, store, codes, parts, model_config, stamp, _warnings(codes, parts["train"][1]))


def _warnings(codes: list[int], train_labels: np.ndarray) -> list[str]:
    """Classes with one train item (too few to learn from) or none (only in the validation split)."""
    counts = np.bincount(train_labels, minlength=len(codes))
    out = []
    for n, what in ((1, "a single train item: too few to learn from"),
                    (0, "no train item, only validation items: never learnt, their F1 is 0")):
        which = [codes[i] for i in np.flatnonzero(counts == n)]
        if which:
            shown = ", ".join(map(str, which[:10])) + (", ..." if len(which) > 10 else "")
            out.append(f"{len(which)} class(es) with {what} (codes {shown})")
    return out


def _input_hashes(store: FeatureStore, ids: np.ndarray) -> str:
    planned_ids, planned_fp = store.planned()
    order = np.argsort(planned_ids)
    return digest(planned_fp[order][np.searchsorted(planned_ids[order], ids)].tolist())


def pretrain(modality: str, workdir: Path, cfg: Config, *, coder: str | None = None, progress: bool = True,
             log=print) -> dict:
    """`pipeline pretrain MODALITY`: train (or resume, or skip) W/models/<modality>/; return its metrics."""
    workdir = Path(workdir)
    with wd.repair_hint(cfg, workdir):  # a damaged feature store met on open names its repair
        job = prepare(modality, workdir, cfg, coder)
    try:
        if torchrun().main:
            recover(job.out)
        if job.stamp.matches(job.out):
            done = read_json(job.out / "metrics.json", "metrics file")
            if torchrun().main:
                log(f"{modality}: nothing to do, {job.out} is up to date (store, split and config unchanged; "
                    f"valid macro-F1 {done['macro_f1']:.4f})")
            return done
        wd.remember(workdir, cfg)
        with output_lock(job.out) if torchrun().main else nullcontext(), wd.repair_hint(cfg, workdir):
            return _run(job, progress, log)
    finally:
        job.store.close()


def _resume_state(job: Job, ctx: Dist, say) -> dict | None:
    """A killed run of this job (in the partial directory), or a finished one with fewer epochs: resumable."""
    partial = partial_dir(job.out)
    for where in (partial, job.out):
        path = where / checkpoint.RESUME_FILE
        if not path.is_file():
            continue
        try:
            state = checkpoint.load(path)
        except PipelineError as err:
            say(f"{job.modality.name}: not resuming from {path} ({err}); starting afresh")
            continue
        if state.get("format") != checkpoint.FORMAT or state.get("stamp") != job.stamp.without("epochs").digest:
            say(f"{job.modality.name}: not resuming from {path}: the settings, split or features changed since "
                "it was written; starting afresh")
            continue
        if state["progress"]["epoch"] > job.opts.epochs:
            say(f"{job.modality.name}: not resuming from {path}: it is {state['progress']['epoch']} epochs in, "
                f"the config asks for {job.opts.epochs}")
            continue
        p = state["progress"]
        say(f"{job.modality.name}: resuming from {path} after epoch {p['epoch']}/{job.opts.epochs} (best valid "
            f"macro-F1 so far {p['best_f1']:.4f} at epoch {p['best_epoch']})")
        return state
    return None


def _readers(job: Job, ctx: Dist) -> tuple[TrainReader, TrainReader]:
    rc = job.cfg.train_reader
    budget = rc.memory_gb * 1e9 / max(ctx.local_world, 1)
    common = dict(mode=rc.mode, buffer_blocks=rc.buffer_blocks, prefetch=rc.prefetch_batches,
                  sort_window=rc.length_sort_window, rank=ctx.rank, world_size=ctx.world,
                  pin_memory=ctx.device.type == "cuda", seed=job.cfg.seed, max_tokens=rc.max_tokens)
    m = job.modality
    train = TrainReader(job.store, m.array, m.batch, *job.parts["train"], batch_size=job.opts.batch_size,
                        shuffle=True, memory_bytes=budget, **common)
    valid = TrainReader(job.store, m.array, m.batch, *job.parts["valid"], shuffle=False,
                        batch_size=job.opts.eval_batch_size,
                        memory_bytes=max(budget - (train.nbytes if train.mode == "memory" else 0), 0), **common)
    return train, valid


def _fit_static(model, reader: TrainReader, ctx: Dist) -> None:
    """Fit the static coder on the encoder outputs of every train item (all ranks' shares; every token of an
    encoder that outputs sets), in float32."""
    model.encoder.eval()
    outs, ids = [], []
    with torch.no_grad():
        for batch in reader.epoch(0):
            batch = batch.to(ctx.device)
            z = model.encoder(*batch.inputs)  # (B, D), or a set per item ((B, L, D), mask (B, L))
            outs.append(vectors(z).float().cpu())  # (B or real tokens, D)
            per_item = z[1].sum(1) if isinstance(z, tuple) else torch.ones_like(batch.ids)  # (B,) vectors per item
            ids.append(batch.ids.repeat_interleave(per_item).cpu())
    mine = (torch.cat(ids).numpy(), torch.cat(outs).numpy()) if outs else (np.zeros(0, np.int64), None)
    parts = [p for p in ctx.gather(mine) if p[1] is not None]
    all_ids = np.concatenate([p[0] for p in parts])
    feats = np.concatenate([p[1] for p in parts])[np.argsort(all_ids, kind="stable")]  # rank-independent
    model.coder.fit(torch.from_numpy(feats).to(ctx.device))


def initial_model(job: Job, pretrained: bool = True):
    """The job's network before its first step: random init under the seed, then what the modality's encoder
    starts from (its registry record's `init_encoder`: a fine-tuned tail, image or text, loads the weights the
    extractor used; skipped with `pretrained=False`, for a resumed run whose state replaces every weight)."""
    torch.manual_seed(job.cfg.seed)
    np.random.seed(job.cfg.seed % 2**32)
    model = checkpoint.build_model(job.model_config)
    if pretrained and job.modality.init_encoder is not None:
        job.modality.init_encoder(model.encoder, job.cfg, job.workdir, job.store.provenance["producer"])
    return model


def _build(job: Job, ctx: Dist, train_reader: TrainReader, fresh: bool, say):
    model = initial_model(job, pretrained=fresh).to(ctx.device)  # a resumed run loads its own weights
    static = job.opts.coder == "static"
    if static:
        for p in list(model.encoder.parameters()) + list(model.coder.parameters()):
            p.requires_grad_(False)
        if fresh:
            t = time.perf_counter()
            _fit_static(model, train_reader, ctx)
            say(f"{job.modality.name}: static EMDE fitted on {train_reader.total_items} train items in "
                f"{time.perf_counter() - t:.1f} s")
    run = RunSettings(job.modality.name, job.opts.epochs, job.opts.lr, job.opts.decay, job.opts.weight_decay,
                      job.opts.label_smoothing, amp=ctx.device.type == "cuda" and not static,
                      lr_groups=(("encoder.tail.", job.opts.backbone_lr),) if hasattr(job.opts, "backbone_lr") else (),
                      fitted=("encoder", "coder") if static else (), stamp=job.stamp.without("epochs").digest)
    return model, run


def _run(job: Job, progress: bool, log) -> dict:
    ctx = Dist(job.opts.device, "[pretrain] device")
    say = log if ctx.main else (lambda *_a, **_k: None)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu" and job.opts.cpu_threads > 0:
        torch.set_num_threads(job.opts.cpu_threads)
    try:
        state = _resume_state(job, ctx, say)
        ctx.barrier()  # every rank has read the resume file before rank 0 touches the directory
        partial = partial_dir(job.out)
        if ctx.main:
            _start_partial(partial, job.out, state)
        train_reader, valid_reader = _readers(job, ctx)
        _check_batches(job, ctx, train_reader)
        model, run = _build(job, ctx, train_reader, state is None, say)
        cut = _describe(job, model, ctx, train_reader, valid_reader, say)
        weights = class_weights(job.parts["train"][1], len(job.codes), job.opts.loss)
        done = train(model, train_reader, valid_reader, run, ctx, job.codes,
                     None if weights is None else weights.to(ctx.device), partial / checkpoint.RESUME_FILE,
                     state, say, progress)
        if done.best_epoch == 0:
            raise PipelineError(f"{job.modality.name}: no epoch was trained (epochs = {job.opts.epochs})")
        metrics = _metrics(job, done, ctx) | cut | {"warnings": job.warnings}
        if ctx.main:
            _finish(job, done, metrics, partial)
        say(f"{job.modality.name}: best valid macro-F1 {done.best_f1:.4f} at epoch {done.best_epoch}/"
            f"{job.opts.epochs} ({metrics['valid_items']} validation items), {metrics['seconds']:.1f} s training "
            f"-> {job.out}")
        ctx.barrier()
        return metrics
    finally:
        torch.set_num_threads(threads)
        ctx.close()


def _start_partial(partial: Path, out: Path, state: dict | None) -> None:
    """The directory this run writes into: a killed run's (resumed), or a fresh one (seeded with the finished
    run's resume file when that run is being continued with more epochs)."""
    if state is not None and (partial / checkpoint.RESUME_FILE).is_file():
        return
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    if state is not None:
        shutil.copy2(out / checkpoint.RESUME_FILE, partial / checkpoint.RESUME_FILE)


def _describe(job: Job, model, ctx: Dist, train_reader, valid_reader, say) -> dict:
    """Say what is trained on what; return the count of items read up to [train_reader] max_tokens."""
    name, opts = job.modality.name, job.opts
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{name}: {opts.coder} EMDE (depth {opts.depth}, width {opts.width}), {type(model.encoder).__name__} "
        f"encoder, {trainable:,} trainable parameters, {len(job.codes)} classes on {ctx.describe()}")
    say(f"{name}: train {train_reader.describe()}; valid {valid_reader.describe()}")
    for warning in job.warnings:
        say(f"{name}: warning: {warning}")
    cut = [int(n) for n in ctx.all_sum([float(train_reader.cut), float(valid_reader.cut)])]
    if sum(cut):
        cap = job.cfg.train_reader.max_tokens
        say(f"{name}: {cut[0]} train and {cut[1]} validation item(s) have more than {cap} tokens: the network "
            f"reads their first {cap} ([train_reader] max_tokens; the store keeps every token)")
    for reader in (train_reader, valid_reader):
        if reader.mode == "memory":
            reader.load()
    return {"max_tokens": job.cfg.train_reader.max_tokens,
            "items_over_max_tokens": {"train": cut[0], "valid": cut[1]}}


def _check_batches(job: Job, ctx: Dist, reader: TrainReader) -> None:
    """Refuse a batch plan with a one-item batch (the BatchNorm of a training batch needs 2), on every rank."""
    if ctx.all_sum([float(reader.steps and reader.sizes.min() < 2)])[0]:
        name, n = job.modality.name, reader.total_items
        fewer = " (or run fewer processes)" if ctx.world > 1 else ""
        raise PipelineError(f"{name}: {n} train items in batches of at most {job.opts.batch_size} leave a batch of "
                            f"1 item (the BatchNorm of a training batch needs 2): set [pretrain.{name}] batch_size "
                            f"to 3 or more{fewer}")


def _metrics(job: Job, done: RunState, ctx: Dist) -> dict:
    return {
        "modality": job.modality.name, "macro_f1": done.best_f1, "per_class_f1": done.best_metrics["per_class_f1"],
        "accuracy": done.best_metrics["accuracy"], "epochs": job.opts.epochs, "best_epoch": done.best_epoch,
        "seconds": float(sum(h["seconds"] for h in done.history)), "coder": job.opts.coder,
        "device": ctx.describe(), "world_size": ctx.world, "train_items": int(len(job.parts["train"][0])),
        "valid_items": int(len(done.best_predictions["ids"])), "class_codes": [int(c) for c in job.codes],
        "history": done.history, "fingerprint": job.stamp.digest, "store": str(job.store.path),
    }


def _finish(job: Job, done: RunState, metrics: dict, partial: Path) -> None:
    """The best epoch into the partial directory, then the directory swapped in (stamp last)."""
    checkpoint.save({"format": checkpoint.FORMAT, "modality": job.modality.name, "coder": job.opts.coder,
                     "model_config": job.model_config, "state_dict": done.best_state, "class_codes": job.codes,
                     "store": {"path": str(job.store.path), "provenance": job.store.provenance},
                     "train_config": job.opts.model_dump(), "fingerprint": job.stamp.digest,
                     "max_tokens": job.cfg.train_reader.max_tokens,
                     "best_epoch": done.best_epoch, "macro_f1": done.best_f1}, partial / checkpoint.MODEL_FILE)
    p = {k: v.numpy() for k, v in done.best_predictions.items()}
    cc = np.asarray(job.codes, dtype=np.int64)
    write_parquet(pl.DataFrame({"item_id": p["ids"], "label": cc[p["labels"]], "predicted": cc[p["preds"]]})
                  .sort("item_id"), partial / "valid_predictions.parquet")
    write_json(partial / "metrics.json", metrics)
    job.stamp.write(partial)
    swap_in(partial, job.out)
