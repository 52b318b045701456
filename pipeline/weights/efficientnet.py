"""timm's EfficientNet-B and EfficientNet-Lite backbones in plain torch: `forward_features` only.

The same networks as timm's ``efficientnet_b0``-``b8``, ``efficientnet_lite0``-``4`` and their ``tf_`` variants
built with ``num_classes=0``, with the same module names, so a timm state dict loads as it is (and
`pipeline.backbone.split` cuts it as it cuts timm's). It exists for the load: importing timm imports
torchvision, which imports torch._dynamo (1.5 s of a bundle's 4 s load on 2 cores). `weights/image.py` picks it
for the names below and leaves every other one to timm; tests/test_weights.py holds it equal to timm's.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# (block, repeats, kernel, stride, expansion, channels) of each stage, before the width and depth multipliers
STAGES = (("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
          ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320))
# (width, depth) multipliers
B = [(1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8), (1.6, 2.2), (1.8, 2.6), (2.0, 3.1), (2.2, 3.6)]
LITE = B[:5]


def arch(name: str) -> dict | None:
    """The architecture timm builds for `name`, or None when this module does not build it."""
    m = re.fullmatch(r"(tf_)?efficientnet_(b|lite)([0-9])", name)
    if m is None or int(m[3]) >= len(B if m[2] == "b" else LITE):
        return None
    lite, tf = m[2] == "lite", m[1] is not None
    width, depth = (LITE if lite else B)[int(m[3])]
    return {"width": width, "depth": depth, "lite": lite,
            "act": nn.ReLU6 if lite else nn.SiLU,  # timm's "relu6" and "swish"
            "same": tf, "eps": 1e-3 if tf else 1e-5}  # TensorFlow's "same" padding and BatchNorm eps


def round_channels(channels: float, width: float) -> int:
    """timm's round_channels: to a multiple of 8, never more than 10% down."""
    v = channels * width
    new = max(8, int(v + 4) // 8 * 8)
    return new + 8 if new < 0.9 * v else new


class Conv(nn.Conv2d):
    """nn.Conv2d without bias; with `same`, TensorFlow's padding: symmetric where it can be (stride 1), else the
    input padded more on the bottom and right for its size (timm's Conv2dSame)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, same: bool = False):
        self.dynamic = same and stride > 1
        super().__init__(cin, cout, k, stride, 0 if self.dynamic else (stride - 1 + k - 1) // 2, groups=groups,
                         bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            ih, iw = x.shape[-2:]
            k, s = self.kernel_size[0], self.stride[0]
            ph, pw = (max((math.ceil(n / s) - 1) * s + k - n, 0) for n in (ih, iw))
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm then the activation (timm's BatchNormAct2d: the same state dict keys)."""

    def __init__(self, channels: int, eps: float, act: type[nn.Module] | None):
        super().__init__(channels, eps=eps)
        self.act = act(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, act: type[nn.Module]):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = act(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, C, H, W)
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        return x * s.sigmoid()


class Block(nn.Module):
    """timm's DepthwiseSeparableConv ("ds": depthwise, SE, pointwise) or InvertedResidual ("ir": pointwise
    expansion first, then the same, ending in conv_pwl); a skip where the shape allows."""

    def __init__(self, kind: str, cin: int, cout: int, k: int, stride: int, expand: int, se: bool, a: dict):
        super().__init__()
        act, eps, same = a["act"], a["eps"], a["same"]
        mid = cin * expand  # timm's make_divisible: channels are multiples of 8 already
        if kind == "ir":
            self.conv_pw, self.bn1 = Conv(cin, mid, 1, same=same), BatchNormAct(mid, eps, act)
        self.conv_dw = Conv(mid, mid, k, stride, groups=mid, same=same)
        dw_bn = BatchNormAct(mid, eps, act)
        # SE reduced from the block's input width (timm: ratio 0.25 / expansion of the expanded width)
        self.se = SqueezeExcite(mid, round(mid * (0.25 / expand)), act) if se else nn.Identity()
        if kind == "ir":
            self.bn2 = dw_bn
            self.conv_pwl, self.bn3 = Conv(mid, cout, 1, same=same), BatchNormAct(cout, eps, None)
        else:
            self.bn1 = dw_bn
            self.conv_pw, self.bn2 = Conv(mid, cout, 1, same=same), BatchNormAct(cout, eps, None)
        self.kind, self.skip = kind, stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.kind == "ir":
            y = self.bn1(self.conv_pw(y))
            y = self.se(self.bn2(self.conv_dw(y)))
            y = self.bn3(self.conv_pwl(y))
        else:
            y = self.se(self.bn1(self.conv_dw(y)))
            y = self.bn2(self.conv_pw(y))
        return y + x if self.skip else y


class EfficientNet(nn.Module):
    """forward_features: (B, 3, H, W) -> (B, num_features, H/32, W/32)."""

    def __init__(self, a: dict):
        super().__init__()
        width, eps, act, same = a["width"], a["eps"], a["act"], a["same"]
        cin = 32 if a["lite"] else round_channels(32, width)
        self.conv_stem, self.bn1 = Conv(3, cin, 3, 2, same=same), BatchNormAct(cin, eps, act)
        stages = []
        for i, (kind, repeats, k, stride, expand, channels) in enumerate(STAGES):
            fixed = a["lite"] and i in (0, len(STAGES) - 1)  # timm's fix_first_last
            n = repeats if fixed else math.ceil(repeats * a["depth"])
            cout = round_channels(channels, width)
            blocks = []
            for j in range(n):
                blocks.append(Block(kind, cin, cout, k, stride if j == 0 else 1, expand, not a["lite"], a))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.num_features = 1280 if a["lite"] else round_channels(1280, width)
        self.conv_head = Conv(cin, self.num_features, 1, same=same)
        self.bn2 = BatchNormAct(self.num_features, eps, act)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv_stem(x))
        x = self.blocks(x)
        return self.bn2(self.conv_head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, num_features): timm's num_classes=0
        return self.forward_features(x).mean((2, 3))
