"""Adapting a trained run's predictions to an unlabelled, possibly shifted set: class-prior correction.

* `estimate_priors` re-estimates the class priors of an unlabelled set by EM (Saerens, Latinne & Decaestecker,
  2002) and returns the posteriors corrected for them: the classifier's p(y|x) was learnt under the training
  priors, and Bayes' rule says how it changes when only the priors change. EM trusts the posteriors to be
  calibrated, so the logits are first divided by the temperature fitted on validation at the end of training
  (metrics.json "temperature"); an uncalibrated, under-confident model drifts toward degenerate priors even when
  nothing shifted. Check `<output>.priors.json` before using the corrected labels.

Self-training, the other adaptation, trains new runs and so sits above the loop, in `selftrain`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runs


@dataclass
class PriorEstimate:
    posteriors: np.ndarray  # (N, C) posteriors corrected to the estimated priors
    priors: np.ndarray  # (C,) estimated class priors of the unlabelled set
    train_priors: np.ndarray  # (C,) the priors the posteriors were learnt under
    iterations: int
    converged: bool

    def as_dict(self) -> dict:
        return {"priors": self.priors.round(6).tolist(), "train_priors": self.train_priors.round(6).tolist(),
                "iterations": self.iterations, "converged": self.converged}


def estimate_priors(probs: np.ndarray, train_priors: np.ndarray | None = None, tol: float = 1e-6,
                    max_iter: int = 1000) -> PriorEstimate:
    """EM for the class priors of an unlabelled sample, given posteriors `probs` (N, C) learnt under `train_priors`
    (default uniform): adjust p(y|x) ∝ p(y|x) · π_new(y) / π_train(y), set π_new to the mean adjusted posterior,
    repeat until π_new moves less than `tol`."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probs must be a non-empty (N, C) array, got shape {probs.shape}")
    c = probs.shape[1]
    pi_train = np.full(c, 1.0 / c) if train_priors is None else np.asarray(train_priors, dtype=np.float64)
    if pi_train.shape != (c,) or (pi_train <= 0).any():
        raise ValueError(f"train priors must be {c} positive numbers, got {pi_train.tolist()}")
    pi_train = pi_train / pi_train.sum()
    pi, adjusted, converged, it = pi_train.copy(), probs, False, 0
    for it in range(1, max_iter + 1):
        adjusted = probs * (pi / pi_train)
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        new = adjusted.mean(axis=0)
        delta = np.abs(new - pi).max()
        pi = new
        if delta < tol:
            converged = True
            break
    adjusted = probs * (pi / pi_train)  # posteriors under the final priors
    adjusted /= adjusted.sum(axis=1, keepdims=True)
    return PriorEstimate(adjusted, pi, pi_train, it, converged)


def train_priors(run: str | Path, num_labels: int) -> np.ndarray | None:
    """The class shares a run was trained on (metrics.json train_class_counts), or None when not recorded."""
    path = Path(run) / runs.METRICS
    counts = runs.read_json(path).get("train_class_counts") if path.is_file() else None
    if not counts or len(counts) != num_labels or min(counts) <= 0:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.sum()


def priors_path(output: str | Path) -> Path:
    """Where `predict --prior-correction` writes its estimate: beside the predictions."""
    return Path(f"{output}.priors.json")


def corrected_probabilities(loaded, texts: list[str], progress: bool = False) -> tuple[np.ndarray, PriorEstimate]:
    """Raw and prior-corrected posteriors of a loaded run (predict.LoadedRun) on unlabelled texts."""
    from .evaluate import softmax

    n = loaded.cfg.model.num_labels
    metrics_path = loaded.path / runs.METRICS
    t = runs.read_json(metrics_path).get("temperature") if metrics_path.is_file() else None
    probs = softmax(loaded.logits(texts, progress=progress) / (t or 1.0))  # calibrated first: EM assumes it
    return probs, estimate_priors(probs, train_priors(loaded.path, n))
