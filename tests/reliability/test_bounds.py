"""Bounded by construction: a photo path that is not a regular file, or too large, is recorded as refused
without being read (never waited on, never read whole); a store whose metadata declares chunks other than its
layout's (a chunk of gigabytes over a small compressed frame) is refused on open, before any chunk is decoded,
and a chunk's frame never decompresses past the chunk's own size.
The hostile cases run in a subprocess under an address-space limit and a timeout, so that a regression fails
the test instead of filling this machine's memory or hanging it."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.extract.image import REFUSED, content_hash
from stores import ArraySpec, FeatureStore, StoreError, UnreadableStoreError, fingerprint

from .conftest import ROOT

MEMORY_LIMIT = 6 << 30  # torch and timm take ~4 GB of address space before anything is read


def bounded(code: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -c code` from the project root, under MEMORY_LIMIT of address space and `timeout` seconds."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)


def hostile_photos(directory: Path, max_bytes: int) -> dict[str, str]:
    directory.mkdir()
    good = directory / "good.jpg"
    Image.new("RGB", (40, 30), (200, 30, 60)).save(good, format="JPEG")
    sparse = directory / "sparse.jpg"
    with open(sparse, "wb") as fh:
        fh.truncate(3 << 30)  # 3 GB of holes: no disk taken, but read whole it is 3 GB of memory
    fifo = directory / "fifo.jpg"
    os.mkfifo(fifo)  # no writer: a blocking open waits forever
    over = directory / "over.jpg"
    over.write_bytes(good.read_bytes() + b"\0" * (max_bytes + 1 - good.stat().st_size))
    (directory / "folder.jpg").mkdir()
    return {"good": str(good), "zero": "/dev/zero", "sparse": str(sparse), "fifo": str(fifo), "over": str(over),
            "folder": str(directory / "folder.jpg")}


@pytest.mark.slow
def test_photos_that_are_not_regular_files_or_too_large_are_refused_unread(tmp_path):
    max_bytes = 1 << 20
    photos = hostile_photos(tmp_path / "photos", max_bytes)
    done = bounded(f"""
        import json, polars as pl, torch
        from pipeline.config import DEFAULT_CONFIG, load_config
        from pipeline.extract.image import ImageMaps
        opts = load_config(DEFAULT_CONFIG).options("image").model_dump() | {{
            "model": "tf_efficientnet_lite0", "input_size": 64, "batch_size": 4, "decode_workers": 2,
            "max_bytes": {max_bytes}}}
        extractor = ImageMaps(opts, None, torch.device("cpu"))
        frame = pl.DataFrame({{"image_path": {list(photos.values())!r}}})
        fp = extractor.fingerprints(frame)
        batch, missing = extractor.prepare(frame)
        print(json.dumps({{"missing": missing.tolist(), "fingerprints": [str(f) for f in fp], "decoded": len(batch)}}))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["missing"] == [0] + [REFUSED] * 5 and result["decoded"] == 1, result
    assert result["fingerprints"][0] == str(content_hash(photos["good"], max_bytes))


def test_a_photo_is_read_at_most_to_its_limit(tmp_path):
    from pipeline.extract.image import read

    path = tmp_path / "p.jpg"
    path.write_bytes(b"x" * 100)
    assert read(str(path), 100) == (b"x" * 100, 0) and read(str(path), 99) == (None, REFUSED)
    assert content_hash(str(path), 100) != content_hash(str(path), 99)  # refused: the fingerprint of why


