"""Classify new products from Python: load a trained work directory once, then call it on data frames.

    from pipeline import Predictor
    p = Predictor.load("work/demo")                 # W's recorded configuration, every model loaded once
    p.predict(df)                                    # one product type code per row, in order
    p.predict_proba(df)                              # (rows, classes) probabilities; p.classes are the codes
    p.embed(df, "title_bpe")                         # that modality's input sketches (rows, depth * width)
    p.explain(df)                                    # each fusion head's contribution to the decision

`df` is a pandas or polars DataFrame with `title`, `description` (may be null), `image` (a file path or the
photo's bytes, may be null) and optional `item_id`; the catalogue's own column names (`designation`,
`description`, ... as the configured layout names them) work too. New items are computed in memory and
never written into the training stores: an input the work directory already holds (the same title, the
same photo file: found by its input fingerprint, not by id) reuses its stored sketch or features.
Caching new items is opt-in (`cache=DIR`): their features go to feature stores under DIR keyed by input
fingerprint, reused by later calls.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import checkpoint, registry, upstream, workdir as wd
from pipeline.config import Config
from pipeline.batches import sketches
from pipeline.distributed import pick_device
from pipeline.errors import PipelineError
from pipeline.fill import keep_freed_memory, fill_store
from pipeline.heads import FusionHeads
from pipeline.extractor import ExtractContext
from stores import FeatureStore, IdIndex, Ragged


class MemoryFeatures:
    """One feature array of new items held in memory, read like a FeatureStore (ids are row positions)."""

    def __init__(self, name: str, spec, values, missing: np.ndarray | None):
        self.path, self.specs, self.name = "(new items)", {name: spec}, name
        self.values, self.missing = values, missing

    def read(self, name: str, ids) -> np.ndarray | Ragged:
        ids = np.asarray(ids, np.int64)
        if not isinstance(self.values, Ragged):
            return self.values[ids]
        parts = [self.values[i] for i in ids]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        empty = self.values.values[:0]
        return Ragged(np.concatenate(parts) if parts else empty, offsets)

    def read_missing(self, ids) -> np.ndarray:
        n = len(np.asarray(ids))
        return np.zeros(n, np.uint8) if self.missing is None else np.asarray(self.missing, np.uint8)[ids]


class _Lookup:
    """Input fingerprint -> item id of a store's complete rows (what a work directory can reuse)."""

    def __init__(self, store: FeatureStore | None):
        self.store = store
        self.ids = store.ids if store is not None else np.zeros(0, np.int64)
        self.index = IdIndex(store.input_hashes(self.ids) if store is not None else np.zeros(0, np.uint64))

    def find(self, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the fingerprints found, the stored item id of each found one)."""
        found, at = self.index.find(fp)
        return found, self.ids[at]


@dataclass
class _Branch:
    """One modality as the predictor uses it: its network, its extractor, what W holds of it."""

    name: str
    model: torch.nn.Module
    extractor: object
    sketch_store: _Lookup  # sketches by this very checkpoint
    feature_store: _Lookup  # the features the checkpoint was trained on
    max_tokens: int = 0  # tokens of an item the network reads, as in training ([train_reader] max_tokens)


def _open(path) -> FeatureStore | None:
    return FeatureStore(path) if FeatureStore.exists(path) else None


def _branch(name: str, workdir: Path, cfg: Config, device: torch.device, fusion: checkpoint.FusionCheckpoint,
            reuse: bool) -> _Branch:
    path = wd.model_path(workdir, name)
    ckpt = checkpoint.load_model(path, wd.command(cfg, workdir, f"pretrain {name}"))
    fusion.check(name, ckpt, path, wd.refit(cfg, workdir, name))
    ctx = ExtractContext(cfg.options(name), cfg.text_model, upstream.resources(cfg, workdir),
                         pick_device(cfg.extract.device, "[extract] device"))
    extractor = registry.get(name).extractor(ctx)
    if not ckpt.trained_on(extractor.producer):
        raise PipelineError(f"{path} was trained on {name} features of another model or settings than "
                            f"{cfg.source} gives now; predict with the configuration it was trained with")
    features = _open(wd.feature_store_path(workdir, cfg, name)) if reuse else None
    stored = _open(wd.sketch_store_path(workdir, cfg, name)) if reuse else None
    if stored is not None and stored.provenance["producer"].get("checkpoint_sha256") != ckpt.sha256:
        stored = None  # sketches of another checkpoint: not this model's
    return _Branch(name, ckpt.network().to(device), extractor, _Lookup(stored), _Lookup(features), ckpt.max_tokens)


class Predictor:
    """A trained work directory, loaded once, that classifies data frames of new items."""

    def __init__(self, cfg: Config, heads: FusionHeads, codes: list[int], branches: dict[str, _Branch],
                 device: torch.device, cache: Path | None = None):
        self.cfg, self.heads, self.branches, self.device, self.cache = cfg, heads, branches, device, cache
        self.classes = np.asarray(codes, dtype=np.int64)

    @classmethod
    def load(cls, workdir: str | Path, config=None, device: str = "auto", cache: str | Path | None = None,
             reuse: bool = True) -> Predictor:
        """Every model of W's fusion, loaded once (W's recorded configuration unless `config`, config files
        or a Config, is given). `cache`: a folder where new items' features are kept for later calls;
        `reuse=False` computes every item afresh (to check that a stored input gives what W stored)."""
        workdir = Path(workdir)
        cfg = config if isinstance(config, Config) else \
            wd.load(workdir, [config] if isinstance(config, (str, Path)) else config)
        path = wd.fusion_path(workdir, cfg)
        if not path.is_file():
            raise PipelineError(f"{path} not found: train the work directory first (extract, pretrain, sketch, "
                                f"fuse; or `pipeline demo --workdir {workdir}`)")
        fusion = checkpoint.load(path, "fusion", wd.command(cfg, workdir, "fuse"))
        keep_freed_memory()  # CPU forwards: no page faults on every big activation (3x on EfficientNet)
        dev = pick_device(device, "device")
        branches = {m: _branch(m, workdir, cfg, dev, fusion, reuse) for m in fusion.checkpoints}
        return cls(cfg, fusion.network(), fusion.codes, branches, dev, Path(cache) if cache else None)

    # ------------------------------------------------------------------ the public calls
    def predict(self, df) -> np.ndarray:
        """One product type code per row, in order: (rows,) int64."""
        return self.classes[self.logits(df).argmax(-1)]

    def predict_proba(self, df) -> np.ndarray:
        """(rows, classes) float32; column j is the probability of `self.classes[j]`."""
        return torch.softmax(torch.from_numpy(self.logits(df)), dim=-1).numpy()

    def embed(self, df, modality: str) -> np.ndarray:
        """The input sketches of `modality` (rows, depth * width) float32: what the fusion heads read."""
        if modality not in self.branches:
            raise PipelineError(f"the fusion of this work directory reads no '{modality}' sketches "
                                f"(it reads {', '.join(self.branches)})")
        with _Items(df, self.cfg) as items:
            return self._sketch(self.branches[modality], items)

    def logits(self, df) -> np.ndarray:
        """The fused logits (rows, classes) float32."""
        with _Items(df, self.cfg) as items, torch.inference_mode():
            s = {m: torch.from_numpy(self._sketch(b, items)) for m, b in self.branches.items()}
            return self.heads(s).numpy()

    def explain(self, df) -> pl.DataFrame:
        """Per row: the predicted code and each fusion head's logit for it (heads sharing a name summed), so
        the row shows which modality decided; `logit` is their sum."""
        with _Items(df, self.cfg) as items, torch.inference_mode():
            s = {m: torch.from_numpy(self._sketch(b, items)) for m, b in self.branches.items()}
            per_head = torch.stack(self.heads.head_logits(s)).numpy()  # (heads, rows, classes)
        total = per_head.sum(0)
        best = total.argmax(-1)
        rows = np.arange(len(best))
        out = {"item_id": items.frame["item_id"], "prdtypecode": self.classes[best], "logit": total[rows, best]}
        for name in dict.fromkeys(n for n, _ in self.heads.heads):
            idx = [k for k, (n, _) in enumerate(self.heads.heads) if n == name]
            inputs = "+".join(self.heads.heads[idx[0]][1])
            out[f"{name} ({inputs})"] = per_head[idx].sum(0)[rows, best]
        return pl.DataFrame(out)

    # ------------------------------------------------------------------ sketches of new items
    def _sketch(self, b: _Branch, items: _Items) -> np.ndarray:
        """Sketches of every row: stored ones by fingerprint, else from stored (or cached) features, else
        computed in memory."""
        frame = items.frame
        fp = b.extractor.fingerprints(frame)  # (rows,) uint64
        out = np.zeros((len(frame), b.model.sketch_dim), np.float32)
        todo = np.ones(len(frame), bool)
        found, ids = b.sketch_store.find(fp)
        if found.any():
            out[found] = b.sketch_store.store.read("sketch", ids)
            todo &= ~found
        self._reuse(b, b.feature_store, fp, out, todo)
        if self.cache is not None and todo.any():
            self._reuse(b, self._cached(b, frame.filter(pl.Series(todo))), fp, out, todo)
        chunk = self.cfg.predict.chunk_rows  # rows computed at once: bounds the memory of photos and token states
        for start in range(0, int(todo.sum()), chunk):
            rows = np.flatnonzero(todo)[start : start + chunk]
            features = self._compute(b, frame[rows])
            out[rows] = sketches(b.model, features, b.name, np.arange(len(rows)), self.cfg.sketch.batch_size,
                                 self.device, b.max_tokens)
        return out

    def _reuse(self, b: _Branch, lookup: _Lookup, fp: np.ndarray, out: np.ndarray, todo: np.ndarray) -> None:
        """Sketch the rows still `todo` whose input `lookup`'s store holds, from its features."""
        found, ids = lookup.find(fp[todo])
        if found.any():
            rows = np.flatnonzero(todo)[found]
            out[rows] = sketches(b.model, lookup.store, b.name, ids, self.cfg.sketch.batch_size, self.device,
                                 b.max_tokens)
            todo[rows] = False

    def _compute(self, b: _Branch, frame: pl.DataFrame) -> MemoryFeatures:
        m = registry.get(b.name)
        data, missing = b.extractor.compute(b.extractor.prepare(frame))
        spec = b.extractor.arrays[m.array]
        values = data[m.array]
        if spec.ragged:
            lengths = b.extractor.lengths(frame)[m.array]
            values = Ragged(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        return MemoryFeatures(m.array, spec, values, missing)

    def _cached(self, b: _Branch, frame: pl.DataFrame) -> _Lookup:
        """The cache's store of this modality with `frame`'s features added (item id = input fingerprint)."""
        fp = b.extractor.fingerprints(frame)
        keyed = frame.with_columns(item_id=pl.Series(fp.view(np.int64))).unique("item_id", keep="first",
                                                                              maintain_order=True)
        path = wd.store_path(self.cache, "features", b.name, "zarr")
        fill_store(b.extractor, keyed, path, block_rows=self.cfg.block_items(b.name), stores=self.cfg.stores,
                   progress=False)
        return _Lookup(FeatureStore(path))


class _Items:
    """A data frame of new items as the extractors read it (item_id, title, description, image_path), with
    photos given as bytes written to a temporary folder (named by content) for the duration of a call."""

    def __init__(self, df, cfg: Config):
        self.df, self.cfg, self._tmp = df, cfg, None

    def __enter__(self) -> _Items:
        df = self.df if isinstance(self.df, pl.DataFrame) else _from_pandas(self.df)
        layout = self.cfg.catalog.layouts[self.cfg.catalog.layout].columns
        df = df.rename({getattr(layout, f): f for f in ("title", "description")
                        if getattr(layout, f) in df.columns and f not in df.columns})
        if "title" not in df.columns:
            raise PipelineError(f"no title column among {df.columns}: give `title` (and `description`, `image`)")
        n = len(df)
        image = df["image"].to_list() if "image" in df.columns else [None] * n
        self.frame = pl.DataFrame({
            "item_id": df["item_id"].cast(pl.Int64) if "item_id" in df.columns else pl.Series(np.arange(n)),
            "title": df["title"].cast(pl.String).fill_null(""),
            "description": (df["description"].cast(pl.String).fill_null("") if "description" in df.columns
                            else pl.Series([""] * n)),
            "image_path": [self._path(x) for x in image],
        })
        return self

    def _path(self, image) -> str:
        if image is None:
            return ""
        if isinstance(image, (bytes, bytearray, memoryview)):
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="emde-predict-")
            path = Path(self._tmp.name) / f"{hashlib.sha256(image).hexdigest()[:32]}.jpg"
            path.write_bytes(image)
            return str(path)
        return str(image)

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _from_pandas(df) -> pl.DataFrame:
    """A pandas DataFrame as polars, column by column (no pyarrow needed); NaN/None become nulls."""
    return pl.DataFrame({str(c): [None if _is_null(v) else v for v in df[c].tolist()] for c in df.columns})


def _is_null(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)
