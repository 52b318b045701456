"""The fusion heads of paper Figure 2: linear layers over input sketches, trained jointly, logits summed.

"We feed these sketches to separate linear layers, which are trained jointly. Obtained per-class
logits for each modality are summed and argmax operation on the vector of length 27 defines the final
prediction." Which sketches each head reads is configuration ([fusion] heads); heads that share a name
share one set of weights, which is how the paper counts the CamemBERT title head twice.

The same heads also make the late fusion paper 3.5 compares with ("simple ensembling of probabilities
from all per-modality networks", [fusion] method = "average"): each head is then one modality's
pretrained head, and the fused prediction is the mean of the heads' class probabilities.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.errors import PipelineError


class FusionHeads(nn.Module):
    """Linear heads over (concatenated) sketches; the fused logits are their sum (or, "average", the log of the
    mean of their probabilities).

    heads: [{"name": str, "inputs": [modality, ...]}, ...]; a name used twice is one nn.Linear.
    dims: sketch width of each modality. method: "joint" (logits summed) or "average" (the mean of the heads'
    softmax probabilities, returned as its log, so that a softmax of the output gives that mean back).
    forward: {modality: (B, dims[m])} -> (B, num_classes)
    """

    def __init__(self, heads: list[dict], dims: dict[str, int], num_classes: int, method: str = "joint"):
        super().__init__()
        if method not in ("joint", "average"):
            raise PipelineError(f"[fusion] method: 'joint' or 'average', not {method!r}")
        self.heads = [(h["name"], list(h["inputs"])) for h in heads]
        self.num_classes = int(num_classes)
        self.method = method
        self.linears = nn.ModuleDict()
        for name, inputs in self.heads:
            in_dim = sum(dims[m] for m in inputs)
            if name in self.linears:
                if self.linears[name].in_features != in_dim:
                    raise PipelineError(f"[fusion] heads: two heads named '{name}' read sketches of different sizes")
                continue
            self.linears[name] = nn.Linear(in_dim, num_classes)

    def head_logits(self, sketches: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One (B, num_classes) logit tensor per head, in config order."""
        return [self.linears[name](torch.cat([sketches[m] for m in inputs], dim=-1)) for name, inputs in self.heads]

    def shares(self, sketches: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each modality's additive share of the output, and the biases': (len(sketches) + 1, B, num_classes),
        rows in `sketches` order, the biases last.

        "joint": shares of the logit. A head over concatenated sketches is W [s1; s2] + b = W1 s1 + W2 s2 + b,
        so even a shared head splits exactly into one term per modality; the rows sum to `forward`'s logits.
        "average": shares of the probability: each head's softmax over the number of heads (their mean is
        the fused probability; every head's bias is inside its own softmax, so the bias row is zero)."""
        names = list(sketches)
        first = next(iter(sketches.values()))
        out = first.new_zeros((len(names) + 1, first.shape[0], self.num_classes))
        for name, inputs in self.heads:
            linear, start = self.linears[name], 0
            for m in inputs:
                width = sketches[m].shape[-1]
                term = sketches[m] @ linear.weight[:, start : start + width].T  # (B, num_classes)
                if self.method == "average":
                    term = torch.softmax(linear(sketches[m]), dim=-1) / len(self.heads)
                out[names.index(m)] += term
                start += width
            if self.method == "joint":
                out[-1] += linear.bias
        return out

    def forward(self, sketches: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = torch.stack(self.head_logits(sketches))  # (heads, B, num_classes)
        if self.method == "joint":
            return logits.sum(0)  # (B, num_classes)
        # log(mean_h softmax(logits_h)), computed in log space
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(len(self.heads))
