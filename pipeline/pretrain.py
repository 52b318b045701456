"""Stage 2, pretrain: one classifier per modality, ``encoder -> EMDE coder -> linear head`` (paper 3.4).

``pipeline pretrain MODALITY --workdir W [--config F] [--coder trainable|static]`` reads
``W/features/<modality>.zarr|h5`` and ``W/split.parquet`` and writes ``W/models/<modality>/``:

* ``model.pt`` -- the best epoch's state dict (by validation macro-F1), the model config (enough for
  :func:`build_model` to rebuild the network), class codes, coder kind, the input store's path and
  provenance, the run fingerprint; load it back with :func:`load_model`;
* ``metrics.json`` -- ``macro_f1`` (0..1, validation split), ``per_class_f1`` (code -> F1), ``accuracy``,
  ``epochs``, ``best_epoch``, ``seconds``, ``coder``, ``device``, the per-epoch history, ...; written last:
  its presence with this run's fingerprint means the stage is done;
* ``valid_predictions.parquet`` -- item_id, label and predicted code of every validation item (best epoch);
* ``last.pt`` -- after every epoch: model, optimizer, scheduler, epoch, best so far, RNG states. A killed
  run started again with the same config and store resumes after its last finished epoch; raising
  ``epochs`` continues a finished run. Any other change of config, split or store starts afresh (and says so).

The networks (paper 3.4, Table 1):

=========  ====================================================  ======  =====
modality   encoder                                               lr      decay
=========  ====================================================  ======  =====
title_cam  TextCNN over CamemBERT token states, 4 kernel sizes   5e-3    0.7
desc_cam   TextCNN, kernels 2, 3, 4, 5                           1e-2    0.7
title_bpe  BpeCNN: learned embedding + TextCNN, kernels 1..5     1e-3    0.9
image      ImagePool: average pooling + BatchNorm over the maps  1e-4    0.9
=========  ====================================================  ======  =====

then :class:`~pipeline.emde.DifferentiableEMDECoder` (paper 3.2) and a linear head; Adam with the learning
rate multiplied by ``decay`` after every epoch (``ExponentialLR``); plain or class-balanced cross-entropy.

``--coder static`` is the paper's "Baseline (Static EMDE)" (Table 3): a fitted, non-trainable
:class:`~pipeline.emde.StaticEMDE` (data-dependent LSH of the original EMDE paper) cannot pass gradients
to an encoder, so the encoder in front of it is one that needs no training: the masked mean of the token
features (:class:`~pipeline.encoders.TokenMeanPool`) for title_cam/desc_cam; for title_bpe the masked mean
of a *fixed* random N(0, 1) embedding of the BPE ids (``static_embed_dim`` wide: a Johnson-Lindenstrauss
projection of the length-normalised bag of BPE ids); for images the average-pooled map (ImagePool left at
its initial, identity BatchNorm). The coder is fitted on the train split's encoder outputs (gathered over
all ranks), then only the linear head is trained, with the same optimiser and schedule.

Devices: CUDA when available (``device = "auto"``; training steps under bf16 autocast, validation in
float32), the CPU otherwise (deterministic under the config's ``seed``). Under ``torchrun``
(``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (nccl on CUDA, one GPU per process;
gloo on the CPU), each rank reads its own share of the store (:mod:`pipeline.train_reader`), validation
predictions are gathered from every rank before the metrics are computed, and only rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from pipeline.catalog import SPLIT_FILE, class_codes
from pipeline.config import section
from pipeline.distributed import Dist
from pipeline.emde import DifferentiableEMDECoder, StaticEMDE
from pipeline.encoders import BpeCNN, ImagePool, ModalityClassifier, TextCNN, TokenMeanPool
from pipeline.errors import PipelineError
from pipeline.metrics import class_weights, classification_metrics
from pipeline.train_reader import TrainReader
from pipeline.workdir import MODALITIES, feature_store_path
from stores import FeatureStore

__all__ = ["pretrain", "build_model", "load_model", "modality_options", "model_dir", "FEATURE_ARRAY"]

FEATURE_ARRAY = {"title_cam": "tokens", "desc_cam": "tokens", "title_bpe": "tokens", "image": "maps"}
CODERS = ("trainable", "static")
CHECKPOINT_FORMAT = 1
# Keys whose change does not invalidate a checkpoint: more epochs continue a run; the rest only decide
# how the run is executed, not what it computes.
NOT_FINGERPRINTED = {"epochs", "eval_batch_size", "device", "cpu_threads"}


class _Interrupted(Exception):
    pass


# ---------------------------------------------------------------------- configuration
def model_dir(workdir: str | Path, modality: str) -> Path:
    return Path(workdir) / "models" / modality


def modality_options(cfg: dict, modality: str, coder: str | None = None) -> dict:
    """[pretrain] defaults merged with [pretrain.<modality>], the coder override applied, checked."""
    base = section(cfg, "pretrain")
    opts = {k: v for k, v in base.items() if not isinstance(v, dict)}
    opts.update(section(cfg, "pretrain", modality))
    if coder is not None:
        opts["coder"] = coder
    where = f"{cfg.get('config_path', 'config')} [pretrain.{modality}]"
    if opts.get("coder") not in CODERS:
        raise PipelineError(f"{where}: coder must be one of {', '.join(CODERS)}, not {opts.get('coder')!r}")
    if opts.get("loss") not in ("balanced", "plain"):
        raise PipelineError(f"{where}: loss must be 'balanced' or 'plain', not {opts.get('loss')!r}")
    needed = ["lr", "decay", "epochs", "batch_size", "depth", "width", "inner_dim", "dropout"]
    needed += {"title_bpe": ["kernel_sizes", "channels", "embed_dim"],
               "title_cam": ["kernel_sizes", "channels"], "desc_cam": ["kernel_sizes", "channels"],
               "image": []}[modality]
    missing = [k for k in needed if k not in opts]
    if missing:
        raise PipelineError(f"{where}: missing key(s) {', '.join(missing)}")
    if opts["coder"] == "static" and int(opts["width"]) & (int(opts["width"]) - 1):
        raise PipelineError(f"{where}: the static coder needs a power-of-two width, not {opts['width']}")
    return opts


def _model_config(modality: str, opts: dict, store: FeatureStore, num_classes: int) -> dict:
    spec = store.specs[FEATURE_ARRAY[modality]]
    coder = opts["coder"]
    if modality == "title_bpe":
        vocab = int(store.provenance.get("producer", {}).get("vocab_size") or 0)
        if vocab <= 0:
            raise PipelineError(f"{store.path}: provenance has no producer vocab_size; rebuild it with "
                                f"`pipeline extract title_bpe --rebuild`")
        if coder == "trainable":
            encoder = {"type": "BpeCNN", "vocab_size": vocab, "embed_dim": int(opts["embed_dim"]),
                       "kernel_sizes": [int(k) for k in opts["kernel_sizes"]], "channels": int(opts["channels"]),
                       "dropout": float(opts["dropout"]), "token_dropout": float(opts.get("token_dropout", 0.0))}
        else:
            encoder = {"type": "RandomBagOfIds", "vocab_size": vocab,
                       "embed_dim": int(opts.get("static_embed_dim", 256))}
    elif modality in ("title_cam", "desc_cam"):
        hidden = int(spec.shape[-1])
        if coder == "trainable":
            encoder = {"type": "TextCNN", "in_dim": hidden, "kernel_sizes": [int(k) for k in opts["kernel_sizes"]],
                       "channels": int(opts["channels"]), "dropout": float(opts["dropout"]),
                       "token_dropout": float(opts.get("token_dropout", 0.0))}
        else:
            encoder = {"type": "TokenMeanPool", "in_dim": hidden}
    else:
        encoder = {"type": "ImagePool", "channels": int(spec.shape[0])}
    emde = {"depth": int(opts["depth"]), "width": int(opts["width"])}
    emde |= {"inner_dim": int(opts["inner_dim"])} if coder == "trainable" else {"seed": int(opts.get("seed", 0))}
    return {"modality": modality, "coder": coder, "encoder": encoder, "emde": emde, "num_classes": num_classes}


class RandomBagOfIds(nn.Module):
    """Static-baseline encoder for BPE ids: masked mean of a fixed N(0, 1) embedding (never trained).

    The embedding is a buffer drawn from a seeded generator, so it is the same in every process and
    is saved in the state dict. forward: ids (B, L) long, mask (B, L) bool -> (B, embed_dim).
    """

    def __init__(self, vocab_size: int, embed_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(int(vocab_size), int(embed_dim), generator=g))
        self.pool = TokenMeanPool(int(embed_dim))
        self.output_dim = int(embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.bool()
        return self.pool(F.embedding(ids.long().masked_fill(~mask, 0), self.table), mask)


def build_model(config: dict) -> ModalityClassifier:
    """The network described by a model config (as stored in model.pt)."""
    enc = dict(config["encoder"])
    kind = enc.pop("type")
    encoder = {"BpeCNN": BpeCNN, "TextCNN": TextCNN, "TokenMeanPool": TokenMeanPool, "ImagePool": ImagePool,
               "RandomBagOfIds": RandomBagOfIds}[kind](**enc)
    emde = config["emde"]
    if config["coder"] == "trainable":
        coder = DifferentiableEMDECoder(encoder.output_dim, depth=emde["depth"], width=emde["width"],
                                        inner_dim=emde["inner_dim"])
    else:
        coder = StaticEMDE(encoder.output_dim, depth=emde["depth"], width=emde["width"], seed=emde["seed"])
    return ModalityClassifier(encoder, coder, config["num_classes"])


def load_model(path: str | Path, map_location="cpu") -> tuple[ModalityClassifier, dict]:
    """(model in eval mode with the best weights, checkpoint dict) from W/models/<modality>[/model.pt]."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise PipelineError(f"{path}: no pretrained model; run `pipeline pretrain MODALITY --workdir W` first")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt


