"""torchrun: 2 and 3 extraction processes (RANK/WORLD_SIZE, no --shard) fill one Zarr store identical to a
single-process run, training the BPE tokenizer once between them; `fuse` ranks other than 0 step aside."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.config import DEMO_CONFIG, load_config
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.synth import synthesize
from stores import FeatureStore

ROOT = Path(__file__).resolve().parent.parent


def test_torchrun_extraction_fills_one_store_like_one_process(tmp_path):
    catalog = tmp_path / "cat"
    synthesize(catalog, items=600, seed=5)
    config = tmp_path / "small_blocks.toml"
    config.write_text(f'base = "{DEMO_CONFIG}"\n[title_bpe]\nblock_items = 64\n')  # 10 blocks to share
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
        assert len(lines) == n  # every rank took a share: RANK/WORLD_SIZE became --shard K/N
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


def test_fuse_ranks_above_zero_step_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    said = []
    result = fuse(tmp_path / "w", load_config(DEMO_CONFIG), progress=False, log=said.append)
    assert result["skipped"] and "rank 0 trains the fusion heads alone" in said[0]
    assert not (tmp_path / "w").exists()  # nothing read, nothing written
