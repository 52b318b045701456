"""The store contract, run against both backends."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from stores import (
    ArraySpec, FeatureStore, Ragged, StoreBusyError, StoreError, WriterConflictError, fingerprint, upgrade,
    writer_claim,
)
from tests.conftest import store_layout

BACKENDS = [".zarr", ".h5"]
SPECS = {"tokens": ArraySpec("float16", (4,), ragged=True), "vec": ArraySpec("float32", (3, 2))}


def make_items(n: int, seed: int = 0, max_len: int = 40):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    lengths = rng.integers(0, max_len, size=n)
    lengths[::17] = 0  # empty rows (an empty description) must round-trip as empty
    tokens = [rng.standard_normal((k, 4)).astype(np.float16) for k in lengths]
    vec = rng.standard_normal((n, 3, 2)).astype(np.float32)
    return ids, lengths, tokens, vec


def block_data(store: FeatureStore, block: int, ids, tokens, vec):
    pos = {int(i): k for k, i in enumerate(ids)}
    rows = [pos[int(i)] for i in store.block_ids(block)]
    flat = np.concatenate([tokens[r] for r in rows]) if rows else np.zeros((0, 4), np.float16)
    return {"tokens": flat.reshape(-1, 4), "vec": vec[rows]}


def build(path: Path, n=700, block_rows=64, seed=0, blocks=None, ids=None):
    """A store of n items (or of `ids`), with the blocks listed in `blocks` written (all by default)."""
    made_ids, lengths, tokens, vec = make_items(n if ids is None else len(ids), seed)
    ids = made_ids if ids is None else np.asarray(ids, dtype=np.int64)
    store = FeatureStore.create(path, "test", SPECS, {"model": "m", "weights_sha256": "abc"}, ids,
                                fingerprint([str(i) for i in ids]), {"tokens": lengths}, block_rows=block_rows,
                                **store_layout())
    for b in store.pending_blocks() if blocks is None else blocks:
        store.write_block(b, block_data(store, b, ids, tokens, vec))
    return store, (ids, lengths, tokens, vec)


@pytest.fixture(params=BACKENDS)
def suffix(request):
    return request.param


def test_random_batch_in_asked_order(tmp_path, suffix):
    store, (ids, lengths, tokens, vec) = build(tmp_path / f"s{suffix}")
    rng = np.random.default_rng(1)
    pick = rng.choice(len(ids), size=256, replace=False)
    got = store.read("tokens", ids[pick])
    assert isinstance(got, Ragged) and len(got) == 256
    for k, r in enumerate(pick):
        np.testing.assert_array_equal(got[k], tokens[r])
    np.testing.assert_array_equal(store.read("vec", ids[pick]), vec[pick])
    # A full scan in row order and a reversed scan agree with the truth too.
    np.testing.assert_array_equal(store.read("vec", ids[::-1]), vec[::-1])
    assert len(store) == len(ids) and set(store.ids.tolist()) == set(ids.tolist())


def test_ragged_padded_and_empty_rows(tmp_path, suffix):
    store, (ids, lengths, tokens, _) = build(tmp_path / f"s{suffix}", n=100)
    got = store.read("tokens", ids)
    np.testing.assert_array_equal(got.lengths, lengths)
    assert got[0].shape == (0, 4)  # row 0 is one of the empty ones
    padded, lens = got.padded()
    assert padded.shape == (100, lengths.max(), 4)
    k = int(np.argmax(lengths))
    np.testing.assert_array_equal(padded[k, : lens[k]], tokens[k])
    assert not padded[0].any()


def test_padding_waste_at_most_ten_percent(tmp_path, suffix):
    # Title-like lengths, paper-size blocks: the token array holds at most 10% more than real tokens.
    ids, lengths, *_ = make_items(5000, max_len=60)
    store = FeatureStore.create(tmp_path / f"s{suffix}", "test", {"tokens": ArraySpec("float16", (768,), True)},
                                {}, ids, fingerprint([str(i) for i in ids]), {"tokens": lengths}, block_rows=1024,
                                **store_layout())
    stored = store.backend.array("tokens/values").shape[0]
    assert lengths.sum() <= stored <= 1.1 * lengths.sum()


def test_unknown_ids_are_named(tmp_path, suffix):
    store, (ids, *_) = build(tmp_path / f"s{suffix}", n=50)
    with pytest.raises(StoreError, match=r"1 item\(s\) not in the store.*\[-5\]"):
        store.read("vec", [ids[0], -5])


def test_incomplete_blocks_are_invisible_and_pending(tmp_path, suffix):
    store, (ids, lengths, tokens, vec) = build(tmp_path / f"s{suffix}", n=300, block_rows=64, blocks=[0, 2])
    assert store.pending_blocks() == [1, 3, 4]
    assert store.pending_blocks((1, 2)) == [1, 3]
    visible = set(store.ids.tolist())
    assert visible == set(store.block_ids(0).tolist()) | set(store.block_ids(2).tolist())
    with pytest.raises(StoreError):
        store.read("vec", store.block_ids(1)[:1])
    assert not store.verify()["ok"] and store.verify()["incomplete_blocks"] == [1, 3, 4]


def test_add_items_appends_without_touching_stored(tmp_path, suffix):
    store, (ids, lengths, tokens, vec) = build(tmp_path / f"s{suffix}", n=130, block_rows=64)
    before = store.read("tokens", ids)
    new_ids, new_len, new_tok, new_vec = make_items(70, seed=5)
    new_ids += 10**10  # disjoint from the first items
    blocks = store.add_items(new_ids, fingerprint([str(i) for i in new_ids]), {"tokens": new_len})
    assert blocks == [3, 4] and store.pending_blocks() == [3, 4]
    for b in blocks:
        store.write_block(b, block_data(store, b, new_ids, new_tok, new_vec))
    after = store.read("tokens", ids)
    np.testing.assert_array_equal(after.values, before.values)
    np.testing.assert_array_equal(store.read("vec", new_ids), new_vec)
    assert len(store) == 200 and store.verify()["ok"]


def test_provenance_round_trip_and_reopen(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    store, (ids, *_rest) = build(path, n=20)
    store.close()
    with FeatureStore(path) as again:
        prov = again.provenance
        assert prov["schema_version"] == 2 and prov["kind"] == "test"
        assert prov["producer"] == {"model": "m", "weights_sha256": "abc"}
        np.testing.assert_array_equal(again.planned()[1], fingerprint([str(i) for i in ids]))
        info = again.info()
        assert info["items"] == 20 and info["arrays"]["vec"]["shape"][1:] == [3, 2]


def test_block_shape_mismatch_is_refused(tmp_path, suffix):
    store, (ids, lengths, tokens, vec) = build(tmp_path / f"s{suffix}", n=64, blocks=[])
    data = block_data(store, 0, ids, tokens, vec)
    data["tokens"] = data["tokens"][:-1]
    with pytest.raises(StoreError, match="expects"):
        store.write_block(0, data)
    assert store.pending_blocks() == [0]


def test_verify_names_items_of_a_deleted_chunk(tmp_path):
    path = tmp_path / "s.zarr"
    store, (ids, *_rest) = build(path, n=300, block_rows=64)
    assert store.verify()["ok"]
    chunk = path / "vec" / "c" / "1" / "0" / "0"  # rows of chunk 1 of the fixed array
    assert chunk.exists()
    chunk.unlink()
    report = FeatureStore(path).verify()
    assert not report["ok"] and any("vec: chunk 1 is missing" in p for p in report["problems"])
    clen = store.chunk_len("vec")
    rows_ids = store.backend.array("ids")[clen : 2 * clen]
    assert set(report["damaged_items"]) == set(rows_ids[rows_ids >= 0].tolist())


def test_both_backends_store_the_same(tmp_path):
    a, _ = build(tmp_path / "a.zarr")
    b, (ids, *_rest) = build(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.read("tokens", ids).values, b.read("tokens", ids).values)
    np.testing.assert_array_equal(a.read("vec", ids), b.read("vec", ids))


INT64 = np.iinfo(np.int64)


def test_any_int64_is_an_item_id(tmp_path, suffix):
    # -1 (what unused rows read), 0, the extremes and negative ids, the last block half empty: every
    # one is an item, before and after an append.
    path = tmp_path / f"s{suffix}"
    negative = -np.random.default_rng(3).choice(10**12, 96, replace=False) - 3
    ids = np.concatenate([[-1, 0, INT64.min, INT64.max], negative])  # 100 items: blocks of 64 and 36
    store, (_, lengths, tokens, vec) = build(path, ids=ids)
    assert len(store) == 100 and store.block_counts().tolist() == [64, 36]
    assert store.ids.tolist() == ids.tolist() and store.planned()[0].tolist() == ids.tolist()
    assert store.contains([-1, INT64.min, INT64.max, -2]).tolist() == [True, True, True, False]
    np.testing.assert_array_equal(store.read("vec", ids[::-1]), vec[::-1])

    more = np.array([-2, 1, INT64.min + 1, INT64.max - 1] + list(range(-100, -70)), dtype=np.int64)
    _, _, more_tokens, more_vec = make_items(len(more), seed=9)
    blocks = store.add_items(more, fingerprint([str(i) for i in more]), {"tokens": [len(t) for t in more_tokens]})
    for b in blocks:
        store.write_block(b, block_data(store, b, more, more_tokens, more_vec))
    store.close()
    with FeatureStore(path) as again:
        everything = np.concatenate([ids, more])
        assert len(again) == 134 and again.verify()["ok"] and again.verify()["items"] == 134
        got = again.read("tokens", everything)
        for k, truth in enumerate(tokens + more_tokens):
            np.testing.assert_array_equal(got[k], truth)
        np.testing.assert_array_equal(again.read("vec", everything), np.concatenate([vec, more_vec]))


def test_refused_items_leave_the_store_as_it_was(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    store, (ids, *_rest) = build(path, n=100)
    arrays_before = {name: store.backend.array(name)[:] for name in store.array_names()}

    def add(new_ids, n_hashes=None, n_lengths=None):
        n = len(new_ids)
        store.add_items(new_ids, np.arange(n if n_hashes is None else n_hashes, dtype=np.uint64),
                        {"tokens": np.ones(n if n_lengths is None else n_lengths, dtype=np.int64)})

    for call, message in ((lambda: add([ids[3], 10**11]), r"1 item id\(s\) given twice or already in the store"),
                          (lambda: add([5, 6, 5]), r"given twice.*\[5\]"),
                          (lambda: add([5, 6], n_hashes=3), "2 item ids but"),
                          (lambda: add([5, 6], n_lengths=1), "one token count"),
                          (lambda: add(np.array([1.0, 2.0])), "64-bit signed integers"),
                          (lambda: add(np.array([2**63], dtype=np.uint64)), "64-bit signed integers")):
        with pytest.raises(StoreError, match=message):
            call()
    for name, before in arrays_before.items():
        np.testing.assert_array_equal(store.backend.array(name)[:], before, err_msg=name)
    with pytest.raises(StoreError, match="given twice"):
        build(tmp_path / f"new{suffix}", ids=[1, 2, 1])
    assert not FeatureStore.exists(tmp_path / f"new{suffix}")


def test_lengths_input_hashes_and_bytes_stored(tmp_path, suffix):
    store, (ids, lengths, *_rest) = build(tmp_path / f"s{suffix}", n=200)
    pick = ids[::-3]
    got = store.lengths("tokens", pick)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, lengths[::-3])
    np.testing.assert_array_equal(store.input_hashes(pick), fingerprint([str(i) for i in pick]))
    assert store.bytes_stored() == store.info()["bytes_on_disk"] > 0
    with pytest.raises(StoreError, match="'vec' is not ragged"):
        store.lengths("vec", pick)


def test_xarray_opens_a_store(tmp_path):
    import xarray as xr

    path = tmp_path / "s.zarr"
    store, (ids, *_rest) = build(path, n=100)
    root = xr.open_zarr(path, consolidated=False, chunks=None)
    assert root["ids"].dims == ("item",) and root["complete"].dims == root["counts"].dims == ("block",)
    assert root["vec"].dims == ("item", "vec_dim1", "vec_dim2")
    assert root["ids"].values[:100].tolist() == ids.tolist()  # int64 as stored, no fill value masked
    tokens = xr.open_zarr(path, group="tokens", consolidated=False, chunks=None)
    assert tokens["values"].dims == ("token", "tokens_dim1") and tokens["starts"].dims == ("item",)
    assert set(xr.open_datatree(path, engine="zarr", consolidated=False, chunks=None).groups) == {"/", "/tokens"}
    assert store.backend.array("complete").chunks == (1,)  # one chunk per block: shard workers write it


def as_schema_1(path: Path) -> None:
    """Rewrite a store as schema 1 wrote it: no `counts` (id -1 marks an unused row), Zarr chunks
    without checksums or dimension names, HDF5 chunks in lzf."""
    with FeatureStore(path) as store:
        arrays = {name: (store.backend.array(name)[:], store.backend.array(name).chunks)
                  for name in store.array_names() if name != "counts"}
        provenance = store.provenance | {"schema_version": 1}
    FeatureStore.remove(path)
    if path.suffix == ".zarr":
        group = zarr.open_group(path, mode="w")
        for name, (values, chunks) in arrays.items():
            arr = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunks,
                                     fill_value=-1 if name == "ids" else 0)
            arr.with_config({"write_empty_chunks": True})[:] = values
        group.attrs["provenance"] = provenance
        return
    with h5py.File(path, "w") as f:
        for name, (values, chunks) in arrays.items():
            f.create_dataset(name, data=values, chunks=chunks, maxshape=(None,) + values.shape[1:],
                             fillvalue=-1 if name == "ids" else 0, compression="lzf",
                             shuffle=values.dtype.itemsize > 1, fletcher32=True)
        f.attrs["provenance"] = json.dumps(provenance)


def test_a_schema_1_store_is_refused_until_upgraded_once_then_reads_and_takes_new_items(tmp_path, suffix):
    from tests.conftest import cli

    path = tmp_path / f"s{suffix}"
    store, (ids, lengths, tokens, vec) = build(path, n=100)
    store.close()
    as_schema_1(path)
    with pytest.raises(StoreError, match=rf"schema version 1.*`pipeline inspect {re.escape(str(path))} --upgrade`"):
        FeatureStore(path)
    done = cli("inspect", path, "--upgrade")  # the command the refusal names
    assert done.returncode == 0 and "upgraded to schema version 2" in done.stderr, done.stderr
    assert not upgrade(path, gzip_level=1)  # once: a schema 2 store is left as it is
    with FeatureStore(path, "a") as new:
        assert new.schema_version == 2 and new.checksummed and new.info()["checksummed"]
        assert len(new) == 100 and new.block_counts().tolist() == [64, 36] and new.verify()["ok"]
        np.testing.assert_array_equal(new.read("tokens", ids).values, np.concatenate(tokens))
        np.testing.assert_array_equal(new.read("vec", ids), np.stack(vec))
        new_ids, new_lengths, new_tokens, new_vec = make_items(40, seed=4)
        new_ids -= 10**10  # negative ids too: `counts`, not id -1, now says which rows are used
        blocks = new.add_items(new_ids, fingerprint([str(i) for i in new_ids]), {"tokens": new_lengths})
        for b in blocks:
            new.write_block(b, block_data(new, b, new_ids, new_tokens, new_vec))
        assert len(new) == 140 and new.verify()["ok"]
        np.testing.assert_array_equal(new.read("vec", new_ids), new_vec)


def test_wrong_suffix_and_missing_store(tmp_path):
    with pytest.raises(Exception, match="must end in .zarr"):
        FeatureStore(tmp_path / "x.npy")
    with pytest.raises(StoreError, match="no such store"):
        FeatureStore(tmp_path / "nothing.zarr")


# ------------------------------------------------------------------ processes
WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.test_stores import build, make_items, block_data
    from stores import FeatureStore
    path, shard, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ids, lengths, tokens, vec = make_items(700)
    store = FeatureStore(path, "a")
    k, n = map(int, shard.split("/"))
    for b in store.pending_blocks((k, n)):
        store.write_block(b, block_data(store, b, ids, tokens, vec))
        print(b, flush=True)
        time.sleep(delay)
""")


