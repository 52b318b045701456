"""Classify new products from Python: load a trained work directory (or a bundle) once, then call it on tables.

    from pipeline import Predictor
    p = Predictor.load("work/demo")                 # W's recorded configuration, every model loaded once
    p.predict(df)                                    # one product type code per row (pandas in: a Series)
    p.predict_proba(df)                              # one column of probabilities per class code
    p.explain(df)                                    # each modality's share of the decision, the bias apart
    p.top(df, k=5)                                   # per item: the k best classes with their shares (JSON-ready)
    p.embed(df, "title_bpe")                         # that modality's input sketches (rows, depth * width)

What a table may hold and what comes back: pipeline.items. New items are computed in memory and never
written into the training stores: an input the work directory already holds (the same title, the same
photo file: found by its input fingerprint, not by id) reuses its stored sketch or features, read only
from stores that the loaded checkpoints and extractors made. Caching new items is opt-in (`cache=DIR`,
never the work directory's stores): their features go to feature stores under DIR keyed by input
fingerprint, reused by later calls.

Identity: every modality checkpoint must be the one the fusion recorded (its sha256), and `version` names
the loaded models (a digest of the fusion checkpoint, the checkpoints it names and the upstream models'
provenance). A Predictor never reads a model file again after loading: when the work directory is
retrained in place it goes on answering with its own models (and says so once); `changed()` tells, and a
new `Predictor.load` gives the new ones. One Predictor may be called from several threads at once: the calls
run side by side, each with the torch threads of the thread that makes it (`distributed.use_threads` there;
`pipeline serve` gives a batch alone every thread, a batch beside it one).
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import checkpoint, manifest, registry, upstream, workdir as wd
from pipeline.batches import sketches
from pipeline.config import Config
from pipeline.distributed import pick_device
from pipeline.errors import PipelineError
from pipeline.extractor import ExtractContext
from pipeline.fill import fill_store
from pipeline.malloc import keep_freed_memory
from pipeline.heads import FusionHeads
from pipeline.items import Items
from pipeline.catalog import class_names as named_classes, read_split
from pipeline.provenance import digest
from stores import FeatureStore, IdIndex, Ragged, StoreBusyError, WriterConflictError, is_url

_CACHE_LOCKS: dict[str, threading.Lock] = {}  # one writer per cache store in this process
_CACHE_LOCKS_GUARD = threading.Lock()


class MissingInputWarning(UserWarning):
    """Some items had an input (a photo) that could not be read: they were classified without it."""


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


def _store_stamp(path) -> object:
    """What changes whenever a store is rebuilt or written: its metadata file's stat (a URL store: its
    provenance); None when there is no store."""
    if not FeatureStore.exists(path):
        return None
    if is_url(str(path)):
        with FeatureStore(path) as store:
            return json.dumps(store.provenance, sort_keys=True, default=str)
    meta = Path(path) / "zarr.json" if Path(path).is_dir() else Path(path)
    try:
        st = os.stat(meta)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class _Lookup:
    """Input fingerprint -> item id of a store's complete rows, for a store whose provenance `accepts` (made by
    this very checkpoint or extractor). Checked at each use (`held`): a store written or rebuilt since it was indexed
    is indexed again, and one rebuilt by another checkpoint or extractor is no longer read."""

    def __init__(self, path, accepts=lambda provenance: True):
        self.path, self.accepts, self.lock = path, accepts, threading.RLock()
        self.stamp, self.store = object(), None
        self.ids, self.index = np.zeros(0, np.int64), IdIndex(np.zeros(0, np.uint64))
        if path is not None:
            self.refresh()

    @contextmanager
    def held(self):
        """This lookup, refreshed, held while its store is read: another call's refresh (which may close the store
        it replaces) waits."""
        with self.lock:
            self.refresh()
            yield self

    def refresh(self) -> None:
        with self.lock:
            stamp = _store_stamp(self.path) if self.path is not None else None
            if stamp == self.stamp:
                return
            store = FeatureStore(self.path) if stamp is not None else None
            if store is not None and not self.accepts(store.provenance):
                store.close()
                store = None
            if self.store is not None:
                self.store.close()
            self.store, self.stamp = store, stamp
            self.ids = store.ids if store is not None else np.zeros(0, np.int64)
            self.index = IdIndex(store.input_hashes(self.ids) if store is not None else np.zeros(0, np.uint64))

    def unchanged(self) -> bool:
        """Whether the store is still the one indexed (checked after reading from it)."""
        return self.path is None or _store_stamp(self.path) == self.stamp

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
    feature_store: _Lookup  # features by this very extractor
    max_tokens: int = 0  # tokens of an item the network reads, as in training ([train_reader] max_tokens)


def _branch(name: str, ckpt: checkpoint.ModelCheckpoint, workdir: Path, cfg: Config, device: torch.device,
            reuse: bool, bundled: bool) -> _Branch:
    """One modality of the fusion: its checkpoint (the one the fusion recorded), its extractor, W's stores."""
    path = wd.model_path(workdir, name)
    trained_on = ckpt.store.get("provenance", {}).get("producer")
    if not bundled:  # before any upstream model is built or converted
        upstream.check_planned_model(cfg, name, trained_on, path, "predict with the configuration it was trained with")
    ctx = ExtractContext(cfg.options(name), cfg.text_model, upstream.resources(cfg, workdir),
                         pick_device(cfg.extract.device, "[extract] device"))
    extractor = registry.get(name).extractor(ctx)
    if not bundled and not ckpt.trained_on(extractor.producer):  # a bundle's files: checked by its manifest
        raise PipelineError(f"{path} was trained on {name} features of another model or settings than "
                            f"{cfg.source} gives now; predict with the configuration it was trained with")
    features = sketched = None
    if reuse and not bundled:
        features = wd.feature_store_path(workdir, cfg, name)
        sketched = wd.sketch_store_path(workdir, cfg, name)
    made_here = lambda p: p["producer"] == extractor.producer  # noqa: E731
    by_this = lambda p: p["producer"].get("checkpoint_sha256") == ckpt.sha256  # noqa: E731
    return _Branch(name, ckpt.network().to(device), extractor, _Lookup(sketched, by_this),
                   _Lookup(features, made_here), ckpt.max_tokens)


