"""The modality registry: one `Modality` record per modality, registered by name.

A leaf: it imports no record and no stage. The paper's four records register themselves when
`pipeline.modalities` is imported (as timm's models do into timm's registry); `pipeline.config` imports
it, so every loaded config sees them. `register` adds another (tests/test_registry.py adds a toy one)
without editing any stage.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from torch import nn

    from pipeline.extractor import ExtractContext, Extractor, Resources
    from pipeline.schema import Section, TrainOptions
    from stores import ArraySpec


@dataclass(frozen=True)
class Modality:
    """Everything the stages know of a modality.

    name: the work-dir layout (features/<name>, models/<name>, sketches/<name>) and the config tables
      [<name>] (`options`: extraction) and [pretrain.<name>] (`train_options`: its network and run);
    array, batch: which array of its feature store the network reads, and how the reader batches it
      ("ids": ragged integer ids, "tokens": ragged float vectors, "fixed": one array per item);
    extractor(ctx): what computes the features of a block of items (pipeline.extractor.Extractor);
    encoder(opts, spec, producer): the encoder config of a network over this store (a dict, kept in the
      checkpoint); build_encoder(config): the nn.Module it describes (None: the pipeline.encoders class
      that the config's "type" names);
    init_encoder(encoder, resources, producer) (optional): what a new network's encoder starts from
      besides its random init (a fine-tuned tail: the upstream weights the extractor used);
    upstream: the upstream model its extractor runs, "text" ([text_model]) or "image" (its own table's
      `model` and `weights`), found before a run writes anything (pipeline.upstream); None: none.
    """

    name: str
    array: str
    batch: str  # "ids" | "tokens" | "fixed"
    options: type[Section]
    train_options: type[TrainOptions]
    extractor: Callable[[ExtractContext], Extractor]
    encoder: Callable[[TrainOptions, ArraySpec, dict], dict]
    build_encoder: Callable[[dict], nn.Module] | None = None
    init_encoder: Callable[[nn.Module, Resources, dict], None] | None = None
    upstream: str | None = None  # "text" | "image" | None


REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    if modality.batch not in ("ids", "tokens", "fixed"):
        raise ValueError(f"modality {modality.name}: batch must be ids, tokens or fixed, not {modality.batch!r}")
    if modality.upstream not in ("text", "image", None):
        raise ValueError(f"modality {modality.name}: upstream must be text, image or None, not {modality.upstream!r}")
    REGISTRY[modality.name] = modality
    return modality


def get(name: str) -> Modality:
    if name not in REGISTRY:
        raise PipelineError(f"unknown modality '{name}' (use one of {', '.join(REGISTRY)})")
    return REGISTRY[name]


def names() -> list[str]:
    """Every registered modality, in the order registered ("all" on the command line)."""
    return list(REGISTRY)