# ---------------------------------------------------------------------- inputs
def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _read_split(workdir: Path, modality: str) -> pl.DataFrame:
    path = workdir / SPLIT_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: build the split and the features first with "
                            f"`pipeline extract {modality} --catalog DIR --workdir {workdir}`")
    split = pl.read_parquet(path)
    if not {"item_id", "split", "label"} <= set(split.columns):
        raise PipelineError(f"{path}: not a split table (needs item_id, split, label)")
    return split


def _open_store(workdir: Path, cfg: dict, modality: str) -> FeatureStore:
    path = feature_store_path(workdir, cfg, modality)
    if not FeatureStore.exists(path):
        raise PipelineError(f"no {modality} features at {path}: build them with "
                            f"`pipeline extract {modality} --catalog DIR --workdir {workdir}`")
    store = FeatureStore(path)
    name = FEATURE_ARRAY[modality]
    if name not in store.specs:
        raise PipelineError(f"{path} holds '{store.provenance.get('kind')}' features without a '{name}' "
                            f"array; rebuild it with `pipeline extract {modality} --rebuild ...`")
    return store


def _fingerprint(opts: dict, model_config: dict, store: FeatureStore, split: pl.DataFrame, seed: int) -> str:
    """What the trained model depends on: config (but epochs), store identity and contents, split."""
    h = hashlib.sha256()
    h.update(_canonical({k: v for k, v in opts.items() if k not in NOT_FINGERPRINTED}).encode())
    h.update(_canonical(model_config).encode())
    h.update(str(seed).encode())
    prov = store.provenance
    h.update(_canonical({k: prov.get(k) for k in ("kind", "producer", "created", "schema_version")}).encode())
    used = split.filter(pl.col("split").is_in(["train", "valid"])).sort("item_id")
    planned_ids, planned_fp = store.planned()
    order = np.argsort(planned_ids)
    pos = np.searchsorted(planned_ids[order], used["item_id"].to_numpy())
    pos = np.minimum(pos, max(len(order) - 1, 0))
    h.update(used["item_id"].to_numpy().astype(np.int64).tobytes())
    h.update(used["label"].to_numpy().astype(np.int64).tobytes())
    h.update((used["split"] == "valid").to_numpy().tobytes())
    h.update(planned_fp[order][pos].astype(np.uint64).tobytes() if len(order) else b"")
    return h.hexdigest()[:32]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- training
