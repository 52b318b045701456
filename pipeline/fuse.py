"""Stage 4, fuse (paper 3.5, Figure 2): linear heads over the input sketches, trained jointly, logits summed.

The heads are `[fusion] heads` (pipeline.heads), trained by `pipeline.trainer` over the sketches held in memory
(Adam, Table 1's rate and decay, the best epoch by validation macro-F1, resumable after every epoch). With
`[fusion] method = "average"` nothing is trained: each head is its modality's pretrained head and the
prediction is the mean of their class probabilities (the late fusion paper 3.5 compares with). Writes
W/fusion/ (or `[fusion] output`): model.pt, last.pt, metrics.json, predictions.csv (the challenge's
submission format), predictions.parquet, valid_predictions.csv, confusion_worst.png (Table 4),
per_class_f1.png and stamp.json, built beside the old directory and swapped in whole; one fuse at a time.
Under torchrun each rank reads the sketches of its share of the split and rank 0 alone writes.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import checkpoint, registry, workdir as wd
from pipeline.batches import Batch
from pipeline.catalog import class_codes, probabilities_table, read_split, write_submission
from pipeline.config import Config
from pipeline.distributed import Dist, torchrun
from pipeline.errors import PipelineError
from pipeline.heads import FusionHeads
from pipeline.metrics import PAPER_TABLE2, PAPER_TABLE3, class_weights, classification_metrics, save_pictures
from pipeline.provenance import Stamp, digest, output_lock, read_json, recover, sha256_file, write_json, write_parquet
from pipeline.trainer import RunSettings, find_resume, run_dir, train
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
    names = [m for m in registry.names() if m in used]
    checkpoints = {}
    for m in names:
        path = wd.model_path(workdir, m)
        if not path.is_file():
            raise PipelineError(f"{path} not found: run `{wd.command(cfg, workdir, f'pretrain {m}')}` and "
                                f"`{wd.command(cfg, workdir, f'sketch {m}')}` first")
        checkpoints[m] = sha256_file(path)
    index = {c: i for i, c in enumerate(codes)}
    labels = np.array([index.get(c, -1) if c is not None else -1 for c in split["label"].to_list()], np.int64)
    kind = split["split"].to_numpy()
    parts = {p: np.flatnonzero(kind == p) for p in PARTS}
    ids = split["item_id"].to_numpy()
    stamp = Stamp("fuse", {"fusion": cfg.fusion.model_dump(exclude={"epochs"}), "epochs": cfg.fusion.epochs,
                           "checkpoints": checkpoints, "seed": cfg.seed,
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
                                    f"{wd.model_path(job.workdir, m)}: {again} again")
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


def _gathered(dist: Dist, mine: np.ndarray) -> np.ndarray:
    """Every rank's rows of `part[rank::world]` (predictions, logits), put back in the part's order."""
    shares = dist.gather(mine)
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


def fuse(workdir: str | Path, cfg: Config, *, progress: bool = True, log=print, table: bool = True) -> dict:
    """`pipeline fuse`: train the fusion heads over the sketch stores; metrics, pictures, predictions; with
    `table`, the results table (`pipeline train` prints it itself, after every stage's line)."""
    workdir = Path(workdir)
    job = prepare(workdir, cfg)
    main = torchrun().main
    if main:
        recover(job.out)
    if job.stamp.matches(job.out):
        if main:
            log(f"fuse: nothing to do, {job.out} is up to date (same sketches and config)")
        return read_json(job.out / wd.METRICS_FILE, "metrics file")
    wd.remember(workdir, cfg)
    with output_lock(job.out) if main else nullcontext(), wd.repair_hint(cfg, workdir):
        dist = Dist("cpu")  # a few linear layers: the CPU, gloo
        try:
            metrics = _run(job, dist, progress, log if dist.main else (lambda *_a, **_k: None))
        finally:
            dist.close()
    if table and main:
        log(summary_table(job.workdir, metrics, job.cfg.fusion.output))
    return metrics


def _run(job: FuseJob, dist: Dist, progress: bool, say) -> dict:
    started = time.perf_counter()
    shares = _shares(job.parts, dist.rank, dist.world)
    mine = np.unique(np.concatenate(list(shares.values())))  # split rows whose sketches this rank reads
    sketches = _load_sketches(job, job.ids[mine])
    local = {name: np.searchsorted(mine, rows) for name, rows in shares.items()}  # rows of `sketches`
    joint = job.cfg.fusion.method == "joint"
    state = find_resume(job.out, job.stamp.without("epochs").digest, job.cfg.fusion.epochs, "fuse", say) \
        if joint else None
    dist.barrier()  # every rank has read the resume file before rank 0 touches the directory
    with run_dir(job.out, state, dist.main) as partial:
        if joint:
            readers = SketchReader.of(sketches, job, mine, local, dist.rank)
            model, best = _train(job, dist, readers, partial, state, progress, say)
        else:
            model, best = _pretrained_heads(job, sketches, say)
        valid_pred = _gathered(dist, _logits(model, sketches, local["valid"]).argmax(-1))  # (len(parts["valid"]),)
        test_logits = _gathered(dist, _logits(model, sketches, local["test"]))  # (len(parts["test"]), classes)
        valid_labels = job.labels[job.parts["valid"]]
        support = np.bincount(valid_labels, minlength=len(job.codes))
        metrics = classification_metrics(valid_labels, valid_pred, job.codes) | best | {
            "method": job.cfg.fusion.method, "epochs": job.cfg.fusion.epochs if joint else 0,
            "seconds": round(time.perf_counter() - started, 2), "heads": [h.model_dump() for h in job.cfg.fusion.heads],
            "valid_items": len(job.parts["valid"]), "test_items": len(job.parts["test"]), "world_size": dist.world,
            "fingerprint": job.stamp.digest, "valid_support": {str(c): int(n) for c, n in zip(job.codes, support) if n}}
        if dist.main:
            _write(job, partial, model, {m: s.shape[1] for m, s in sketches.items()}, valid_pred, test_logits, metrics)
    say(f"fuse: valid macro-F1 {metrics['macro_f1']:.4f} (best epoch {metrics['best_epoch']}) -> {job.out}")
    dist.barrier()  # every rank returns once the outputs are written
    return metrics


class SketchReader:
    """Batches of sketches held in memory, for `trainer.train`: rows `rows` of `sketches` ({modality: (n, width)}),
    in batches of `batch_size`, shuffled per epoch as a function of (seed, epoch, rank) only, so that a resumed
    run draws the batches an uninterrupted one would."""

    def __init__(self, sketches: dict[str, torch.Tensor], labels: np.ndarray, ids: np.ndarray, rows: np.ndarray,
                 batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0):
        self.sketches, self.labels, self.ids, self.rows = sketches, labels, ids, rows
        self.batch_size, self.shuffle, self.seed, self.rank = batch_size, shuffle, seed, rank

    @classmethod
    def of(cls, sketches: dict, job: FuseJob, mine: np.ndarray, local: dict,
           rank: int) -> tuple[SketchReader, SketchReader]:
        """This rank's train and valid readers (`mine`: the split rows of `sketches`; `local`: each part's rows)."""
        opts = job.cfg.fusion
        labels, ids = job.labels[mine], job.ids[mine]
        return (cls(sketches, labels, ids, local["train"], opts.batch_size, True, job.cfg.seed, rank),
                cls(sketches, labels, ids, local["valid"], opts.batch_size, False))

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        rows = np.random.default_rng([self.seed, epoch, self.rank]).permutation(self.rows) if self.shuffle \
            else self.rows
        for i in range(0, len(rows), self.batch_size):
            r = rows[i : i + self.batch_size]
            yield Batch(({m: s[r] for m, s in self.sketches.items()},), torch.from_numpy(self.labels[r]),
                        torch.from_numpy(self.ids[r]))


def _train(job: FuseJob, dist: Dist, readers: tuple[SketchReader, SketchReader], partial: Path,
           state: checkpoint.ResumeState | None, progress: bool, say) -> tuple[FusionHeads, dict]:
    """Train the heads on this rank's share (DDP under torchrun) with `trainer.train`: the best epoch by the
    gathered validation macro-F1, resumable after every epoch."""
    opts = job.cfg.fusion
    torch.manual_seed(job.cfg.seed)  # the same initial heads on every rank
    model = FusionHeads([h.model_dump() for h in opts.heads], {m: s.shape[1] for m, s in readers[0].sketches.items()},
                        len(job.codes))
    if dist.active:
        say(f"fuse: {dist.world} processes (DistributedDataParallel, gloo), {len(readers[0].rows)} of "
            f"{len(job.parts['train'])} train items per rank")
    run = RunSettings("fuse", opts.epochs, opts.lr, opts.decay, stamp=job.stamp.without("epochs").digest)
    weights = class_weights(job.labels[job.parts["train"]], len(job.codes), opts.loss)
    done = train(model, *readers, run, dist, job.codes, weights, partial / wd.RESUME_FILE, state, say, progress)
    model.load_state_dict(done.best_state)
    return model, {"best_epoch": done.best_epoch, "history": done.history}


def _pretrained_heads(job: FuseJob, sketches: dict, say) -> tuple[FusionHeads, dict]:
    """`method = "average"`: each head is its modality's pretrained head (no training)."""
    model = FusionHeads([h.model_dump() for h in job.cfg.fusion.heads], {m: s.shape[1] for m, s in sketches.items()},
                        len(job.codes), "average")
    for name, (modality,) in model.heads:
        again = wd.command(job.cfg, job.workdir, f"pretrain {modality}")
        ckpt = checkpoint.load_model(wd.model_path(job.workdir, modality), again)
        if [int(c) for c in ckpt.class_codes] != list(job.codes):
            raise PipelineError(f"{wd.model_path(job.workdir, modality)} was trained on other classes than the "
                                f"split's: run `{again}` again")
        model.linears[name].load_state_dict(ckpt.head())
    say(f"fuse: the mean of {len(model.heads)} pretrained heads' probabilities")
    return model, {"best_epoch": 0}


def _write(job: FuseJob, out: Path, model: FusionHeads, dims: dict, valid_pred: np.ndarray, test_logits: np.ndarray,
           metrics: dict) -> None:
    """Every output into the run's directory (stamp last; `run_dir` swaps it in)."""
    code_of = np.array(job.codes)
    test_ids = job.ids[job.parts["test"]]
    write_submission(out / "predictions.csv", test_ids, code_of[test_logits.argmax(-1)])
    test_probs = torch.softmax(torch.from_numpy(test_logits), dim=-1).numpy()  # (test items, classes)
    write_parquet(probabilities_table(test_ids, test_probs, job.codes), out / "predictions.parquet")
    valid_labels = job.labels[job.parts["valid"]]
    pl.DataFrame({"item_id": job.ids[job.parts["valid"]], "label": code_of[valid_labels],
                  "predicted": code_of[valid_pred]}).write_csv(out / "valid_predictions.csv")
    save_pictures(out, valid_labels, valid_pred, job.codes, metrics, job.cfg.fusion.worst_classes)
    checkpoint.save(checkpoint.FusionCheckpoint(
        state_dict=model.state_dict(), heads=[h.model_dump() for h in job.cfg.fusion.heads], codes=job.codes,
        dims=dims, checkpoints=job.checkpoints, method=model.method), out / wd.MODEL_FILE)
    write_json(out / wd.METRICS_FILE, metrics)
    job.stamp.write(out)


def summary_table(workdir: Path, fused: dict, output: str = "fusion", data: str = "this catalogue") -> str:
    """This run (on `data`) beside the paper's full-data figures: validation macro-F1 of every modality (Table 3)
    and of the fusion (Table 2's row for its ablations' outputs, none for a system the paper does not score)."""
    rows = [("modality", f"this run ({data})", "paper (full Rakuten data, 84,916 items)")]
    for m in registry.names():
        path = wd.metrics_path(workdir, m)
        if path.exists():
            paper = f"{100 * PAPER_TABLE3[m]:.2f} (Table 3)" if m in PAPER_TABLE3 else "-"
            rows.append((m, f"{100 * read_json(path, 'metrics file')['macro_f1']:.2f}", paper))
    paper = f"{100 * PAPER_TABLE2[output]:.2f} (Table 2)" if output in PAPER_TABLE2 else "-"
    rows.append((f"fused ({output})", f"{100 * fused['macro_f1']:.2f}", paper))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    return "validation macro-F1 (%)\n" + "\n".join(lines)
