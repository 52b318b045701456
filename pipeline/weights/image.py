"""Image backbones: a timm model with a local weights file, loaded strictly (no model hub: `pretrained=False`);
the EfficientNets built by `weights.efficientnet` (the same network, without importing timm)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ModelNotFoundError, PipelineError, WeightsMismatchError, one_line

IMAGE_WEIGHTS_HINT = (
    "give [image] weights (or --image-weights FILE) a local weights file for the [image] model, \"pretrained\" "
    "(timm's own weights, from the local cache) or \"packaged\" (tf_efficientnet_lite0 and lite2, installed "
    "with the pipeline)"
)

def _read_state_dict(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict) and not any(
            hasattr(v, "shape") for v in sd.values()
        ):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict):
        raise WeightsMismatchError(f"'{path}' holds no state dict ({type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_image_backbone(
    name: str,
    weights: str | Path | None,
    *,
    random_ok: bool = False,
    num_classes: int = 0,
):
    """A timm model ``name`` (``pretrained=False``) with a local weights file, in eval mode.

    The load is strict except for the classifier: with ``num_classes`` different from the file's (0 by
    default: no classifier, the model returns pooled features; ``forward_features`` gives the map), the
    file's classifier keys are dropped and the new classifier keeps its init. ``weights=None`` is an error
    unless ``random_ok=True`` (benchmarks on random weights). A weights file for a network without classifier
    that `weights.efficientnet` builds loads into that one, timm's network in plain torch, which carries no
    ``pretrained_cfg``: the eval transform comes from the name (`modalities.image_maps.data_config`).
    """
    if weights is None or str(weights).strip() == "":
        if not random_ok:
            raise ModelNotFoundError(f"no image weights given for '{name}': {IMAGE_WEIGHTS_HINT}")
        path = None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"no image weights file at '{weights}': {IMAGE_WEIGHTS_HINT}")
    model = _network(name, num_classes, plain=path is not None)
    if path is not None:
        try:
            sd = _read_state_dict(path)
        except WeightsMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable file
            raise ModelNotFoundError(
                f"cannot read image weights '{weights}' ({type(e).__name__}: {one_line(e)}): {IMAGE_WEIGHTS_HINT}"
            ) from e
        _load_strict_but_classifier(model, sd, name, weights)
    model.eval()
    return model


def _network(name: str, num_classes: int, plain: bool):
    """The network, at random: `weights.efficientnet`'s where it builds it (and `plain`), else timm's."""
    from pipeline.weights import efficientnet

    a = efficientnet.arch(name) if plain and num_classes == 0 else None
    if a is not None:
        return efficientnet.EfficientNet(a)
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise PipelineError(f"unknown image backbone '{name}': {one_line(e)}") from e


def _load_strict_but_classifier(model, sd: dict, name: str, weights: Any) -> None:
    clf = model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else "classifier"
    clf_names = clf if isinstance(clf, (list, tuple)) else [clf]

    def is_clf(k: str) -> bool:
        return any(k == c or k.startswith(c + ".") for c in clf_names)

    own = model.state_dict()
    # The file's classifier is used only when it fits the model's exactly.
    file_clf = {k: v for k, v in sd.items() if is_clf(k)}
    clf_fits = bool(file_clf) and all(k in own and tuple(own[k].shape) == tuple(v.shape) for k, v in file_clf.items())
    body = {k: v for k, v in sd.items() if not is_clf(k)}
    if clf_fits:
        body.update(file_clf)
    missing = [k for k in own if k not in body and not (is_clf(k) and not clf_fits)]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and tuple(own[k].shape) != tuple(body[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(body[k].shape)}, model {tuple(own[k].shape)})"
            )
        raise WeightsMismatchError(
            f"image weights '{weights}' do not fit timm model '{name}': {'; '.join(parts)}; "
            "convert them for this architecture or use the model they were saved from"
        )
    model.load_state_dict(body, strict=False)
