"""`pipeline bundle --workdir W --out B`: only what prediction needs, in the form that loads fastest.

    B/manifest.json                every file's sha256 and size (checked on load), the format, what it came from
    B/config.json                  the configuration W was trained with (a work-directory record)
    B/<[fusion] output>/model.pt   the fusion heads, as W has them
    B/models/<modality>/model.pt   each network the fusion reads, as W has them (the sha256 the fusion recorded)
    B/tokenizers/title_bpe.*       title_bpe's SentencePiece model
    B/upstream/text-model/         the text model: config.json, its tokenizer and model.safetensors with the
                                   layers `[text_model] layers` runs only, in float16 (loaded as float32)
    B/upstream/image.safetensors   the image backbone's weights (float32)
    B/class_names.csv              when `[serve] class_names` names one

No feature or sketch store, no training state (`last.pt`), no catalogue: every item is computed from its
inputs. `Predictor.load(B)`, `pipeline predict --model B` and `pipeline serve --model B` read it with W
gone. The text model is the one part not copied as it is: float16 halves it (the demo's multilingual-e5-small
embeds 250,037 pieces), so a bundle's text features differ from W's within float16 rounding (README "Bundles"
gives how often a prediction differs); everything else is bit for bit W's.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import polars as pl

from pipeline import checkpoint, workdir as wd
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.manifest import CLASS_NAMES, FORMAT, IMAGE_WEIGHTS, MANIFEST, TEXT_MODEL, is_bundle
from pipeline.provenance import output_lock, sha256_file, staged_dir, write_json
from pipeline.predictor import Predictor, split_class_names

TEXT_MODALITIES = ("title_cam", "desc_cam")


# ---------------------------------------------------------------------- writing one
def _check_out(out: Path, workdir: Path) -> None:
    if out.is_symlink() or (out.exists() and not is_bundle(out)):
        raise PipelineError(f"--out {out}: exists and is not a bundle; give a new folder (or a bundle to replace)")
    o, w = out.resolve(), workdir.resolve()
    if o == w or o.is_relative_to(w) or w.is_relative_to(o):
        raise PipelineError(f"--out {out}: it is, holds or lies inside the work directory {workdir}; give a folder "
                            f"outside it")
    if not out.parent.is_dir():
        raise PipelineError(f"--out {out}: the folder {out.parent} does not exist; create it first")


def write_bundle(workdir: str | Path, out: str | Path, cfg: Config, log=print) -> dict:
    """Write B from W; returns its manifest (with the loaded bundle's `version`)."""
    workdir, out = Path(workdir), Path(out)
    if is_bundle(workdir):
        raise PipelineError(f"--workdir {workdir} is a bundle already; bundle a trained work directory")
    _check_out(out, workdir)
    started = time.perf_counter()
    fusion, models = checkpoint.load_fused(workdir, cfg)  # every model the one the fusion recorded
    with output_lock(out), staged_dir(out) as tmp:
        wd.remember(tmp, cfg)  # the configuration W was trained with, as W records it
        for path in [wd.fusion_path(workdir, cfg), *(wd.model_path(workdir, m) for m in models)]:
            _copy(path, tmp / path.relative_to(workdir))
        if "title_bpe" in models:
            bpe = wd.bpe_model_path(workdir)
            for f in sorted(bpe.parent.glob(f"{bpe.stem}.*")):
                _copy(f, tmp / bpe.parent.relative_to(workdir) / f.name)
        if set(TEXT_MODALITIES) & set(models):
            _text_model(cfg, workdir, tmp / TEXT_MODEL)
        if "image" in models:
            _image_weights(cfg, workdir, tmp / IMAGE_WEIGHTS)
        if cfg.serve.class_names:
            _copy(Path(cfg.serve.class_names).expanduser(), tmp / CLASS_NAMES)
        elif names := split_class_names(workdir):  # the training catalogue's own names
            pl.DataFrame({"prdtypecode": list(names), "name": list(names.values())}).write_csv(tmp / CLASS_NAMES)
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "workdir": str(workdir.resolve()), "modalities": sorted(models),
                    "files": files}
        write_json(tmp / MANIFEST, manifest)  # last: a folder without it is no bundle
    version = Predictor.load(out, reuse=False).version  # it loads, from its own files alone
    size = sum(f["bytes"] for f in files.values())
    log(f"bundle: {out} ({size / 2**20:.1f} MiB, {len(files)} files, version {version}) in "
        f"{time.perf_counter() - started:.1f} s")
    return manifest | {"version": version, "bytes": size}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _text_model(cfg: Config, workdir: Path, out: Path) -> None:
    """The text model W's extractors run: its first `[text_model] layers` layers (all when 0), float16 weights
    (config dtype float32: loaded as float32), and its tokenizer (`_tokenizer`)."""
    import json

    import torch
    from safetensors.torch import save_file

    from pipeline.upstream import text_model_dir
    from pipeline.weights.text import load_text_model, text_config

    src = text_model_dir(cfg, workdir)
    tokenizer, model = load_text_model(src)
    if cfg.text_model.layers:
        model.encoder.layer = model.encoder.layer[: cfg.text_model.layers]
    out.mkdir(parents=True)
    state = {k: v.to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in vars(text_config(src)).items() if k not in ("torch_dtype", "_name_or_path")}
    config |= {"num_hidden_layers": len(model.encoder.layer), "dtype": "float32"}  # every key, defaults filled
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _tokenizer(tokenizer, src, out, _texts(workdir, cfg))


