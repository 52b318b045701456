"""A photo is known by its bytes: one replaced by another of the same name and size is never taken for the old
one, neither by `extract` (which refuses to mix versions and names the rebuild that extracts it again) nor by
the Predictor (which reuses a stored sketch only for the very same photo)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.catalog import load_catalog
from pipeline.config import load_config
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.predictor import Predictor
from pipeline.pretrain import pretrain
from pipeline.sketch import sketch
from pipeline.synth import synthesize
from stores import FeatureStore

from tests.conftest import cli, one_error_line

from .conftest import DEMO, quiet

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
IMAGE_ONLY = """
[stores]
block_items = 16

[image]
input_size = 64
block_items = 16

[pretrain.image]
epochs = 2
batch_size = 16

[sketch]
block_items = 16

[fusion]
heads = [{ name = "image", inputs = ["image"] }]
epochs = 2
"""


@pytest.fixture(scope="module")
def image_work(tmp_path_factory):
    """A catalogue of 64 items, all with a photo, and a work directory trained on the image modality alone."""
    root = tmp_path_factory.mktemp("photos")
    synthesize(root / "catalog", items=64, seed=9, missing_image_fraction=0.0)
    config = root / "image.toml"
    config.write_text(f'base = "{DEMO}"\n{IMAGE_ONLY}')
    cfg = load_config(config)
    w = root / "work"
    extract("image", root / "catalog", w, cfg, progress=False, log=quiet)
    pretrain("image", w, cfg, progress=False, log=quiet)
    sketch("image", w, cfg, progress=False, log=quiet)
    fuse(w, cfg, progress=False, log=quiet)
    return root / "catalog", w, config


def same_size_other_photo(photos: list[Path]) -> tuple[Path, bytes]:
    """A photo of the list and other bytes of exactly its size: another photo of the list, padded after its
    end-of-image marker (decoders stop there)."""
    by_size = sorted(photos, key=lambda p: p.stat().st_size)
    small, large = by_size[0], by_size[-1]
    other = small.read_bytes()
    return large, other + b"\0" * (large.stat().st_size - len(other))


def test_a_photo_replaced_by_another_of_the_same_size_is_refused_then_extracted_again(tmp_path, image_work):
    catalog, w, config = image_work
    shutil.copytree(catalog, tmp_path / "catalog")
    shutil.copytree(w, tmp_path / "w")
    items = load_catalog(tmp_path / "catalog", load_config(config)).items
    paths = [Path(p) for p in items["image_path"].to_list()]
    target, replacement = same_size_other_photo(paths)
    donor = min(paths, key=lambda p: p.stat().st_size)
    target.write_bytes(replacement)  # same name, same size, other picture
    item = int(items.filter(pl.col("image_path") == str(target))["item_id"][0])
    args = ("extract", "image", "--catalog", tmp_path / "catalog", "--workdir", tmp_path / "w", "--config", config)
    line = one_error_line(cli(*args))
    assert f"the input of 1 stored item(s) changed since extraction (e.g. item {item})" in line, line
    assert line.endswith("--rebuild`"), line
    done = cli(*args, "--rebuild")  # the command the refusal names
    assert done.returncode == 0, done.stderr
    donor_item = int(items.filter(pl.col("image_path") == str(donor))["item_id"][0])
    with FeatureStore(tmp_path / "w" / "features" / "image.zarr") as store:
        maps = store.read("maps", [item, donor_item])
    np.testing.assert_array_equal(maps[0], maps[1])  # the new picture's maps: the donor's own


def test_the_predictor_reuses_a_stored_sketch_only_for_the_very_same_photo(tmp_path, image_work):
    catalog, w, config = image_work
    items = load_catalog(catalog, load_config(config)).items
    paths = [Path(p) for p in items["image_path"].to_list()]
    target, replacement = same_size_other_photo(paths)
    elsewhere = tmp_path / "elsewhere" / target.name  # same name, same size, other bytes, another folder
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(replacement)
    frame = pl.DataFrame({"title": ["", ""], "image": [str(target), str(elsewhere)]})
    reused = Predictor.load(w).embed(frame, "image")
    fresh = Predictor.load(w, reuse=False).embed(frame, "image")
    item = int(items.filter(pl.col("image_path") == str(target))["item_id"][0])
    with FeatureStore(w / "sketches" / "image.zarr") as store:
        stored = store.read("sketch", [item])[0]
    np.testing.assert_array_equal(reused[0], stored)  # the training photo itself: its stored sketch
    np.testing.assert_allclose(reused[1], fresh[1], rtol=1e-5, atol=1e-6)  # the other photo: computed for itself
    assert not np.allclose(reused[1], stored, atol=1e-3)
