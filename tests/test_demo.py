"""The README's main job, `pipeline demo` (the session's trained work directory is one), end to end; then sketches,
predict and stale sketches against it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from pipeline import registry
from pipeline.checkpoint import load_model
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.fuse import fuse
from pipeline.batches import inference_batches
from stores import FeatureStore
from tests.conftest import cli, snapshot

MODALITIES = ("title_cam", "desc_cam", "title_bpe", "image")  # the paper's four, all in the demo
pytestmark = pytest.mark.slow  # the session's trained work directory


@pytest.fixture(scope="module")
def demo_dir(trained_workdir) -> Path:
    """The session's work directory, trained by `demo`: read it, never change it (copy it first)."""
    return trained_workdir


@pytest.fixture(scope="module")
def demo_config(trained_workdir) -> str:
    return str(trained_workdir.parent / "trained.toml")


def test_fused_beats_every_single_modality(demo_dir):
    fused = json.loads((demo_dir / "fusion" / "metrics.json").read_text())
    singles = {m: json.loads((demo_dir / "models" / m / "metrics.json").read_text())["macro_f1"] for m in MODALITIES}
    assert all(fused["macro_f1"] > f for f in singles.values()), (fused["macro_f1"], singles)
    assert all(f > 2 / 27 for f in singles.values()), singles  # every modality well above chance
    assert set(fused["per_class_f1"]) <= {str(c) for c in pl.read_parquet(demo_dir / "split.parquet")["label"].drop_nulls()}
    for picture in ("confusion_worst.png", "per_class_f1.png"):
        assert (demo_dir / "fusion" / picture).read_bytes()[:4] == b"\x89PNG"


def test_predictions_hold_one_row_per_test_item(demo_dir):
    lines = (demo_dir / "fusion" / "predictions.csv").read_text().splitlines()
    assert lines[0] == ",prdtypecode"
    split = pl.read_parquet(demo_dir / "split.parquet")
    test_ids = set(split.filter(pl.col("split") == "test")["item_id"].to_list())
    rows = [tuple(map(int, line.split(","))) for line in lines[1:]]
    assert {i for i, _ in rows} == test_ids and len(rows) == len(test_ids)
    assert {c for _, c in rows} <= set(split["label"].drop_nulls().to_list())


def test_sketch_store_equals_the_encoder_output(demo_dir):
    for modality in ("title_bpe", "image"):
        model = load_model(demo_dir / "models" / modality).network()
        with FeatureStore(demo_dir / "features" / f"{modality}.zarr") as features, \
                FeatureStore(demo_dir / "sketches" / f"{modality}.zarr") as sketches:
            ids = features.ids[::37]
            m = registry.get(modality)
            with torch.inference_mode():
                for batch in inference_batches(features, m.array, m.batch, ids, batch_size=64):
                    stored = sketches.read("sketch", batch.ids.numpy())
                    np.testing.assert_allclose(stored, model.sketch(*batch.inputs).numpy(), rtol=1e-5, atol=1e-6)


def test_a_second_demo_recomputes_nothing(demo_dir, demo_config, tmp_path):
    shutil.copytree(demo_dir, tmp_path / "w", symlinks=True)
    run = cli("demo", "--workdir", tmp_path / "w", "--config", demo_config)
    assert run.returncode == 0 and "validation macro-F1" in run.stderr and "demo finished" in run.stderr, \
        run.stderr[-2000:]
    assert run.stderr.count("nothing to do") >= 4 + 4 + 4 + 1  # extract, pretrain, sketch (per modality), fuse


