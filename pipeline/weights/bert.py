"""A BERT-family text encoder in plain torch: BERT, RoBERTa, XLM-R and CamemBERT without their pooler.

The same network as transformers' `BertModel` / `XLMRobertaModel` (`add_pooling_layer=False`), with the same
module names, so a Hugging Face state dict loads into it as it is. It exists for the load: building it
imports nothing but torch, where transformers' model classes import some 3 s of modules on 2 cores (the
slim bundle's load, `pipeline serve`'s cold start). `weights/text.py` picks it for the architectures below and
leaves every other one to transformers; tests/test_weights.py holds it equal to transformers'.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# model_type -> whether positions count from the padding index (RoBERTa) or from 0 (BERT)
ARCHITECTURES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}
# what the network is built from: a config.json without one of these is left to transformers (its defaults); with
# them all, the file says what transformers' config would (`weights.text.text_config` reads it as it is)
KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
        "hidden_dropout_prob", "attention_probs_dropout_prob")


def runs(config: dict) -> bool:
    """Whether this module builds the network `config` (a config.json) describes."""
    return (isinstance(config.get("model_type"), str) and config["model_type"] in ARCHITECTURES
            and all(config.get(k) is not None for k in KEYS) and config["hidden_act"] == "gelu"
            and config["hidden_size"] % config["num_attention_heads"] == 0
            and config.get("position_embedding_type", "absolute") == "absolute"
            and not config.get("is_decoder") and not config.get("add_cross_attention"))


class Embeddings(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        # uninitialised: `load` replaces it, and drawing XLM-R's 96M random numbers first would cost half a second
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id,
                                            _weight=torch.empty(c.vocab_size, c.hidden_size))
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.pad, self.roberta = c.pad_token_id, ARCHITECTURES[c.model_type]

    def forward(self, ids: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:  # ids (B, L) -> (B, L, H)
        if self.roberta:  # fairseq's positions: pad + 1, pad + 2, ... over the real tokens, pad over padding
            real = (ids != self.pad).long()
            positions = torch.cumsum(real, dim=1) * real + self.pad
        else:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)
        x = x + (self.token_type_embeddings.weight[0] if types is None else self.token_type_embeddings(types))
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.heads, self.p = c.num_attention_heads, c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:  # x (B, L, H), keep (B, 1, 1, L)
        B, L, H = x.shape
        q, k, v = (f(x).view(B, L, self.heads, H // self.heads).transpose(1, 2)  # each (B, heads, L, H/heads)
                   for f in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, L, H)  # (B, heads, L, H/heads) -> (B, L, H)


class Residual(nn.Module):
    """dense -> dropout -> LayerNorm(x + input): transformers' SelfOutput and Output."""

    def __init__(self, width: int, c: SimpleNamespace):
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + skip)


class Attention(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = Residual(c.hidden_size, c)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = Residual(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: SimpleNamespace):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class TextEncoder(nn.Module):
    """`model(input_ids=, attention_mask=, token_type_ids=).last_hidden_state` as transformers' (B, L, H); no mask:
    every token is real, no token types: all 0."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = c = SimpleNamespace(**config)  # read as transformers' config is (`model.config.hidden_size`)
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> SimpleNamespace:
        # (B, 1, 1, L): every query sees the real tokens only; none when all are real (CUDA's flash attention then)
        keep = None if attention_mask is None or attention_mask.all() else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return SimpleNamespace(last_hidden_state=x)


def load(directory: Path, config: dict) -> TextEncoder | None:
    """The encoder of `directory` (config.json `config`, model.safetensors) in eval mode, every weight from the
    file (an MLM head or a pooler there is skipped), in the dtype transformers' `dtype="auto"` gives; None when
    the file's weights do not fill it (other names, missing ones: transformers decides)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(directory) / "model.safetensors"))
    prefixes = ("roberta.", "bert.", "model.")  # a checkpoint of the model with a head
    prefix = next((p for p in prefixes if any(k.startswith(p + "embeddings.") for k in state)), "")
    model = TextEncoder(config)  # (not built on the meta device: that imports torch._dynamo, a second)
    wanted = model.state_dict()
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in wanted}
    if state.keys() != wanted.keys() or any(state[k].shape != wanted[k].shape for k in state):
        return None
    dtype = _dtype(config, state)
    model.load_state_dict({k: v if _kept(k, v, dtype) else v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def _kept(name: str, value: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the file's word embeddings stay as stored: a float16 (or bfloat16) lookup table under a float32
    model gives rows that become float32 exactly as they join the position embeddings, the same numbers as a
    table converted first, in half the memory (a bundle's 250,002 x 384: 192 MB less, 0.1 s less load)."""
    return (name == "embeddings.word_embeddings.weight" and value.is_floating_point() and dtype.is_floating_point
            and value.dtype.itemsize < dtype.itemsize)


def _dtype(config: dict, state: dict) -> torch.dtype:
    """As transformers loads by default: the config's dtype, else the weights' own."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
