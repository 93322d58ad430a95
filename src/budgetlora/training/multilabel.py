"""Multi-label runs (model.problem_type multi): each text carries a set of labels, held as an (n, num_labels) 0/1
matrix. One sigmoid per label trained with binary cross-entropy; each label's decision threshold is tuned on
validation and kept in metrics.json, so prediction turns logits into label sets exactly as the reported test
metrics did.
"""
from __future__ import annotations

import numpy as np
import torch

from budgetlora.training.labelsets import label_sets, sigmoid

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


class MultiLabelLoss(torch.nn.BCEWithLogitsLoss):
    """BCE over every (row, label) pair; the loop hands over the label matrix as integers."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, targets.to(logits.dtype))


def _f1(pred: np.ndarray, gold: np.ndarray, axis=None):
    """F1 from counts (summed over `axis`); 0 where a label is neither predicted nor present."""
    tp = (pred & gold).sum(axis=axis)
    denom = pred.sum(axis=axis) + gold.sum(axis=axis)
    return np.divide(2.0 * tp, denom, out=np.zeros(np.shape(tp), dtype=float), where=np.asarray(denom) > 0)


def tune_thresholds(logits: np.ndarray, labels: np.ndarray, grid=THRESHOLD_GRID) -> list[float]:
    """Each label's threshold from `grid` maximising its own F1 on these (validation) rows. Among equal F1s the one
    nearest 0.5 wins (the lower on a tie), so a label validation never shows keeps the neutral 0.5."""
    probs, gold = sigmoid(logits), np.asarray(labels, dtype=np.int64)
    out = []
    for j in range(gold.shape[1]):
        scores = np.array([_f1((probs[:, j] >= t).astype(np.int64), gold[:, j]) for t in grid])
        best = np.flatnonzero(scores >= scores.max() - 1e-12)
        out.append(float(grid[min(best, key=lambda i: (abs(grid[i] - 0.5), grid[i]))]))
    return out


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray, thresholds=None) -> dict:
    """Subset accuracy (exact match; also under `accuracy`, which model selection and reports read), mean BCE (under
    `loss`), micro- and macro-F1 and per-label F1 at `thresholds` (0.5 each when not given)."""
    logits = np.asarray(logits, dtype=np.float64)
    gold = np.asarray(labels, dtype=np.int64)
    thresholds = [0.5] * gold.shape[1] if thresholds is None else [float(t) for t in thresholds]
    pred = label_sets(logits, thresholds)
    # log(1 + e^x) - y x, computed without overflow
    bce = np.logaddexp(0.0, logits) - gold * logits
    per_label = _f1(pred, gold, axis=0)
    subset = float((pred == gold).all(axis=1).mean())
    return {
        "accuracy": subset, "subset_accuracy": subset, "loss": float(bce.mean()),
        "micro_f1": float(_f1(pred, gold)), "macro_f1": float(per_label.mean()),
        "per_label_f1": per_label.round(6).tolist(), "thresholds": thresholds, "n": len(gold),
    }


def run_metrics(val_logits, val_labels, test_logits, test_labels) -> tuple[dict, dict, dict]:
    """Validation and test metrics at thresholds tuned on validation, and the keys metrics.json holds for them in
    place of the single-label ones (confusion matrices, per-class accuracy)."""
    thresholds = tune_thresholds(val_logits, val_labels)
    val_m = multilabel_metrics(val_logits, val_labels, thresholds)
    test_m = multilabel_metrics(test_logits, test_labels, thresholds)
    keys = {"problem_type": "multi", "thresholds": thresholds,
            "val_micro_f1": val_m["micro_f1"], "test_micro_f1": test_m["micro_f1"],
            "val_subset_accuracy": val_m["subset_accuracy"], "test_subset_accuracy": test_m["subset_accuracy"],
            "val_per_label_f1": val_m["per_label_f1"], "test_per_label_f1": test_m["per_label_f1"],
            "val_rows": val_m["n"], "test_rows": test_m["n"]}
    return val_m, test_m, keys


def label_counts(labels, num_labels: int) -> list[int]:
    """Training rows per class: a row counts once for each label of its set."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.sum(axis=0).astype(int).tolist()
    return np.bincount(labels, minlength=num_labels).tolist()


def format_sets(matrix: np.ndarray, delimiter: str = ";") -> list[str]:
    """Each row's label ids joined by `delimiter` ('1;2'; '' for none), the form the training data uses."""
    return [delimiter.join(str(j) for j in np.flatnonzero(row)) for row in np.asarray(matrix)]
