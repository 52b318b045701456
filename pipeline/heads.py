"""The fusion heads of paper Figure 2: linear layers over input sketches, trained jointly, logits summed.

"We feed these sketches to separate linear layers, which are trained jointly. Obtained per-class
logits for each modality are summed and argmax operation on the vector of length 27 defines the final
prediction." Which sketches each head reads is configuration ([fusion] heads); heads that share a name
share one set of weights, which is how the paper counts the CamemBERT title head twice.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.errors import PipelineError


class FusionHeads(nn.Module):
    """Linear heads over (concatenated) sketches; the fused logits are their sum.

    heads: [{"name": str, "inputs": [modality, ...]}, ...]; a name used twice is one nn.Linear.
    dims: sketch width of each modality. forward: {modality: (B, dims[m])} -> (B, num_classes)
    """

    def __init__(self, heads: list[dict], dims: dict[str, int], num_classes: int):
        super().__init__()
        self.heads = [(h["name"], list(h["inputs"])) for h in heads]
        self.num_classes = int(num_classes)
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

    def forward(self, sketches: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self.head_logits(sketches)).sum(0)  # (B, num_classes)
