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


class BpeDropout:
    """BPE-dropout (Provilkov et al., ACL 2020) over stored title ids: a training augmentation.

    Each training batch is re-segmented at random: the titles are decoded from their stored ids and encoded
    again by SentencePiece with every merge skipped with probability ``p``, so the network sees the same
    title in different subword splits from epoch to epoch (with 5,000 titles instead of the paper's 80,000,
    one fixed split per title is easy to memorise). Validation, sketches and predictions keep the stored,
    deterministic ids. A title whose ids do not survive a decode/encode round trip keeps its stored ids (on the
    real Rakuten titles, 2% of them: characters outside the vocabulary, whose ``<unk>`` decodes to a
    placeholder that encodes to another id).

    Deterministic: the batch of step ``step`` in epoch ``epoch`` is re-segmented from a seed derived from
    ``(seed, epoch, step)`` (SentencePiece's sampling generator is global and seeded per batch call), so a
    resumed run draws what an uninterrupted one does.

    __call__: ids (B, L) int64, mask (B, L) bool, epoch, step -> ids (B, L'), mask (B, L')
    """

    def __init__(self, model_path: Path, p: float, seed: int):
        if not 0.0 < p < 1.0:
            raise ValueError(f"BPE-dropout probability must be in (0, 1), got {p}")
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.p = float(p)
        self.seed = int(seed)

    def __call__(self, ids, mask, epoch: int, step: int):
        import torch

        rows = [r[m].tolist() for r, m in zip(ids.numpy(), mask.numpy())]
        texts = self.sp.decode(rows)
        exact = self.sp.encode(texts, num_threads=1)
        spm.set_random_generator_seed(int(np.random.SeedSequence([self.seed, epoch, step]).generate_state(1)[0]))
        drawn = self.sp.encode(texts, enable_sampling=True, alpha=self.p, nbest_size=-1, num_threads=1)
        rows = [d if e == r else r for r, e, d in zip(rows, exact, drawn)]
        width = max(1, max(map(len, rows)))
        out = np.zeros((len(rows), width), np.int64)                    # (B, L')
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        lengths = torch.tensor([len(r) for r in rows])
        return torch.from_numpy(out), torch.arange(width)[None, :] < lengths[:, None]
