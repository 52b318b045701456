"""Checkpoints: a trained network as data (tensors, numbers, strings), never as code.

A modality's `model.pt` holds its model config (the encoder, as its registry record describes it, the
EMDE coder and the number of classes), the best weights and what they were trained on; `build_model`
rebuilds the network from the config alone. The fusion heads' `model.pt` holds theirs. Every
checkpoint is loaded with `torch.load(weights_only=True)`: a file that would need to unpickle an object
(and so could run code) is refused in one line, so a work directory received from someone else is safe
to open.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from pipeline import modalities
from pipeline.emde import DifferentiableEMDECoder, StaticEMDE
from pipeline.encoders import ModalityClassifier
from pipeline.errors import PipelineError
from pipeline.provenance import write_bytes

FORMAT = 2
MODEL_FILE = "model.pt"
RESUME_FILE = "last.pt"


class CheckpointError(PipelineError):
    """A checkpoint that is missing, damaged, or not made only of data."""


def model_config(modality: str, opts, spec, producer: dict, num_classes: int, seed: int) -> dict:
    """What `build_model` needs to rebuild a modality's network (saved in its checkpoint)."""
    emde = {"depth": opts.depth, "width": opts.width}
    emde |= {"inner_dim": opts.inner_dim} if opts.coder == "trainable" else {"seed": seed}
    return {"modality": modality, "coder": opts.coder, "encoder": modalities.get(modality).encoder(opts, spec, producer),
            "emde": emde, "num_classes": num_classes}


def build_model(config: dict) -> ModalityClassifier:
    """The network a model config describes: encoder -> EMDE coder -> linear head (paper 3.4)."""
    encoder = modalities.get(config["modality"]).build_encoder(config["encoder"])
    emde = config["emde"]
    if config["coder"] == "trainable":
        coder = DifferentiableEMDECoder(encoder.output_dim, depth=emde["depth"], width=emde["width"],
                                        inner_dim=emde["inner_dim"])
    else:
        coder = StaticEMDE(encoder.output_dim, depth=emde["depth"], width=emde["width"], seed=emde["seed"])
    return ModalityClassifier(encoder, coder, config["num_classes"])


def save(obj: dict, path: str | Path) -> None:
    """torch.save, atomically: a reader never sees half a checkpoint (and a full disk is one OSError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint's contents, loaded as data only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused: it holds Python objects, not only tensors and plain values "
                              f"({first[:160]}); only load checkpoints this pipeline wrote") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}); train it again") from None


def load_model(path: str | Path, map_location="cpu") -> tuple[ModalityClassifier, dict]:
    """(model in eval mode with the best weights, checkpoint dict) from W/models/<modality>[/model.pt]."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no pretrained model; run `pipeline pretrain {path.parent.name} "
                              f"--workdir {path.parent.parent.parent}` first")
    ckpt = load(path, map_location)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
