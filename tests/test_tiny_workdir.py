"""Prediction, bundles and serving over the smallest trained work directory (`tiny`, built in seconds): the fast
tier's check of each. The four-modality work directory's tests (test_predictor, test_bundle, test_serve) go further."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from pipeline import Predictor
from pipeline.bundle import write_bundle
from pipeline.catalog import load_catalog
from tests.conftest import Tiny, cli, quiet, serving, snapshot


@pytest.fixture(scope="module")
def validation(tiny: Tiny) -> tuple[pl.DataFrame, list[int]]:
    """The validation items' inputs, and the class fuse predicted for each."""
    valid = pl.read_csv(tiny.workdir / "fusion" / "valid_predictions.csv")
    items = load_catalog(tiny.catalog, tiny.cfg).items
    rows = valid.join(items, on="item_id", how="left").select("item_id", "title", "description")
    return rows, valid["predicted"].to_list()


def test_the_predictor_agrees_with_fuse_from_stored_sketches_and_from_inputs_alone(tiny: Tiny, validation):
    rows, predicted = validation
    assert Predictor.load(tiny.workdir).predict(rows).to_list() == predicted  # the stored sketches, found by input
    fresh = Predictor.load(tiny.workdir, reuse=False)  # every feature and sketch computed anew, in memory
    assert fresh.predict(rows).to_list() == predicted
    proba = fresh.predict_proba(rows[:5]).to_numpy()
    assert proba.shape == (5, len(fresh.classes)) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert fresh.classes[proba.argmax(1)].tolist() == predicted[:5]


def test_a_bundle_holds_only_what_prediction_needs_and_classifies_as_w_does(tiny: Tiny, validation, tmp_path):
    rows, predicted = validation
    write_bundle(tiny.workdir, tmp_path / "b", tiny.cfg, log=quiet)
    names = {str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert {"manifest.json", "fusion/model.pt", "models/title_bpe/model.pt", "tokenizers/title_bpe.model"} <= names
    assert not [n for n in names if n.startswith(("features/", "sketches/", "upstream/"))], names  # title_bpe alone
    assert Predictor.load(tmp_path / "b").predict(rows).to_list() == predicted


def test_a_served_prediction_is_the_predictors(tiny: Tiny, validation):
    httpx = pytest.importorskip("httpx")
    rows, predicted = validation
    body = {"items": [{"item_id": i, "title": t, "description": d} for i, t, d in rows.head(16).iter_rows()]}
    with serving(tiny.workdir) as (url, _):
        answer = httpx.post(f"{url}/v1/predict", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert [a["item_id"] for a in answer.json()["items"]] == rows["item_id"].head(16).to_list()
        assert [a["code"] for a in answer.json()["items"]] == predicted[:16]
        assert httpx.get(f"{url}/readyz").json()["status"] == "ready"


def test_evaluate_scores_the_labelled_items_as_the_predictor_classifies_them_and_leaves_w_alone(tiny: Tiny,
                                                                                               validation, tmp_path):
    rows, predicted = validation
    before = snapshot(tiny.workdir)
    done = cli("evaluate", "--catalog", tiny.catalog, "--workdir", tiny.workdir, "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    assert snapshot(tiny.workdir) == before
    labelled = load_catalog(tiny.catalog, tiny.cfg).items.filter(pl.col("label").is_not_null())
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["items"] == len(labelled) and 0 < metrics["macro_f1"] <= 1
    table = pl.read_parquet(tmp_path / "report" / "predictions.parquet")
    assert set(table.columns) == {"item_id", "label", "predicted_fused", "predicted_title_bpe"}
    fused = dict(zip(table["item_id"].to_list(), table["predicted_fused"].to_list()))
    assert [fused[i] for i in rows["item_id"].to_list()] == predicted  # the validation items: as fuse predicted
