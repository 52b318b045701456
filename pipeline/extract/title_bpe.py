"""title_bpe (paper 3.3): titles as they are, byte-pair encoded with a 2000-code vocabulary.

The SentencePiece BPE model is trained once on the titles of the train split and kept in
W/tokenizers/title_bpe.model, so that items added later get ids from the same vocabulary; its
sha256 is in the store's provenance. Each item's ids are stored whole (titles are never cut).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import polars as pl
import sentencepiece as spm

from pipeline.extract.driver import StaleStoreError
from stores import ArraySpec, fingerprint, store_lock


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_tokenizer(titles: list[str], model_dir: Path, opts: dict, rebuild_hint: str) -> Path:
    """Train the BPE model on `titles`, or reuse the one in `model_dir` trained with the same options.

    Under a lock: workers started together (torchrun, --shard K/N) train it once, the first one,
    and the others reuse it (they would otherwise write the same tmp files at once).
    """
    with store_lock(Path(model_dir) / "title_bpe.model"):
        return _train_tokenizer(titles, Path(model_dir), opts, rebuild_hint)


def _train_tokenizer(titles: list[str], model_dir: Path, opts: dict, rebuild_hint: str) -> Path:
    model_path = model_dir / "title_bpe.model"
    meta_path = model_dir / "title_bpe.json"
    options = {k: opts[k] for k in ("vocab_size", "character_coverage", "max_sentence_length")}
    if model_path.exists() and meta_path.exists():
        trained_with = json.loads(meta_path.read_text())
        if trained_with != options:
            raise StaleStoreError(f"{model_path} was trained with {trained_with}, the config asks for "
                                  f"{options}; rebuild with `{rebuild_hint}`")
        return model_path
    model_dir.mkdir(parents=True, exist_ok=True)
    sentences = [t for t in titles if t.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(model_dir / "title_bpe.tmp"),
        model_type="bpe",
        vocab_size=options["vocab_size"],
        character_coverage=options["character_coverage"],
        max_sentence_length=options["max_sentence_length"],
        hard_vocab_limit=False,  # a small catalogue gets the codes it has, not an error
        num_threads=int(opts.get("threads", 1)),
        minloglevel=2,
    )
    for suffix in (".model", ".vocab"):
        (model_dir / f"title_bpe.tmp{suffix}").replace(model_dir / f"title_bpe{suffix}")
    meta_path.write_text(json.dumps(options))
    return model_path


class TitleBpe:
    """Extractor for the title_bpe store: one ragged int16 array `tokens` of BPE ids per item."""

    name = "title_bpe"

    def __init__(self, model_path: Path, opts: dict):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.threads = int(opts.get("threads", 1))
        vocab = self.sp.vocab_size()
        self.arrays = {"tokens": ArraySpec("int16" if vocab < 2**15 else "int32", (), ragged=True)}
        self.producer = {
            "model": "sentencepiece-bpe",
            "vocab_size": vocab,
            "tokenizer_sha256": sha256_file(model_path),
            "config": {k: opts[k] for k in ("vocab_size", "character_coverage", "max_sentence_length")},
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