def _tokenizer(tokenizer, src: Path, out: Path, texts: list[str]) -> None:
    """The tokenizer as the `tokenizer.json` of its pipeline as loaded (the model class may rebuild the file's),
    with a generic config of its special tokens and length limit: a bundle then reads it with `tokenizers` alone
    (`weights.text.FastTokenizer`), without transformers. Kept only if that reader gives the same ids as the
    original on `texts`; else the original files are copied as they are."""
    import json

    from pipeline.weights.text import FastTokenizer

    if hasattr(tokenizer, "backend_tokenizer"):
        special = {f"{k}_token": str(getattr(tokenizer, f"{k}_token")) for k in FastTokenizer.SPECIAL
                   if getattr(tokenizer, f"{k}_token", None) is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tokenizer.model_max_length}
        tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(config | special, indent=1))
        generic = FastTokenizer.of(out)
        ids = ("cls_token_id", "sep_token_id", "pad_token_id")
        if generic is not None and all(getattr(generic, k) == getattr(tokenizer, k) for k in ids) and \
                generic(texts)["input_ids"] == tokenizer(texts, add_special_tokens=False)["input_ids"]:
            return
        for f in out.glob("tokenizer*"):
            f.unlink()
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in (".safetensors", ".bin") and f.name != "config.json" \
                and not f.name.endswith(".index.json"):
            _copy(f, out / f.name)


PROBES = ["Piscine tubulaire 3 m", "Livre d'occasion - très bon état", "éàü ÉÀÜ ß œ 東京 😀", "<b>x</b> &amp; y",
          "  spaces   and\ttabs\n", "", "a" * 600]


def _texts(workdir: Path, cfg: Config, n: int = 2000) -> list[str]:
    """Texts to compare two tokenizers on: W's catalogue's titles and descriptions (when W names it), probes."""
    from pipeline.catalog import load_catalog

    texts = list(PROBES)
    catalog = (wd.recorded(workdir) or {}).get("catalog")
    if catalog and Path(catalog).is_dir():
        items = load_catalog(catalog, cfg, require_train=False).items.head(n)
        texts += items["title"].to_list() + items["description"].to_list()
    return [cfg.text_model.prefix + t for t in texts]


def _image_weights(cfg: Config, workdir: Path, out: Path) -> None:
    from safetensors.torch import save_file

    from pipeline.upstream import image_weights
    from pipeline.weights.image import load_image_backbone

    weights = image_weights(cfg, workdir)
    if weights is None:
        raise PipelineError("[image] weights = \"random\": a backbone drawn at random on each load has nothing to "
                            "bundle; bundle a work directory trained with real weights")
    model = load_image_backbone(cfg.options("image").model, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata={"format": "pt"})