def _evaluate(module: nn.Module, reader: TrainReader, ctx: Dist) -> tuple[np.ndarray, ...]:
    """(item ids, true class, predicted class) over the whole split: every rank's share gathered.

    In float32 also on CUDA (only training steps run under bf16 autocast): the checkpoint is chosen on, and
    its predictions are, what `pipeline sketch` and `pipeline predict` compute with it."""
    module.eval()
    ids, labels, preds = [], [], []
    with torch.no_grad():
        for batch in reader.epoch(0):
            batch = batch.to(ctx.device)
            preds.append(module(*batch.inputs).argmax(1).cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
            ids.append(batch.ids.cpu().numpy())
    mine = tuple(np.concatenate(x) if x else np.zeros(0, np.int64) for x in (ids, labels, preds))
    parts = ctx.gather(mine)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _fit_static(model: ModalityClassifier, reader: TrainReader, ctx: Dist) -> None:
    """Fit the static coder on the encoder outputs of every train item (all ranks' shares), in float32."""
    model.encoder.eval()
    outs, ids = [], []
    with torch.no_grad():
        for batch in reader.epoch(0):
            batch = batch.to(ctx.device)
            outs.append(model.encoder(*batch.inputs).float().cpu())
            ids.append(batch.ids.cpu())
    mine = (torch.cat(ids).numpy(), torch.cat(outs).numpy()) if outs else (np.zeros(0, np.int64), None)
    parts = [p for p in ctx.gather(mine) if p[1] is not None]
    all_ids = np.concatenate([p[0] for p in parts])
    feats = np.concatenate([p[1] for p in parts])[np.argsort(all_ids, kind="stable")]  # rank-independent
    model.coder.fit(torch.from_numpy(feats).to(ctx.device))


def _set_train_mode(model: ModalityClassifier, coder: str) -> None:
    model.train()
    if coder == "static":  # fitted parts stay as fitted: only the head learns
        model.encoder.eval()
        model.coder.eval()


def pretrain(modality: str, workdir: Path, cfg: dict, *, coder: str | None = None, progress: bool = True,
             log=print) -> dict:
    """`pipeline pretrain MODALITY`: train (or resume, or skip) W/models/<modality>/; return its metrics."""
    if modality not in MODALITIES:
        raise PipelineError(f"unknown modality '{modality}' (use one of {', '.join(MODALITIES)})")
    workdir = Path(workdir)
    opts = modality_options(cfg, modality, coder)
    seed = int(opts.get("seed", cfg.get("seed", 0)))
    opts["seed"] = seed
    split = _read_split(workdir, modality)
    store = _open_store(workdir, cfg, modality)
    codes = class_codes(split)
    code_index = {c: i for i, c in enumerate(codes)}
    parts = {}
    for name in ("train", "valid"):
        sub = split.filter(pl.col("split") == name)
        if len(sub) == 0:
            raise PipelineError(f"{workdir / SPLIT_FILE}: no '{name}' items")
        parts[name] = (sub["item_id"].to_numpy(), np.array([code_index[c] for c in sub["label"].to_list()]))
    absent = sum(int((~store.contains(parts[n][0])).sum()) for n in parts)
    if absent:
        pending = len(store.pending_blocks())
        raise PipelineError(f"{store.path}: {absent} train/valid item(s) are not in the store"
                            f"{f' ({pending} block(s) still pending)' if pending else ''}; complete it with "
                            f"`pipeline extract {modality} --catalog DIR --workdir {workdir}`")
    model_config = _model_config(modality, opts, store, len(codes))
    rcfg = dict(cfg.get("train_reader", {}))
    # how training batches are drawn changes the model too (length-sorted batches skew BatchNorm)
    fp = _fingerprint(opts | {"length_sort_window": int(rcfg.get("length_sort_window", 0))}, model_config, store,
                      split, seed)
    epochs = int(opts["epochs"])
    out = model_dir(workdir, modality)
    metrics_path, model_path = out / "metrics.json", out / "model.pt"

    if metrics_path.is_file() and model_path.is_file():
        done = json.loads(metrics_path.read_text())
        if done.get("fingerprint") == fp and done.get("epochs") == epochs:
            if int(os.environ.get("RANK", "0")) == 0:
                log(f"{modality}: nothing to do, {out} is up to date (store, split and config unchanged; "
                    f"valid macro-F1 {done['macro_f1']:.4f})")
            store.close()
            return done

    ctx = Dist(str(opts.get("device", "auto")), "[pretrain] device")
    say = log if ctx.main else (lambda *_a, **_k: None)
    threads = torch.get_num_threads()
    if ctx.device.type == "cpu" and int(opts.get("cpu_threads", 0)) > 0:
        torch.set_num_threads(int(opts["cpu_threads"]))
    try:
        return _run(modality, opts, rcfg, model_config, fp, store, codes, parts,
                    ctx, progress, say, out, epochs, seed)
    finally:
        torch.set_num_threads(threads)
        store.close()
        ctx.close()


def _run(modality, opts, rcfg, model_config, fp, store, codes, parts, ctx, progress, say, out, epochs,
         seed) -> dict:
    metrics_path, model_path, last_path = out / "metrics.json", out / "model.pt", out / "last.pt"
    cuda = ctx.device.type == "cuda"
    # bf16 autocast on CUDA for the training steps of the trainable networks (the static coder's hyperplane
    # sides are compared in float32; its encoders are cheap anyway); validation runs in float32
    amp = cuda and opts["coder"] == "trainable"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    budget = float(rcfg.get("memory_gb", 8.0)) * 1e9 / max(ctx.local_world, 1)
    common = dict(mode=rcfg.get("mode", "auto"), buffer_blocks=int(rcfg.get("buffer_blocks", 8)),
                  prefetch=int(rcfg.get("prefetch_batches", 8)), sort_window=int(rcfg.get("length_sort_window", 0)),
                  rank=ctx.rank, world_size=ctx.world, pin_memory=cuda, seed=seed)
    name = FEATURE_ARRAY[modality]
    train = TrainReader(store, name, *parts["train"], batch_size=int(opts["batch_size"]), shuffle=True,
                        memory_bytes=budget, **common)
    valid = TrainReader(store, name, *parts["valid"], shuffle=False,
                        batch_size=int(opts.get("eval_batch_size", 4 * int(opts["batch_size"]))),
                        memory_bytes=max(budget - (train.nbytes if train.mode == "memory" else 0), 0), **common)

    # ---- resume, or start afresh
    state = None
    if last_path.is_file():
        try:
            state = torch.load(last_path, map_location="cpu", weights_only=False)
        except Exception as err:  # a torn or foreign file: not worth failing over, but say so
            say(f"{modality}: {last_path} unreadable ({type(err).__name__}); starting afresh")
            state = None
        if state is not None:
            why = None
            if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fp:
                changed = state.get("coder") != opts["coder"] and f"coder {state.get('coder')} -> {opts['coder']}"
                why = changed or "the config, split or feature store changed since it was written"
            elif state["epoch"] > epochs:
                why = f"it is {state['epoch']} epochs in, the config asks for {epochs}"
            if why:
                say(f"{modality}: not resuming from {last_path}: {why}; starting afresh")
                state = None
    ctx.barrier()  # every rank has decided before rank 0 touches the files
    if state is None and ctx.main:
        for p in (metrics_path, model_path, last_path, out / "valid_predictions.parquet"):
            p.unlink(missing_ok=True)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    model = build_model(model_config).to(ctx.device)
    if opts["coder"] == "static":
        for p in list(model.encoder.parameters()) + list(model.coder.parameters()):
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=float(opts["lr"]), weight_decay=float(opts.get("weight_decay", 0.0)))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(opts["decay"]))
    history: list[dict] = []
    best = {"macro_f1": -1.0, "epoch": 0}
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, start = state["history"], state["best"], int(state["epoch"])
        rng = state["rng"][ctx.rank % len(state["rng"])]
        torch.set_rng_state(rng["torch"])
        if cuda and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)
        say(f"{modality}: resuming from {last_path} after epoch {start}/{epochs} "
            f"(best valid macro-F1 so far {best['macro_f1']:.4f} at epoch {best['epoch']})")

    say(f"{modality}: {opts['coder']} EMDE (depth {opts['depth']}, width {opts['width']}), "
        f"{type(model.encoder).__name__} encoder, {sum(p.numel() for p in trainable):,} trainable parameters, "
        f"{len(codes)} classes on {ctx.describe()}")
    say(f"{modality}: train {train.describe()}; valid {valid.describe()}")
    if train.mode == "memory" or valid.mode == "memory":
        t = time.perf_counter()
        train.load() if train.mode == "memory" else None
        valid.load() if valid.mode == "memory" else None
        say(f"{modality}: features loaded into memory in {time.perf_counter() - t:.1f} s (one sequential pass)")
    if opts["coder"] == "static" and state is None:
        t = time.perf_counter()
        _fit_static(model, train, ctx)
        say(f"{modality}: static EMDE fitted on {train.total_items} train items in {time.perf_counter() - t:.1f} s")

    weights = class_weights(parts["train"][1], len(codes), opts["loss"])
    smoothing = float(opts.get("label_smoothing", 0.0))
    weights = weights.to(ctx.device) if weights is not None else None
    net: nn.Module = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[ctx.device.index] if cuda else None)

    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        _set_train_mode(model, opts["coder"])
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        seen = 0
        columns = [TextColumn(f"[bold]{modality}[/] epoch {epoch + 1}/{epochs}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
        with Progress(*columns, console=Console(stderr=True), transient=True,
                      disable=not (progress and ctx.main)) as bar:
            task = bar.add_task("train", total=len(train), loss="-")
            batches = train.epoch(epoch)
            try:
                for step, batch in enumerate(batches, 1):
                    batch = batch.to(ctx.device)
                    with autocast():
                        logits = net(*batch.inputs)
                    loss = F.cross_entropy(logits.float(), batch.labels, weight=weights, label_smoothing=smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    n = len(batch)
                    loss_sum += loss.detach().double() * n
                    seen += n
                    shown = {"loss": f"{float(loss_sum) / seen:.4f}"} if step % 10 == 0 or step == len(train) else {}
                    bar.update(task, advance=1, **shown)
            finally:
                batches.close()
        scheduler.step()
        loss_sum, seen = ctx.all_sum([float(loss_sum), float(seen)])
        ids, labels, preds = _evaluate(model, valid, ctx)
        m = classification_metrics(labels, preds, codes)
        seconds = time.perf_counter() - t0
        improved = m["macro_f1"] > best["macro_f1"]
        if improved:
            best = {"macro_f1": m["macro_f1"], "epoch": epoch + 1, "metrics": m,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    "predictions": (ids, labels, preds)}
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "valid_macro_f1": m["macro_f1"],
                        "valid_accuracy": m["accuracy"], "lr": lr,
                        "seconds": seconds, "valid_items": int(len(ids))})
        rng = ctx.gather({"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state(ctx.device) if cuda else None})
        if ctx.main:
            _atomic_save({"format": CHECKPOINT_FORMAT, "fingerprint": fp, "coder": opts["coder"],
                          "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "best": best, "history": history, "rng": rng,
                          "model_config": model_config}, last_path)
        say(f"{modality} epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.4f}, valid macro-F1 "
            f"{m['macro_f1']:.4f}{' (best)' if improved else ''}, accuracy {m['accuracy']:.4f}, {seconds:.1f} s")
        ctx.barrier()

    # ---- the best epoch -> model.pt, metrics.json (last: it marks the stage done)
    if best["epoch"] == 0:
        raise PipelineError(f"{modality}: no epoch was trained (epochs = {epochs})")
    total_seconds = float(sum(h["seconds"] for h in history))
    metrics = {
        "modality": modality,
        "macro_f1": best["macro_f1"],
        "per_class_f1": best["metrics"]["per_class_f1"],
        "accuracy": best["metrics"]["accuracy"],
        "epochs": epochs,
        "best_epoch": best["epoch"],
        "seconds": total_seconds,
        "coder": opts["coder"],
        "device": ctx.describe(),
        "world_size": ctx.world,
        "train_items": int(len(parts["train"][0])),
        "valid_items": int(len(best["predictions"][0])),
        "class_codes": [int(c) for c in codes],
        "history": history,
        "fingerprint": fp,
        "store": str(store.path),
    }
    if ctx.main:
        _atomic_save({"format": CHECKPOINT_FORMAT, "modality": modality, "coder": opts["coder"],
                      "model_config": model_config, "state_dict": best["state"], "class_codes": codes,
                      "store": {"path": str(store.path), "provenance": store.provenance},
                      "train_config": opts,
                      "fingerprint": fp, "best_epoch": best["epoch"], "macro_f1": best["macro_f1"]}, model_path)
        ids, labels, preds = best["predictions"]
        cc = np.asarray(codes, dtype=np.int64)
        pl.DataFrame({"item_id": ids, "label": cc[labels], "predicted": cc[preds]}).sort("item_id") \
            .write_parquet(out / "valid_predictions.parquet")
        _atomic_write(json.dumps(metrics, indent=1), metrics_path)
    say(f"{modality}: best valid macro-F1 {best['macro_f1']:.4f} at epoch {best['epoch']}/{epochs} "
        f"({metrics['valid_items']} validation items), {total_seconds:.1f} s training -> {out}")
    ctx.barrier()
    return metrics
