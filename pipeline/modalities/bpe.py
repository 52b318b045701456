"""The title_bpe extractor: a SentencePiece BPE trained once on the train split's titles, each title's ids.

The model is kept in W/tokenizers/title_bpe.model (its settings in title_bpe.json beside it), so that items
added later get ids from the same vocabulary; its sha256 is in the store's provenance. Each item's ids are
stored whole (titles are never cut).
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import sentencepiece as spm

from pipeline.errors import PipelineError, StaleStoreError
from pipeline.provenance import Stamp, atomic_path, sha256_file
from pipeline.schema import Section
from stores import ArraySpec, fingerprint, store_lock

TRAINED_WITH = ("vocab_size", "character_coverage", "max_sentence_length")  # of `opts`: [title_bpe]


def _retrain(rebuild_hint: str) -> str:
    return f"train the tokenizer and its store again with `{rebuild_hint or 'pipeline extract title_bpe ... --rebuild'}`"


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


def train_tokenizer(titles: list[str] | None, model_path: Path, opts: Section, rebuild: bool = False,
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


def _train(titles: list[str], model_path: Path, opts: Section, options: dict) -> Path:
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

    def __init__(self, model_path: Path, opts: Section, rebuild_hint: str = ""):
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

    def load(self):
        return self.sp  # loaded when built: a SentencePiece model is small

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
