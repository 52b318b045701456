"""The tiny test CamemBERT: a SentencePiece unigram model trained on the catalogue texts plus a small, seeded,
randomly initialised `CamembertModel`, saved as a Hugging Face directory (`[text_model] path = "tiny"`).

Deterministic: the same texts, sizes and seed give the same bytes in every file.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.provenance import staged_dir
from pipeline.weights.text import SPM_FILE, quiet_transformers

TINY_INFO_FILE = "tiny_model.json"

def _train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model in CamemBERT's layout (<unk>=0, <s>=1, </s>=2, no pad), as bytes.

    Single-threaded, no sampling, no shuffling: the same texts give the same bytes.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,  # long descriptions are kept, not skipped
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_tiny_camembert(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_position: int = 514,
    seed: int = 0,
    max_train_chars: int = 1_000_000,
) -> Path:
    """Build a tiny, randomly initialised CamemBERT and its SentencePiece tokenizer in out_dir.

    The tokenizer is trained on ``texts`` (empty ones are skipped; above ``max_train_chars`` characters in
    all, on every k-th text, so that training stays within seconds: SentencePiece costs about 3 s per
    million characters on one core); the model's vocabulary is the tokenizer's actual size (at most
    ``vocab_size`` + 5 CamemBERT specials; fewer on a small corpus).
    Deterministic: the same texts, sizes and seed give byte-identical files. The directory loads with
    ``load_text_model`` / ``AutoTokenizer`` / ``AutoModel`` offline. Returns out_dir.
    """
    texts = [t for t in (str(x) for x in texts if x is not None) if t.strip()]
    if not texts:
        raise PipelineError("cannot build the tiny text model: no non-empty text to train its tokenizer on")
    if hidden_size % num_heads:
        raise PipelineError(f"tiny text model: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    total = sum(len(t) for t in texts)
    stride = max(1, -(-total // max_train_chars)) if max_train_chars and max_train_chars > 0 else 1
    sizes = {"vocab_size_requested": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers,
             "num_heads": num_heads, "intermediate_size": intermediate_size, "max_position": max_position}
    with staged_dir(out_dir) as tmp:  # built beside out_dir, swapped in whole
        spm_bytes = _train_sentencepiece(texts[::stride], vocab_size)
        (tmp / SPM_FILE).write_bytes(spm_bytes)
        vocab = _save_tiny_camembert(tmp, sizes, seed)
        info = {"kind": "tiny-camembert", "seed": seed, "vocab_size": vocab, **sizes, "texts": len(texts),
                "train_texts": len(texts[::stride]), "max_train_chars": max_train_chars,
                "texts_sha256": hashlib.sha256("\n".join(texts).encode("utf-8", "surrogatepass")).hexdigest(),
                "sentencepiece_sha256": hashlib.sha256(spm_bytes).hexdigest()}
        (tmp / TINY_INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return Path(out_dir)


def _save_tiny_camembert(directory: Path, sizes: dict, seed: int) -> int:
    """A seeded random CamemBERT over the SentencePiece model in `directory`, saved there; its vocabulary size."""
    import torch
    from transformers import CamembertConfig, CamembertModel, CamembertTokenizer

    tokenizer = CamembertTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                   model_max_length=sizes["max_position"] - 2)
    config = CamembertConfig(
        vocab_size=len(tokenizer), hidden_size=sizes["hidden_size"], num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"], intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=sizes["max_position"], type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = CamembertModel(config, add_pooling_layer=False)
    model.eval()
    with quiet_transformers():
        model.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
    return len(tokenizer)
