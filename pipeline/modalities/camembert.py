"""The title_cam and desc_cam extractor (paper 3.3-3.4): a text model's last-layer states of every token.

Titles go in as they are and are never truncated: a title longer than the model's 512 positions
is cut into consecutive windows, each run on its own, and the windows' token features are stored
back to back. Descriptions have their HTML residues removed (tags, entities such as `&amp;amp;`) and
are cut to 200 characters. An empty text is stored as zero tokens (and flagged missing), never as
a padding token. Windows are grouped by length into batches under a token budget, so padding
costs little; the forward runs under `torch.inference_mode`, in bf16 on CUDA.
"""
from __future__ import annotations

import threading
import weakref
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.errors import PipelineError
from pipeline.extractor import LoadedOnce
from pipeline.provenance import sha256_files_remembered
from pipeline.schema import TextModel
from pipeline.text import clean_description
from pipeline.weights.text import load_text_model, text_config, tokenizer_max_length, weight_files
from stores import ArraySpec, fingerprint


# The config keys a transformer layer is built from (not the vocabulary or the library's version).
HF_LAYER_KEYS = ("model_type", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "position_embedding_type")


class _TextModel:
    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model
        # a fast tokenizer may reset its Rust settings inside a call: concurrent predictor calls take turns here
        self.tokenizing = threading.Lock()


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_text_model(model_dir: Path, layers: int, device) -> _TextModel:
    """The text model of `model_dir` (its first `layers`), loaded once for every extractor that reads it at the
    same time (title_cam and desc_cam in a predictor: one load, one copy in memory), freed with the last one.
    The model is only run forward, never changed, so sharing it is safe."""
    key = (str(Path(model_dir).resolve()), layers, str(device))
    with _SHARED_LOCK:
        found = _SHARED.get(key)
        if found is None:
            tokenizer, model = load_text_model(model_dir)
            if layers:
                model.encoder.layer = model.encoder.layer[:layers]
            found = _SHARED[key] = _TextModel(tokenizer, model.to(device))
        return found


