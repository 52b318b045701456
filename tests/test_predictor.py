"""The Python API over one small trained work directory: tables in the caller's kind, each modality's share,
photos that cannot be read, identity (the fusion's checksums, a work directory retrained in place), threads
and the cache."""
from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import Predictor, checkpoint
from pipeline.catalog import load_catalog
from pipeline.errors import PipelineError
from pipeline.predictor import MissingInputWarning
from pipeline.sketch import sketch
from tests.conftest import cli, quiet

pd = pytest.importorskip("pandas")
pytestmark = pytest.mark.slow  # the session's trained work directory takes ~40 s to build
MODALITIES = ["title_cam", "desc_cam", "title_bpe", "image"]


@pytest.fixture(scope="module")
def predictor(trained_workdir) -> Predictor:
    return Predictor.load(trained_workdir)


@pytest.fixture(scope="module")
def items(trained_workdir, predictor) -> pl.DataFrame:
    """Test items of the catalogue (not in the training stores' sketches by id: found by input), photos by path."""
    cat = load_catalog(trained_workdir / "catalog", predictor.cfg).items
    photo = pl.when(pl.col("has_image")).then(pl.col("image_path"))
    return cat.filter(pl.col("has_image")).head(12).select("item_id", "title", "description", image=photo)


def copy_of(workdir: Path, tmp_path: Path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(workdir, w, ignore=shutil.ignore_patterns("catalog"))
    return w


def test_pandas_in_pandas_out_indexed_like_the_input(predictor, items):
    df = items.to_pandas()
    df.index = pd.Index([f"sku-{i}" for i in range(len(df))], name="sku")
    codes = predictor.predict(df)
    proba = predictor.predict_proba(df)
    assert isinstance(codes, pd.Series) and codes.name == "prdtypecode" and codes.index.equals(df.index)
    assert isinstance(proba, pd.DataFrame) and proba.index.equals(df.index)
    assert list(proba.columns) == predictor.classes.tolist()
    np.testing.assert_allclose(proba.sum(axis=1).to_numpy(), 1, atol=1e-5)
    assert (proba.idxmax(axis=1) == codes).all()
    assert pd.read_parquet(_parquet(proba)).equals(proba)  # pyarrow is there: pandas' own I/O works


def _parquet(frame):
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf)
    buf.seek(0)
    return buf


def test_polars_in_polars_out_and_records_give_arrays(predictor, items):
    codes = predictor.predict(items)
    proba = predictor.predict_proba(items)
    assert isinstance(codes, pl.Series) and isinstance(proba, pl.DataFrame)
    assert proba.columns == [str(c) for c in predictor.classes.tolist()] and len(proba) == len(items)
    records = items.to_dicts()
    assert predictor.predict(records).tolist() == codes.to_list()  # a list of dicts: numpy out
    np.testing.assert_allclose(predictor.predict_proba(items.to_dict(as_series=False)), proba.to_numpy(), rtol=1e-5,
                               atol=1e-6)
    explained = predictor.explain(items.to_pandas())
    assert isinstance(explained, pd.DataFrame) and explained["item_id"].tolist() == items["item_id"].to_list()


def test_each_modality_share_of_a_shared_head_sums_to_the_logit(predictor, items):
    heads = [h["inputs"] for h in predictor.cfg.fusion.model_dump()["heads"]]
    assert any(len(inputs) > 1 for inputs in heads)  # desc_cam, image and title_bpe share one head
    why = predictor.explain(items)
    shares = why.select([*MODALITIES, "bias"]).to_numpy()
    np.testing.assert_allclose(shares.sum(1), why["logit"].to_numpy(), rtol=1e-5, atol=1e-5)
    logits = predictor.logits(items)
    np.testing.assert_allclose(why["logit"].to_numpy(), logits.max(1), rtol=1e-5, atol=1e-5)
    assert why["prdtypecode"].to_list() == predictor.classes[logits.argmax(1)].tolist()
    assert np.abs(shares[:, :4]).min(axis=0).max() > 0  # every modality has a say somewhere
    top = predictor.top(items[:2], k=3)
    assert [len(t["top"]) for t in top] == [3, 3] and top[0]["code"] == why["prdtypecode"][0]
    first = top[0]["top"][0]
    assert sum(first["shares"].values()) == pytest.approx(float(why["logit"][0]), rel=1e-4, abs=1e-4)


