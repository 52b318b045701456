"""torchrun: 2 and 3 extraction processes (RANK/WORLD_SIZE, no --shard) fill one Zarr store identical to a
single-process run, training the BPE tokenizer once between them; `fuse` on 2 processes (DDP, gloo) scores
and writes the whole split once, as well as one process does."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.config import TINY_CONFIG, load_config
from pipeline.extract import extract
from pipeline.provenance import sha256_file
from pipeline.fuse import fuse
from pipeline.metrics import classification_metrics
from pipeline.synth import synthesize
from stores import ArraySpec, FeatureStore, fingerprint
from tests.conftest import store_layout

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # torchrun launches two processes, each importing torch


def test_torchfill_store_fills_one_store_like_one_process(tmp_path):
    catalog = tmp_path / "cat"
    synthesize(catalog, items=600, seed=5)
    config = tmp_path / "small_blocks.toml"
    config.write_text(f'base = "{TINY_CONFIG}"\n[title_bpe]\nblock_items = 64\n')  # 10 blocks to share
    [one] = extract("title_bpe", catalog, tmp_path / "one", load_config(config), progress=False, log=lambda *_: None)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    procs = {n: subprocess.Popen(  # both launches at once: the machine's time goes to imports, mostly
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
         "cli.py", "extract", "title_bpe", "--catalog", str(catalog), "--workdir", str(tmp_path / f"w{n}"),
         "--config", str(config)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in (2, 3)}
    reference = FeatureStore(one.store)
    for n, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        lines = [x for x in stderr.splitlines() if "items extracted" in x]
        assert len(lines) == n, stderr  # every rank took a share: RANK/WORLD_SIZE became --shard K/N
        assert sum(int(x.split("title_bpe: ")[1].split(" items")[0]) for x in lines) == 600
        store = FeatureStore(tmp_path / f"w{n}" / "features" / "title_bpe.zarr")
        assert store.verify()["ok"] and len(store) == 600
        for name in reference.array_names():
            np.testing.assert_array_equal(store.backend.array(name)[:], reference.backend.array(name)[:], name)
        # Same layout and producer; the tokenizer's sha256 differs only because SentencePiece records
        # its (work-directory) output path in the model file: its vocabulary is the same.
        ignore = {"created", "producer"}
        assert {k: v for k, v in store.provenance.items() if k not in ignore} == \
               {k: v for k, v in reference.provenance.items() if k not in ignore}
        tokenizer = tmp_path / f"w{n}" / "tokenizers"
        assert sorted(p.name for p in tokenizer.glob("title_bpe*")) == ["title_bpe.json", "title_bpe.model",
                                                                          "title_bpe.vocab"]  # no tmp left
        assert (tokenizer / "title_bpe.vocab").read_text() == \
               (tmp_path / "one" / "tokenizers" / "title_bpe.vocab").read_text()


CODES = [10, 40, 50, 60, 1140, 1160]  # a few real product type codes


def sketch_workdir(w: Path, n: int = 1199, seed: int = 0) -> pl.DataFrame:
    """What fuse reads, built directly: split.parquet, and for title_bpe and image a stand-in checkpoint
    and a sketch store whose noisy sketches carry the class (a prototype per class)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    labels = rng.choice(CODES, size=n)
    part = np.where(rng.random(n) < 0.25, "valid", "train")
    part[rng.random(n) < 0.1] = "test"
    split = pl.DataFrame({"item_id": ids, "split": part,
                          "label": [None if p == "test" else int(c) for p, c in zip(part, labels)]},
                         schema_overrides={"label": pl.Int64})
    w.mkdir(parents=True)
    split.write_parquet(w / "split.parquet")
    for modality, dim in (("title_bpe", 16), ("image", 8)):
        checkpoint = w / "models" / modality / "model.pt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(f"stand-in {modality} checkpoint".encode())
        protos = rng.standard_normal((len(CODES), dim))
        x = protos[[CODES.index(c) for c in labels]] + 1.2 * rng.standard_normal((n, dim))  # (n, dim)
        store = FeatureStore.create(w / "sketches" / f"{modality}.zarr", modality,
                                    {"sketch": ArraySpec("float32", (dim,))},
                                    {"checkpoint_sha256": sha256_file(checkpoint)}, ids,
                                    fingerprint([str(i) for i in ids]), None, block_rows=256, **store_layout())
        pos = {int(i): k for k, i in enumerate(ids)}
        for b in store.pending_blocks():
            rows = [pos[int(i)] for i in store.block_ids(b)]
            store.write_block(b, {"sketch": x[rows].astype(np.float32)})
        store.close()
    return split


@pytest.mark.usefixtures("one_torch_thread")
def test_fuse_on_two_processes_scores_and_writes_the_whole_split_once(tmp_path):
    split = sketch_workdir(tmp_path / "one")  # 801 train, 281 valid, 117 test items: odd halves
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    config = tmp_path / "fusion.toml"
    config.write_text(f'base = "{TINY_CONFIG}"\n[fusion]\nepochs = 6\nbatch_size = 80\nlr = 1e-2\n'
                      'heads = [{ name = "concat", inputs = ["title_bpe", "image"] }]\n')
    # 2 ranks: 401 + 400 train items, 6 and 5 batches of 80 unless the shares are padded alike (DDP would hang)
    one = fuse(tmp_path / "one", load_config(config), progress=False, log=lambda *_: None)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "cli.py", "fuse", "--workdir", str(tmp_path / "two"), "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "two" / "fusion"
    metrics = json.loads((out / "metrics.json").read_text())
    valid = split.filter(pl.col("split") == "valid")
    test_ids = split.filter(pl.col("split") == "test")["item_id"].to_list()
    # Both ranks trained (DDP) on their halves; the metrics cover every validation item, not rank 0's half.
    assert metrics["world_size"] == 2 and "2 processes (DistributedDataParallel" in proc.stderr
    assert metrics["valid_items"] == len(valid) == sum(metrics["valid_support"].values())
    assert metrics["valid_support"] == {str(c): n for c, n in valid["label"].value_counts().rows()}
    predicted = pl.read_csv(out / "valid_predictions.csv")
    assert predicted["item_id"].to_list() == valid["item_id"].to_list()  # every item, in split order
    codes = sorted(CODES)
    recomputed = classification_metrics(np.searchsorted(codes, predicted["label"].to_numpy()),
                                        np.searchsorted(codes, predicted["predicted"].to_numpy()), codes)
    assert recomputed["macro_f1"] == metrics["macro_f1"] and recomputed["per_class_f1"] == metrics["per_class_f1"]
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == ",prdtypecode" and [int(r.split(",")[0]) for r in rows[1:]] == test_ids
    # Written once: one rank speaks and writes.
    assert proc.stderr.count("fuse epoch 6/6:") == 1 and proc.stderr.count("validation macro-F1 (%)") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "one" / "fusion").iterdir())
    # As good as one process (6 classes: chance ~0.17).
    assert one["world_size"] == 1 and one["macro_f1"] > 0.6, one["macro_f1"]
    assert abs(metrics["macro_f1"] - one["macro_f1"]) < 0.05, (metrics["macro_f1"], one["macro_f1"])
