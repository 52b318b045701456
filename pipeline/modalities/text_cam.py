"""title_cam and desc_cam (paper 3.3-3.4): the text model's token states, then an n-gram CNN.

The features are the token states of a local Hugging Face text model (CamemBERT-base in the paper;
`[text_model]`), computed by `pipeline.modalities.camembert`: titles whole, descriptions cleaned of HTML
and cut (`[desc_cam]`). Over a store of a lower layer (`[text_model] layers`), `tune_layers = k` makes
the network fine-tune the text model's k layers above it first (`encoders.TextTail`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import registry
from pipeline.errors import PipelineError
from pipeline.schema import NonNegative, PositiveFloat, PowerOfTwo, Section, TextTrainOptions

if TYPE_CHECKING:
    from torch import nn

    from pipeline.extractor import ExtractContext, Extractor, Resources
    from stores import ArraySpec


class TextCamOptions(Section):
    """[title_cam] / [desc_cam] (paper 3.3-3.4): which text, cleaned or not, cut or not."""

    block_items: PowerOfTwo | None = None  # None: [stores] block_items
    clean_html: bool
    max_chars: NonNegative  # 0 = whole text


class TextCamTrainOptions(TextTrainOptions):
    """[pretrain.title_cam] / [pretrain.desc_cam]: the n-gram CNN, optionally over the text model's top layers."""

    tune_layers: NonNegative  # 0: the stored features as they are; k: the k layers above the stored one, fine-tuned
    backbone_lr: PositiveFloat  # the fine-tuned layers' rate; the CNN, coder and head train at lr


def _extractor(name: str, field: str):
    def make(ctx: ExtractContext) -> Extractor:
        from pipeline.modalities.camembert import CamembertTokens

        opts = ctx.options
        return CamembertTokens(name, field, ctx.resources.text_model(), opts.clean_html, opts.max_chars,
                               ctx.text_model, ctx.device)
    return make


def _encoder(opts: TextCamTrainOptions, spec: ArraySpec, producer: dict) -> dict:
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


def _init(encoder: nn.Module, resources: Resources, producer: dict) -> None:
    """Fine-tuned layers start as the text model's own layers above the stored one (the extractor's weights)."""
    from pipeline.encoders import TextTail
    from pipeline.modalities.camembert import model_layers

    if isinstance(encoder, TextTail):
        encoder.tail.load_state_dict(model_layers(resources.text_model(), producer, encoder.first, encoder.count))


registry.register(registry.Modality("title_cam", array="tokens", batch="tokens", options=TextCamOptions,
                                    train_options=TextCamTrainOptions, extractor=_extractor("title_cam", "title"),
                                    encoder=_encoder, init_encoder=_init, upstream="text"))
registry.register(registry.Modality("desc_cam", array="tokens", batch="tokens", options=TextCamOptions,
                                    train_options=TextCamTrainOptions,
                                    extractor=_extractor("desc_cam", "description"), encoder=_encoder,
                                    init_encoder=_init, upstream="text"))
