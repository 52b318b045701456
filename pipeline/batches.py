"""Feature rows as a network's inputs: batches padded to their longest row, for training and inference.

The training reader (pipeline.train_reader) shuffles and prefetches them; `inference_batches` serves the
items in the order asked, and `sketches` runs a pretrained network over them up to its input sketch
(what the sketch stage stores and the predictor computes for new items).

Batches (``Batch.inputs`` matches the encoders of ``pipeline.encoders``), by the modality's batch kind:

* ``ids``    (ragged integer ids, title_bpe):    ids (B, L) int64, mask (B, L) bool;
* ``tokens`` (ragged float vectors, *_cam):      x (B, L, H) float, mask (B, L) bool (an empty row,
  e.g. a missing description, is all False);
* ``fixed``  (one array per item, image):        x (B, *shape) float, present (B,) bool (False where
  the store's ``missing`` flag is set: the zeros stored for it are not data);

plus ``labels`` (B,) int64 and the item ``ids`` (B,) int64.

Ragged rows are read up to ``max_tokens`` tokens when it is set, as the network was trained. On CUDA
(``pin``) the batches are built in pinned memory and token features stay float16 until ``Batch.to``
puts them on the device.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline import registry
from pipeline.errors import PipelineError
from stores import FeatureStore

KINDS = ("ids", "tokens", "fixed")


class Batch(NamedTuple):
    inputs: tuple  # (ids|x|maps, mask|present) as Tensors; ({modality: sketches},) for the fusion heads
    labels: Tensor  # (B,) int64 class indices
    ids: Tensor  # (B,) int64 item ids

    def to(self, device: torch.device | str, non_blocking: bool = True, float_dtype=torch.float32) -> Batch:
        """On `device`; floating inputs (float16 from the store) become `float_dtype` there."""
        def move(t: Tensor | dict) -> Tensor | dict:
            if isinstance(t, dict):  # the fusion heads' input: {modality: sketches}
                return {k: move(v) for k, v in t.items()}
            t = t.to(device, non_blocking=non_blocking)
            return t.to(float_dtype) if t.is_floating_point() and t.dtype != float_dtype else t
        return Batch(tuple(move(t) for t in self.inputs), move(self.labels), move(self.ids))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Pool:
    """Rows held in memory: ragged (values back to back + offsets) or fixed (one row per item)."""

    ids: np.ndarray
    labels: np.ndarray
    values: np.ndarray
    offsets: np.ndarray | None = None  # ragged: (n + 1,)
    present: np.ndarray | None = None  # fixed maps: (n,) bool

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets) if self.offsets is not None else np.ones(len(self.ids), np.int64)

    def take(self, idx: np.ndarray) -> Pool:
        """A copy holding rows `idx` only (the few rows carried from one stream group to the next)."""
        if self.offsets is None:
            return Pool(self.ids[idx], self.labels[idx], self.values[idx], None,
                         None if self.present is None else self.present[idx])
        lens = self.lengths[idx]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        pos = np.repeat(self.offsets[idx] - offsets[:-1], lens) + np.arange(offsets[-1])
        return Pool(self.ids[idx], self.labels[idx], self.values[pos], offsets, None)

    @staticmethod
    def concat(pools: list[Pool]) -> Pool:
        ids = np.concatenate([p.ids for p in pools])
        labels = np.concatenate([p.labels for p in pools])
        values = np.concatenate([p.values for p in pools])
        if pools[0].offsets is None:
            return Pool(ids, labels, values, None, np.concatenate([p.present for p in pools]))
        offsets = np.concatenate([[0], np.cumsum(np.concatenate([p.lengths for p in pools]))]).astype(np.int64)
        return Pool(ids, labels, values, offsets, None)


def check_spec(store: FeatureStore, name: str, kind: str):
    """The spec of array `name`, checked against the batch kind the modality declares."""
    if kind not in KINDS:
        raise PipelineError(f"batch kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if name not in store.specs:
        raise PipelineError(f"{store.path}: no feature array '{name}' (has {sorted(store.specs)})")
    spec = store.specs[name]
    if spec.ragged != (kind != "fixed"):
        raise PipelineError(f"{store.path}: array '{name}' is {'ragged' if spec.ragged else 'fixed-shape'}, "
                            f"which a '{kind}' modality cannot read; rebuild the store")
    return spec


def read_pool(store: FeatureStore, name: str, ids: np.ndarray, labels: np.ndarray | None = None) -> Pool:
    """Array `name` of the items `ids` into memory (ragged: values back to back with offsets)."""
    labels = np.zeros(len(ids), np.int64) if labels is None else labels
    got = store.read(name, ids)
    if store.specs[name].ragged:
        return Pool(ids, labels, got.values, np.asarray(got.offsets, np.int64), None)
    return Pool(ids, labels, got, None, store.read_missing(ids) == 0)


def _alloc(shape: tuple, dtype, pin: bool) -> tuple[Tensor, np.ndarray]:
    """A zeroed tensor (pinned when `pin`) and a numpy view to fill it through. The batch keeps the tensor
    itself: torch's pinned-memory cache then knows when a non-blocking copy from it has finished, and
    never hands the memory to the next batch before that."""
    t = torch.zeros(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, pin_memory=pin)
    return t, t.numpy()


def assemble(parts: list[tuple[Pool, np.ndarray]], kind: str, spec, pin: bool = False,
             max_tokens: int = 0) -> Batch:
    """One batch from rows `idx` of each pool: ragged rows (their first `max_tokens` tokens when > 0) padded
    to the batch's longest.

    On the CPU float16 features become float32 here (off the training thread); on CUDA (`pin`) they stay
    float16, half the bytes to copy, and `Batch.to` converts them on the device."""
    b = sum(len(idx) for _, idx in parts)
    ids = np.concatenate([p.ids[i] for p, i in parts])
    labels = np.concatenate([p.labels[i] for p, i in parts])
    out_float = np.dtype(spec.dtype) if pin else np.dtype(np.float32)
    if kind != "fixed":
        cap = max_tokens or np.iinfo(np.int64).max
        L = max(1, max(min(int(p.lengths[i].max(initial=0)), cap) for p, i in parts))
        xt, x = _alloc((b, L) + spec.shape, np.int64 if kind == "ids" else out_float, pin)
        mt, mask = _alloc((b, L), np.bool_, pin)
        r = 0
        for pool, idx in parts:
            lens = np.minimum(pool.lengths[idx], cap)
            row = np.repeat(np.arange(r, r + len(idx)), lens)
            col = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
            x[row, col] = pool.values[np.repeat(pool.offsets[idx], lens) + col]
            mask[row, col] = True
            r += len(idx)
        return Batch((xt, mt), torch.from_numpy(labels), torch.from_numpy(ids))
    xt, x = _alloc((b,) + spec.shape, out_float, pin)
    pt, present = _alloc((b,), np.bool_, pin)
    r = 0
    for pool, idx in parts:
        np.copyto(x[r : r + len(idx)], pool.values[idx], casting="unsafe")
        present[r : r + len(idx)] = pool.present[idx]
        r += len(idx)
    x[~present] = 0  # whatever the store holds for a missing input, it is not data
    return Batch((xt, pt), torch.from_numpy(labels), torch.from_numpy(ids))


def inference_batches(store: FeatureStore, name: str, kind: str, ids, batch_size: int,
                      pin_memory: bool = False, max_tokens: int = 0) -> Iterator[Batch]:
    """Batches of the items `ids` in the order given, for inference (labels are zeros); each batch is read
    with one store read (give ids in store row order for sequential reads). Ragged rows are read up to
    `max_tokens` tokens (> 0), as the network was trained."""
    spec = check_spec(store, name, kind)
    ids = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(ids), batch_size):
        pool = read_pool(store, name, ids[start : start + batch_size])
        yield assemble([(pool, np.arange(len(pool)))], kind, spec, pin_memory, max_tokens)


@torch.inference_mode()
def sketches(model, store: FeatureStore, modality: str, ids: np.ndarray, batch_size: int,
             device: torch.device, max_tokens: int = 0) -> np.ndarray:
    """The input sketch (n, depth * width) float32 of the items `ids` of a feature store (or of anything that
    reads like one), in that order; ragged rows read up to `max_tokens` tokens, as the model was trained."""
    m = registry.get(modality)
    out = np.zeros((len(ids), model.sketch_dim), np.float32)
    start = 0
    for batch in inference_batches(store, m.array, m.batch, ids, batch_size, pin_memory=device.type == "cuda",
                                   max_tokens=max_tokens):
        batch = batch.to(device)
        out[start : start + len(batch)] = model.sketch(*batch.inputs).float().cpu().numpy()
        start += len(batch)
    return out
