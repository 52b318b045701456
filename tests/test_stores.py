"""The store contract, run against both backends."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from stores import ArraySpec, FeatureStore, Ragged, StoreError, fingerprint

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


def build(path: Path, n=700, block_rows=64, seed=0, blocks=None):
    ids, lengths, tokens, vec = make_items(n, seed)
    store = FeatureStore.create(path, "test", SPECS, {"model": "m", "weights_sha256": "abc"}, ids,
                                fingerprint([str(i) for i in ids]), {"tokens": lengths}, block_rows=block_rows)
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
                                {}, ids, fingerprint([str(i) for i in ids]), {"tokens": lengths}, block_rows=1024)
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
