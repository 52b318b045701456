"""The modality registry: a fifth modality, defined here and nowhere else, through every stage."""
from __future__ import annotations

import zlib

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from pipeline import registry
from pipeline.config import ConfigError, load_config
from pipeline.extract import extract
from pipeline.fuse import fuse
from pipeline.pretrain import pretrain
from pipeline.schema import Positive, Section, TrainOptions
from pipeline.sketch import sketch
from pipeline.synth import synthesize
from stores import ArraySpec, FeatureStore, fingerprint
from tests.conftest import quiet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WordHashOptions(Section):  # the [toy] table
    buckets: Positive


class WordHashTrainOptions(TrainOptions):  # the [pretrain.toy] table: the common keys and its own
    hidden: Positive


class WordHashes:
    """Extractor: a title's words hashed into `buckets` counts (a numeric feature, one vector per item)."""

    name = "toy"

    def __init__(self, buckets: int):
        self.buckets = buckets
        self.arrays = {"hashes": ArraySpec("float32", (buckets,))}
        self.producer = {"model": "crc32 word hashes", "buckets": buckets}

    def fingerprints(self, items: pl.DataFrame) -> np.ndarray:
        return fingerprint(items["title"].to_list())

    def lengths(self, items: pl.DataFrame) -> dict:
        return {}

    def prepare(self, items: pl.DataFrame) -> list[str]:
        return items["title"].to_list()

    def compute(self, titles: list[str]) -> tuple[dict, None]:
        counts = np.zeros((len(titles), self.buckets), np.float32)  # (n, buckets)
        for row, title in enumerate(titles):
            for word in title.lower().split():
                counts[row, zlib.crc32(word.encode()) % self.buckets] += 1
        return {"hashes": counts}, None


class HashEncoder(nn.Module):
    """counts (B, buckets), present (B,) -> (B, hidden)."""

    def __init__(self, buckets: int, hidden: int):
        super().__init__()
        self.lin = nn.Linear(buckets, hidden)
        self.output_dim = hidden

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


TOY = registry.Modality(
    name="toy", array="hashes", batch="fixed", options=WordHashOptions, train_options=WordHashTrainOptions,
    extractor=lambda ctx: WordHashes(ctx.options.buckets),
    encoder=lambda opts, spec, producer: {"buckets": int(spec.shape[0]), "hidden": opts.hidden},
    build_encoder=lambda config: HashEncoder(**config),
)

CONFIG = """
[stores]
block_items = 64

[toy]
buckets = 512

[pretrain.toy]
lr = 1e-2
decay = 0.9
epochs = 15
batch_size = 32
hidden = 64
depth = 16
width = 8

[fusion]
heads = [{ name = "toy", inputs = ["toy"] }]
lr = 1e-2
epochs = 15
"""


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.REGISTRY.pop("toy")


@pytest.mark.slow
def test_a_fifth_modality_runs_every_stage_without_editing_the_project(tmp_path, toy):
    synthesize(tmp_path / "catalog", items=1000, seed=4)
    (tmp_path / "toy.toml").write_text('base = "tiny.toml"\n' + CONFIG)
    cfg = load_config(tmp_path / "toy.toml")
    w = tmp_path / "w"
    [features] = extract("toy", tmp_path / "catalog", w, cfg, progress=False, log=quiet)
    assert features.computed == 1000 and str(features.store).endswith("features/toy.zarr")
    metrics = pretrain("toy", w, cfg, progress=False, log=quiet)
    assert metrics["macro_f1"] > 5 / 27  # word hashes carry the class: measured 0.28 (chance: 1/27)
    [sketches] = sketch("toy", w, cfg, progress=False, log=quiet)
    with FeatureStore(sketches.store) as store:
        s = store.read("sketch", store.ids)  # (items, depth * width)
        assert s.shape == (1000, 16 * 8)
        np.testing.assert_allclose(s.reshape(1000, 16, 8).sum(-1), 1.0, rtol=1e-5)  # a distribution per depth
    fused = fuse(w, cfg, progress=False, log=quiet)
    assert fused["macro_f1"] > 5 / 27 and (w / "fusion" / "predictions.csv").is_file()
    assert "toy" in fused["heads"][0]["inputs"]


def test_a_modality_the_registry_does_not_know_is_refused_with_the_near_miss(tmp_path, toy):
    (tmp_path / "typo.toml").write_text('base = "tiny.toml"\n' + CONFIG.replace("[pretrain.toy]", "[pretrain.tyo]"))
    with pytest.raises(ConfigError, match=r"typo.toml: \[pretrain.tyo\]: unknown modality \(did you mean 'toy'\?\)"):
        load_config(tmp_path / "typo.toml")
