"""image (paper 3.3-3.4): EfficientNet `forward_features` maps of every item's photo (or, with `[image] cache_at`,
the input of that backbone module, where pretraining fine-tunes the rest: pipeline.backbone).

Photos are decoded in parallel threads (Pillow releases the GIL while decoding) one block ahead
of the model, resized and normalised with the backbone's own eval transform (ImageNet statistics;
no other transformation, as in the paper), and run channels_last under `torch.inference_mode`
(bf16 on CUDA). A missing or unreadable photo is recorded in the store's `missing` array with its
reason, its map left at zero, counted, and the run goes on.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import timm
import torch
from joblib import Parallel, delayed
from PIL import Image
from torchvision.transforms import Normalize

from pipeline.backbone import features_until
from pipeline.weights import load_image_backbone
from stores import ArraySpec, fingerprint

NO_FILE, UNREADABLE = 1, 2


def decode(path: str, transform, draft_size: int) -> tuple[torch.Tensor | None, int]:
    """One photo as a normalised (3, H, W) tensor, or None and why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                # The bomb guard itself: catch_warnings is not thread-safe (decode threads restore each
                # other's filters), so Pillow's warning alone may let a bomb of up to 2x its limit through.
                if im.width * im.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                    return None, UNREADABLE
                im.draft("RGB", (draft_size, draft_size))  # JPEG: decode big photos at reduced scale
                return transform(im.convert("RGB")), 0
    except FileNotFoundError:
        return None, NO_FILE
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, UNREADABLE


def decode_threads() -> int:
    """``decode_workers = 0``: one thread per usable CPU core, shared among torchrun's local processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # Linux; macOS
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class NumpyTensorSteps:
    """A timm eval transform whose last steps (ToTensor, Normalize) run in numpy: the same values bit for
    bit, and no torch op in the decode threads (each thread's torch ops start an OpenMP team of their own,
    whose threads fight the model's for the cores)."""

    def __init__(self, transform):
        self.transform = transform
        *self.pil_steps, to_tensor, normalize = transform.transforms
        self.split = isinstance(normalize, Normalize) and type(to_tensor).__name__ in ("ToTensor", "MaybeToTensor")
        if self.split:
            self.mean = np.asarray(normalize.mean, np.float32).reshape(-1, 1, 1)
            self.std = np.asarray(normalize.std, np.float32).reshape(-1, 1, 1)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        if not self.split:
            return self.transform(im)
        for step in self.pil_steps:
            im = step(im)
        x = np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1), dtype=np.float32)
        x /= np.float32(255)  # ToTensor, in float32 as torch does
        x -= self.mean  # Normalize
        x /= self.std
        return torch.from_numpy(x)


class ImageMaps:
    """Extractor for the image store: one fixed float16 array `maps` of shape (C, h, w) per item."""

    name = "image"

    def __init__(self, opts: dict, weights: Path | None, device: torch.device):
        self.model = load_image_backbone(opts["model"], weights, random_ok=weights is None)
        self.device = device
        self.model.to(device, memory_format=torch.channels_last)
        overrides = {"input_size": (3, opts["input_size"], opts["input_size"])} if opts["input_size"] else {}
        self.data_cfg = timm.data.resolve_data_config(overrides, model=self.model)
        self.transform = timm.data.create_transform(**self.data_cfg, is_training=False)
        self.decode_transform = NumpyTensorSteps(self.transform)  # the same transform, without torch ops
        size = self.data_cfg["input_size"][1]
        self.draft_size = int(size / self.data_cfg.get("crop_pct", 1.0)) + 1
        self.batch_size = int(opts["batch_size"])
        self.workers = int(opts["decode_workers"]) or decode_threads()
        self.features = features_until(self.model, opts["cache_at"])  # final maps, or the input of `cache_at`
        with torch.inference_mode():
            shape = tuple(self.features(torch.zeros(1, 3, size, size, device=device)).shape[1:])
        self.arrays = {"maps": ArraySpec("float16", shape)}
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest() if weights else "random"
        self.producer = {
            "model": opts["model"],
            "weights_sha256": digest,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_cfg.items()},
        }
        if opts["cache_at"]:  # only then: a store of final maps keeps the producer it always had
            self.producer["cache_at"] = opts["cache_at"]

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray:
        """A photo's file name and size: cheap to take for every item, changes when the file does."""
        def size(path: str) -> int:
            try:
                return os.stat(path).st_size
            except OSError:
                return -1
        return fingerprint([f"{Path(p).name}:{size(p)}" for p in items["image_path"].to_list()])

    def lengths(self, items: pl.DataFrame) -> dict[str, np.ndarray]:
        return {}

    def prepare(self, items: pl.DataFrame) -> tuple[torch.Tensor, np.ndarray]:
        """Decode the block's photos in parallel: a (N, 3, H, W) batch and the missing codes."""
        decoded = Parallel(n_jobs=self.workers, prefer="threads")(
            delayed(decode)(p, self.decode_transform, self.draft_size) for p in items["image_path"].to_list())
        missing = np.array([code for _, code in decoded], dtype=np.uint8)
        size = self.data_cfg["input_size"][1:]
        batch = torch.stack([t if t is not None else torch.zeros(3, *size) for t, _ in decoded]) \
            if decoded else torch.zeros(0, 3, *size)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch, missing

    @torch.inference_mode()
    def compute(self, prepared) -> tuple[dict[str, np.ndarray], np.ndarray]:
        batch, missing = prepared
        maps = np.zeros((len(batch),) + self.arrays["maps"].shape, dtype=np.float16)
        present = np.flatnonzero(missing == 0)
        on_cuda = self.device.type == "cuda"
        for start in range(0, len(present), self.batch_size):
            rows = present[start : start + self.batch_size]
            x = batch[rows].to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
                out = self.features(x)  # (B, C, h, w)
            maps[rows] = out.to(torch.float16).cpu().numpy()
        return {"maps": maps}, missing
