"""Checkpoints: trained networks as data (tensors, numbers, strings), never as code, in three records.

* `ModelCheckpoint` -- W/models/<modality>/model.pt: a pretrained network (its model config, which
  `build_model` rebuilds it from, the best epoch's weights, the class codes, what it was trained on);
* `FusionCheckpoint` -- the fusion heads' model.pt, with the sha256 of every modality model it reads;
* `ResumeState` -- last.pt: everything an interrupted training run needs to go on.

They are written and read here only. Every file is loaded with `torch.load(weights_only=True)`, so a file
that would need to unpickle an object (and so could run code) is refused in one line, and each carries
the sha256 of every tensor it holds, checked on load: a flipped bit is refused, never computed with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

import pipeline.modalities  # noqa: F401  (the paper's four records, which rebuild their networks)
from pipeline import registry, workdir as wd
from pipeline.emde import DifferentiableEMDECoder, StaticEMDE
from pipeline.encoders import ModalityClassifier, build_encoder
from pipeline.errors import PipelineError
from pipeline.heads import FusionHeads
from pipeline.provenance import Stamp, write_bytes
from stores import ArraySpec

FORMAT = 3  # 3: every tensor checksummed; 2 (no checksums) still loads


class CheckpointError(PipelineError):
    """A checkpoint that is missing, damaged, or not made only of data."""


# ---------------------------------------------------------------------- the networks
def model_config(modality: str, opts, spec: ArraySpec, producer: dict, num_classes: int, seed: int) -> dict:
    """What `build_model` needs to rebuild a modality's network (saved in its checkpoint)."""
    emde = {"depth": opts.depth, "width": opts.width}
    emde |= {"inner_dim": opts.inner_dim} if opts.coder == "trainable" else \
        {"seed": seed, "quantile_range": list(opts.static_quantiles)}
    return {"modality": modality, "coder": opts.coder, "encoder": registry.get(modality).encoder(opts, spec, producer),
            "emde": emde, "num_classes": num_classes}


def build_model(config: dict) -> ModalityClassifier:
    """The network a model config describes: encoder -> EMDE coder -> linear head (paper 3.4)."""
    build = registry.get(config["modality"]).build_encoder or build_encoder
    encoder = build(config["encoder"])
    emde = config["emde"]
    if config["coder"] == "trainable":
        coder = DifferentiableEMDECoder(encoder.output_dim, depth=emde["depth"], width=emde["width"],
                                        inner_dim=emde["inner_dim"])
    else:
        # (checkpoints older than the quantile range's key hold a fitted coder: it is never fitted again)
        coder = StaticEMDE(encoder.output_dim, depth=emde["depth"], width=emde["width"], seed=emde["seed"],
                           quantile_range=emde.get("quantile_range"))
    return ModalityClassifier(encoder, coder, config["num_classes"])


# ---------------------------------------------------------------------- the three records
@dataclass
class ModelCheckpoint:
    """A pretrained modality network: W/models/<modality>/model.pt."""

    modality: str
    coder: str
    model_config: dict
    state_dict: dict
    class_codes: list[int]
    store: dict  # the feature store it was trained on: {"path", "provenance"}
    train_config: dict  # its [pretrain.<modality>] table
    fingerprint: str  # the digest of the pretrain stamp
    best_epoch: int
    macro_f1: float
    max_tokens: int = 0  # tokens of an item the network reads ([train_reader] max_tokens)
    sha256: str = field(default="", compare=False)  # of the file it was read from (not saved)

    def trained_on(self, producer: dict) -> bool:
        """Whether features of this producer are those the network was trained on (the oldest checkpoints did
        not record theirs: then yes)."""
        theirs = self.store.get("provenance", {}).get("producer")
        return theirs is None or not Stamp("features", producer).changed(theirs)

    @property
    def array_spec(self) -> ArraySpec:
        """The spec of the store array the network reads (what its inputs look like)."""
        arrays = self.store["provenance"]["layout"]["arrays"]
        return ArraySpec.from_json(arrays[registry.get(self.modality).array])

    def head(self) -> dict:
        """The linear head's weights ({"weight", "bias"}): a pretrained head, reused by averaging fusion."""
        return {"weight": self.state_dict["head.weight"], "bias": self.state_dict["head.bias"]}

    def network(self) -> ModalityClassifier:
        """The network with these weights, in eval mode."""
        model = build_model(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class FusionCheckpoint:
    """The fusion heads: <[fusion] output>/model.pt."""

    state_dict: dict
    heads: list[dict]  # [fusion] heads
    codes: list[int]
    dims: dict[str, int]  # modality -> sketch width
    checkpoints: dict[str, str]  # modality -> sha256 of the model.pt whose sketches the heads were trained on
    method: str = "joint"  # "joint" | "average"
    sha256: str = field(default="", compare=False)

    def network(self) -> FusionHeads:
        heads = FusionHeads(self.heads, self.dims, len(self.codes), self.method)
        heads.load_state_dict(self.state_dict)
        return heads.eval()

    def check(self, modality: str, model: ModelCheckpoint, path: Path, again: str) -> None:
        """Refuse a modality model that is not the one these heads were trained over (retrained since); `again`
        names the commands that sketch and fuse anew."""
        if model.sha256 != self.checkpoints[modality]:
            raise CheckpointError(f"{path} is not the {modality} model the fusion was trained over (its sha256 "
                                  f"differs from the one the fusion recorded: retrained since?); {again}")


@dataclass
class ResumeState:
    """An interrupted (or finished, to be continued) training run: last.pt."""

    stamp: str  # the digest a run must carry to resume from it
    progress: dict  # trainer.RunState's fields
    model: dict
    optimizer: dict
    scheduler: dict
    rng: list  # every rank's RNG states


KINDS = {"model": ModelCheckpoint, "fusion": FusionCheckpoint, "resume": ResumeState}


# ---------------------------------------------------------------------- writing and reading
def _tensors(obj, prefix: str = ""):
    """(path, tensor) of every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _checksums(obj) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes."""
    out = {}
    for name, t in _tensors(obj):
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def save(record: ModelCheckpoint | FusionCheckpoint | ResumeState, path: str | Path) -> None:
    """The record as a torch file, written atomically (a reader never sees half a checkpoint)."""
    kind = next(k for k, cls in KINDS.items() if isinstance(record, cls))
    data = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "sha256"}
    blob = {"format": FORMAT, "kind": kind, **data, "checksums": _checksums(data)}
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    write_bytes(path, buffer.getvalue())  # atomically (a reader never sees half a checkpoint); a full disk: OSError


