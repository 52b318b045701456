"""The README's recipe for reading a store without this project, run as written against both backends.

The store has what a wrong recipe would get wrong: negative ids (-1 among them), a half-empty last block
and a block never written.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from stores import ArraySpec, FeatureStore, fingerprint
from tests.conftest import store_layout

README = Path(__file__).resolve().parent.parent / "README.md"
SPECS = {"tokens": ArraySpec("float16", (4,), ragged=True), "maps": ArraySpec("float32", (3, 2))}


def recipe() -> tuple[str, str, str]:
    """The section's three code blocks: open with zarr, open with h5py, read (the same for both)."""
    section = README.read_text().split("### Reading a store without this project", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3, "the recipe has changed shape: update this test with it"
    return blocks[0], blocks[1], blocks[2]


def build(path: Path, rng) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A store of 150 items in blocks of 64 with block 1 left unwritten; returns id -> (tokens, maps)
    of the items a reader must see."""
    ids = np.concatenate([[-1, 0, np.iinfo(np.int64).min], -rng.choice(10**9, 147, replace=False) - 2])
    lengths = rng.integers(0, 9, len(ids))
    truth = {int(i): (rng.standard_normal((k, 4)).astype(np.float16), rng.standard_normal((3, 2)).astype(np.float32))
             for i, k in zip(ids, lengths)}
    store = FeatureStore.create(path, "recipe", SPECS, {}, ids, fingerprint([str(i) for i in ids]),
                                {"tokens": lengths}, block_rows=64, **store_layout())
    for block in (0, 2):
        items = [truth[int(i)] for i in store.block_ids(block)]
        store.write_block(block, {"tokens": np.concatenate([t for t, _ in items]),
                                  "maps": np.stack([m for _, m in items])})
    visible = {int(i): truth[int(i)] for i in np.concatenate([store.block_ids(0), store.block_ids(2)])}
    store.close()
    return visible


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_the_readme_recipe_reads_a_store(tmp_path, monkeypatch, suffix):
    visible = build(tmp_path / f"store{suffix}", np.random.default_rng(5))
    open_zarr, open_h5, read = recipe()
    code = (open_zarr if suffix == ".zarr" else open_h5) + read
    assert "stores" not in code and "pipeline" not in code  # nothing of this project
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, f"README.md recipe ({suffix})", "exec"), ns)
    assert sorted(ns["ids"].tolist()) == sorted(visible) and len(ns["ids"]) == 64 + 22
    for k, item in enumerate(ns["ids"].tolist()):
        np.testing.assert_array_equal(ns["tokens"](k), visible[item][0])
        np.testing.assert_array_equal(ns["maps"](k), visible[item][1])
    if suffix == ".h5":
        ns["store"].close()