def test_predictor_agrees_with_fuse_and_explains_its_decisions(demo_dir, demo_config):
    from pipeline import Predictor
    from pipeline.catalog import load_catalog

    valid = pl.read_csv(demo_dir / "fusion" / "valid_predictions.csv")
    items = load_catalog(demo_dir / "catalog", load_config(demo_config)).items
    photo = pl.when(pl.col("has_image")).then(pl.col("image_path"))  # a photo the catalogue lacks is no photo
    rows = valid.join(items, on="item_id", how="left").select("item_id", "title", "description", image=photo)
    predictor = Predictor.load(demo_dir)  # the work directory's own configuration
    assert predictor.predict(rows).to_list() == valid["predicted"].to_list()  # stored sketches, found by input
    fresh = Predictor.load(demo_dir, reuse=False)  # every feature and sketch computed anew, in memory
    some = rows[::12]
    pandas = pytest.importorskip("pandas")
    assert fresh.predict(pandas.DataFrame(some.to_dict(as_series=False))).tolist() == valid["predicted"].to_list()[::12]
    proba = fresh.predict_proba(some).to_numpy()
    assert proba.shape == (len(some), len(fresh.classes)) and np.allclose(proba.sum(1), 1, atol=1e-5)
    why = fresh.explain(some)
    shares = list(MODALITIES) + ["bias"]
    assert sorted(c for c in why.columns if c in shares) == sorted(shares)  # the shared head split by modality
    np.testing.assert_allclose(why.select(shares).sum_horizontal().to_numpy(), why["logit"].to_numpy(), rtol=1e-5,
                               atol=1e-5)
    assert why["prdtypecode"].to_list() == fresh.predict(some).to_list()
    photo = Path(some["image"][0]).read_bytes()  # a photo as bytes, no title: still a prediction
    one = fresh.predict_proba(pl.DataFrame({"title": [some["title"][0]], "image": [photo]}))
    by_path = fresh.predict_proba(some[:1].select("title", "image"))
    np.testing.assert_allclose(one.to_numpy(), by_path.to_numpy(), rtol=1e-5, atol=1e-6)


