"""Zarr stores addressed by URL through fsspec (memory://, file://): the store contract's basics, two
processes writing disjoint shards of one file:// store, the store filler's lock-free plan on object storage, and
the stages (extract, pretrain, sketch, fuse, predict) with their stores under a `[stores] root` URL."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import polars as pl
import pytest

from pipeline.config import TINY_CONFIG, load_config
from pipeline.errors import PipelineError
from pipeline.extract import extract
from pipeline.fill import fill_store
from pipeline.fuse import fuse
from pipeline.predict import predict
from pipeline.pretrain import pretrain
from pipeline.sketch import sketch
from pipeline.synth import synthesize
from stores import ArraySpec, FeatureStore, Ragged, StoreError, fingerprint, local_path, store_lock, writer_claim
from tests.test_stores import build

STORES = load_config(TINY_CONFIG).stores

ROOT = Path(__file__).resolve().parent.parent


def memory_url(name: str = "s.zarr") -> str:
    return f"memory://{uuid.uuid4().hex}/{name}"  # the memory filesystem is global to the process


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path) -> str:
    return memory_url() if request.param == "memory" else f"file://{tmp_path}/sub/s.zarr"


def same_arrays(a: FeatureStore, b: FeatureStore) -> None:
    assert a.array_names() == b.array_names()
    for name in a.array_names():
        np.testing.assert_array_equal(a.backend.array(name)[:], b.backend.array(name)[:], err_msg=name)


def test_contract_basics_on_a_url(url):
    assert not FeatureStore.exists(url)
    store, (ids, lengths, tokens, vec) = build(url)
    assert isinstance(store.path, str) and store.path == url  # a URL is never turned into a Path
    again = FeatureStore(url)
    pick = np.random.default_rng(1).choice(len(ids), size=256, replace=False)
    got = again.read("tokens", ids[pick])
    assert isinstance(got, Ragged) and len(got) == 256
    for k, r in enumerate(pick):
        np.testing.assert_array_equal(got[k], tokens[r])
    np.testing.assert_array_equal(again.read("vec", ids[pick]), vec[pick])
    assert len(again) == len(ids) and again.verify()["ok"]
    info = again.info()
    assert info["items"] == len(ids) and info["bytes_on_disk"] > 0 and info["path"] == url
    with pytest.raises(StoreError, match="already exists"):
        build(url)
    FeatureStore.remove(url)
    assert not FeatureStore.exists(url)


def test_verify_names_the_items_of_a_lost_chunk_on_memory():
    url = memory_url()
    store, (ids, *_) = build(url, n=200, block_rows=64)
    fs, root = fsspec.core.url_to_fs(url)
    chunk = f"{root}/vec/c/1/0/0"
    assert fs.exists(chunk)
    fs.rm(chunk)
    report = FeatureStore(url).verify()
    assert not report["ok"] and report["problems"] == ["vec: chunk 1 is missing"]
    assert sorted(report["damaged_items"]) == sorted(ids[store.rows(ids) // 64 == 1].tolist())


def test_locks_on_urls(tmp_path):
    # file:// is a local filesystem: the same lock file as the plain path.
    assert local_path(f"file://{tmp_path}/a.zarr") == tmp_path / "a.zarr"
    with store_lock(f"file://{tmp_path}/a.zarr"):
        assert (tmp_path / ".locks" / "a.zarr.lock").exists()
    # Object storage has no lock to take: no crash, no claims file, nothing imported (s3fs is not installed).
    for u in ("s3://bucket/prefix/a.zarr", "gs://bucket/a.zarr", memory_url()):
        assert local_path(u) is None
        with store_lock(u), writer_claim(u, (0, 2)), writer_claim(u, (0, 2)):
            pass
    with pytest.raises(StoreError, match="HDF5 store must be a local file"):
        FeatureStore.exists("s3://bucket/a.h5")


WRITER = """
import sys
from stores import FeatureStore
from tests.test_stores import block_data, make_items
url, k, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids, lengths, tokens, vec = make_items(700, 0)
store = FeatureStore(url, "a")
for b in store.pending_blocks((k, n)):
    store.write_block(b, block_data(store, b, ids, tokens, vec))
"""


def test_two_processes_writing_disjoint_shards_of_a_file_url(tmp_path):
    one, _ = build(f"file://{tmp_path}/one.zarr")
    two_url = f"file://{tmp_path}/two.zarr"
    build(two_url, blocks=[])  # the layout first, by one process; then the writers
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, two_url, str(k), "2"], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    two = FeatureStore(two_url)
    assert two.verify()["ok"] and len(two) == 700
    same_arrays(one, two)


class Chars:
    """A toy extractor: each title's characters as int16 tokens."""

    name = "chars"
    arrays = {"tokens": ArraySpec("int16", (), ragged=True)}
    producer = {"model": "chars"}

    def fingerprints(self, items):
        return fingerprint(items["title"].to_list())

    def lengths(self, items):
        return {"tokens": np.array([len(t) for t in items["title"].to_list()], dtype=np.int64)}

    def prepare(self, items):
        return items["title"].to_list()

    def compute(self, titles):
        return {"tokens": np.array([ord(c) for t in titles for c in t], dtype=np.int16)}, None


