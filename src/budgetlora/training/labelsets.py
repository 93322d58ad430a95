"""A multi-label run's answers from its logits: one sigmoid per label, each compared with that label's threshold
tuned on validation. Kept free of torch so that the ONNX service, which runs without it, answers as the run does."""
from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def label_sets(logits: np.ndarray, thresholds) -> np.ndarray:
    """The 0/1 matrix of labels whose probability reaches their threshold."""
    return (sigmoid(logits) >= np.asarray(thresholds, dtype=np.float64)[None, :]).astype(np.int64)


def set_ids(logits: np.ndarray, thresholds) -> list[list[int]]:
    """Each row's label ids at or above their thresholds ([] for none)."""
    return [np.flatnonzero(row).tolist() for row in label_sets(logits, thresholds)]