def model_stamp(source: str | Path, cfg: Config) -> tuple:
    """The stat of every model file a Predictor of `source` (a work directory or a bundle) loads: it changes
    when one is replaced (a new pretrain or fuse, a bundle swapped in or a symlink repointed)."""
    source = Path(source)
    files = [wd.fusion_path(source, cfg), *sorted(source.glob(f"models/*/{wd.MODEL_FILE}"))]
    stamp = []
    for f in files:
        try:
            st = os.stat(f)
            stamp.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append((str(f), None))
    return tuple(stamp)


def check_cache(cache: Path, workdir: Path, cfg: Config) -> Path:
    """Refuse a cache folder that is, holds or lies inside the work directory or its stores root: new items'
    features never go into the training stores."""
    places = [Path(workdir)]
    root = wd.stores_root(workdir, cfg)
    if not is_url(str(root)):
        places.append(Path(root))
    c = Path(cache).expanduser().resolve()
    for place in places:
        p = place.expanduser().resolve()
        if c == p or c.is_relative_to(p) or p.is_relative_to(c):
            raise PipelineError(f"cache folder {cache}: it is, holds or lies inside {place}, whose stores are the "
                                f"training stores, which predicting never writes; give a folder outside it")
    return Path(cache)


def read_class_names(path: str) -> dict[int, str]:
    """`[serve] class_names`: a CSV of `prdtypecode,name` rows (code -> name); {} when not set."""
    if not path:
        return {}
    try:
        table = pl.read_csv(path, schema_overrides={"prdtypecode": pl.Int64, "name": pl.String})
        return dict(zip(table["prdtypecode"].to_list(), table["name"].to_list()))
    except (OSError, pl.exceptions.PolarsError) as err:
        raise PipelineError(f"[serve] class_names = {path!r}: not a CSV of prdtypecode,name rows "
                            f"({type(err).__name__}); fix the file or set it to \"\"") from None


def split_class_names(workdir: Path) -> dict[int, str]:
    """Code -> name as the training catalogue named its classes (W/split.parquet); {} when it gave codes."""
    return named_classes(read_split(workdir)) if wd.split_path(workdir).is_file() else {}


