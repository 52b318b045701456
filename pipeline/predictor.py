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
new `Predictor.load` gives the new ones. One Predictor is safe to call from several threads (the calls
take turns: each already uses every core).
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline import bundle as bundles, checkpoint, modalities, workdir as wd
from pipeline.config import Config
from pipeline.distributed import pick_device
from pipeline.errors import PipelineError
from pipeline.extract.driver import keep_freed_memory, run_extraction
from pipeline.heads import FusionHeads
from pipeline.items import Items
from pipeline.catalog import SPLIT_FILE, class_names as named_classes, read_split
from pipeline.modalities import ExtractContext
from pipeline.provenance import digest, sha256_file
from pipeline.sketch import sketches
from pipeline.upstream import check_planned_model
from stores import FeatureStore, Ragged, StoreBusyError, WriterConflictError
from stores.paths import is_url

CHUNK_ROWS = 512  # rows computed at once: bounds the memory of decoded photos and token states
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
    this very checkpoint or extractor). Checked at each use: a store written or rebuilt since it was indexed is
    indexed again, and one rebuilt by another checkpoint or extractor is no longer read."""

    def __init__(self, path, accepts=lambda provenance: True):
        self.path, self.accepts, self.lock = path, accepts, threading.Lock()
        self.stamp, self.store = object(), None
        self.fp, self.ids = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        if path is not None:
            self.refresh()

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
            ids = store.ids if store is not None else np.zeros(0, np.int64)
            planned_ids, planned_fp = store.planned() if store is not None else (ids, np.zeros(0, np.uint64))
            order = np.argsort(planned_ids)
            fp = planned_fp[order][np.searchsorted(planned_ids[order], ids)] if len(ids) else planned_fp[:0]
            by_fp = np.argsort(fp, kind="stable")
            self.fp, self.ids = fp[by_fp], ids[by_fp]

    def unchanged(self) -> bool:
        """Whether the store is still the one indexed (checked after reading from it)."""
        return self.path is None or _store_stamp(self.path) == self.stamp

    def find(self, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of the fingerprints found, the stored item id of each found one)."""
        if not len(self.fp):
            return np.zeros(len(fp), bool), np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(self.fp, fp), len(self.fp) - 1)
        found = self.fp[pos] == fp
        return found, self.ids[pos[found]]


@dataclass
class _Branch:
    """One modality as the predictor uses it: its network, its extractor, what W holds of it."""

    name: str
    model: torch.nn.Module
    extractor: object
    sketch_store: _Lookup  # sketches by this very checkpoint
    feature_store: _Lookup  # features by this very extractor
    max_tokens: int = 0  # tokens of an item the network reads, as in training ([train_reader] max_tokens)


def _not_fused(path: Path, name: str, now: str, sha: str, fusion_path: Path, cfg: Config, workdir: Path) -> str:
    return (f"{path} is not the checkpoint {fusion_path} was fused with (sha256 {now[:12]}, the fusion recorded "
            f"{sha[:12]}): {name} was retrained after fuse; run `{wd.command(cfg, workdir, f'sketch {name}')}` and "
            f"`{wd.command(cfg, workdir, 'fuse')}`, or restore the checkpoint fuse used")


def _model(workdir: Path, name: str, sha: str, fusion_path: Path, cfg: Config):
    """The modality's network, refused unless its checkpoint is the one the fusion recorded."""
    path = wd.model_dir(workdir, name) / checkpoint.MODEL_FILE
    model, ckpt = checkpoint.load_model(path)
    if (now := sha256_file(path)) != sha:  # hashed after loading: what was loaded is no older than this
        raise PipelineError(_not_fused(path, name, now, sha, fusion_path, cfg, workdir))
    return model, ckpt


def fused_checkpoints(workdir: Path, cfg: Config) -> tuple[Path, dict[str, Path]]:
    """The fusion checkpoint and each modality checkpoint it names, refused unless each is the one it recorded."""
    path = wd.fusion_dir(workdir, cfg) / checkpoint.MODEL_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: train the work directory first (extract, pretrain, sketch, "
                            f"fuse; or `pipeline demo --workdir {workdir}`)")
    models = {}
    for name, sha in checkpoint.load(path)["checkpoints"].items():
        models[name] = wd.model_dir(workdir, name) / checkpoint.MODEL_FILE
        if not models[name].is_file():
            raise PipelineError(f"{models[name]} not found: the fusion {path} reads {name}; train it again")
        if (now := sha256_file(models[name])) != sha:
            raise PipelineError(_not_fused(models[name], name, now, sha, path, cfg, workdir))
    return path, models


def _branch(name: str, workdir: Path, cfg: Config, device: torch.device, sha: str, fusion_path: Path,
            reuse: bool, bundled: bool) -> _Branch:
    model, ckpt = _model(workdir, name, sha, fusion_path, cfg)
    trained_on = ckpt.get("store", {}).get("provenance", {}).get("producer")
    if not bundled:  # before any upstream model is built or converted
        check_planned_model(cfg, name, trained_on, wd.model_dir(workdir, name) / checkpoint.MODEL_FILE,
                            "predict with the configuration it was trained with")
    ctx = ExtractContext(cfg, workdir, pick_device(cfg.extract.device, "[extract] device"))
    extractor = modalities.get(name).extractor(ctx)
    if not bundled and trained_on is not None and trained_on != extractor.producer:  # a bundle: its manifest
        raise PipelineError(f"{wd.model_dir(workdir, name) / checkpoint.MODEL_FILE} was trained on {name} features "
                            f"of another model or settings than {cfg.source} gives now; predict with the "
                            f"configuration it was trained with")
    features = sketched = None
    if reuse and not bundled:
        features = wd.feature_store_path(workdir, cfg, name)
        sketched = wd.sketch_store_path(workdir, cfg, name)
    made_here = lambda p: p["producer"] == extractor.producer  # noqa: E731
    by_this = lambda p: p["producer"].get("checkpoint_sha256") == sha  # noqa: E731
    return _Branch(name, model.to(device), extractor, _Lookup(sketched, by_this), _Lookup(features, made_here),
                   ckpt.get("max_tokens", 0))


