"""title_bpe (paper 3.3): titles as they are, byte-pair encoded with a 2000-code vocabulary.

The features are the ids of a SentencePiece BPE trained once on the train split's titles
(`pipeline.modalities.bpe`); the network is a learned embedding of the ids, then the n-gram CNN (or, for the
static coder, a fixed random embedding).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import registry
from pipeline.errors import PipelineError
from pipeline.schema import Positive, PowerOfTwo, Section, TextTrainOptions

if TYPE_CHECKING:
    from pipeline.extractor import ExtractContext, Extractor
    from stores import ArraySpec


class TitleBpeOptions(Section):
    """[title_bpe] (paper 3.3): titles as they are, a SentencePiece BPE of `vocab_size` codes."""

    block_items: PowerOfTwo | None = None  # None: [stores] block_items
    vocab_size: Positive
    character_coverage: float
    max_sentence_length: Positive
    threads: Positive


class BpeTrainOptions(TextTrainOptions):
    """[pretrain.title_bpe]: a learned embedding of the BPE ids, then the n-gram CNN."""

    embed_dim: Positive
    static_embed_dim: Positive  # the static baseline's fixed random embedding of the BPE ids


def _extractor(ctx: ExtractContext) -> Extractor:
    from pipeline.modalities.bpe import TitleBpe, train_tokenizer

    titles = None if ctx.train_items is None else ctx.train_items["title"].to_list()
    model = train_tokenizer(titles, ctx.resources.bpe_model, ctx.options, ctx.rebuild, ctx.rebuild_hint)
    return TitleBpe(model, ctx.options, ctx.rebuild_hint)


def _encoder(opts: BpeTrainOptions, spec: ArraySpec, producer: dict) -> dict:
    vocab = int(producer.get("vocab_size") or 0)
    if vocab <= 0:
        raise PipelineError("the title_bpe store's provenance has no vocab_size; rebuild it with "
                            "`pipeline extract title_bpe --rebuild`")
    if opts.coder == "static":
        kind = "RandomIdEmbedding" if opts.static_pooling == "tokens" else "RandomBagOfIds"
        return {"type": kind, "vocab_size": vocab, "embed_dim": opts.static_embed_dim}
    return {"type": "BpeCNN", "vocab_size": vocab, "embed_dim": opts.embed_dim, "kernel_sizes": opts.kernel_sizes,
            "channels": opts.channels, "dropout": opts.dropout, "token_dropout": opts.token_dropout}


registry.register(registry.Modality("title_bpe", array="tokens", batch="ids", options=TitleBpeOptions,
                                    train_options=BpeTrainOptions, extractor=_extractor, encoder=_encoder))
