"""The image stage's decode path against the Pillow eval transform it replaces, and its bad-input codes."""
from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.extract.image import NO_FILE, REFUSED, UNREADABLE, ImageMaps, encoded, jpeg_frame, load_photo

OPTS = load_config(DEFAULT_CONFIG).options("image").model_dump() | {
    "model": "tf_efficientnet_lite0", "input_size": 64, "batch_size": 4, "decode_workers": 2}


def picture(height: int, width: int, seed: int) -> Image.Image:
    """Smooth colour waves under pixel noise: edges and texture for the resize to get wrong."""
    y, x = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 100 * np.sin(x / 13 + c) * np.cos(y / 29 - c) for c in range(3)], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(waves + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("photos")
    made = {
        "jpeg": (picture(500, 500, 0), {"format": "JPEG", "quality": 90}),
        "wide": (picture(333, 517, 1), {"format": "JPEG", "quality": 75}),
        "small": (picture(40, 56, 2), {"format": "JPEG"}),  # upscaled
        "progressive": (picture(300, 240, 3), {"format": "JPEG", "progressive": True}),
        "444": (picture(200, 260, 4), {"format": "JPEG", "subsampling": 0}),
        "grey": (picture(120, 150, 5).convert("L"), {"format": "JPEG"}),
        "cmyk": (picture(120, 150, 6).convert("CMYK"), {"format": "JPEG"}),
        "png": (picture(90, 70, 7), {"format": "PNG"}),
        "rgba": (picture(90, 70, 8).convert("RGBA"), {"format": "PNG"}),
        "webp": (picture(90, 70, 9), {"format": "WEBP", "lossless": True}),
    }
    paths = {}
    for name, (im, kw) in made.items():
        paths[name] = d / f"{name}.jpg"  # every photo under a .jpg name, as in a catalogue
        im.save(paths[name], **kw)
    good = paths["jpeg"].read_bytes()
    paths["truncated"] = d / "truncated.jpg"
    paths["truncated"].write_bytes(good[: len(good) // 2])
    paths["empty"] = d / "empty.jpg"
    paths["empty"].write_bytes(b"")
    paths["noise"] = d / "noise.jpg"
    paths["noise"].write_bytes(np.random.default_rng(0).bytes(5000))
    paths["bomb"] = d / "bomb.jpg"  # the frame header says 20000 x 20000: refused before any decoding
    sof = good.index(b"\xff\xc0")
    paths["bomb"].write_bytes(good[: sof + 5] + struct.pack(">HH", 20_000, 20_000) + good[sof + 9 :])
    paths["missing"] = d / "missing.jpg"
    paths["directory"] = d / "directory.jpg"
    paths["directory"].mkdir()
    return paths


@pytest.fixture(scope="module")
def extractor() -> ImageMaps:
    return ImageMaps(OPTS, None, torch.device("cpu"))


GOOD = ["jpeg", "wide", "small", "progressive", "444", "grey", "cmyk", "png", "rgba", "webp"]
BAD = {"missing": NO_FILE, "truncated": UNREADABLE, "empty": UNREADABLE, "noise": UNREADABLE,
       "bomb": UNREADABLE, "directory": REFUSED}


def reference(extractor: ImageMaps, path: Path) -> torch.Tensor:
    """The previous path: Pillow's decode and timm's eval transform, (3, S, S) float32 normalised."""
    transform = timm.data.create_transform(**extractor.data_cfg, is_training=False)
    with Image.open(path) as im:
        return transform(im.convert("RGB"))


def test_jpeg_frame_reads_the_header_only(photos):
    assert jpeg_frame(photos["jpeg"].read_bytes()) == (500, 500, 3)
    assert jpeg_frame(photos["wide"].read_bytes()) == (333, 517, 3)
    assert jpeg_frame(photos["progressive"].read_bytes()) == (300, 240, 3)
    assert jpeg_frame(photos["grey"].read_bytes()) == (120, 150, 1)
    assert jpeg_frame(photos["cmyk"].read_bytes()) == (120, 150, 4)
    assert jpeg_frame(photos["bomb"].read_bytes()) == (20_000, 20_000, 3)
    for name in ("png", "webp", "empty", "noise"):
        assert jpeg_frame(photos[name].read_bytes()) is None, name
    assert jpeg_frame(photos["jpeg"].read_bytes()[:100]) is None  # cut before its frame header


def test_decoded_photos_match_the_pillow_eval_transform(photos, extractor):
    """Every format, through whichever decoder takes it: within 2 uint8 levels of Pillow's pixels (antialiased
    resizes on tensors round differently on a few pixels), i.e. 2 / 255 / std in normalised units."""
    batch, missing = extractor.prepare(pl.DataFrame({"image_path": [str(photos[n]) for n in GOOD]}))
    assert batch.dtype == torch.uint8 and batch.shape == (len(GOOD), 3, 64, 64) and not missing.any()
    assert batch.is_contiguous(memory_format=torch.channels_last)  # the model's layout: batches copy as they are
    got = extractor.normalize(batch)
    want = torch.stack([reference(extractor, photos[n]) for n in GOOD])
    levels = ((got - want).abs() * torch.tensor(extractor.std).view(3, 1, 1) * 255).round()
    assert levels.max() <= 2, {n: levels[i].max().item() for i, n in enumerate(GOOD)}
    assert (levels > 0).float().mean() < 0.02  # ~0.5% here: the rest are Pillow's pixels exactly


def test_the_float_resize_of_the_gpu_path_is_pillows_too(photos, extractor):
    """Where torch resizes in float (CUDA), one axis at a time and rounded in between: within one level of
    Pillow's pixels (run here on the CPU, the same ops)."""
    transform = timm.data.create_transform(**extractor.data_cfg, is_training=False)
    pil_steps = transforms.Compose(transform.transforms[:2])  # Resize, CenterCrop
    for name in ("jpeg", "wide", "small", "444"):
        x = decode_jpeg(encoded(photos[name].read_bytes()), mode=ImageReadMode.RGB)
        got = F.center_crop(extractor.resize.by_axis(x), extractor.resize.crop).int()
        with Image.open(photos[name]) as im:
            want = F.pil_to_tensor(pil_steps(im.convert("RGB"))).int()
        assert (got - want).abs().max() <= 1, name


def test_missing_and_unreadable_photos_get_their_codes(photos, extractor):
    for name, code in BAD.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # and no warning escapes
            assert load_photo(str(photos[name]), extractor.resize, extractor.max_bytes) == (None, code), name
    names = ["jpeg", "missing", "png", "truncated", "bomb", "grey", "empty"]
    batch, missing = extractor.prepare(pl.DataFrame({"image_path": [str(photos[n]) for n in names]}))
    assert missing.tolist() == [0, NO_FILE, 0, UNREADABLE, UNREADABLE, 0, UNREADABLE]
    assert len(batch) == 3  # only the photos that decoded, in item order
    assert torch.equal(batch[2], load_photo(str(photos["grey"]), extractor.resize, extractor.max_bytes)[0])


def test_maps_land_on_their_items(photos, extractor):
    """compute: the photos' maps go to the rows of their items, the missing ones stay zero; equal to the
    model's forward on the Pillow reference within what one level of rounding moves."""
    names = ["missing", "jpeg", "wide", "truncated", "small", "png", "444", "grey"]  # two batches of 4 photos
    paths = pl.DataFrame({"image_path": [str(photos[n]) for n in names]})
    maps, missing = extractor.compute(extractor.prepare(paths))
    maps = maps["maps"].astype(np.float32)
    present = [i for i, n in enumerate(names) if n not in BAD]
    assert not maps[[0, 3]].any() and missing[[0, 3]].tolist() == [NO_FILE, UNREADABLE]
    with torch.inference_mode():
        want = torch.stack([reference(extractor, photos[names[i]]) for i in present])
        direct = extractor.model.forward_features(want)
    diff = np.abs(maps[present] - direct.numpy())
    # ~0.2% of the maps' mean and of their largest value here
    assert diff.mean() < 0.01 * np.abs(direct.numpy()).mean() and diff.max() < 0.02 * np.abs(direct.numpy()).max()


def test_batched_device_path_decodes_like_the_threads(photos, extractor):
    """The nvJPEG path's logic (one batch, resized by shape, the rest photo by photo), run on the CPU, where
    `decode_jpeg` takes the same list: the same pixels and codes as the threads; a bad JPEG in the batch
    sends the block to the per-photo path."""
    for names in (GOOD, GOOD + ["truncated", "missing"]):
        paths = [str(photos[n]) for n in names]
        batched = extractor.decode_on_device(paths)
        threads = [load_photo(p, extractor.resize, extractor.max_bytes) for p in paths]
        assert [c for _, c in batched] == [c for _, c in threads]
        for (a, _), (b, _) in zip(batched, threads):
            assert (a is None and b is None) or torch.equal(a, b)
