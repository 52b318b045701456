"""title_bpe (paper 3.3): titles as they are, byte-pair encoded with a 2000-code vocabulary.

The SentencePiece BPE model is trained once on the titles of the train split and kept in
W/tokenizers/title_bpe.model, so that items added later get ids from the same vocabulary; its
sha256 is in the store's provenance. Each item's ids are stored whole (titles are never cut); the
network is a learned embedding of the ids, then the n-gram CNN (or, for the static coder, a fixed
random embedding).
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import sentencepiece as spm

from pipeline import registry
from pipeline.errors import PipelineError, StaleStoreError
from pipeline.provenance import Stamp, atomic_path, sha256_file
from pipeline.schema import Positive, PowerOfTwo, Section, TextTrainOptions
from stores import ArraySpec, fingerprint, store_lock

if TYPE_CHECKING:
    from pipeline.extractor import ExtractContext

TRAINED_WITH = ("vocab_size", "character_coverage", "max_sentence_length")


def _retrain(rebuild_hint: str) -> str:
    return f"train the tokenizer and its store again with `{rebuild_hint or 'pipeline extract title_bpe ... --rebuild'}`"


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


def _trained(model_path: Path, options: dict, rebuild_hint: str) -> Path | None:
    """The tokenizer at `model_path` if one was trained with `options`; a StaleStoreError if with others."""
    meta_path = model_path.with_suffix(".json")  # written last: the tokenizer is complete
    if not (model_path.exists() and meta_path.exists()):
        return None
    try:
        trained_with = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError):
        trained_with = None
    if not isinstance(trained_with, dict):
        raise PipelineError(f"{meta_path}: damaged tokenizer record; {_retrain(rebuild_hint)}")
    if Stamp("title_bpe tokenizer", options).changed(trained_with):
        raise StaleStoreError(f"{model_path} was trained with {trained_with}, the config asks for "
                              f"{options}; rebuild with `{rebuild_hint}`")
    return model_path


def train_tokenizer(titles: list[str] | None, model_path: Path, opts: TitleBpeOptions, rebuild: bool = False,
                    rebuild_hint: str = "") -> Path:
    """Train the BPE model on `titles` into `model_path`, or reuse the one there trained with the same options.

    Under a lock: workers started together (torchrun, --shard K/N) train it once, the first one, and the
    others reuse it. A tokenizer that is there already is used without the lock (read-only work dirs).
    """
    options = {k: getattr(opts, k) for k in TRAINED_WITH}
    if not rebuild and (found := _trained(model_path, options, rebuild_hint)) is not None:
        return found
    if titles is None:
        raise PipelineError(f"{model_path}: no title_bpe tokenizer trained with {options}; "
                            "run `pipeline extract title_bpe` on the training catalogue first")
    with store_lock(model_path):
        if rebuild:
            for f in model_path.parent.glob(f"{model_path.stem}.*"):
                f.unlink()
        return _trained(model_path, options, rebuild_hint) or _train(titles, model_path, opts, options)


def _train(titles: list[str], model_path: Path, opts: TitleBpeOptions, options: dict) -> Path:
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_suffix(".tmp")
    titles = [t for t in titles if t.strip()]
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(titles),
            model_prefix=str(tmp),
            model_type="bpe",
            vocab_size=options["vocab_size"],
            character_coverage=options["character_coverage"],
            max_sentence_length=options["max_sentence_length"],
            hard_vocab_limit=False,  # a small catalogue gets the codes it has, not an error
            num_threads=opts.threads,
            minloglevel=2,
        )
    except (RuntimeError, ValueError) as err:  # SentencePiece refuses a setting or the data (no title, ...)
        if shutil.disk_usage(model_path.parent).free < 1 << 20:  # ... or could not write its files
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(model_path.parent)) from None
        settings = ", ".join(f"{k} = {v}" for k, v in options.items())
        raise PipelineError(f"{model_path}: SentencePiece cannot learn a BPE from the "
                            f"{len(titles)} non-empty train titles with [title_bpe] {settings} "
                            f"({str(err).strip().splitlines()[0]})") from None
    for suffix in (".model", ".vocab"):
        shutil.move(f"{tmp}{suffix}", model_path.with_suffix(suffix))
    with atomic_path(model_path.with_suffix(".json")) as meta:  # last: it marks the tokenizer complete
        meta.write_text(json.dumps(options))
    return model_path


class TitleBpe:
    """Extractor for the title_bpe store: one ragged int16 array `tokens` of BPE ids per item."""

    name = "title_bpe"

    def __init__(self, model_path: Path, opts: TitleBpeOptions, rebuild_hint: str = ""):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as err:
            raise PipelineError(f"{model_path}: damaged SentencePiece model "
                                f"({str(err).strip().splitlines()[0][:120]}); {_retrain(rebuild_hint)}") from None
        self.threads = opts.threads
        vocab = self.sp.vocab_size()
        self.arrays = {"tokens": ArraySpec("int16" if vocab < 2**15 else "int32", (), ragged=True)}
        self.producer = {
            "model": "sentencepiece-bpe",
            "vocab_size": vocab,
            "tokenizer_sha256": sha256_file(model_path),
            "config": {k: getattr(opts, k) for k in TRAINED_WITH},
        }

    def _encode(self, items: pl.DataFrame) -> list[list[int]]:
        return self.sp.encode(items["title"].to_list(), num_threads=self.threads)

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray:
        return fingerprint(items["title"].to_list())

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]:
        return {"tokens": np.array([len(x) for x in self._encode(items)], dtype=np.int64)}

    def prepare(self, items: pl.DataFrame) -> list[list[int]]:
        return self._encode(items)

    def compute(self, ids: list[list[int]]) -> tuple[dict[str, np.ndarray], None]:
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.arrays["tokens"].dtype,
                           count=sum(map(len, ids)))
        return {"tokens": flat}, None


def _extractor(ctx: ExtractContext) -> TitleBpe:
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