class Predictor:
    """A trained work directory (or a bundle), loaded once, that classifies tables of new items."""

    def __init__(self, cfg: Config, heads: FusionHeads, codes: list[int], branches: dict[str, _Branch],
                 device: torch.device, cache: Path | None = None, version: str = "", source: Path | None = None,
                 names: dict[int, str] | None = None):
        self.cfg, self.heads, self.branches, self.device, self.cache = cfg, heads, branches, device, cache
        self.classes = np.asarray(codes, dtype=np.int64)
        self.class_names = read_class_names(cfg.serve.class_names) if names is None else names
        self.version, self.source = version, source
        self._stamp = model_stamp(source, cfg) if source is not None else ()
        self._warned = False
        self.warn_on_change = True  # off where something else swaps models (pipeline serve)

    @classmethod
    def load(cls, workdir: str | Path, config=None, device: str = "auto", cache: str | Path | None = None,
             reuse: bool = True) -> Predictor:
        """Every model of W's fusion (or of a bundle: `pipeline bundle`), loaded once, with W's recorded
        configuration unless `config` (config files or a Config) is given. `cache`: a folder where new items'
        features are kept for later calls; `reuse=False` computes every item afresh (to check that a stored
        input gives what W stored)."""
        workdir = Path(workdir)
        cfg = config if isinstance(config, Config) else \
            wd.load(workdir, [config] if isinstance(config, (str, Path)) else config)
        bundled = manifest.is_bundle(workdir)
        if bundled:
            cfg = manifest.settings(workdir, cfg)  # checks every file against the manifest first
        elif not workdir.is_dir():
            raise PipelineError(f"{workdir}: no such work directory or bundle")
        fusion, models = checkpoint.load_fused(workdir, cfg)
        if cache is not None:
            cache = check_cache(Path(cache), workdir, cfg)
        names = read_class_names(cfg.serve.class_names) or ({} if bundled else split_class_names(workdir))
        keep_freed_memory()  # CPU forwards: no page faults on every big activation (3x on EfficientNet)
        dev = pick_device(device, "device")
        branches = {m: _branch(m, ckpt, workdir, cfg, dev, reuse, bundled) for m, ckpt in models.items()}
        # Every network loaded now, not by the first call; the photo decoder (torchvision's 1.5 s of imports)
        # comes with the first photo, which `pipeline serve` runs before it serves.
        for b in branches.values():
            b.extractor.load()
        version = digest([fusion.sha256, fusion.checkpoints, {m: b.extractor.producer for m, b in branches.items()}])
        return cls(cfg, fusion.network(), fusion.codes, branches, dev, cache, version[:16], workdir, names)

    # ------------------------------------------------------------------ the public calls
    def predict(self, df):
        """One product type code per row, in order (pandas: a Series indexed like `df`; polars: a Series;
        otherwise a (rows,) int64 array)."""
        with self._items(df) as items:
            return items.series(self.classes[self._logits(items).argmax(-1)], "prdtypecode")

    def predict_proba(self, df):
        """The probability of every class, one column per code of `self.classes` (pandas: a DataFrame indexed
        like `df`; polars: a DataFrame with the codes as column names; otherwise (rows, classes) float32)."""
        with self._items(df) as items:
            return items.table(torch.softmax(torch.from_numpy(self._logits(items)), dim=-1).numpy(),
                               self.classes.tolist())

    def logits(self, df) -> np.ndarray:
        """The fused logits (rows, classes) float32."""
        with self._items(df) as items:
            return self._logits(items)

    def embed(self, df, modality: str) -> np.ndarray:
        """The input sketches of `modality` (rows, depth * width) float32: what the fusion heads read."""
        if modality not in self.branches:
            raise PipelineError(f"the fusion of this model reads no '{modality}' sketches "
                                f"(it reads {', '.join(self.branches)})")
        with self._items(df) as items:
            return self._sketch(self.branches[modality], items)

    def explain(self, df):
        """Per row: the predicted code, its fused logit (or probability, for [fusion] method = "average") and each
        modality's share of it, a head over several modalities split exactly into one term per modality; the
        heads' biases are the `bias` column (shares + bias = the logit). `missing_inputs` names what was given
        but could not be read. The caller's kind of table (polars for a list or a dict)."""
        with self._items(df) as items:
            logits, shares = self._decide(items)
        best = logits.argmax(-1)
        rows = np.arange(len(best))
        value = "logit" if self.heads.method == "joint" else "probability"
        total = logits if value == "logit" else torch.softmax(torch.from_numpy(logits), -1).numpy()
        columns = {"prdtypecode": self.classes[best], value: total[rows, best]}
        columns |= {name: shares[j][rows, best] for j, name in enumerate([*self.branches, "bias"])}
        return items.frame_of(columns | {"missing_inputs": items.missing_inputs()})

    def top(self, df, k: int = 5) -> list[dict]:
        """Per item, JSON-ready: the predicted code and name, the `k` most probable classes, each with its
        probability and every modality's share of its logit (as `explain`), and `missing_inputs`."""
        with self._items(df) as items:
            logits, shares = self._decide(items)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (rows, k)
        names = [*self.branches, "bias"]
        out = []
        for row, best in enumerate(order):
            top = [{"code": int(self.classes[j]), "name": self.class_names.get(int(self.classes[j])),
                    "probability": float(probs[row, j]),
                    "shares": {n: float(shares[i][row, j]) for i, n in enumerate(names)}} for j in best]
            out.append({"code": top[0]["code"], "name": top[0]["name"], "top": top,
                        "missing_inputs": items.problems.get(row, [])})
        return out

    def changed(self) -> bool:
        """Whether the model files at the source differ from the ones this Predictor loaded (it keeps using its
        own: load again for the new ones)."""
        return self.source is not None and model_stamp(self.source, self.cfg) != self._stamp

    # ------------------------------------------------------------------ internals
    def _items(self, df) -> _Call:
        return _Call(self, df)

    def _logits(self, items: Items) -> np.ndarray:
        with torch.inference_mode():
            return self.heads(self._all_sketches(items)).numpy()

    def _decide(self, items: Items) -> tuple[np.ndarray, np.ndarray]:
        """(logits (rows, classes), shares (modalities + bias, rows, classes))."""
        with torch.inference_mode():
            s = self._all_sketches(items)
            return self.heads(s).numpy(), self.heads.shares(s).numpy()

    def _all_sketches(self, items: Items) -> dict[str, torch.Tensor]:
        return {m: torch.from_numpy(self._sketch(b, items)) for m, b in self.branches.items()}

    # ------------------------------------------------------------------ sketches of new items
    def _sketch(self, b: _Branch, items: Items) -> np.ndarray:
        """Sketches of every row: stored ones by fingerprint, else from stored (or cached) features, else
        computed in memory."""
        frame = items.frame
        fp = b.extractor.fingerprints(frame)  # (rows,) uint64
        out = np.zeros((len(frame), b.model.sketch_dim), np.float32)
        todo = np.ones(len(frame), bool)
        with b.sketch_store.held() as stored:
            found, ids = stored.find(fp)
            if found.any():
                rows = stored.store.read("sketch", ids)
                if stored.unchanged():  # else rebuilt while reading: computed below instead
                    out[found] = rows
                    todo &= ~found
        self._reuse(b, b.feature_store, fp, out, todo)
        if self.cache is not None and todo.any():
            self._reuse(b, self._cached(b, frame.filter(pl.Series(todo))), fp, out, todo)
        chunk = self.cfg.predict.chunk_rows  # rows computed at once: bounds the memory of photos and token states
        for start in range(0, int(todo.sum()), chunk):
            rows = np.flatnonzero(todo)[start : start + chunk]
            features = self._compute(b, frame[rows])
            if features.missing is not None and b.name == "image":
                items.undecodable(rows[np.asarray(features.missing) != 0])
            out[rows] = sketches(b.model, features, b.name, np.arange(len(rows)), self.cfg.sketch.batch_size,
                                 self.device, b.max_tokens)
        return out

    def _reuse(self, b: _Branch, lookup: _Lookup, fp: np.ndarray, out: np.ndarray, todo: np.ndarray) -> None:
        """Sketch the rows still `todo` whose input `lookup`'s store holds, from its features."""
        with lookup.held():
            found, ids = lookup.find(fp[todo])
            if found.any():
                rows = np.flatnonzero(todo)[found]
                values = sketches(b.model, lookup.store, b.name, ids, self.cfg.sketch.batch_size, self.device,
                                  b.max_tokens)
                if lookup.unchanged():
                    out[rows] = values
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
        """The cache's store of this modality with `frame`'s features added (item id = input fingerprint). One
        writer per store in this process; a store another process is writing is skipped (computed in memory)."""
        fp = b.extractor.fingerprints(frame)
        keyed = frame.with_columns(item_id=pl.Series(fp.view(np.int64))).unique("item_id", keep="first",
                                                                              maintain_order=True)
        path = wd.store_path(self.cache, "features", b.name, "zarr")
        with _CACHE_LOCKS_GUARD:
            lock = _CACHE_LOCKS.setdefault(str(path.resolve()), threading.Lock())
        try:
            with lock:
                fill_store(b.extractor, keyed, path, block_rows=self.cfg.block_items(b.name), stores=self.cfg.stores,
                           progress=False)
        except (StoreBusyError, WriterConflictError):
            return _Lookup(None)
        return _Lookup(path)


class _Call:
    """One public call: the items, and what is said once it is done (inputs that could not be read; a source
    whose models changed since loading)."""

    def __init__(self, predictor: Predictor, df):
        self.predictor, self.df = predictor, df

    def __enter__(self) -> Items:
        self.items = Items(self.df, self.predictor.cfg).__enter__()
        return self.items

    def __exit__(self, kind, *exc) -> None:
        p = self.predictor
        self.items.__exit__(kind, *exc)
        if kind is None and self.items.problems:
            rows = sorted(self.items.problems)
            warnings.warn(MissingInputWarning(f"{len(rows)} item(s) classified without an input that could "
                                              f"not be read: {self.items.names(rows)}"), stacklevel=3)
        if kind is None and p.warn_on_change and not p._warned and p.changed():
            p._warned = True
            warnings.warn(f"{p.source}: its models changed since this Predictor was loaded; it goes on answering "
                          f"with its own (version {p.version}): Predictor.load it again for the new ones",
                          stacklevel=3)