def toy_items(n: int = 300) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    return pl.DataFrame({"item_id": rng.permutation(10 * n)[:n].astype(np.int64),
                         "title": ["x" * int(k) for k in rng.integers(1, 30, n)]})


def test_shard_workers_on_object_storage_wait_for_worker_zero_to_plan():
    items = toy_items()
    one = memory_url()
    fill_store(Chars(), items, one, block_rows=32, stores=STORES, progress=False)
    shared, results = memory_url(), {}

    def worker(k):
        results[k] = fill_store(Chars(), items, shared, block_rows=32, stores=STORES, shard=(k, 2),
                                progress=False)

    late = threading.Thread(target=worker, args=(1,))
    late.start()  # worker 1 first: it must wait for worker 0's layout, not make its own
    time.sleep(0.5)
    assert not FeatureStore.exists(shared)
    worker(0)
    late.join(timeout=60)
    assert results[0].computed + results[1].computed == len(items)
    a, b = FeatureStore(one), FeatureStore(shared)
    assert b.verify()["ok"]
    same_arrays(a, b)


def test_a_worker_without_a_plan_gives_up_with_the_remedy(monkeypatch):
    with pytest.raises(PipelineError, match=r"waited .* for worker 0/2 .*--shard 0/2"):
        fill_store(Chars(), toy_items(), memory_url(), block_rows=32, shard=(1, 2), progress=False,
                   stores=STORES.model_copy(update={"plan_wait_s": 0.3}))


@pytest.mark.usefixtures("one_torch_thread")
def test_stages_keep_their_stores_under_a_url_root(tmp_path):
    synthesize(tmp_path / "cat", items=600, seed=2)
    tiny = {"epochs": 2, "embed_dim": 16, "channels": 16, "depth": 8, "width": 8}
    cfg = load_config(TINY_CONFIG).merged({"pretrain": {"title_bpe": tiny}, "fusion": {
        "epochs": 2, "heads": [{"name": "bpe", "inputs": ["title_bpe"]}]}})
    with_root = cfg.merged({"stores": {"root": f"file://{tmp_path}/shared/emde/"}})
    quiet = lambda *_: None  # noqa: E731
    results = {}
    for name, c in (("plain", cfg), ("root", with_root)):
        w = tmp_path / name
        [features] = extract("title_bpe", tmp_path / "cat", w, c, progress=False, log=quiet)
        metrics = pretrain("title_bpe", w, c, progress=False, log=quiet)
        [sketches] = sketch("title_bpe", w, c, progress=False, log=quiet)
        results[name] = (FeatureStore(features.store), metrics, FeatureStore(sketches.store))

    shared = tmp_path / "shared" / "emde"
    assert results["root"][0].path == f"file://{shared}/features/title_bpe.zarr"
    assert results["root"][2].path == f"file://{shared}/sketches/title_bpe.zarr"
    assert (shared / "features" / "title_bpe.zarr" / "zarr.json").is_file()
    assert (shared / "sketches" / "title_bpe.zarr" / "zarr.json").is_file()
    w = tmp_path / "root"
    assert not (w / "features").exists() and not (w / "sketches").exists()  # the stores, elsewhere
    assert (w / "split.parquet").is_file() and (w / "tokenizers" / "title_bpe.model").is_file()  # the rest, here
    assert (w / "models" / "title_bpe" / "model.pt").is_file()
    assert (tmp_path / "plain" / "features" / "title_bpe.zarr" / "zarr.json").is_file()  # no root: W/features/
    # Same stores and model as without a root (the tokenizer differs only by the path SentencePiece records).
    (plain_features, plain_metrics, plain_sketches), (features, metrics, sketches) = results["plain"], results["root"]
    same_arrays(plain_features, features)
    assert metrics["macro_f1"] == plain_metrics["macro_f1"] and metrics["history"][-1]["loss"] == \
        plain_metrics["history"][-1]["loss"]
    same_arrays(plain_sketches, sketches)

    # fuse and predict find the sketches under the root too; predict adds nothing to the stores.
    fused = fuse(w, with_root, progress=False, log=quiet)
    assert fused["valid_items"] == sum(fused["valid_support"].values()) > 0
    table = predict(tmp_path / "cat", w, tmp_path / "predicted.csv", with_root, progress=False, log=quiet)
    assert len(table) == 600 and not (w / "features").exists() and not (w / "sketches").exists()

    with pytest.raises(PipelineError, match=r"root = .*is a URL, and an HDF5 store must be a local file"):
        extract("title_bpe", tmp_path / "cat", w, with_root, backend="hdf5", progress=False, log=quiet)