def _writer(path: Path, shard="0/1", delay=0.0) -> subprocess.Popen:
    # The script goes on the command line: a script file rewritten for the next writer could be read
    # empty by the one starting, which then ran nothing and exited 0.
    return subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(Path(__file__).resolve().parent.parent)),
                             str(path), shard, str(delay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("suffix", BACKENDS)
def test_killed_writer_resumes_to_the_same_store(tmp_path, suffix):
    reference, (ids, *_rest) = build(tmp_path / f"ref{suffix}")
    path = tmp_path / f"s{suffix}"
    build(path, blocks=[])[0].close()  # laid out, nothing written
    proc = _writer(path, delay=0.2)
    for _ in range(3):  # let it write three blocks, then kill it between or inside a block
        proc.stdout.readline()
    time.sleep(np.random.default_rng().uniform(0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureStore(path, "a")
    done = store.n_blocks - len(store.pending_blocks())
    assert 3 <= done < store.n_blocks
    store.close()
    rerun = _writer(path)
    assert rerun.wait(60) == 0, rerun.stderr.read()
    resumed = FeatureStore(path)
    assert resumed.verify()["ok"]
    np.testing.assert_array_equal(resumed.read("tokens", ids).values, reference.read("tokens", ids).values)
    np.testing.assert_array_equal(resumed.read("vec", ids), reference.read("vec", ids))


def test_zarr_shards_written_concurrently_equal_one_writer(tmp_path):
    reference, (ids, *_rest) = build(tmp_path / "ref.zarr")
    path = tmp_path / "s.zarr"
    build(path, blocks=[])[0].close()
    procs = [_writer(path, shard=f"{k}/3") for k in range(3)]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read()
    store = FeatureStore(path)
    assert store.verify()["ok"] and len(store) == len(ids)
    np.testing.assert_array_equal(store.read("tokens", ids).values, reference.read("tokens", ids).values)
    np.testing.assert_array_equal(store.read("vec", ids), reference.read("vec", ids))


def test_hdf5_refuses_a_second_writer(tmp_path):
    path = tmp_path / "s.h5"
    store, _ = build(path, blocks=[])  # held open for writing by this process
    proc = _writer(path)
    assert proc.wait(60) != 0
    assert "takes one writer at a time" in proc.stderr.read()
    store.close()
    assert _writer(path).wait(60) == 0  # once released, the next writer gets it


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from contextlib import nullcontext
    from stores import store_lock, writer_claim
    path, shard, planning = sys.argv[1], tuple(map(int, sys.argv[2].split("/"))), sys.argv[3] == "planning"
    with writer_claim(path, shard), (store_lock(path) if planning else nullcontext()):
        print("holding", flush=True)
        time.sleep(120)
""")


def _holder(path: Path, shard: str, planning: bool) -> subprocess.Popen:
    """A writer process that has claimed shard K/N (and holds the layout lock, as when it plans)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(Path(__file__).resolve().parent.parent)),
                             str(path), shard, "planning" if planning else "writing"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "holding\n", proc.stderr.read()
    return proc


def test_a_second_hdf5_writer_is_refused_at_once_naming_the_first(tmp_path):
    path = tmp_path / "s.h5"
    build(path, blocks=[])[0].close()
    first = _holder(path, "0/1", planning=True)  # the layout lock is held: a claim used to wait on it

    def claim():
        with writer_claim(path, (0, 1)):
            pass

    try:
        for attempt in (claim, lambda: FeatureStore(path, "a"), lambda: FeatureStore.remove(path)):
            started = time.monotonic()
            refusal = rf"^{re.escape(str(path))}: process {first.pid} on .* is writing this HDF5 store"
            with pytest.raises(StoreBusyError, match=refusal):
                attempt()
            assert time.monotonic() - started < 2
        assert FeatureStore.exists(path)
    finally:
        first.kill()
        first.wait()
    with writer_claim(path, (0, 1)), FeatureStore(path, "a") as store:  # the lock went with its process
        assert store.pending_blocks() == list(range(11))


def test_zarr_writers_of_disjoint_shards_run_side_by_side(tmp_path):
    path = tmp_path / "s.zarr"
    build(path, blocks=[])[0].close()
    first = _holder(path, "0/2", planning=False)
    try:
        with writer_claim(path, (1, 2)), FeatureStore(path, "a") as store:
            assert store.pending_blocks((1, 2)) == [1, 3, 5, 7, 9]
        with pytest.raises(WriterConflictError, match=rf"process {first.pid} on .* is writing the same shard"):
            with writer_claim(path, (0, 2)):
                pass
    finally:
        first.kill()
        first.wait()


def test_a_feature_may_not_take_the_name_of_the_stores_own_arrays(tmp_path):
    with pytest.raises(StoreError, match=r"a feature array may not be called counts"):
        FeatureStore.create(tmp_path / "s.zarr", "test", {"counts": ArraySpec("float32", (2,))}, {}, np.arange(3),
                            fingerprint(["a", "b", "c"]), block_rows=64, **store_layout())
    assert not FeatureStore.exists(tmp_path / "s.zarr")