def test_predict_on_an_overlapping_catalogue_leaves_every_training_store_unchanged(demo_dir, demo_config, tmp_path):
    # A new catalogue numbered from 0, as any new Rakuten-layout file is: its ids are the training items'.
    new = tmp_path / "new"
    (new / "image_test").mkdir(parents=True)
    x_test = pl.read_csv(demo_dir / "catalog" / "X_test.csv")
    renumbered = x_test.head(8).with_columns(pl.Series("", range(8)), pl.col("designation") + " neuf")
    for row in renumbered.iter_rows(named=True):
        old = demo_dir / "catalog" / "image_test" / f"image_{row['imageid']}_product_{row['productid']}.jpg"
        if old.exists():
            shutil.copy(old, new / "image_test" / old.name)
    renumbered.write_csv(new / "X_test.csv")
    before = {d: snapshot(demo_dir / d) for d in ("features", "sketches")}
    split = (demo_dir / "split.parquet").read_bytes()
    out = tmp_path / "pred.csv"
    run = cli("predict", "--catalog", str(new), "--workdir", str(demo_dir), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert {d: snapshot(demo_dir / d) for d in ("features", "sketches")} == before
    assert (demo_dir / "split.parquet").read_bytes() == split
    lines = out.read_text().splitlines()
    assert lines[0] == ",prdtypecode" and [int(x.split(",")[0]) for x in lines[1:]] == list(range(8))
    table = pl.read_parquet(out.with_suffix(".parquet"))
    probs = table.select([c for c in table.columns if c.startswith("p_")]).to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and table["prdtypecode"].to_list() == \
        [int(x.split(",")[1]) for x in lines[1:]]


def test_exported_networks_give_the_same_outputs(demo_dir, demo_config, tmp_path):
    from pipeline.export import export, load_program

    files = export(demo_dir, load_config(demo_config), tmp_path, log=lambda *_: None)
    sketches = {}
    with FeatureStore(demo_dir / "features" / "image.zarr") as images:  # items with a photo and without
        ids = np.concatenate([images.ids[:5], images.ids[np.flatnonzero(images.read_missing(images.ids))[:3]]])
    for modality in MODALITIES:
        program = load_program(files[modality]).module()  # the safe loader takes every genuine program
        model = load_model(demo_dir / "models" / modality).network()
        m = registry.get(modality)
        with FeatureStore(demo_dir / "features" / f"{modality}.zarr") as features:
            batch = next(inference_batches(features, m.array, m.batch, ids, batch_size=len(ids)))  # another batch size
        with torch.inference_mode():
            sketches[modality] = model.sketch(*batch.inputs)
            np.testing.assert_allclose(program(*batch.inputs).numpy(), sketches[modality].numpy(), rtol=1e-5, atol=1e-6)
    heads = load_program(files["fusion"]).module()
    fusion = torch.load(demo_dir / "fusion" / "model.pt", weights_only=True)
    from pipeline.heads import FusionHeads

    reference = FusionHeads(fusion["heads"], fusion["dims"], len(fusion["codes"]))
    reference.load_state_dict(fusion["state_dict"])
    with torch.inference_mode():
        np.testing.assert_allclose(heads(sketches).numpy(), reference.eval()(sketches).numpy(), rtol=1e-5, atol=1e-5)


def test_fuse_refuses_sketches_of_an_older_checkpoint(demo_dir, demo_config, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(demo_dir, w, ignore=shutil.ignore_patterns("catalog", "upstream"))
    ckpt = torch.load(w / "models" / "title_cam" / "model.pt", weights_only=True)
    ckpt["retrained"] = True
    torch.save(ckpt, w / "models" / "title_cam" / "model.pt")
    with pytest.raises(PipelineError, match=r"sketched by another checkpoint.*pipeline sketch title_cam"):
        fuse(w, load_config(demo_config), log=lambda *_: None)


def test_probability_averaging_is_the_mean_of_the_modality_networks(demo_dir, demo_config, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(demo_dir, w, ignore=shutil.ignore_patterns("catalog", "upstream"))
    fuse(w, load_config([demo_config, "configs/fusion-ensemble.toml"]), log=lambda *_: None)
    out = w / "fusion-ensemble"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "average" and metrics["epochs"] == 0 and 2 / 27 < metrics["macro_f1"] <= 1
    assert (out / "predictions.csv").read_text().startswith(",prdtypecode\n") and (out / "per_class_f1.png").exists()
    table = pl.read_parquet(out / "predictions.parquet").head(100)
    ids = table["item_id"].to_numpy()
    probabilities = []  # each pretrained network's own class probabilities, straight from its feature store
    for modality in MODALITIES:
        model = load_model(demo_dir / "models" / modality).network()
        m = registry.get(modality)
        with FeatureStore(demo_dir / "features" / f"{modality}.zarr") as features, torch.inference_mode():
            batch = next(inference_batches(features, m.array, m.batch, ids, batch_size=len(ids)))
            probabilities.append(torch.softmax(model(*batch.inputs), -1).numpy())
    columns = [c for c in table.columns if c.startswith("p_")]
    np.testing.assert_allclose(table.select(columns).to_numpy(), np.mean(probabilities, axis=0), atol=1e-5)


def test_the_static_emde_system_runs_every_stage(demo_dir, demo_config, tmp_path):
    from pipeline.pretrain import pretrain
    from pipeline.sketch import sketch

    w = tmp_path / "static"
    w.mkdir()
    for shared in ("split.parquet", "features"):  # the same features: only the coders differ
        (w / shared).symlink_to(demo_dir / shared)
    cfg = load_config([demo_config, "configs/static-emde.toml"]).merged(
        {"pretrain": {m: {"epochs": 2} for m in MODALITIES}, "fusion": {"epochs": 3}})  # it runs: scores are not the point
    for modality in MODALITIES:
        pretrain(modality, w, cfg, progress=False, log=lambda *_: None)
        assert load_model(w / "models" / modality).coder == "static"
    sketch("all", w, cfg, progress=False, log=lambda *_: None)
    with FeatureStore(w / "sketches" / "title_cam.zarr") as store:
        depth = cfg.train_options("title_cam").depth
        sums = store.read("sketch", store.ids[:50]).reshape(50, depth, -1).sum(-1)
        np.testing.assert_allclose(sums, 1, atol=1e-5)  # every token sketched, the counts normalised per depth
    fused = fuse(w, cfg, log=lambda *_: None)
    assert fused["macro_f1"] > 2 / 27 and (w / "fusion" / "predictions.csv").exists()
