"""The image extractor (paper 3.3-3.4): EfficientNet `forward_features` maps of every item's photo (or, with
`[image] cache_at`, the input of that backbone module, where pretraining fine-tunes the rest of it).

Photos are decoded one block ahead of the model: on CUDA by nvJPEG in one batch, elsewhere by libjpeg-turbo
in threads; each is resized and center-cropped as uint8 with the backbone's own eval transform (ImageNet
statistics, no other transformation, as in the paper), and normalised on the model's device just before
the forward. Photos libjpeg-turbo does not take (PNG, WebP, CMYK JPEG, ...) go through Pillow. Only a regular
file of at most `[image] max_bytes` is read (never a FIFO, a device or a huge file); a missing, refused or
unreadable photo is recorded in the store's `missing` array with its reason, and the run goes on. A photo's
input fingerprint is a hash of its bytes, so a photo replaced by another is never taken for the old one.
torchvision and timm are imported where a photo is decoded or the model built (together 2 s of imports), so
a run with nothing to extract imports neither: the data config is remembered (provenance.remembered).
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings
from collections import defaultdict
from collections.abc import Iterator
from functools import cached_property
from importlib.metadata import version
from pathlib import Path

import numpy as np
import polars as pl
import torch
from joblib import Parallel, delayed
from PIL import Image

from pipeline.backbone import features_until
from pipeline.distributed import torchrun
from pipeline.errors import PipelineError
from pipeline.extractor import LoadedOnce
from pipeline.provenance import remembered, sha256_file
from pipeline.weights.image import load_image_backbone
from stores import ArraySpec

NO_FILE, UNREADABLE, REFUSED = 1, 2, 3  # REFUSED: not a regular file, or over [image] max_bytes
# Frame types that libjpeg-turbo and nvJPEG both decode: baseline, extended and progressive Huffman.
HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)
# Segments that may come before the frame header: DHT, DAC, DQT, DRI, APP0-15, COM.
TABLES = {0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)}


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from the frame header of an 8-bit Huffman JPEG, without decoding it;
    None for anything else (another format, arithmetic coding, 12 bits, a file cut before its frame)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 10 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in HUFFMAN_FRAMES:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return (height, width, data[i + 9]) if data[i + 4] == 8 else None
        elif marker in TABLES:
            i += 2 + struct.unpack_from(">H", data, i + 2)[0]
        else:
            return None  # another frame type, or anything unexpected: Pillow sorts it out
    return None


def plain_jpeg(data: bytes, components: tuple[int, ...]) -> bool:
    """Whether `decode_jpeg` takes these bytes: an 8-bit Huffman JPEG of `components` channels (1: grey,
    3: YCbCr) within Pillow's pixel limit. The rest (other formats, CMYK, bombs) goes to `decode`, whose
    Pillow converts them as before and refuses what is too big."""
    frame = jpeg_frame(data)
    return frame is not None and frame[2] in components and \
        frame[0] * frame[1] <= (Image.MAX_IMAGE_PIXELS or float("inf"))


def decode(data: bytes, transform, draft_size: int) -> tuple[torch.Tensor | None, int]:
    """One photo's bytes through Pillow, then `transform`, or None and why not: the path of the photos that are
    not plain JPEGs (PNG, WebP, CMYK JPEG, ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                # The bomb guard itself: catch_warnings is not thread-safe (decode threads restore each
                # other's filters), so Pillow's warning alone may let a bomb of up to 2x its limit through.
                if im.width * im.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                    return None, UNREADABLE
                im.draft("RGB", (draft_size, draft_size))  # JPEG: decode big photos at reduced scale
                return transform(im.convert("RGB")), 0
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, UNREADABLE


def chunks(path: str, max_bytes: int) -> Iterator[bytes | int]:
    """A photo file's bytes in pieces of at most 1 MiB, or one int: why it is not read (NO_FILE, UNREADABLE,
    REFUSED). Only a regular file of at most `max_bytes` is read: a FIFO or a device is never waited on nor
    read, a huge file never read whole (one that grows past the limit while read is refused too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, writer or not
    except FileNotFoundError:
        yield NO_FILE
        return
    except (OSError, ValueError):  # no permission, a name with a NUL byte, ...
        yield UNREADABLE
        return
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        yield REFUSED
        return
    with os.fdopen(fd, "rb", buffering=0) as fh:
        left = max_bytes + 1
        try:
            while piece := fh.read(min(left, 1 << 20)):
                left -= len(piece)
                yield piece if left > 0 else REFUSED
        except OSError:  # an I/O error mid-file
            yield UNREADABLE


def read(path: str, max_bytes: int) -> tuple[bytes | None, int]:
    """A photo file's bytes (at most `max_bytes`), or None and why not (see `chunks`)."""
    pieces = list(chunks(path, max_bytes))
    if pieces and isinstance(pieces[-1], int):
        return None, pieces[-1]
    return b"".join(pieces), 0


def content_hash(path: str, max_bytes: int) -> int:
    """A photo's fingerprint: a 64-bit hash of its bytes (blake2b, read streaming), or of why it is not read."""
    h = hashlib.blake2b(digest_size=8, person=b"photo")
    for piece in chunks(path, max_bytes):
        if isinstance(piece, int):
            h = hashlib.blake2b(f"no photo: {piece}".encode(), digest_size=8, person=b"photo")
            break
        h.update(piece)
    return int.from_bytes(h.digest(), "little")


def encoded(data: bytes) -> torch.Tensor:
    """The bytes as the 1-D uint8 tensor `decode_jpeg` takes (a writable copy: torch warns on read-only buffers)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class EvalResize:
    """timm's eval Resize (shorter side to input_size / crop_pct, antialiased, its interpolation) and
    CenterCrop, as uint8 tensor ops: (..., 3, H, W) -> (..., 3, S, S).

    On the CPU, uint8 bilinear and bicubic resizes run torch's single-threaded uint8 kernel (no intra-op
    pool: safe in many threads at once); its pixels are Pillow's but for one level on ~0.2% of them."""

    def __init__(self, transform):
        from torchvision import transforms

        resize, crop = transform.transforms[:2]
        if not (isinstance(resize, transforms.Resize) and isinstance(crop, transforms.CenterCrop)):
            raise ValueError(f"eval transform {transform}: only Resize + CenterCrop run as tensor ops "
                             f"(timm's crop_mode 'center' or 'squash')")
        self.size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        self.interpolation, self.crop = resize.interpolation, list(crop.size)
        self.draft_size = max(self.size) + 1  # what Pillow's draft keeps for a non-JPEG's fallback

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.v2.functional as F

        if x.device.type == "cpu":
            x = F.resize(x, self.size, interpolation=self.interpolation, antialias=True)
        else:
            x = self.by_axis(x)
        return F.center_crop(x, self.crop)  # a view: copies in decode threads would start OpenMP teams

    def by_axis(self, x: torch.Tensor) -> torch.Tensor:
        """The resize where torch runs it in float (CUDA): one axis at a time, rounded to uint8 in between as
        Pillow does. In one float pass, overshoot on sharp edges that Pillow clips between its passes puts
        pixels up to 10 levels off Pillow's (3 or more on 1 in 10^4, one on 9%); by axis, one level on 0.01%."""
        import torchvision.transforms.v2.functional as F

        h, w = x.shape[-2:]
        if len(self.size) == 2:
            out_h, out_w = self.size
        else:  # torchvision's rule: the shorter side to size, the longer in proportion, rounded down
            short = self.size[0]
            out_h, out_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        for size in ([h, out_w], [out_h, out_w]):  # Pillow's order: horizontal, then vertical
            x = F.resize(x.float(), size, interpolation=self.interpolation, antialias=True)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        return x

    def pil(self, im: Image.Image) -> torch.Tensor:
        import torchvision.transforms.v2.functional as F

        return self(F.pil_to_tensor(im))


