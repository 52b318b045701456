"""Scores and reports: macro-F1 (the challenge's metric), per-class precision, recall, F1 and support, the full
confusion matrix (CSV and picture) and the confusion of the worst classes (Table 4)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Paper, Table 3 (validation macro-F1 on the full Rakuten train set) and Table 2.
PAPER_TABLE3 = {"image": 0.6861, "title_bpe": 0.8262, "title_cam": 0.8439, "desc_cam": 0.8258,
                "fusion": 0.8972, "static": 0.8608}
PAPER_TABLE2 = {"fusion-concat-all": 0.875, "fusion-single-title": 0.888, "fusion": 0.8972}


def classification_metrics(labels: np.ndarray, preds: np.ndarray, codes: list[int]) -> dict:
    """macro_f1 (unweighted mean over classes, as the challenge), per_class_f1 (code -> F1), accuracy."""
    from sklearn.metrics import accuracy_score, f1_score

    present = np.union1d(labels, preds)
    per_class = f1_score(labels, preds, labels=present, average=None, zero_division=0)
    return {
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "per_class_f1": {str(codes[int(c)]): float(f) for c, f in zip(present, per_class)},
        "accuracy": float(accuracy_score(labels, preds)),
    }


def class_weights(labels: np.ndarray, num_classes: int, kind: str):
    """'balanced': n / (K * count_c) (sklearn's "balanced"); a class absent from train gets weight 1."""
    import torch

    if kind == "plain":
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def most_confused(labels: np.ndarray, preds: np.ndarray, codes: list[int], k: int):
    """Table 4: the confusion matrix (rows: target, columns: predicted) among the k classes most confused
    with each other: pairs taken by their mistakes both ways, most first, until k classes are in."""
    n = len(codes)
    full = np.bincount(np.asarray(labels) * n + np.asarray(preds), minlength=n * n).reshape(n, n)
    both = full + full.T
    np.fill_diagonal(both, 0)
    i, j = np.triu_indices(n, 1)
    chosen: list[int] = []
    for p in np.argsort(-both[i, j], kind="stable"):
        if both[i[p], j[p]] == 0 or len(chosen) >= k:
            break
        chosen += [c for c in (int(i[p]), int(j[p])) if c not in chosen][: k - len(chosen)]
    idx = sorted(chosen)
    return [codes[c] for c in idx], full[np.ix_(idx, idx)]


def class_report(labels: np.ndarray, preds: np.ndarray, names: dict[int, str] | None = None) -> dict:
    """Scores of predicted class codes against true ones (any integer codes): macro_f1 and accuracy, and for
    every class in either (sorted by code) its precision, recall, F1, support and name (the code when the
    catalogue names none); `confusion` is the full matrix over those classes (rows: target, columns: predicted)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    classes = np.union1d(labels, preds)
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
    names = names or {}
    return {
        "macro_f1": float(f1.mean()) if len(classes) else 0.0,
        "accuracy": float((labels == preds).mean()) if len(labels) else 0.0,
        "items": int(len(labels)),
        "per_class": {str(c): {"name": names.get(int(c), str(c)), "precision": float(p), "recall": float(r),
                               "f1": float(f), "support": int(n)}
                      for c, p, r, f, n in zip(classes, precision, recall, f1, support)},
        "confusion": confusion_matrix(labels, preds, labels=classes).tolist(),
    }


def save_report(out: Path, report: dict, title: str) -> None:
    """A report of `class_report` as files in `out`: metrics.json (without the matrix) and the matrix files."""
    from pipeline.provenance import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {k: v for k, v in report.items() if k != "confusion"})
    save_matrix(out, report, title)


def save_matrix(out: Path, report: dict, title: str) -> None:
    """confusion.csv (the full matrix, class names as row and column headers), confusion.png and per_class_f1.png
    (with each class's support) of a `class_report`, in `out`."""
    import polars as pl

    names = [c["name"] for c in report["per_class"].values()]
    matrix = np.asarray(report["confusion"], np.int64).reshape(len(names), len(names))
    pl.DataFrame({"target \\ predicted": names} | {n: matrix[:, j] for j, n in enumerate(_unique(names))}) \
        .write_csv(out / "confusion.csv")
    plot_confusion(out / "confusion.png", matrix, names, f"Confusion matrix: {title}")
    plot_per_class_f1(out / "per_class_f1.png", {n: c for n, c in zip(_unique(names), report["per_class"].values())},
                      report["macro_f1"], f"Per-class F1: {title}")


def _unique(names: list[str]) -> list[str]:
    """Column headers: a name given twice (two codes, one name) gets its position appended."""
    return [n if names.count(n) == 1 else f"{n} #{i}" for i, n in enumerate(names)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, matrix: np.ndarray, names: list[str], title: str) -> None:
    """The full confusion matrix: colour = the share of the target class's items (so small classes show), the
    count written in each cell when there are few enough classes to read."""
    plt = _pyplot()
    n = len(names)
    side = min(max(4.0, 0.42 * n + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the target class")
    short = [s if len(s) <= 24 else s[:23] + "…" for s in names]
    ax.set_xticks(range(n), short, rotation=90)
    ax.set_yticks(range(n), short)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("target class")
    if n <= 40:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class_f1(path: Path, per_class: dict[str, dict], macro_f1: float, title: str) -> None:
    """F1 of every class, worst first, each bar labelled with the class's support (its items)."""
    plt = _pyplot()
    order = sorted(per_class, key=lambda c: per_class[c]["f1"])
    fig, ax = plt.subplots(figsize=(max(8.0, 0.38 * len(order) + 2), 4.5))
    ax.bar(range(len(order)), [per_class[c]["f1"] for c in order], color="tab:blue")
    for x, c in enumerate(order):
        ax.text(x, per_class[c]["f1"] + 0.01, str(per_class[c]["support"]), ha="center", va="bottom", fontsize=7)
    ax.axhline(macro_f1, color="tab:red", linestyle="--", label=f"macro-F1 {macro_f1:.3f}")
    short = [c if len(c) <= 24 else c[:23] + "…" for c in order]
    ax.set_xticks(range(len(order)), short, rotation=90)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("F1 (number on a bar: the class's items)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_pictures(out: Path, labels: np.ndarray, preds: np.ndarray, codes: list[int], metrics: dict, k: int) -> None:
    """fuse's reports in `out`: confusion_worst.png (Table 4), the full matrix (confusion.csv, confusion.png) and
    per_class_f1.png with each class's support (labels, preds: class indices into `codes`)."""
    plt = _pyplot()
    names, matrix = most_confused(labels, preds, codes, k)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 1.1 * len(names) + 1.5))
    if names:  # none when the validation split holds no mistake at all
        ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), [str(c) for c in names])
    ax.set_yticks(range(len(names)), [str(c) for c in names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("target class")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, matrix[i, j], ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black",
                    fontweight="bold" if i != j and matrix[i, j] > 0 else "normal")
    ax.set_title(f"The {len(names)} classes most confused with each other (validation)" if names
                 else "No confusion on the validation split")
    fig.tight_layout()
    fig.savefig(out / "confusion_worst.png", dpi=120)
    plt.close(fig)
    code_of = np.asarray(codes, np.int64)
    save_matrix(out, class_report(code_of[labels], code_of[preds]), "validation split")