class CamembertTokens:
    """Extractor for title_cam / desc_cam: one ragged float16 array `tokens` (hidden size per token).

    Built from the model directory's files alone (config, tokenizer config, weights and tokenizer hashes);
    the tokenizer and the model are loaded on first use, so a run with nothing to do loads neither."""

    def __init__(self, name: str, field: str, model_dir: Path, clean_html: bool, max_chars: int,
                 model_opts: TextModel, device: torch.device):
        self.name, self.field = name, field  # field: the catalogue column ("title", "description")
        self.clean = clean_html
        self.max_chars = max_chars  # 0: the whole text
        self.prefix = model_opts.prefix  # e5 models expect "passage: " before a text
        self.model_dir, self.layers, self.device = Path(model_dir), model_opts.layers, device
        cfg = text_config(model_dir)
        if self.layers > cfg.num_hidden_layers:  # the first k layers only: their last hidden state is layer k's
            raise PipelineError(f"[text_model] layers = {self.layers}: {model_dir} has {cfg.num_hidden_layers} layers")
        # RoBERTa-style position ids start after the padding index: 514 positions -> 512 tokens.
        positions = cfg.max_position_embeddings - (cfg.pad_token_id or 0) - 1
        self.max_len = int(min(tokenizer_max_length(model_dir), positions))
        self.batch_tokens = model_opts.batch_tokens
        self.max_batch = model_opts.max_batch
        self.arrays = {"tokens": ArraySpec("float16", (cfg.hidden_size,), ragged=True)}
        tokenizer_files = sorted(p for p in Path(model_dir).iterdir()
                                 if p.name in ("tokenizer.json", "sentencepiece.bpe.model", "tokenizer_config.json"))
        self.producer = {
            "model": f"{cfg.model_type}:{Path(model_dir).resolve().name}",
            "weights_sha256": sha256_files_remembered(weight_files(model_dir)),
            "tokenizer_sha256": sha256_files_remembered(tokenizer_files),
            "config": {"field": self.field, "clean_html": self.clean, "max_chars": self.max_chars,
                       "prefix": self.prefix, "max_len": self.max_len, "hidden_size": cfg.hidden_size},
        }
        if self.layers:  # only then: a store of the last layer's features keeps the producer it always had
            self.producer["config"]["layers"] = self.layers
            # what a network needs to build the layers above this one and fine-tune them (encoders.TextTail)
            self.producer["hf_config"] = {k: getattr(cfg, k) for k in HF_LAYER_KEYS if hasattr(cfg, k)}
        # The loaded model, shared with every extractor of the same directory (held here: freed with the last one)
        self._loaded = LoadedOnce(lambda: shared_text_model(self.model_dir, self.layers, self.device))

    def load(self):
        return self._loaded()

    @property
    def tokenizer(self):
        return self._loaded().tokenizer

    @property
    def model(self):
        return self._loaded().model

    def texts(self, items: pl.DataFrame) -> list[str]:
        texts = items[self.field].to_list()
        if self.clean:
            texts = [clean_description(t, self.max_chars) for t in texts]
        elif self.max_chars:
            texts = [t[: self.max_chars] for t in texts]
        return [self.prefix + t if t and self.prefix else t for t in texts]  # an empty text stays empty

    def windows(self, items: pl.DataFrame) -> list[list[list[int]]]:
        """Per item, its model inputs: windows of at most max_len ids, each <s> ... </s>."""
        loaded, texts = self._loaded(), self.texts(items)
        with loaded.tokenizing:
            ids = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos, eos, step = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.max_len - 2
        return [[[bos, *seq[i : i + step], eos] for i in range(0, len(seq), step)] for seq in ids]

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray:
        return fingerprint(self.texts(items))

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]:
        return {"tokens": np.array([sum(map(len, w)) for w in self.windows(items)], dtype=np.int64)}

    def prepare(self, items: pl.DataFrame):
        """Token ids of the block, windows sorted by length and padded into batches (CPU work)."""
        windows = self.windows(items)
        flat = [(i, w) for i, ws in enumerate(windows) for w in ws]  # (item, window ids) in store order
        order = sorted(range(len(flat)), key=lambda k: len(flat[k][1]))
        batches, start = [], 0
        while start < len(order):
            longest = len(flat[order[min(start + self.max_batch, len(order)) - 1]][1])
            size = max(1, min(self.max_batch, self.batch_tokens // longest))
            members = order[start : start + size]
            width = len(flat[members[-1]][1])
            ids = torch.full((len(members), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(members), width), dtype=torch.long)
            for row, k in enumerate(members):
                ids[row, : len(flat[k][1])] = torch.tensor(flat[k][1])
                mask[row, : len(flat[k][1])] = 1
            batches.append((members, ids, mask))
            start += size
        missing = np.array([0 if ws else 1 for ws in windows], dtype=np.uint8)
        return [len(w) for _, w in flat], batches, missing

    @torch.inference_mode()
    def compute(self, prepared) -> tuple[dict[str, np.ndarray], np.ndarray]:
        lengths, batches, missing = prepared
        outputs: list[np.ndarray | None] = [None] * len(lengths)
        on_cuda = self.device.type == "cuda"
        for members, ids, mask in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                hidden = self.model(input_ids=ids.to(self.device, non_blocking=True),
                                    attention_mask=mask.to(self.device, non_blocking=True)).last_hidden_state
            hidden = hidden.to(torch.float16).cpu().numpy()  # (B, width, hidden)
            for row, k in enumerate(members):
                outputs[k] = hidden[row, : lengths[k]]
        hidden_size = self.arrays["tokens"].shape[0]
        flat = np.concatenate(outputs) if outputs else np.zeros((0, hidden_size), np.float16)
        return {"tokens": flat}, missing


def model_layers(model_dir: Path, producer: dict, first: int, count: int) -> dict:
    """The state dict of layers `first .. first + count - 1` (0-based: the `count` layers above layer `first`'s
    output) of the text model at `model_dir`, which must be the one the store was extracted with."""
    if sha256_files_remembered(weight_files(model_dir)) != producer["weights_sha256"]:
        raise PipelineError(f"{model_dir} is not the text model this store was extracted with: the fine-tuned layers "
                            f"must start from the extractor's own weights")
    _, model = load_text_model(model_dir)
    layers = model.encoder.layer
    if first + count > len(layers):
        raise PipelineError(f"tune_layers = {count} above layer {first}: {model_dir} has {len(layers)} layers")
    return layers[first : first + count].state_dict()
