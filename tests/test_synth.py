"""The synthetic catalogue: real challenge layout, real imbalance, noisy multilingual text, determinism,
and a structure where titles alone are informative but not enough."""
import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.synth import CLASS_COUNTS, IMAGE_GROUPS, synthesize

X_HEADER = ",designation,description,productid,imageid"


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synthesize(out, items=2000, seed=0)
    x_train = pl.read_csv(out / "X_train.csv")
    x_test = pl.read_csv(out / "X_test.csv")
    y_train = pl.read_csv(out / "Y_train.csv")
    return out, summary, x_train, x_test, y_train


def _image_path(root: Path, split: str, imageid: int, productid: int) -> Path:
    return root / f"image_{split}" / f"image_{imageid}_product_{productid}.jpg"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_headers_and_ids(catalogue):
    out, summary, x_train, x_test, y_train = catalogue
    assert (out / "X_train.csv").read_text(encoding="utf-8").split("\n", 1)[0] == X_HEADER
    assert (out / "X_test.csv").read_text(encoding="utf-8").split("\n", 1)[0] == X_HEADER
    assert (out / "Y_train.csv").read_text(encoding="utf-8").split("\n", 1)[0] == ",prdtypecode"
    assert summary["train_items"] == x_train.height == 1800
    assert summary["test_items"] == x_test.height == 200
    assert x_train[""].to_list() == list(range(1800))
    assert x_test[""].to_list() == list(range(1800, 2000))
    assert y_train[""].to_list() == x_train[""].to_list()
    ids = pl.concat([x_train, x_test])
    for col in ("productid", "imageid"):
        values = ids[col].to_numpy()
        assert len(np.unique(values)) == len(values)
        assert values.min() >= 100_000_000 and values.max() < 10_000_000_000  # 9-10 digits
    assert ids["designation"].null_count() == 0


def test_images_exist_except_missing_fraction(catalogue):
    out, summary, x_train, x_test, _ = catalogue
    present = missing = 0
    for split, frame in (("train", x_train), ("test", x_test)):
        for imageid, productid in zip(frame["imageid"], frame["productid"]):
            if _image_path(out, split, imageid, productid).exists():
                present += 1
            else:
                missing += 1
    assert missing == summary["missing_images"] == 20  # 1% of 2000
    n_files = len(list((out / "image_train").glob("*.jpg"))) + len(list((out / "image_test").glob("*.jpg")))
    assert n_files == present == 2000 - missing
    first = next(iter(sorted((out / "image_train").glob("*.jpg"))))
    with Image.open(first) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (96, 96))


def test_classes_and_imbalance(catalogue):
    _, summary, _, _, y_train = catalogue
    counts = y_train["prdtypecode"].value_counts()
    assert set(counts["prdtypecode"].to_list()) == set(CLASS_COUNTS) and summary["classes"] == 27
    assert 8 <= counts["count"].max() / counts["count"].min() <= 20
    assert counts.sort("count")["prdtypecode"][-1] == 2583  # the real largest class


def test_every_class_present_in_small_catalogue(tmp_path):
    synthesize(tmp_path, items=600, seed=5, image_size=16)
    counts = pl.read_csv(tmp_path / "Y_train.csv")["prdtypecode"].value_counts()
    assert counts.height == 27 and counts["count"].min() >= 3


def test_text_is_noisy_multilingual_html(catalogue):
    _, _, x_train, _, _ = catalogue
    descriptions = x_train["description"].fill_null("").to_list()
    empty = np.mean([d == "" for d in descriptions])
    assert 0.25 <= empty <= 0.42
    text = " ".join(descriptions)
    for marker in ("<br", "<b>", "<p>", "&eacute;", "&amp;amp;"):
        assert marker in text
    assert sum(len(d) > 200 for d in descriptions) > 50
    titles = x_train["designation"].to_list()
    lengths = [len(t.split()) for t in titles]
    assert min(lengths) >= 3 and 20 <= max(lengths) <= 35
    joined = " ".join(titles)
    assert "&amp;" in joined.lower() and any(t.isupper() for t in titles)
    for word in ("für", "with", "pour"):  # German, English, French
        assert word in joined.lower()


def test_deterministic_per_seed(tmp_path):
    kwargs = dict(items=300, image_size=32)
    synthesize(tmp_path / "a", seed=7, **kwargs)
    synthesize(tmp_path / "b", seed=7, **kwargs)
    synthesize(tmp_path / "c", seed=8, **kwargs)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len(a) > 250
    for name in ("X_train.csv", "Y_train.csv", "X_test.csv"):
        assert a[name] != c[name]


def test_titles_informative_but_not_enough(catalogue):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.svm import LinearSVC

    _, _, x_train, _, y_train = catalogue
    y = y_train["prdtypecode"].to_numpy()
    titles = x_train["designation"].to_list()
    both = [t + " " + d for t, d in zip(titles, x_train["description"].fill_null("").to_list())]
    fit, val = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)

    def macro_f1(texts):
        vec = TfidfVectorizer(sublinear_tf=True)
        model = LinearSVC().fit(vec.fit_transform([texts[i] for i in fit]), y[fit])
        return f1_score(y[val], model.predict(vec.transform([texts[i] for i in val])), average="macro")

    title_f1, both_f1 = macro_f1(titles), macro_f1(both)
    assert 0.3 < title_f1 < 0.95  # chance is ~1/27
    assert both_f1 > title_f1 + 0.05


def test_image_groups_separable_by_image(catalogue):
    """Classes sharing a title vocabulary in IMAGE_GROUPS differ by their pictures (nearest centroid)."""
    out, _, x_train, _, y_train = catalogue
    for _, specs in IMAGE_GROUPS:
        feats, labels = [], []
        for imageid, productid, code in zip(x_train["imageid"], x_train["productid"], y_train["prdtypecode"]):
            path = _image_path(out, "train", imageid, productid)
            if code in specs and path.exists():
                with Image.open(path) as img:
                    feats.append(np.asarray(img.resize((12, 12)), dtype=float).ravel())
                labels.append(code)
        feats, labels = np.array(feats), np.array(labels)
        half = len(labels) // 2
        codes = sorted(specs)
        centroids = np.stack([feats[:half][labels[:half] == c].mean(axis=0) for c in codes])
        dist = ((feats[half:, None, :] - centroids[None]) ** 2).sum(axis=2)
        accuracy = np.mean(np.array(codes)[dist.argmin(axis=1)] == labels[half:])
        assert accuracy > 0.7, (codes, accuracy)
