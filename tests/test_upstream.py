"""configs/paper.toml's models by their usual ids, found offline the way the libraries cache them: a Hugging Face
cache (HF_HOME) for CamemBERT-base and timm's efficientnet_b2, torch hub's checkpoints folder (TORCH_HOME) for
timm's older downloads. This machine has no network: only these offline paths are tested (a download is
huggingface_hub's and timm's own call)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.synth import synthesize
from pipeline.upstream import check_models, hub_text_model, image_weights, text_model_dir, timm_weights
from tests.conftest import process

PAPER = load_config("configs/paper.toml")
B2_REPO, B2_FILE = "timm/efficientnet_b2.ra_in1k", "efficientnet_b2_ra-bcdf34b7.pth"


def cached(hub: Path, repo: str, files: dict[str, bytes], revision: str = "0123abcd") -> Path:
    """A snapshot of `repo` in a Hugging Face cache laid out as huggingface_hub writes it."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches for this test (what HF_HOME and TORCH_HOME point to)."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return hub, tmp_path / "torch"


def test_a_text_model_id_is_found_in_the_hugging_face_cache_under_either_name(caches):
    hub, _ = caches
    assert hub_text_model("almanach/camembert-base", fetch=False) is None
    snapshot = cached(hub, "camembert-base", {"config.json": b"{}"})  # cached under the model's old id
    assert hub_text_model("almanach/camembert-base", fetch=False) == snapshot
    assert text_model_dir(PAPER, "unused") == snapshot


def test_timms_weights_are_found_in_the_hugging_face_cache_or_torch_hubs(caches, tmp_path):
    hub, torch_home = caches
    assert timm_weights("efficientnet_b2", fetch=False) is None
    legacy = torch_home / "hub" / "checkpoints" / B2_FILE  # where timm's url downloads went
    legacy.parent.mkdir(parents=True, exist_ok=True)  # timm makes the folder when it looks
    legacy.write_bytes(b"weights")
    assert timm_weights("efficientnet_b2", fetch=False) == legacy
    snapshot = cached(hub, B2_REPO, {"model.safetensors": b"weights"})  # where timm's hub downloads go: first
    assert timm_weights("efficientnet_b2", fetch=False) == snapshot / "model.safetensors"
    assert image_weights(PAPER, tmp_path) == snapshot / "model.safetensors"


def test_missing_paper_models_are_named_before_anything_is_written(caches, tmp_path):
    with pytest.raises(PipelineError) as refused:
        check_models(PAPER, ["title_cam", "image"], "products.csv", tmp_path / "w",
                     "train")
    message = str(refused.value)
    assert "\"almanach/camembert-base\" is neither a local directory nor in the local Hugging Face cache" in message
    assert "timm's weights of 'efficientnet_b2' are neither in the local Hugging Face cache nor in torch hub's" in message
    assert f"`pipeline train --catalog products.csv --workdir {tmp_path / 'w'}`" in message
    assert f"`pipeline models --catalog products.csv --workdir {tmp_path / 'w'} --config configs/paper.toml`" in message
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_the_papers_models_from_local_caches_run_every_stage(tmp_path):
    """paper.toml offline, its models in the caches: a tiny CamemBERT under CamemBERT-base's id, random
    efficientnet_b2 weights where timm keeps efficientnet_b2.ra_in1k's (the real ones need a network)."""
    import timm
    from safetensors.torch import save_file

    from pipeline.weights.tiny_camembert import build_tiny_camembert

    hub = tmp_path / "hf" / "hub"
    model = build_tiny_camembert([f"texte numéro {i}" for i in range(200)], tmp_path / "tiny", vocab_size=200)
    cached(hub, "almanach/camembert-base", {f.name: f.read_bytes() for f in model.iterdir() if f.is_file()})
    weights = timm.create_model("efficientnet_b2", pretrained=False).state_dict()
    save_file(weights, cached(hub, B2_REPO, {}) / "model.safetensors")
    synthesize(tmp_path / "cat", items=60, seed=2, missing_image_fraction=0.0)
    done = process("train", "--catalog", tmp_path / "cat", "--workdir", tmp_path / "w", "--config",
                   "configs/paper.toml", "--set", "pretrain.epochs=1", "--set", "pretrain.depth=4",
                   "--set", "pretrain.width=8", "--set", "fusion.epochs=1", "--set", "image.input_size=64",
                   cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")})
    _, err = done.communicate(timeout=1200)
    assert done.returncode == 0, err[-3000:]
    assert "validation macro-F1 (%)" in err
