"""Damaged chunks: every read and verify() catch them, name the items and blocks whose data lies
there, and those blocks, marked incomplete, are written again in place.

The damage: 8 bytes flipped in the middle of a chunk, or at its first bytes, as stored (a Zarr chunk
file, an HDF5 chunk's bytes in the file). A token chunk of random float16 values barely compresses,
so without a checksum such damage reads back as features.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from stores import DamagedStoreError, FeatureStore, StoreError
from tests.test_stores import block_data, build

BLOCK_ROWS = 64


@pytest.fixture(params=[".zarr", ".h5"])
def suffix(request):
    return request.param


def chunk_span(path: Path, array: str, chunk: int) -> tuple[Path, int, int]:
    """(file, offset, size) of chunk `chunk` (along axis 0) of `array` as stored."""
    with FeatureStore(path) as store:
        ndim = len(store.backend.array(array).shape)
    if path.suffix == ".zarr":
        file = path.joinpath(array, "c", str(chunk), *["0"] * (ndim - 1))
        return file, 0, file.stat().st_size
    with h5py.File(path, "r") as f:
        ds = f[array]
        info = ds.id.get_chunk_info_by_coord((chunk * ds.chunks[0],) + (0,) * (ndim - 1))
    return path, info.byte_offset, info.size


def damage(path: Path, array: str, chunk: int, where: str = "middle") -> None:
    """Flip 8 bytes of a chunk as stored: in its middle, or its first 8."""
    file, offset, size = chunk_span(path, array, chunk)
    at = offset + (size // 2 if where == "middle" else 0)
    with open(file, "r+b") as fh:
        fh.seek(at)
        stored = fh.read(8)
        fh.seek(at)
        fh.write(bytes(b ^ 0xFF for b in stored))


def first_token_chunk(store: FeatureStore, block: int) -> int:
    return int(store.backend.array("tokens/starts")[block * BLOCK_ROWS]) // store.chunk_len("tokens")


def items_with_tokens_in(store: FeatureStore, chunk: int) -> set[int]:
    """Items with at least one token in chunk `chunk` of tokens/values (from the planned layout)."""
    clen, ids = store.chunk_len("tokens"), store.planned()[0]
    starts = store.backend.array("tokens/starts")[:][store.rows(ids)]
    lengths = store.lengths("tokens", ids)
    hit = (lengths > 0) & (starts < (chunk + 1) * clen) & (starts + lengths > chunk * clen)
    return set(ids[hit].tolist())


@pytest.mark.parametrize("where", ["middle", "start"])
def test_a_damaged_token_chunk_fails_every_read_and_verify(tmp_path, suffix, where):
    path = tmp_path / f"s{suffix}"
    store, (ids, lengths, tokens, vec) = build(path, n=300, block_rows=BLOCK_ROWS)
    chunk = first_token_chunk(store, 2)
    expected = items_with_tokens_in(store, chunk)
    assert expected
    store.close()
    damage(path, "tokens/values", chunk, where)

    store = FeatureStore(path)
    for asked in (ids, ids[[i for i, item in enumerate(ids) if item in expected][:1]]):  # all items, one item
        with pytest.raises(DamagedStoreError) as caught:
            store.read("tokens", asked)
        err = caught.value
        assert err.path == path and err.array == "tokens/values" and err.blocks == [2] and err.chunks == [chunk]
        assert set(err.item_ids.tolist()) == expected
        assert str(err).startswith(f"{path}: array 'tokens/values' is damaged") and "\n" not in str(err)
    elsewhere = store.block_ids(0)  # other chunks read as they were
    got = store.read("tokens", elsewhere)
    for k, item in enumerate(elsewhere):
        np.testing.assert_array_equal(got[k], tokens[int(np.flatnonzero(ids == item)[0])])

    report = store.verify()
    assert not report["ok"] and report["problems"] == [f"tokens/values: chunk {chunk} is unreadable "
                                                       f"({err.cause})"]
    assert set(report["damaged_items"]) == expected and report["damaged_blocks"] == [2] and report["repairable"]


def test_damaged_blocks_invalidated_and_written_again_read_as_before(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    store, (ids, lengths, tokens, vec) = build(path, n=300, block_rows=BLOCK_ROWS)
    before = store.read("tokens", ids)
    token_rows = store.backend.array("tokens/values").shape[0]
    damage(path, "tokens/values", first_token_chunk(store, 3))
    damage(path, "vec", 1 * BLOCK_ROWS // store.chunk_len("vec"))  # a chunk of block 1
    store.close()

    store = FeatureStore(path, "a")
    report = store.verify()
    assert report["damaged_blocks"] == [1, 3] and report["repairable"]
    store.invalidate_blocks(report["damaged_blocks"])
    assert store.pending_blocks() == [1, 3] and len(store) == 300 - 2 * BLOCK_ROWS
    with pytest.raises(StoreError, match="not in the store"):
        store.read("tokens", store.block_ids(3)[:1])
    for block in store.pending_blocks():
        store.write_block(block, block_data(store, block, ids, tokens, vec))
    assert store.verify()["ok"] and store.backend.array("tokens/values").shape[0] == token_rows  # in place
    again = store.read("tokens", ids)
    np.testing.assert_array_equal(again.values, before.values)
    np.testing.assert_array_equal(again.offsets, before.offsets)
    np.testing.assert_array_equal(store.read("vec", ids), vec)


def test_damaged_ids_are_reported_as_needing_a_rebuild(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    build(path, n=300, block_rows=BLOCK_ROWS)[0].close()
    damage(path, "ids", 2)
    store = FeatureStore(path)
    with pytest.raises(DamagedStoreError, match=r"array 'ids' is damaged.*its items are unknown, in block\(s\) 2$"):
        store.read("vec", [0])
    report = store.verify()
    assert len(report["problems"]) == 1 and report["problems"][0].startswith("ids: chunk 2 is unreadable (")
    assert report["damaged_blocks"] == [2] and not report["repairable"] and not report["ok"]
    assert "damaged" in store.info()  # info still describes the store


def test_invalidate_refuses_blocks_it_does_not_have(tmp_path):
    store, _ = build(tmp_path / "s.zarr", n=100, block_rows=BLOCK_ROWS)
    with pytest.raises(StoreError, match="no block 2"):
        store.invalidate_blocks([0, 2])
    assert store.pending_blocks() == []
    with pytest.raises(StoreError, match="opened for reading"):
        FeatureStore(tmp_path / "s.zarr").invalidate_blocks([0])
