"""Scores and their files: a per-class report with support, the full confusion matrix as CSV and picture."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from pipeline.catalog import probabilities_table
from pipeline.metrics import class_report, save_pictures, save_report


def test_class_report_counts_every_class_of_truth_and_prediction():
    labels = np.array([10, 10, 10, 20, 20, 30])
    preds = np.array([10, 10, 20, 20, 40, 30])  # 40: predicted, never true
    report = class_report(labels, preds, {10: "livres", 20: "jeux"})
    assert list(report["per_class"]) == ["10", "20", "30", "40"]
    ten = report["per_class"]["10"]
    assert (ten["name"], ten["precision"], ten["recall"], ten["support"]) == ("livres", 1.0, pytest.approx(2 / 3), 3)
    assert report["per_class"]["40"] == {"name": "40", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["confusion"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert report["macro_f1"] == pytest.approx(np.mean([0.8, 0.5, 1.0, 0.0]))
    assert report["accuracy"] == pytest.approx(4 / 6)


def test_a_report_is_written_as_json_csv_and_pictures(tmp_path):
    report = class_report(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), {0: "a", 1: "b", 2: "a"})
    save_report(tmp_path / "r", report, "test")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "confusion" not in metrics and metrics["per_class"]["1"]["support"] == 2
    matrix = pl.read_csv(tmp_path / "r" / "confusion.csv")
    assert matrix.columns == ["target \\ predicted", "a #0", "b", "a #2"]  # one name for two codes: told apart
    assert matrix.row(1) == ("b", 0, 1, 1)
    assert (tmp_path / "r" / "confusion.png").stat().st_size > 0 and (tmp_path / "r" / "per_class_f1.png").is_file()


def test_fuse_pictures_include_the_full_matrix(tmp_path):
    labels, preds = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
    save_pictures(tmp_path, labels, preds, [1280, 1281, 2705], {"macro_f1": 0.7}, 2)
    matrix = pl.read_csv(tmp_path / "confusion.csv")
    assert matrix.columns == ["target \\ predicted", "1280", "1281", "2705"] and matrix.row(2) == (2705, 1, 0, 2)
    assert {p.name for p in tmp_path.iterdir()} == {"confusion.csv", "confusion.png", "confusion_worst.png",
                                                    "per_class_f1.png"}


def test_predictions_name_their_class_when_the_catalogue_names_classes():
    table = probabilities_table([7, 8], np.array([[0.9, 0.1], [0.2, 0.8]]), [0, 1], {0: "livres", 1: "jeux"})
    assert table["label"].to_list() == ["livres", "jeux"] and table["prdtypecode"].to_list() == [0, 1]
    assert "label" not in probabilities_table([7], np.array([[1.0]]), [1280]).columns