# ---------------------------------------------------------------------- store metadata
def small_store(path: Path) -> np.ndarray:
    ids = np.arange(40, dtype=np.int64)
    store = FeatureStore.create(path, "test", {"vec": ArraySpec("float32", (4,))}, {"model": "test"}, ids,
                                fingerprint([str(i) for i in ids]), block_rows=16)
    for b in store.pending_blocks():
        store.write_block(b, {"vec": np.ones((len(store.block_ids(b)), 4), np.float32)})
    store.close()
    return ids


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_chunk_declared_larger_than_the_layout_is_refused_before_any_chunk_is_decoded(tmp_path):
    import google_crc32c
    from numcodecs import Zstd

    path = tmp_path / "s.zarr"
    small_store(path)
    frame = Zstd(level=0).encode(np.zeros(1 << 28, np.int64))  # 2 GiB of zeros (never touched) in ~64 KB
    assert len(frame) < 1 << 20
    checksum = np.array([google_crc32c.value(frame)], np.uint32).view("B").tobytes()  # the store's CRC32C codec
    (path / "ids" / "c" / "0").write_bytes(frame + checksum)  # `ids` chunk 0 is now that frame
    edit_json(path / "ids" / "zarr.json", lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[1 << 28]))
    done = bounded(f"""
        from stores import FeatureStore, StoreError
        try:
            FeatureStore({str(path)!r}).read("vec", [0])
        except StoreError as err:
            print("refused:", err)
    """, timeout=120)
    assert done.returncode == 0 and "refused:" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert "array 'ids' is int64 () in chunks of (268435456,), not what its layout says (int64 (), chunks of 16)" \
        in done.stdout


def test_a_frame_that_decompresses_past_its_chunk_is_a_damaged_chunk_without_the_memory(tmp_path):
    import google_crc32c
    from numcodecs import Zstd

    path = tmp_path / "s.zarr"
    small_store(path)
    frame = Zstd(level=0).encode(np.zeros(1 << 30, np.uint8))  # 1 GiB of zeros in ~32 KB; the chunk holds 256 B
    checksum = np.array([google_crc32c.value(frame)], np.uint32).view("B").tobytes()
    (path / "vec" / "c" / "0" / "0").write_bytes(frame + checksum)
    done = bounded(f"""
        import resource
        from stores import FeatureStore, StoreError
        resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))  # well under the bomb's 1 GiB
        with FeatureStore({str(path)!r}) as store:
            try:
                store.read("vec", [3])
            except StoreError as err:
                print("refused:", err)
            print(store.read("vec", [20]).tolist())  # the other chunks read as before
    """, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "array 'vec' is damaged: chunk(s) 0 cannot be read (ValueError); 16 item(s)" in done.stdout, done.stdout
    assert "[[1.0, 1.0, 1.0, 1.0]]" in done.stdout


@pytest.mark.parametrize("what, change", [
    ("a huge row", lambda d: d["attributes"]["provenance"]["layout"]["arrays"]["vec"].update(shape=[1 << 30])),
    ("a block of a billion rows", lambda d: d["attributes"]["provenance"]["layout"].update(block_rows=1 << 30)),
    ("a chunk of a billion rows", lambda d: d["attributes"]["provenance"]["layout"]["arrays"]["vec"].update(
        chunk=1 << 30)),
    ("an object dtype", lambda d: d["attributes"]["provenance"]["layout"]["arrays"]["vec"].update(dtype="O")),
])
def test_a_provenance_declaring_unbounded_sizes_is_refused(tmp_path, what, change):
    path = tmp_path / "s.zarr"
    small_store(path)
    edit_json(path / "zarr.json", change)
    with pytest.raises(UnreadableStoreError, match=r"s.zarr: damaged: its provenance is damaged"):
        FeatureStore(path)


def test_an_hdf5_dataset_with_other_chunks_than_its_layout_is_refused(tmp_path):
    import h5py

    path = tmp_path / "s.h5"
    small_store(path)
    with h5py.File(path, "a") as f:
        values = f["vec"][:]
        del f["vec"]
        f.create_dataset("vec", data=values, chunks=(len(values), 4), maxshape=(None, 4))
    with pytest.raises(StoreError, match=r"array 'vec' is float32 \(4,\) in chunks of \(48, 4\), not what its "
                                         r"layout says"):
        FeatureStore(path)