def test_unreadable_photos_are_named_per_item_and_paths_mix_with_bytes(predictor, items, tmp_path):
    photo_path = items["image"][0]
    photo = Path(photo_path).read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo[: len(photo) // 3])  # a JPEG header, then nothing: does not decode
    fifo = tmp_path / "fifo.jpg"
    import os

    os.mkfifo(fifo)  # would block forever if it were read
    rows = [{"item_id": 10, "title": "t", "image": photo}, {"item_id": 11, "title": "t", "image": photo_path},
            {"item_id": 12, "title": "t", "image": str(tmp_path / "gone.jpg")}, {"item_id": 13, "title": "t",
            "image": b"not an image"}, {"item_id": 14, "title": "t", "image": str(broken)},
            {"item_id": 15, "title": "t", "image": str(fifo)}, {"item_id": 16, "title": "t"}]
    with pytest.warns(MissingInputWarning, match=r"4 item\(s\).*item_id 12 \(image: no such file\), item_id 13 "
                                                 r"\(image: not an image\), item_id 14 \(image: unreadable"):
        why = predictor.explain(pd.DataFrame(rows))
    assert why["missing_inputs"].tolist() == ["", "", "image: no such file", "image: not an image",
                                              "image: unreadable (the file does not decode)",
                                              "image: not a regular file", ""]
    proba = predictor.predict_proba(rows[:2])  # the same photo as bytes and by path: the same answer
    np.testing.assert_allclose(proba[0], proba[1], rtol=1e-5, atol=1e-6)


def test_a_modality_retrained_after_fuse_is_refused_in_one_line(trained_workdir, tmp_path):
    w = copy_of(trained_workdir, tmp_path)
    path = w / "models" / "title_bpe" / "model.pt"
    ckpt = checkpoint.load_model(path)
    ckpt.state_dict["head.bias"] += 1.0  # retrained: another checkpoint than the fusion recorded
    checkpoint.save(ckpt, path)
    with pytest.raises(PipelineError, match=r"title_bpe/model.pt is not the title_bpe model the fusion was trained "
                                            r"over .*pipeline sketch title_bpe .*pipeline fuse"):
        Predictor.load(w)


def test_a_predictor_keeps_its_own_models_when_the_workdir_is_retrained_in_place(trained_workdir, items, tmp_path):
    w = copy_of(trained_workdir, tmp_path)
    stored = load_catalog(trained_workdir / "catalog", Predictor.load(w).cfg).items.head(16)
    stored = stored.select("title", "description", image=pl.when(pl.col("has_image")).then(pl.col("image_path")))
    old = Predictor.load(w)
    before = old.predict_proba(stored).to_numpy()  # stored sketches, found by input
    path = w / "models" / "title_bpe" / "model.pt"
    ckpt = checkpoint.load_model(path)
    ckpt.state_dict = {k: v * 1.5 if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    checkpoint.save(ckpt, path)
    sketch("title_bpe", w, old.cfg, progress=False, log=quiet)  # the store now holds the new network's sketches
    assert old.changed()
    with pytest.warns(UserWarning, match="its models changed since this Predictor was loaded"):
        after = old.predict_proba(stored).to_numpy()
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)  # its own title_bpe, not the new sketches
    with pytest.raises(PipelineError, match="is not the title_bpe model the fusion was trained over"):
        Predictor.load(w)  # a new Predictor: the new checkpoint, which the fusion never saw


def test_one_predictor_from_several_threads_at_once_with_and_without_a_cache(trained_workdir, items, tmp_path):
    new = items.with_columns(pl.col("title") + " (nouveau)")  # inputs W does not hold: computed, then cached
    parts = [new[k::3] for k in range(3)]  # each thread its own items: answers must not cross
    want = [Predictor.load(trained_workdir).predict_proba(part).to_numpy() for part in parts]  # one call at a time
    for cache in (None, tmp_path / "cache"):
        p = Predictor.load(trained_workdir, cache=cache)
        results, errors, start = {}, [], threading.Barrier(3)

        def call(k: int) -> None:
            try:
                start.wait()
                results[k] = p.predict_proba(parts[k]).to_numpy()
            except Exception as err:  # noqa: BLE001 - the test reports it
                errors.append(err)
        threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for k in range(3):
            np.testing.assert_allclose(results[k], want[k], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "cache" / "features" / "title_bpe.zarr").is_dir()


def test_a_cache_in_the_workdir_is_refused_and_the_stores_stay_as_they_were(trained_workdir, tmp_path):
    for cache in (trained_workdir, trained_workdir / "features", trained_workdir.parent):
        with pytest.raises(PipelineError, match=r"cache folder .* training stores, which predicting never writes"):
            Predictor.load(trained_workdir, cache=cache)
    before = sorted(p.name for p in (trained_workdir / "features").iterdir())
    out = tmp_path / "pred.csv"
    run = cli("predict", "--catalog", trained_workdir / "catalog", "--workdir", trained_workdir, "--out", out,
              "--cache", trained_workdir)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("error: cache folder ")
    assert "Traceback" not in run.stderr and not out.exists()
    assert sorted(p.name for p in (trained_workdir / "features").iterdir()) == before


def test_records_that_are_not_tables_are_refused(predictor):
    with pytest.raises(PipelineError, match="pandas or polars DataFrame, a list of dicts or a dict of columns"):
        predictor.predict("title")
    with pytest.raises(PipelineError, match="no title column"):
        predictor.predict([{"name": "x"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingInputWarning)
        assert len(predictor.predict([{"title": "x", "description": None, "image": None}])) == 1


def test_class_names_from_serve_class_names_name_the_codes(trained_workdir, predictor, items, tmp_path):
    names = tmp_path / "names.csv"
    names.write_text("prdtypecode,name\n" + "".join(f"{c},classe {c}\n" for c in predictor.classes.tolist()))
    named = Predictor.load(trained_workdir, predictor.cfg.merged({"serve": {"class_names": str(names)}}))
    top = named.top(items[:1], k=2)[0]
    assert top["name"] == f"classe {top['code']}" and [c["name"] for c in top["top"]] == \
        [f"classe {c['code']}" for c in top["top"]]
    names.write_bytes(b"\xff\xfe not a csv")
    with pytest.raises(PipelineError, match=r"\[serve\] class_names = .*not a CSV of prdtypecode,name rows"):
        Predictor.load(trained_workdir, predictor.cfg.merged({"serve": {"class_names": str(names)}}))


def test_title_and_description_read_one_loaded_text_model(trained_workdir, predictor, items):
    """title_cam and desc_cam run the same text model: loaded once, held once, freed with the predictor."""
    predictor.predict(items.head(3).with_columns(pl.col("title") + " (new)"))  # new texts: the model runs
    title, desc = (predictor.branches[m].extractor for m in ("title_cam", "desc_cam"))
    assert title.model is desc.model and title.tokenizer is desc.tokenizer
    other = Predictor.load(trained_workdir)
    other.branches["title_cam"].extractor.model  # loaded while the first predictor holds it: the same one
    assert other.branches["title_cam"].extractor.model is title.model


def test_a_loaded_predictor_holds_its_upstream_models_before_the_first_call(trained_workdir):
    """The extract stage loads models on first use; a predictor (a server's) is ready when `load` returns."""
    fresh = Predictor.load(trained_workdir)
    for m in ("title_cam", "desc_cam", "image"):
        assert fresh.branches[m].extractor._loaded._value is not None, m