def _read(path: Path) -> tuple[dict, str]:
    """A checkpoint file's contents, loaded as data only, and the sha256 of its bytes."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    data = path.read_bytes()
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused: it holds Python objects, not only tensors and plain values "
                              f"({first[:160]}); only load checkpoints this pipeline wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__})") from None
    return blob, hashlib.sha256(data).hexdigest()


def load(path: str | Path, kind: str, hint: str = ""):
    """The `kind` record ("model", "fusion", "resume") in `path`; `hint` (the command that writes it again)
    ends the one line that refuses a damaged, foreign or unreadable file."""
    path = Path(path)
    again = f"; write it again with `{hint}`" if hint else ""
    try:
        blob, sha = _read(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{again}") from None
    cls = KINDS[kind]
    fields = {f.name for f in dataclasses.fields(cls)} - {"sha256"}
    if not isinstance(blob, dict) or not blob.keys() >= {f.name for f in dataclasses.fields(cls)
                                                         if f.default is dataclasses.MISSING}:
        raise CheckpointError(f"{path}: not a {kind} checkpoint of this pipeline{again}")
    if blob.get("format", 2) >= 3:
        theirs, ours = blob.get("checksums", {}), _checksums({k: blob[k] for k in fields if k in blob})
        bad = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if bad:
            which = f"tensor '{bad[0]}' no longer matches its" if len(bad) == 1 else \
                f"{len(bad)} tensors ('{bad[0]}', ...) no longer match their"
            raise CheckpointError(f"{path}: damaged checkpoint: {which} checksum{again}")
    record = cls(**{k: blob[k] for k in fields if k in blob})
    if "sha256" in {f.name for f in dataclasses.fields(cls)}:
        record.sha256 = sha
    return record


def load_model(path: str | Path, hint: str = "") -> ModelCheckpoint:
    """A modality's checkpoint (W/models/<modality>/model.pt, or that folder); `hint`: the command that trains it
    (default: `pipeline pretrain MODALITY --workdir W` from the path)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / wd.MODEL_FILE
    hint = hint or f"pipeline pretrain {path.parent.name} --workdir {path.parent.parent.parent}"
    if not path.is_file():
        raise CheckpointError(f"{path}: no pretrained model; run `{hint}` first")
    return load(path, "model", hint)


def load_fused(workdir, cfg) -> tuple[FusionCheckpoint, dict[str, ModelCheckpoint]]:
    """W's fusion heads and every modality model they read, each refused unless it is the model the fusion was
    trained over (the sha256 it recorded)."""
    path = wd.fusion_path(workdir, cfg)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: train the work directory first, "
                              f"`{wd.command(cfg, workdir, 'train', catalog=True)}`")
    fusion = load(path, "fusion", wd.command(cfg, workdir, "fuse"))
    models = {}
    for name in fusion.checkpoints:
        models[name] = load_model(wd.model_path(workdir, name), wd.command(cfg, workdir, f"pretrain {name}"))
        fusion.check(name, models[name], wd.model_path(workdir, name), wd.refit(cfg, workdir, name))
    return fusion, models