def model_stamp(source: str | Path, cfg: Config) -> tuple:
    """The stat of every model file a Predictor of `source` (a work directory or a bundle) loads: it changes
    when one is replaced (a new pretrain or fuse, a bundle swapped in or a symlink repointed)."""
    source = Path(source)
    files = [wd.fusion_dir(source, cfg) / checkpoint.MODEL_FILE,
             *sorted(source.glob(f"models/*/{checkpoint.MODEL_FILE}"))]
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
    return named_classes(read_split(workdir)) if (Path(workdir) / SPLIT_FILE).is_file() else {}


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
        self._lock = threading.RLock()  # one call at a time: each already uses every core
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
        if not isinstance(config, Config):
            config = wd.load(workdir, [config] if isinstance(config, (str, Path)) else config)
        return cls.open(workdir, config, device, cache, reuse)

    @classmethod
    def open(cls, workdir: Path, cfg: Config, device: str = "auto", cache: str | Path | None = None,
             reuse: bool = True) -> Predictor:
        workdir = Path(workdir)
        bundled = bundles.is_bundle(workdir)
        if bundled:
            cfg = bundles.settings(workdir, cfg)  # checks every file against the manifest first
        elif not workdir.is_dir():
            raise PipelineError(f"{workdir}: no such work directory or bundle")
        path = wd.fusion_dir(workdir, cfg) / checkpoint.MODEL_FILE
        if not path.is_file():
            raise PipelineError(f"{path} not found: train the work directory first, "
                                f"`{wd.command(cfg, workdir, 'train', catalog=True)}`")
        if cache is not None:
            cache = check_cache(Path(cache), workdir, cfg)
        names = read_class_names(cfg.serve.class_names) or ({} if bundled else split_class_names(workdir))
        fusion = checkpoint.load(path)
        fusion_sha = sha256_file(path)
        keep_freed_memory()  # CPU forwards: no page faults on every big activation (3x on EfficientNet)
        dev = pick_device(device, "device")
        branches = {m: _branch(m, workdir, cfg, dev, sha, path, reuse, bundled)
                    for m, sha in fusion["checkpoints"].items()}
        heads = FusionHeads(fusion["heads"], fusion["dims"], len(fusion["codes"]), fusion.get("method", "joint"))
        heads.load_state_dict(fusion["state_dict"])
        version = digest([fusion_sha, fusion["checkpoints"], {m: b.extractor.producer for m, b in branches.items()}])
        return cls(cfg, heads.eval(), fusion["codes"], branches, dev, cache, version[:16], workdir, names)

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
        b.sketch_store.refresh()
        found, ids = b.sketch_store.find(fp)
        if found.any():
            rows = b.sketch_store.store.read("sketch", ids)
            if b.sketch_store.unchanged():  # else rebuilt while reading: computed below instead
                out[found] = rows
                todo &= ~found
        self._reuse(b, b.feature_store, fp, out, todo)
        if self.cache is not None and todo.any():
            self._reuse(b, self._cached(b, frame.filter(pl.Series(todo))), fp, out, todo)
        for start in range(0, int(todo.sum()), CHUNK_ROWS):
            rows = np.flatnonzero(todo)[start : start + CHUNK_ROWS]
            features = self._compute(b, frame[rows])
            if features.missing is not None and b.name == "image":
                items.undecodable(rows[np.asarray(features.missing) != 0])
            out[rows] = sketches(b.model, features, b.name, np.arange(len(rows)), self.cfg.sketch.batch_size,
                                 self.device, b.max_tokens)
        return out

    def _reuse(self, b: _Branch, lookup: _Lookup, fp: np.ndarray, out: np.ndarray, todo: np.ndarray) -> None:
        """Sketch the rows still `todo` whose input `lookup`'s store holds, from its features."""
        lookup.refresh()
        found, ids = lookup.find(fp[todo])
        if found.any():
            rows = np.flatnonzero(todo)[found]
            values = sketches(b.model, lookup.store, b.name, ids, self.cfg.sketch.batch_size, self.device,
                              b.max_tokens)
            if lookup.unchanged():
                out[rows] = values
                todo[rows] = False

    def _compute(self, b: _Branch, frame: pl.DataFrame) -> MemoryFeatures:
        m = modalities.get(b.name)
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
        path = self.cache / "features" / f"{b.name}.zarr"
        with _CACHE_LOCKS_GUARD:
            lock = _CACHE_LOCKS.setdefault(str(path.resolve()), threading.Lock())
        try:
            with lock:
                run_extraction(b.extractor, keyed, path, block_rows=self.cfg.block_items(b.name), progress=False)
        except (StoreBusyError, WriterConflictError):
            return _Lookup(None)
        return _Lookup(path)


class _Call:
    """One public call: the Predictor's turn (its lock), the items, and what is said once it is done (inputs
    that could not be read; a source whose models changed since loading)."""

    def __init__(self, predictor: Predictor, df):
        self.predictor, self.df = predictor, df

    def __enter__(self) -> Items:
        self.predictor._lock.acquire()
        try:
            self.items = Items(self.df, self.predictor.cfg).__enter__()
        except BaseException:
            self.predictor._lock.release()
            raise
        return self.items

    def __exit__(self, kind, *exc) -> None:
        p = self.predictor
        try:
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
        finally:
            p._lock.release()
