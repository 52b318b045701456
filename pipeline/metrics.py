"""Scores and reports: macro-F1 (the challenge's metric), per-class F1, confusion of the worst classes."""
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


def save_pictures(out: Path, labels: np.ndarray, preds: np.ndarray, codes: list[int], metrics: dict, k: int) -> None:
    """confusion_worst.png (Table 4) and per_class_f1.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

    f1 = metrics["per_class_f1"]
    order = sorted(f1, key=f1.get)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(order)), [f1[c] for c in order], color="tab:blue")
    ax.axhline(metrics["macro_f1"], color="tab:red", linestyle="--", label=f"macro-F1 {metrics['macro_f1']:.3f}")
    ax.set_xticks(range(len(order)), order, rotation=90)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (validation)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "per_class_f1.png", dpi=120)
    plt.close(fig)
