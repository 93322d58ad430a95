"""A class mix the user knows: fit the posteriors of a whole target set to it, then decide by argmax. `KnownMix` is
the post-processor `inference.predict.predict` runs for `--target-prior`.

Benchmark test sets are often balanced by construction (AG News's test split has 1,900 rows per class), yet on texts
that moved a classifier's predicted shares skew, and an estimated prior (EM, BBSE) follows the skew instead of
removing it. When the mix is known, iterative proportional fitting (Sinkhorn scaling) finds one weight per class
such that the re-weighted, re-normalised posteriors average to that mix: p'(y|x) ∝ p(y|x) · w_y. For pure label
shift and calibrated posteriors, w is the ratio of the target prior to the training prior, so this is Bayes' rule at
the known prior; under text shift it still spends the known marginal, which argmax alone ignores.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlora.errors import ConfigError
from budgetlora.tasks import softmax


def parse_prior(spec: str | list | tuple | np.ndarray, num_labels: int) -> np.ndarray:
    """'uniform', or one share per class ('0.4,0.2,0.2,0.2' or a sequence): non-negative, summing to 1 within 1e-3.
    Anything else is one ConfigError line."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "uniform":
            return np.full(num_labels, 1.0 / num_labels)
        try:
            values = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"target prior {spec!r}: expected 'uniform' or {num_labels} comma-separated shares")
    else:
        values = [float(x) for x in spec]
    p = np.asarray(values, dtype=np.float64)
    if len(p) != num_labels:
        raise ConfigError(f"target prior has {len(p)} shares; the run has {num_labels} classes")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ConfigError(f"target prior shares must be finite and >= 0, got {p.tolist()}")
    if abs(p.sum() - 1.0) > 1e-3:
        raise ConfigError(f"target prior shares must sum to 1, got {p.sum():.4f}")
    return p / p.sum()


@dataclass
class MixFit:
    posteriors: np.ndarray  # (N, C) fitted posteriors, averaging to the target mix
    weights: np.ndarray  # (C,) the per-class factors the posteriors were scaled by (normalised to sum 1)
    target: np.ndarray
    shares_before: np.ndarray  # argmax shares of the given posteriors
    shares_after: np.ndarray  # argmax shares of the fitted ones
    changed: int  # labels that differ from argmax
    iterations: int
    converged: bool

    @property
    def labels(self) -> np.ndarray:
        return self.posteriors.argmax(1)

    def as_dict(self) -> dict:
        r = lambda a: np.round(a, 6).tolist()  # noqa: E731
        return {"target_prior": r(self.target), "weights": r(self.weights), "shares_before": r(self.shares_before),
                "shares_after": r(self.shares_after), "labels_changed": self.changed, "rows": len(self.posteriors),
                "iterations": self.iterations, "converged": self.converged}


def _shares(labels: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels, minlength=n) / max(len(labels), 1)


def fit_to_mix(probs: np.ndarray, target: np.ndarray, tol: float = 1e-6, max_iter: int = 1000) -> MixFit:
    """Scale each class's column of `probs` (N, C) until the row-normalised posteriors average to `target`.
    A class with target share 0 gets weight 0; a class the model never gives mass to cannot be raised (its weight
    would grow without bound), so the fit stops at max_iter and says it did not converge."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not len(p):
        raise ValueError(f"probs must be a non-empty (N, C) array, got shape {p.shape}")
    target = np.asarray(target, dtype=np.float64)
    w, q, converged, it = np.ones(p.shape[1]), p / p.sum(1, keepdims=True), False, 0
    for it in range(1, max_iter + 1):
        mean = q.mean(0)
        if np.abs(mean - target).max() < tol:
            converged = True
            break
        w = w * np.divide(target, mean, out=np.zeros_like(mean), where=mean > 0)
        q = p * w
        q /= np.maximum(q.sum(1, keepdims=True), 1e-300)
    before, after = p.argmax(1), q.argmax(1)
    return MixFit(q, w / max(w.sum(), 1e-300), target, _shares(before, p.shape[1]), _shares(after, p.shape[1]),
                  int((before != after).sum()), it, converged)


def shares_differ(labels: np.ndarray, mix: np.ndarray, z: float = 3.0) -> list[int]:
    """Classes whose predicted share strays from `mix` by more than sampling noise: |share - p| above z binomial
    standard errors of a sample this size (z = 3: about one false alarm in 370 per class when nothing moved)."""
    n, mix = len(labels), np.asarray(mix, dtype=np.float64)
    share = _shares(np.asarray(labels), len(mix))
    se = np.sqrt(mix * (1 - mix) / max(n, 1))
    return [int(c) for c in np.flatnonzero(np.abs(share - mix) > z * np.maximum(se, 1e-12))]


def calibrated_probabilities(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(logits / T) with the run's validation temperature (metrics "temperature"; None for runs that did not
    record one): fitting to a mix and EM prior estimates both assume calibrated posteriors."""
    return softmax(np.asarray(logits, dtype=np.float64) / (temperature or 1.0))


def priors_path(output: str | Path) -> Path:
    """Where a prediction that moved its posteriors (a known mix, prior correction) records how: beside it."""
    return Path(f"{output}.priors.json")


@dataclass
class Adjusted:
    """What a post-processor made of a target set: the labels, the posteriors they are the argmax of, and the record
    written to `<output>.priors.json`."""

    labels: np.ndarray
    probs: np.ndarray
    record: dict


def known_mix(fit: MixFit, source: str, read_length: int) -> Adjusted:
    """A mix fit as an answer: its labels and posteriors, and its record (the mix, shares before and after)."""
    reasons = [f"the class mix was given: {fit.target.round(4).tolist()}"]
    if not fit.converged:
        reasons.append(f"the fit stopped after {fit.iterations} iterations without reaching it (a class the model "
                       "never predicts cannot be raised)")
    n = len(fit.posteriors)
    record = {**fit.as_dict(), "source": str(source), "read_length": read_length,
              "decision": {"mode": "known-mix", "apply": True, "reasons": reasons},
              "label_counts_uncorrected": [int(round(x * n)) for x in fit.shares_before],
              "label_counts_written": [int(round(x * n)) for x in fit.shares_after]}
    return Adjusted(fit.labels, fit.posteriors, record)


@dataclass(frozen=True)
class KnownMix:
    """`predict --target-prior`: the run's validation-calibrated posteriors of the whole set scaled per class until
    they average to the given mix, then argmax."""

    mix: str | list | tuple
    windows = True

    def check(self, cfg) -> None:
        parse_prior(self.mix, cfg.model.num_labels)  # a malformed mix is refused before the model loads

    def __call__(self, loaded, texts: list[str], source: str) -> Adjusted:
        probs = calibrated_probabilities(loaded.logits(texts, progress=True), loaded.metrics.get("temperature"))
        fit = fit_to_mix(probs, parse_prior(self.mix, loaded.cfg.model.num_labels))
        return known_mix(fit, source, loaded.read_length)
