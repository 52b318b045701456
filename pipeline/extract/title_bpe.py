"""title_bpe (paper 3.3): titles as they are, byte-pair encoded with a 2000-code vocabulary.

The SentencePiece BPE model is trained once on the titles of the train split and kept in
W/tokenizers/title_bpe.model, so that items added later get ids from the same vocabulary; its
sha256 is in the store's provenance. Each item's ids are stored whole (titles are never cut).
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
from pipeline.provenance import atomic_path, sha256_file
from stores import ArraySpec, fingerprint, store_lock

TRAINED_WITH = ("vocab_size", "character_coverage", "max_sentence_length")


def _trained(model_dir: Path, options: dict, rebuild_hint: str) -> Path | None:
    """The tokenizer in `model_dir` if one was trained with `options`; a StaleStoreError if with others."""
    model_path, meta_path = model_dir / "title_bpe.model", model_dir / "title_bpe.json"
    if not (model_path.exists() and meta_path.exists()):
        return None
    try:
        trained_with = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise PipelineError(f"{meta_path}: damaged tokenizer record; train the tokenizer and its store again with "
                            f"`{rebuild_hint or 'pipeline extract title_bpe ... --rebuild'}`") from None
    if trained_with != options:
        raise StaleStoreError(f"{model_path} was trained with {trained_with}, the config asks for "
                              f"{options}; rebuild with `{rebuild_hint}`")
    return model_path


def train_tokenizer(titles: list[str] | None, model_dir: Path, opts, rebuild: bool = False,
                    rebuild_hint: str = "") -> Path:
    """Train the BPE model on `titles`, or reuse the one in `model_dir` trained with the same options.

    Under a lock: workers started together (torchrun, --shard K/N) train it once, the first one, and the
    others reuse it. A tokenizer that is there already is used without the lock (read-only work dirs).
    """
    model_dir = Path(model_dir)
    options = {k: getattr(opts, k) for k in TRAINED_WITH}
    if not rebuild and (found := _trained(model_dir, options, rebuild_hint)) is not None:
        return found
    if titles is None:
        raise PipelineError(f"{model_dir / 'title_bpe.model'}: no title_bpe tokenizer trained with {options}; "
                            "run `pipeline extract title_bpe` on the training catalogue first")
    with store_lock(model_dir / "title_bpe.model"):
        if rebuild:
            for f in model_dir.glob("title_bpe.*"):
                f.unlink()
        return _trained(model_dir, options, rebuild_hint) or _train(titles, model_dir, opts, options)


def _train(titles: list[str], model_dir: Path, opts, options: dict) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "title_bpe.tmp"
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
        if shutil.disk_usage(model_dir).free < 1 << 20:  # ... or could not write its files
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(model_dir)) from None
        settings = ", ".join(f"{k} = {v}" for k, v in options.items())
        raise PipelineError(f"{model_dir / 'title_bpe.model'}: SentencePiece cannot learn a BPE from the "
                            f"{len(titles)} non-empty train titles with [title_bpe] {settings} "
                            f"({str(err).strip().splitlines()[0]})") from None
    for suffix in (".model", ".vocab"):
        shutil.move(f"{tmp}{suffix}", model_dir / f"title_bpe{suffix}")
    with atomic_path(model_dir / "title_bpe.json") as meta:  # last: it marks the tokenizer complete
        meta.write_text(json.dumps(options))
    return model_dir / "title_bpe.model"


class TitleBpe:
    """Extractor for the title_bpe store: one ragged int16 array `tokens` of BPE ids per item."""

    name = "title_bpe"

    def __init__(self, model_path: Path, opts, rebuild_hint: str = ""):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as err:
            raise PipelineError(f"{model_path}: damaged SentencePiece model ({str(err).strip().splitlines()[0][:120]});"
                                f" train the tokenizer and its store again with "
                                f"`{rebuild_hint or 'pipeline extract title_bpe ... --rebuild'}`") from None
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
