"""The image backbone cut in two at a named module: what extraction caches, and what pretraining fine-tunes.

A timm EfficientNet's ``forward_features`` is ``conv_stem -> bn1 -> blocks.0 -> ... -> blocks.N -> conv_head
-> bn2``. `split(model, cache_at)` cuts it just before the module ``cache_at`` (``[image] cache_at``, e.g.
"blocks.6"): the *head* computes that module's input, which the extract stage stores instead of the final
maps, and the *tail* turns it into the final maps, fine-tuned in pretraining (paper 3.3 fine-tunes
EfficientNet; the tail costs a fraction of a full forward per step). Head and tail are `nn.Sequential`s of the
model's own modules, so `tail(head(x))` is ``forward_features(x)``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import PipelineError


def steps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``forward_features`` of a timm EfficientNet as (name, module) steps, each stage of ``blocks`` its own."""
    parts = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    if not all(hasattr(model, p) for p in parts):
        raise PipelineError(f"[image] cache_at: {type(model).__name__} is not an EfficientNet-like timm model "
                            f"(conv_stem, bn1, blocks, conv_head, bn2); leave cache_at empty for it")
    return ([("conv_stem", model.conv_stem), ("bn1", model.bn1)]
            + [(f"blocks.{i}", stage) for i, stage in enumerate(model.blocks)]
            + [("conv_head", model.conv_head), ("bn2", model.bn2)])


def split(model: nn.Module, cache_at: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(head, tail): ``head(x)`` is the input of the module ``cache_at``, ``tail(head(x)) == forward_features(x)``."""
    seq = steps(model)
    names = [name for name, _ in seq]
    if cache_at not in names[1:]:  # cutting before conv_stem would cache the photo itself
        raise PipelineError(f"[image] cache_at = {cache_at!r} is not a module of {type(model).__name__}'s "
                            f"forward_features: use one of {', '.join(names[1:])} (or \"\" for the final maps)")
    k = names.index(cache_at)

    def sequential(part):
        return nn.Sequential(OrderedDict((name.replace(".", "_"), module) for name, module in part))
    return sequential(seq[:k]), sequential(seq[k:])


def features_until(model: nn.Module, cache_at: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """What extraction stores: ``forward_features`` (cache_at "") or the input of the module ``cache_at``."""
    return split(model, cache_at)[0] if cache_at else model.forward_features


def build_tail(model_name: str, cache_at: str) -> tuple[nn.Sequential, int]:
    """The tail of a freshly built (randomly initialised) timm ``model_name`` cut at ``cache_at``, and the number
    of channels of its output (the final maps). Its weights come from a checkpoint or from `pretrained_tail`."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    return split(model, cache_at)[1], int(model.num_features)


def pretrained_tail(model_name: str, cache_at: str, weights) -> nn.Sequential:
    """The tail of ``model_name`` cut at ``cache_at`` with the weights of the file ``weights`` (loaded as the
    extractor loads them, so the tail continues exactly the head that computed the cache)."""
    from pipeline.weights.image import load_image_backbone

    return split(load_image_backbone(model_name, weights), cache_at)[1]
