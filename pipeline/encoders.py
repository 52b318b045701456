"""Per-modality encoders and the pretraining classifier (paper section 3.4).

Each modality is ``encoder -> EMDE coder -> linear head`` (paper 3.4, blocks 2-4):

* :class:`TextCNN` -- parallel n-gram convolutions over token features (title_cam, desc_cam);
* :class:`BpeCNN` -- a learned embedding of BPE ids followed by :class:`TextCNN` (title_bpe);
* :class:`ImagePool` -- global average pooling + BatchNorm over backbone feature maps (image);
* :class:`ImageTail` -- the backbone's last stage(s) over their cached input, fine-tuned, then :class:`ImagePool`;
* static-EMDE baseline encoders (a non-differentiable coder cannot train an encoder placed before it): the
  token features themselves as a set (:class:`TokenSet`, :class:`RandomIdEmbedding`, :class:`MapToken`: the
  coder sketches every token), or their masked mean (:class:`TokenMeanPool`, :class:`RandomBagOfIds`);
* :class:`ModalityClassifier` -- encoder -> coder -> head; :meth:`ModalityClassifier.sketch` is the paper's
  "input sketch" that the fusion stage consumes (paper 3.5, Figure 2).

An encoder with pretrained parts (the text and image tails) names them and the option of their learning rate
in ``fine_tuned``; every other parameter trains at the network's ``lr``.

Missing inputs (an empty description: mask all False; a missing image: ``present`` False) are replaced at the
encoder output by a learned ``missing`` vector, so they never look like real data (no zero rows standing in
for data, no NaN from a max over nothing). Every encoder exposes ``output_dim``. An encoder returns one vector
per item, (B, output_dim), or a set of vectors per item, ((B, L, output_dim), mask (B, L)), for a coder that
sketches sets.

Pure torch: no I/O, no configuration reading; every hyperparameter is a constructor argument.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TextCNN", "TextTail", "BpeCNN", "ImagePool", "ImageTail", "TokenMeanPool", "RandomBagOfIds", "TokenSet",
           "RandomIdEmbedding", "MapToken", "ModalityClassifier", "ENCODERS", "build_encoder"]


def _replace_missing(out: Tensor, present: Tensor, missing: Tensor) -> Tensor:
    """out (B, C), present (B,) bool, missing (C,) -> rows with present=False replaced by ``missing``."""
    return torch.where(present[:, None], out, missing.to(out.dtype).expand_as(out))


class TextCNN(nn.Module):
    """Parallel n-gram convolutions over token features (paper 3.4, "Trainable layer").

    The paper's "stack of convolutional layers with varying kernel sizes, which are treated as ngrams" is read
    as Kim-style parallel branches: per kernel size ``k`` a ``Conv1d(in_dim, channels, k)`` with "same" padding
    (left ``(k-1)//2``, right ``k//2``), ReLU, and a max over the *valid* positions only; branch outputs are
    concatenated, then dropout.

    ``token_dropout`` (training only): each real token is hidden from the convolutions with this probability
    ("word dropout"), so the network cannot lean on one token; a row keeps its tokens when all would go.

    Masking: padded token features are zeroed before the convolution, so a padded position contributes exactly
    what the convolution's own zero padding at the sequence ends contributes, whatever value it held; the max
    runs over positions whose centre token is real. A row with no real token gets the learned ``missing``
    vector.

    forward: x (B, L, in_dim) float, mask (B, L) bool (True = real token) -> (B, len(kernel_sizes) * channels)
    """

    def __init__(self, in_dim: int, kernel_sizes: Sequence[int], channels: int, dropout: float = 0.0,
                 token_dropout: float = 0.0):
        super().__init__()
        kernel_sizes = [int(k) for k in kernel_sizes]
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ValueError(f"kernel_sizes must be a non-empty list of positive ints, got {kernel_sizes!r}")
        self.in_dim = int(in_dim)
        self.kernel_sizes = kernel_sizes
        self.channels = int(channels)
        self.output_dim = len(kernel_sizes) * self.channels
        self.convs = nn.ModuleList(nn.Conv1d(self.in_dim, self.channels, k) for k in kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.token_dropout = float(token_dropout)
        self.missing = nn.Parameter(torch.randn(self.output_dim))  # learned stand-in for "no tokens at all"

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        present = mask.any(dim=1)                                 # (B,) rows with at least one real token
        if self.training and self.token_dropout > 0:
            kept = mask & (torch.rand(mask.shape, device=mask.device) >= self.token_dropout)
            mask = torch.where(kept.any(dim=1, keepdim=True), kept, mask)  # never empty a row
        x = x.masked_fill(~mask[..., None], 0.0)                  # (B, L, in_dim): padding -> zeros
        x = x.transpose(1, 2)                                     # (B, in_dim, L)
        invalid = ~mask[:, None, :]                               # (B, 1, L)
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs):
            h = F.relu(conv(F.pad(x, ((k - 1) // 2, k // 2))))     # (B, channels, L)
            h = h.masked_fill(invalid, float("-inf"))
            pooled.append(h.amax(dim=-1))                         # (B, channels); -inf for all-masked rows
        out = self.dropout(torch.cat(pooled, dim=-1))             # (B, output_dim)
        return _replace_missing(out, present, self.missing)


class TextTail(nn.Module):
    """The text model's top `count` transformer layers, fine-tuned over the cached states of layer `first`, then
    :class:`TextCNN` (issue 19: the text counterpart of :class:`ImageTail`).

    The store holds layer `first`'s hidden states ([text_model] layers = first); the layers `first + 1 ..
    first + count` are built here from the model's config (`hf_config`, recorded in the store's producer) at
    random, and given their weights by the checkpoint, or before the first step by the upstream model the
    extractor used (its record's `init_encoder`), so that training starts from the frozen model's own states.

    forward: x (B, L, hidden) float, mask (B, L) bool -> (B, len(kernel_sizes) * channels)
    """

    fine_tuned = {"tail": "backbone_lr"}  # pretrained submodules -> the [pretrain.<modality>] key of their rate

    def __init__(self, hf_config: dict, first: int, count: int, cnn: dict):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.hf_config, self.first, self.count = dict(hf_config), int(first), int(count)
        args = {k: v for k, v in self.hf_config.items() if k != "model_type"}
        args |= {"num_hidden_layers": self.count, "vocab_size": 2, "pad_token_id": 0, "bos_token_id": 0,
                 "eos_token_id": 1}  # a 2-word vocabulary: no large embedding table is built for nothing
        config = AutoConfig.for_model(self.hf_config["model_type"], **args)
        self.tail = AutoModel.from_config(config, add_pooling_layer=False).encoder.layer  # the layers only
        self.cnn = TextCNN(**cnn)
        self.output_dim = self.cnn.output_dim

    def states(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L, hidden) states of layer `first` -> those of layer `first + count`."""
        # additive (B, 1, 1, L) mask, the layout eager and sdpa attention both take: padding never attended to
        blocked = (~mask.bool())[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        for layer in self.tail:
            out = layer(x, attention_mask=blocked)
            x = out[0] if isinstance(out, tuple) else out            # (B, L, hidden)
        return x

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.cnn(self.states(x, mask), mask)


class BpeCNN(nn.Module):
    """Learned embedding of BPE ids followed by :class:`TextCNN` (paper 3.3/3.4, title_bpe, kernels 1-5).

    Padded ids are replaced by 0 before the lookup (any padding id, even out of range, is safe); their
    features are then masked by :class:`TextCNN`.

    forward: ids (B, L) long, mask (B, L) bool -> (B, len(kernel_sizes) * channels)
    """

    def __init__(self, vocab_size: int, embed_dim: int, kernel_sizes: Sequence[int], channels: int,
                 dropout: float = 0.0, token_dropout: float = 0.0):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.embed = nn.Embedding(self.vocab_size, int(embed_dim))
        self.cnn = TextCNN(embed_dim, kernel_sizes, channels, dropout, token_dropout)
        self.output_dim = self.cnn.output_dim

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        ids = ids.long().masked_fill(~mask, 0)
        return self.cnn(self.embed(ids), mask)                    # (B, output_dim)


class ImagePool(nn.Module):
    """Global average pooling + BatchNorm1d over backbone feature maps (paper 3.4, images).

    BatchNorm sees present images only (a missing image's map, whatever it holds, never enters the batch
    statistics); missing rows get the learned ``missing`` vector. In training mode with fewer than two present
    images the running statistics are used for that batch.

    forward: fmap (B, C, h, w) float, present (B,) bool -> (B, C)
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)
        self.output_dim = self.channels
        self.bn = nn.BatchNorm1d(self.channels)
        self.missing = nn.Parameter(torch.randn(self.channels))

    def forward(self, fmap: Tensor, present: Tensor) -> Tensor:
        present = present.bool()
        if self.training:
            return self._train_forward(fmap, present)
        # Inference: BatchNorm uses its running statistics, row by row, so every row goes through it (no
        # data-dependent shapes: the module exports with torch.export) and missing rows are replaced after.
        out = self.bn(fmap.mean(dim=(2, 3)))                      # (B, C)
        return _replace_missing(out, present, self.missing)

    def _train_forward(self, fmap: Tensor, present: Tensor) -> Tensor:
        b = fmap.shape[0]
        idx = present.nonzero().squeeze(1)                        # (P,)
        sub = fmap.index_select(0, idx).mean(dim=(2, 3))          # (P, C) global average pool
        if idx.numel() == 0:
            return self.missing.to(fmap.dtype).expand(b, self.channels).clone()
        if idx.numel() < 2:                                       # batch stats undefined for one row
            bn = self.bn
            sub = F.batch_norm(sub, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            sub = self.bn(sub)                                    # statistics of the present rows only
        out = sub.new_zeros(b, self.channels).index_copy(0, idx, sub)  # (B, C), missing rows still 0 here
        return _replace_missing(out, present, self.missing)


class ImageTail(nn.Module):
    """The image backbone's last stage(s), fine-tuned over their cached input, then :class:`ImagePool` (paper 3.3:
    "as we fine-tune EfficientNet"; 3.4: average pooling + batch normalization).

    The store holds the input of the module ``cache_at`` (pipeline.backbone); the tail is the rest of the timm
    ``model``'s ``forward_features``, built here at random and given its weights by the checkpoint, or, before
    the first step, by the weights file the extractor used (``weights_sha256`` names it; its record's
    `init_encoder` loads it), so that training starts from the frozen backbone's own maps. The tail's BatchNorm layers keep
    their ImageNet statistics (always in eval mode; their scale and shift still learn): a batch holds few
    photos where most items have none, and batch statistics of a few photos would move every map.

    forward: maps (B, C_cut, h, w) float, present (B,) bool -> (B, channels)
    """

    fine_tuned = {"tail": "backbone_lr"}  # pretrained submodules -> the [pretrain.<modality>] key of their rate

    def __init__(self, model: str, cache_at: str, weights_sha256: str):
        super().__init__()
        from pipeline.backbone import build_tail

        self.model, self.cache_at, self.weights_sha256 = model, cache_at, weights_sha256
        self.tail, channels = build_tail(model, cache_at)
        self.pool = ImagePool(channels)
        self.output_dim = channels

    def train(self, mode: bool = True) -> "ImageTail":
        super().train(mode)
        self.tail.eval()  # frozen BatchNorm statistics (see the class docstring); no dropout in the tail
        return self

    def forward(self, maps: Tensor, present: Tensor) -> Tensor:
        present = present.bool()
        if not self.training:
            # Every row through the tail (its BatchNorm is in eval mode: rows are independent), missing ones
            # replaced by the pool: no data-dependent shapes, so the network exports with torch.export.
            return self.pool(self.tail(maps), present)            # (B, channels)
        idx = present.nonzero().squeeze(1)                        # (P,)
        if idx.numel() == 0:
            return self.pool(maps, present)                       # no photo: the learned `missing` vector
        out = self.tail(maps.index_select(0, idx))                # (P, channels, h', w') final maps
        fmap = out.new_zeros((maps.shape[0],) + out.shape[1:]).index_copy(0, idx, out)  # (B, channels, h', w')
        return self.pool(fmap, present)


class TokenSet(nn.Module):
    """The token features themselves, a set per item, for a coder that sketches every token (static EMDE).

    forward: x (B, L, in_dim) float, mask (B, L) bool -> (x, mask): the set (padding masked out by the coder)
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = self.output_dim = int(in_dim)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return x, mask.bool()


class RandomIdEmbedding(nn.Module):
    """BPE ids as a set of fixed N(0, 1) vectors (never trained), for a coder that sketches every token.

    The static coder's regions of a random vector per id are a hash of the id, so the sketch is a count sketch
    of the bag of ids. The table is a buffer drawn from a seeded generator (the same in every process, saved).

    forward: ids (B, L) long, mask (B, L) bool -> (vectors (B, L, embed_dim), mask (B, L))
    """

    def __init__(self, vocab_size: int, embed_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(int(vocab_size), int(embed_dim), generator=g))
        self.output_dim = int(embed_dim)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = mask.bool()
        return F.embedding(ids.long().masked_fill(~mask, 0), self.table), mask


class MapToken(nn.Module):
    """An image as a set of one token, its average-pooled map; a missing photo as the empty set.

    forward: fmap (B, C, h, w) float, present (B,) bool -> (pooled (B, 1, C), mask (B, 1))
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = self.output_dim = int(channels)

    def forward(self, fmap: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        return fmap.mean(dim=(2, 3))[:, None, :], present.bool()[:, None]


class TokenMeanPool(nn.Module):
    """Masked mean of token features; a row with no real token gets the ``missing`` vector.

    Meant for the static-EMDE baseline (paper Table 3), where the coder is not differentiable and an encoder
    in front of it could not be trained: the original EMDE sketches the upstream embeddings themselves.

    forward: x (B, L, in_dim) float, mask (B, L) bool -> (B, in_dim)
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = int(in_dim)
        self.output_dim = self.in_dim
        self.missing = nn.Parameter(torch.randn(self.in_dim))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        m = mask[..., None].to(x.dtype)                           # (B, L, 1)
        s = x.masked_fill(~mask[..., None], 0.0).sum(dim=1)        # (B, in_dim)
        n = m.sum(dim=1).clamp_min(1.0)                           # (B, 1)
        return _replace_missing(s / n, mask.any(dim=1), self.missing)


class RandomBagOfIds(nn.Module):
    """Static-baseline encoder for BPE ids: masked mean of a fixed N(0, 1) embedding (never trained).

    A Johnson-Lindenstrauss projection of the length-normalised bag of ids. The embedding is a buffer drawn
    from a seeded generator, so it is the same in every process and is saved in the state dict.

    forward: ids (B, L) long, mask (B, L) bool -> (B, embed_dim)
    """

    def __init__(self, vocab_size: int, embed_dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(int(vocab_size), int(embed_dim), generator=g))
        self.pool = TokenMeanPool(int(embed_dim))
        self.output_dim = int(embed_dim)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        return self.pool(F.embedding(ids.long().masked_fill(~mask, 0), self.table), mask)


# The encoders a checkpoint's model config may name ({"type": name, **constructor arguments}).
ENCODERS = {cls.__name__: cls for cls in (TextCNN, TextTail, BpeCNN, ImagePool, ImageTail, TokenMeanPool,
                                          RandomBagOfIds, TokenSet, RandomIdEmbedding, MapToken)}


def build_encoder(config: dict) -> nn.Module:
    """The encoder described by `config` ({"type": "TextCNN", "in_dim": 768, ...})."""
    args = dict(config)
    return ENCODERS[args.pop("type")](**args)


def vectors(z: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """An encoder's output as the vectors a static coder is fitted on: (B, D) as it is, a set's real tokens (N, D)."""
    return z[0][z[1]] if isinstance(z, tuple) else z


class ModalityClassifier(nn.Module):
    """One pretraining network of paper 3.4: ``encoder -> EMDE coder -> linear head``.

    ``coder`` is a :class:`~pipeline.emde.DifferentiableEMDECoder` (the paper's system) or a fitted
    :class:`~pipeline.emde.StaticEMDE` (the Table 3 baseline; then only the head learns, see :meth:`fit_coder`).
    The coder's ``input_dim`` must equal ``encoder.output_dim``.

    forward(*inputs) -> logits (B, num_classes); sketch(*inputs) -> input sketch (B, depth * width).
    """

    def __init__(self, encoder: nn.Module, coder: nn.Module, num_classes: int):
        super().__init__()
        enc_dim = getattr(encoder, "output_dim", None)
        if enc_dim is not None and getattr(coder, "input_dim", enc_dim) != enc_dim:
            raise ValueError(f"coder input_dim {coder.input_dim} != encoder output_dim {enc_dim}")
        self.encoder = encoder
        self.coder = coder
        self.num_classes = int(num_classes)
        self.sketch_dim = int(coder.output_dim)
        self.head = nn.Linear(self.sketch_dim, self.num_classes)

    def sketch(self, *inputs: Tensor) -> Tensor:
        """The input sketch (B, depth * width) that multimodal fusion consumes (paper 3.5)."""
        z = self.encoder(*inputs)  # (B, D), or a set per item: ((B, L, D), mask (B, L))
        return self.coder(*z) if isinstance(z, tuple) else self.coder(z)

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.head(self.sketch(*inputs))                    # (B, num_classes)

    @torch.no_grad()
    def fit_coder(self, *inputs: Tensor) -> "ModalityClassifier":
        """Fit a static coder on the encoder outputs of ``inputs`` (encoder run in eval mode, then restored)."""
        if not hasattr(self.coder, "fit"):
            raise TypeError(f"{type(self.coder).__name__} is trained, not fitted")
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            self.coder.fit(vectors(self.encoder(*inputs)))
        finally:
            self.encoder.train(was_training)
        return self