def load_photo(path: str, resize: EvalResize, max_bytes: int) -> tuple[torch.Tensor | None, int]:
    """One photo as a uint8 (3, S, S) tensor on the CPU, or None and why not (NO_FILE, UNREADABLE, REFUSED)."""
    data, code = read(path, max_bytes)
    if data is None:
        return None, code
    if not plain_jpeg(data, (1, 3)):  # Pillow, with its own checks and conversions (CMYK, palettes, ...)
        return decode(data, resize.pil, resize.draft_size)
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return resize(decode_jpeg(encoded(data), mode=ImageReadMode.RGB)), 0
    except RuntimeError:  # truncated or corrupt
        return None, UNREADABLE


def decode_threads() -> int:
    """``decode_workers = 0``: one thread per usable CPU core, shared among torchrun's local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux; macOS
    return max(1, cores // torchrun().local_world)


def nvjpeg_works(device: torch.device) -> bool:
    """Whether this torchvision decodes JPEGs on `device` (built with nvJPEG, a CUDA device)."""
    if device.type != "cuda":
        return False
    from torchvision.io import decode_jpeg, encode_jpeg

    try:
        decode_jpeg([encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))], device=device)
        return True
    except RuntimeError:
        return False


def data_config(model: str, input_size: int) -> dict:
    """timm's eval data config of `model` (input size, interpolation, crop, mean and std), at `input_size`
    pixels (0: the model's own)."""
    import timm

    pretrained_cfg = timm.get_pretrained_cfg(model)
    if pretrained_cfg is None:
        raise PipelineError(f"unknown image backbone '{model}': [image] model must be a timm model name")
    overrides = {"input_size": (3, input_size, input_size)} if input_size else {}
    return timm.data.resolve_data_config(overrides, pretrained_cfg=pretrained_cfg.to_dict())


class ImageMaps:
    """Extractor for the image store: one fixed float16 array `maps` of shape (C, h, w) per item."""

    name = "image"

    def __init__(self, model: str, weights: Path | None, device: torch.device, *, input_size: int, batch_size: int,
                 decode_workers: int, decode_device: str, cache_at: str, max_bytes: int):
        """[image] as arguments: the timm `model` with its `weights` file (None: random), `input_size` (0: the
        model's own), photos per forward, decoding threads (0: one per core), where JPEGs are decoded ("auto":
        nvJPEG on CUDA, "cpu"), the module whose input is stored ("": the final maps) and the largest photo
        file read. The backbone is built
        and loaded on first use: its eval transform comes from timm's record of the model, its producer from
        the weights file's sha256."""
        self.model_name, self.weights, self.cache_at, self.device = model, weights, cache_at, device
        key = {"timm": version("timm"), "model": model, "input_size": input_size}
        config = remembered("timm-data-config", key, lambda: data_config(model, input_size))
        self.data_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        self.mean, self.std = list(self.data_cfg["mean"]), list(self.data_cfg["std"])
        self.batch_size = batch_size
        self.max_bytes = max_bytes  # a photo file past this is not read (recorded REFUSED)
        self.workers = decode_workers or decode_threads()
        self.nvjpeg = decode_device == "auto" and nvjpeg_works(device)
        self.producer = {
            "model": model,
            "weights_sha256": sha256_file(weights) if weights else "random",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_cfg.items()},
        }
        if cache_at:  # only then: a store of final maps keeps the producer it always had
            self.producer["cache_at"] = cache_at
        self._loaded = LoadedOnce(self._load)  # (backbone, what of it computes the stored features)

    @cached_property
    def transform(self):
        """timm's eval transform of the model (Pillow): the reference the tensor resize follows."""
        import timm

        return timm.data.create_transform(**self.data_cfg, is_training=False)

    @cached_property
    def resize(self) -> EvalResize:
        return EvalResize(self.transform)

    def _load(self):
        backbone = load_image_backbone(self.model_name, self.weights, random_ok=self.weights is None)
        backbone.to(self.device, memory_format=torch.channels_last)
        return backbone, features_until(backbone, self.cache_at)  # final maps, or cache_at's input

    def load(self):
        return self._loaded()

    @property
    def model(self):
        """The timm backbone, with its weights."""
        return self._loaded()[0]

    @property
    def features(self):
        """The backbone's `forward_features`, or its head up to `cache_at`."""
        return self._loaded()[1]

    @cached_property
    def arrays(self) -> dict[str, ArraySpec]:
        size = self.data_cfg["input_size"][1]
        with torch.inference_mode():
            shape = tuple(self.features(torch.zeros(1, 3, size, size, device=self.device)).shape[1:])
        return {"maps": ArraySpec("float16", shape)}

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray:
        """A hash of each photo's bytes (read in threads): it changes whenever the bytes do, whatever the name,
        size or time stamp (a file name and size missed a photo replaced by another of the same size)."""
        paths = items["image_path"].to_list()
        if len(paths) < 64:  # a few photos (the predictor's calls): no thread pool to start
            return np.array([content_hash(p, self.max_bytes) for p in paths], dtype=np.uint64)
        return np.array(self.threads(delayed(content_hash)(p, self.max_bytes) for p in paths), dtype=np.uint64)

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]:
        return {}

    def prepare(self, items: pl.DataFrame) -> tuple[torch.Tensor, np.ndarray]:
        """Decode the block's photos: the P that decoded as one (P, 3, S, S) uint8 tensor in item order, and the
        (N,) missing codes. The tensor is on the model's device after nvJPEG, else on the CPU."""
        paths = items["image_path"].to_list()
        if self.nvjpeg:
            photos = self.decode_on_device(paths)
        else:
            photos = self.threads(delayed(load_photo)(p, self.resize, self.max_bytes) for p in paths)
        missing = np.array([code for _, code in photos], dtype=np.uint8)
        return self.stack([x for x, _ in photos if x is not None]), missing

    def threads(self, tasks) -> list:
        return Parallel(n_jobs=self.workers, prefer="threads")(tasks)

    def decode_on_device(self, paths: list[str]) -> list[tuple[torch.Tensor | None, int]]:
        """nvJPEG for the block's YCbCr JPEGs, in one batch, resized on the device; the rest (grey, CMYK,
        other formats, missing and bad files) through `load_photo` on the CPU, then moved over."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = self.threads(delayed(read)(p, self.max_bytes) for p in paths)  # bytes and codes, read in parallel
        batch = [i for i, (d, _) in enumerate(data) if d is not None and plain_jpeg(d, (3,))]
        try:
            images = decode_jpeg([encoded(data[i][0]) for i in batch], mode=ImageReadMode.RGB,
                                 device=self.device) if batch else []
        except RuntimeError:  # one bad photo fails the whole batch: the CPU finds which
            batch, images = [], []
        photos: list = [None] * len(paths)
        for i, x in zip(batch, self.resize_by_shape(images)):
            photos[i] = (x, 0)
        rest = [i for i, p in enumerate(photos) if p is None]
        for i, (x, code) in zip(rest, self.threads(delayed(load_photo)(paths[i], self.resize, self.max_bytes)
                                                   for i in rest)):
            photos[i] = (None if x is None else x.to(self.device), code)
        return photos

    def resize_by_shape(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Photos of one size resized in one call: a catalogue's photos mostly share a few sizes, and one
        batched kernel beats hundreds of small ones."""
        by_shape = defaultdict(list)
        for i, x in enumerate(images):
            by_shape[x.shape].append(i)
        out: list = [None] * len(images)
        for rows in by_shape.values():
            for i, x in zip(rows, self.resize(torch.stack([images[i] for i in rows]))):
                out[i] = x
        return out

    def stack(self, photos: list[torch.Tensor]) -> torch.Tensor:
        """(P, 3, S, S) uint8 in channels_last memory: the model's layout, and the one the CPU resize gives.

        From the CPU, numpy copies (one thread, without the GIL: torch's copy would start an intra-op team
        that fights the model's for the cores), into pinned memory when the model is on CUDA: `compute`
        copies contiguous slices of it, so every pinned byte is copied once, asynchronously."""
        if photos and photos[0].is_cuda:
            return torch.stack(photos).contiguous(memory_format=torch.channels_last)
        c, h, w = self.data_cfg["input_size"]
        out = torch.empty((len(photos), h, w, c), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        out = out.permute(0, 3, 1, 2)  # (P, 3, S, S) view of (P, S, S, 3) memory
        if photos:
            np.stack([x.numpy() for x in photos], out=out.numpy())
        return out

    def normalize(self, photos: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> float32 on the model's device, channels_last: the reference's ToTensor + Normalize."""
        import torchvision.transforms.v2.functional as F

        x = F.to_dtype(photos.to(self.device, non_blocking=True), torch.float32, scale=True)  # keeps channels_last
        return F.normalize(x, self.mean, self.std)

    @torch.inference_mode()
    def compute(self, prepared) -> tuple[dict[str, np.ndarray], np.ndarray]:
        photos, missing = prepared  # (P, 3, S, S) uint8, (N,) codes
        maps = np.zeros((len(missing),) + self.arrays["maps"].shape, dtype=np.float16)
        rows = np.flatnonzero(missing == 0)  # the item of each photo
        on_cuda = self.device.type == "cuda"
        for start in range(0, len(photos), self.batch_size):
            x = self.normalize(photos[start : start + self.batch_size])
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                out = self.features(x)  # (B, C, h, w)
            maps[rows[start : start + self.batch_size]] = out.to(torch.float16).cpu().numpy()
        return {"maps": maps}, missing
