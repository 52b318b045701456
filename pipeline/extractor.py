"""What a modality's extractor is, and what it is given: the contract between a record and the store filler.

An `Extractor` computes one modality's features block by block; `pipeline.fill` does the rest (layout,
resume, shards, stale caches). It is built from an `ExtractContext`: its typed `[<name>]` options, the
`[text_model]` settings, the device, and the upstream files it may need (`Resources`), resolved by the
stage that builds it, so that no record reads a work directory or a config itself.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    import torch

    from pipeline.schema import Section, TextModel
    from stores import ArraySpec


class Extractor(Protocol):
    """Computes one modality's features, block by block.

    Building one is cheap: `producer` comes from files (hashes, config files) and the model is loaded on first
    use (`arrays` may load it; `fingerprints` never does), so a stage with nothing to do loads none."""

    name: str
    arrays: dict[str, ArraySpec]  # the arrays it writes
    producer: dict  # model, weights and tokenizer sha256, settings: what the features depend on

    def load(self) -> Any: ...  # its model now, not on first use (a predictor is ready once loaded)

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray: ...  # (n,) uint64: each item's input

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]: ...  # tokens per item of ragged arrays

    def prepare(self, items: pl.DataFrame) -> Any: ...  # CPU work (tokenising, decoding), one block ahead

    def compute(self, prepared) -> tuple[dict[str, np.ndarray], np.ndarray | None]: ...  # (arrays, missing)


@dataclass(frozen=True)
class Resources:
    """The upstream files of a work directory, each resolved on first use: a tiny text model is built and
    packaged image weights are converted only when a modality asks for them."""

    text_model: Callable[[], Path]  # a Hugging Face directory
    image_weights: Callable[[], Path | None]  # a weights file (None: random weights, benchmarks only)
    bpe_model: Path  # title_bpe's SentencePiece model (trained there on first use)


@dataclass(frozen=True)
class ExtractContext:
    """What an extractor is built from. `train_items` is the train split (what a tokenizer learns from);
    None when predicting: then what it learned must already be in the work directory."""

    options: Section  # the modality's [<name>] table
    text_model: TextModel  # [text_model]
    resources: Resources
    device: torch.device
    train_items: pl.DataFrame | None = None
    rebuild: bool = False
    rebuild_hint: str = ""


class LoadedOnce:
    """What `build()` returns, built on the first call and kept (an extractor's model: built by the first block that
    needs it, in whichever thread that is, and never by a run with nothing to do)."""

    def __init__(self, build: Callable[[], Any]):
        self._build, self._value, self._lock = build, None, threading.Lock()

    def __call__(self):
        with self._lock:
            if self._value is None:
                self._value = self._build()
        return self._value
