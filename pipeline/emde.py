"""EMDE coders: the trainable coder of the paper and the static (DLSH) baseline.

Both coders map a batch of vectors ``(B, input_dim)`` to a *sketch* ``(B, depth * width)``: ``depth``
independent partitionings of the input manifold into ``width`` regions each, every depth block a
probability vector over its ``width`` regions (paper Figure 1, "input sketch"). The static coder also
sketches a set of vectors per item (the tokens of a title): each vector's region counted, per depth.

* :class:`DifferentiableEMDECoder` -- paper section 3.2 and Listing 1 (trainable centroids, soft assignment).
* :class:`StaticEMDE` -- paper section 3.1 / Table 3 "Baseline (Static EMDE)": the data-dependent LSH of the
  original EMDE paper (Dabrowski et al. 2020, arXiv:2006.01894), fitted on data, never trained.

Pure torch: no I/O, no configuration reading; every hyperparameter is a constructor argument.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DifferentiableEMDECoder", "StaticEMDE"]


class DifferentiableEMDECoder(nn.Module):
    """Trainable EMDE coder (paper section 3.2, Listing 1).

    1. ``depth * width`` centroids of dimension ``inner_dim``, initialised from N(0, 1);
    2. a linear projection of the input to ``depth * width * inner_dim``;
    3. BatchNorm1d of the projection (the paper: crucial, together with the N(0, 1) centroids, to avoid a
       degenerate start where every centroid is far from every input);
    4. squared euclidean distance of each projected chunk to its centroid, summed over ``inner_dim``;
    5. softmax of the negative squared distances over ``width``: ``depth`` soft assignments.

    Listing 1 takes ``(input_dim, width, depth)``; here the order is ``(input_dim, depth, width)`` -- pass them
    by keyword where it matters. Unlike the listing, ``depth``/``width``/``inner_dim`` are stored.

    forward: x (B, input_dim) -> soft assignments (B, depth * width), each depth block sums to 1.
    """

    def __init__(self, input_dim: int, depth: int, width: int, inner_dim: int = 8):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("depth", depth), ("width", width), ("inner_dim", inner_dim)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.input_dim = int(input_dim)
        self.depth = int(depth)
        self.width = int(width)
        self.inner_dim = int(inner_dim)
        self.output_dim = self.depth * self.width
        n = self.depth * self.width * self.inner_dim
        self.lin = nn.Linear(self.input_dim, n)
        self.bn = nn.BatchNorm1d(n)
        self.centroids = nn.Parameter(torch.randn(n))  # (depth*width*inner_dim,) ~ N(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        # In float32 even under autocast: the softmax reads squared distances of order 10-100, which bf16
        # (8-bit mantissa) rounds by up to +-0.5 -- enough to move the soft assignments, so a coder trained
        # under bf16 would sketch differently from the float32 sketch and predict stages.
        with torch.autocast(x.device.type, enabled=False):
            return self._assign(x.float())

    def _assign(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = self.bn(self.lin(x))                                   # (B, depth*width*inner_dim)
        d = (x - self.centroids) ** 2                              # (B, depth*width*inner_dim)
        d = d.view(b, self.depth * self.width, self.inner_dim).sum(-1)  # (B, depth*width) squared distances
        d = d.view(b, self.depth, self.width)                      # (B, depth, width)
        soft_assignments = F.softmax(-d, dim=-1)                   # over width
        return soft_assignments.view(b, self.depth * self.width)   # (B, depth*width)

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, depth={self.depth}, width={self.width}, inner_dim={self.inner_dim}"


class StaticEMDE(nn.Module):
    """Static EMDE sketch: data-dependent LSH (paper section 3.1; original EMDE, arXiv:2006.01894).

    Fitted, not trained. :meth:`fit` standardises the features (mean/std kept as buffers), then for each of
    ``depth`` independent partitionings draws ``log2(width)`` random hyperplanes (Gaussian directions from a
    seeded generator, orthonormalised within a partitioning) and sets each hyperplane's offset at a quantile of the data projected on it, the quantile drawn
    uniformly from ``quantile_range`` (a middle range, so every hyperplane splits the data and the ``width``
    regions are populated in a balanced way). A vector's region in one partitioning is the binary code of its
    ``log2(width)`` side-of-hyperplane bits; the sketch is the one-hot region per depth, so each depth block
    sums to 1 (a normalised count sketch of a single item).

    Buffers only (no parameters): it lives in a ``state_dict`` and loads into a fresh instance built with the
    same constructor arguments. Not differentiable: gradients do not flow through it to an encoder.

    forward: x (B, input_dim) -> sketch (B, depth * width), one-hot per depth; or a set per item,
    x (B, L, input_dim) and mask (B, L) -> sketch (B, depth * width), normalised region counts per depth.
    """

    def __init__(
        self,
        input_dim: int,
        depth: int,
        width: int,
        seed: int,
        quantile_range: tuple[float, float] | None,
        eps: float = 1e-6,
    ):
        super().__init__()
        if int(input_dim) < 1 or int(depth) < 1:
            raise ValueError(f"input_dim and depth must be positive integers, got {input_dim!r}, {depth!r}")
        width = int(width)
        if width < 2 or width & (width - 1):
            raise ValueError(f"StaticEMDE width must be a power of two >= 2, got {width}")
        if quantile_range is not None and not 0.0 < quantile_range[0] <= quantile_range[1] < 1.0:
            raise ValueError(f"quantile_range must satisfy 0 < low <= high < 1, got {quantile_range!r}")
        self.input_dim = int(input_dim)
        self.depth = int(depth)
        self.width = width
        self.bits = int(math.log2(width))
        self.output_dim = self.depth * self.width
        self.seed = int(seed)
        self.quantile_range = None if quantile_range is None else tuple(float(q) for q in quantile_range)
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(self.input_dim))
        self.register_buffer("std", torch.ones(self.input_dim))
        self.register_buffer("hyperplanes", torch.zeros(self.depth, self.bits, self.input_dim))  # (depth, bits, D)
        self.register_buffer("thresholds", torch.zeros(self.depth, self.bits))                  # (depth, bits)
        self.register_buffer("powers", 2 ** torch.arange(self.bits), persistent=False)          # (bits,)
        self.register_buffer("is_fitted", torch.zeros((), dtype=torch.bool))

    @property
    def fitted(self) -> bool:
        return bool(self.is_fitted)

    def _project(self, x: Tensor) -> Tensor:
        z = (x.to(self.mean.dtype) - self.mean) / self.std                  # (B, D) standardised
        return torch.einsum("bd,kjd->bkj", z, self.hyperplanes)              # (B, depth, bits)

    @torch.no_grad()
    def fit(self, x: Tensor) -> "StaticEMDE":
        """Fit the partitionings on data ``x`` (N, input_dim); deterministic for a given ``seed``."""
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"StaticEMDE.fit expects (N, {self.input_dim}), got {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError("StaticEMDE.fit needs at least 2 vectors")
        x = x.detach().to(device=self.mean.device, dtype=self.mean.dtype)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(self.eps))
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        planes = torch.randn(self.depth, self.bits, self.input_dim, generator=g)  # (depth, bits, D)
        if self.input_dim >= self.bits:
            # orthonormal directions within a partitioning: on standardised, roughly isotropic data the
            # bits are then close to independent, which keeps the 2**bits regions balanced
            planes = torch.linalg.qr(planes.transpose(1, 2)).Q.transpose(1, 2)
        planes = planes / planes.norm(dim=-1, keepdim=True)
        if self.quantile_range is None:
            raise ValueError("StaticEMDE.fit needs a quantile_range (None: a fitted coder, loaded from a checkpoint)")
        lo, hi = self.quantile_range
        q = lo + (hi - lo) * torch.rand(self.depth, self.bits, generator=g, dtype=torch.float64)
        self.hyperplanes.copy_(planes)
        n = x.shape[0]
        proj = np.ascontiguousarray(self._project(x).reshape(n, -1).t().double().cpu().numpy())  # (depth*bits, N)
        # a different quantile per hyperplane, linear interpolation (torch.quantile's default); np.partition
        # finds a row's two order statistics in linear time (sorting 1e5 token projections is ~5x slower)
        pos = q.reshape(-1).numpy() * (n - 1)                                # (depth*bits,)
        lo_i, hi_i = np.floor(pos).astype(np.int64), np.ceil(pos).astype(np.int64)
        thr = np.empty(len(pos))
        for j, row in enumerate(proj):
            part = np.partition(row, (lo_i[j], hi_i[j]))
            thr[j] = part[lo_i[j]] + (part[hi_i[j]] - part[lo_i[j]]) * (pos[j] - lo_i[j])
        self.thresholds.copy_(torch.from_numpy(thr).view(self.depth, self.bits).to(self.thresholds))
        self.is_fitted.fill_(True)
        return self

    def buckets(self, x: Tensor) -> Tensor:
        """Region index per depth: x (B, input_dim) -> (B, depth) long in [0, width)."""
        if not torch.compiler.is_compiling() and not self.fitted:  # a buffer's value: no guard on it in export
            raise RuntimeError("StaticEMDE is not fitted: call .fit(x) on the training vectors (or load a "
                               "fitted state_dict) before using it")
        side = self._project(x) > self.thresholds                           # (B, depth, bits) bool
        return (side.long() * self.powers).sum(-1)                          # (B, depth)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, D): the one-hot region of each vector per depth. A set of vectors per item, x (B, L, D) with
        mask (B, L) (True = a real vector): the normalised count of its vectors' regions per depth, the
        original EMDE's sketch of a set (each vector sketched, the sketches summed, each depth block summing
        to one). An empty set gets the uniform distribution: no evidence for any region."""
        dtype = x.dtype if x.is_floating_point() else torch.float32
        if mask is None:
            idx = self.buckets(x)                                           # (B, depth)
            return F.one_hot(idx, self.width).to(dtype).view(x.shape[0], self.output_dim)  # (B, depth*width)
        b, n = mask.shape
        idx = self.buckets(x.reshape(b * n, -1)).view(b, n, self.depth)     # (B, L, depth)
        idx = idx + self.width * torch.arange(self.depth, device=idx.device)  # column of each region in the sketch
        w = mask.to(dtype)[..., None].expand(b, n, self.depth)              # (B, L, depth): 0 for padding
        counts = torch.zeros(b, self.output_dim, dtype=dtype, device=x.device)
        counts.scatter_add_(1, idx.reshape(b, -1), w.reshape(b, -1))        # (B, depth*width) region counts
        tokens = mask.sum(1, keepdim=True).to(dtype)                        # (B, 1)
        return torch.where(tokens > 0, counts / tokens.clamp_min(1), 1.0 / self.width)

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, depth={self.depth}, width={self.width}, seed={self.seed}, "
                f"quantile_range={self.quantile_range}, fitted={self.fitted}")
