"""`pipeline bundle`: only what prediction needs, checked on load, classifying as W does with W gone."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import Predictor
from pipeline.bundle import write_bundle
from pipeline.catalog import load_catalog
from pipeline.errors import PipelineError
from tests.conftest import cli, quiet

pytestmark = pytest.mark.slow  # the session's trained work directory, and a bundle of it


@pytest.fixture(scope="module")
def bundled(trained_workdir, tmp_path_factory) -> tuple[Path, pl.DataFrame, np.ndarray]:
    """(a bundle of a copy of W, with that copy deleted; some catalogue items; W's probabilities for them)."""
    root = tmp_path_factory.mktemp("bundle")
    w = root / "w"
    shutil.copytree(trained_workdir, w, ignore=shutil.ignore_patterns("catalog"))
    predictor = Predictor.load(w, reuse=False)  # every item computed from its inputs, as a bundle does
    items = load_catalog(trained_workdir / "catalog", predictor.cfg).items.head(40)
    items = items.select("item_id", "title", "description", image=pl.when(pl.col("has_image")).then(pl.col("image_path")))
    expected = predictor.predict_proba(items).to_numpy()
    write_bundle(w, root / "b", predictor.cfg, log=quiet)
    shutil.rmtree(w)
    return root / "b", items, expected


def test_a_bundle_holds_only_what_prediction_needs_and_classifies_as_w_did(bundled, trained_workdir):
    b, items, expected = bundled
    names = {str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()}
    manifest = json.loads((b / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert not [n for n in names if n.startswith(("features/", "sketches/", "catalog/")) or n.endswith("last.pt")]
    assert {"fusion/model.pt", "upstream/image.safetensors", "upstream/text-model/model.safetensors",
            "tokenizers/title_bpe.model"} <= names
    size = sum(f["bytes"] for f in manifest["files"].values())
    w_size = sum(p.stat().st_size for p in trained_workdir.rglob("*") if p.is_file() and "catalog" not in p.parts)
    assert size < w_size / 2, (size, w_size)
    got = Predictor.load(b).predict_proba(items).to_numpy()  # the work directory is gone
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got, expected, atol=2e-3)  # the text model is float16 in the bundle


def test_a_bundle_loads_and_predicts_without_importing_transformers(bundled, tmp_path):
    """Its text model is built by pipeline.weights.bert and its tokenizer read by `tokenizers`: a fresh process
    with nothing remembered (a new machine) never imports transformers' 3 s of modules."""
    import subprocess
    import sys

    b, items, expected = bundled
    items.head(3).write_parquet(tmp_path / "items.parquet")
    code = ("import sys, polars as pl; from pipeline import Predictor; p = Predictor.load(sys.argv[1]); "
            "print(p.predict_proba(pl.read_parquet(sys.argv[2])).to_numpy().argmax(1).tolist(), "
            "'transformers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(b), str(tmp_path / "items.parquet")], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent,
                         env=os.environ | {"EMDE_CACHE_DIR": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("] ")[1].strip() == "False"
    assert run.stdout.split("] ")[0] + "]" == str(expected[:3].argmax(1).tolist())


def test_predict_with_a_bundle_on_the_command_line(bundled, trained_workdir, tmp_path):
    b, _, _ = bundled
    out = tmp_path / "pred.csv"
    run = cli("predict", "--catalog", trained_workdir / "catalog", "--model", b, "--out", out)
    assert run.returncode == 0, run.stderr[-2000:]
    table = pl.read_parquet(out.with_suffix(".parquet"))
    assert out.read_text().startswith(",prdtypecode\n") and len(table) == len(out.read_text().splitlines()) - 1


def test_a_damaged_bundle_file_is_refused_in_one_line(bundled, tmp_path):
    b, items, _ = bundled
    copy = tmp_path / "b"
    shutil.copytree(b, copy)
    path = copy / "models" / "title_bpe" / "model.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"title_bpe/model.pt: damaged \(sha256 differs from the manifest\); "
                                            r"build the bundle again"):
        Predictor.load(copy)


def test_bundle_outputs_that_are_not_bundles_are_refused(trained_workdir, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    for out, why in ((tmp_path / "notes", "exists and is not a bundle"),
                     (trained_workdir / "b", "it is, holds or lies inside the work directory")):
        run = cli("bundle", "--workdir", trained_workdir, "--out", out)
        assert run.returncode == 1 and why in run.stderr.strip().splitlines()[-1], run.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and not (trained_workdir / "b").exists()


def test_serve_a_bundle_with_the_work_directory_gone(bundled):
    httpx = pytest.importorskip("httpx")
    from tests.conftest import serving

    b, items, expected = bundled
    with serving(b) as (url, app):
        answer = httpx.post(f"{url}/v1/predict", json={"items": [{"title": items["title"][0],
                                                                  "description": items["description"][0]}]}, timeout=60)
    assert answer.status_code == 200 and answer.json()["model_version"] == Predictor.load(b).version
