"""Adapting a trained run's predictions to an unlabelled, possibly shifted set: class-prior correction.

* `estimate_priors` re-estimates the class priors of an unlabelled set by EM (Saerens, Latinne & Decaestecker,
  2002) and returns the posteriors corrected for them: the classifier's p(y|x) was learnt under the training
  priors, and Bayes' rule says how it changes when only the priors change. EM trusts the posteriors to be
  calibrated, so the logits are first divided by the temperature fitted on validation at the end of training
  (metrics.json "temperature"); an uncalibrated, under-confident model drifts toward degenerate priors even when
  nothing shifted. Check `<output>.priors.json` before using the corrected labels.
  Everything here works on arrays and the run's metrics dict (`LoadedRun.metrics`): no function opens a file.
* `bbse_priors` estimates the same priors a second way, from the validation confusion matrix and the target's
  predicted shares (BBSE, Lipton et al. 2018), and `decide` is the gate: the correction is only worth applying
  when only the class mix moved, so it is applied when EM and BBSE agree, the texts are not separable once the
  class mix is accounted for (measured by `analysis`), and the priors moved at all; otherwise argmax is kept and the
  reason recorded. Bayes' prior rule is exact under label shift and wrong under text shift: on texts that moved,
  EM follows posteriors that are no longer calibrated and the "correction" costs accuracy.

Self-training, the other adaptation, trains new runs and so sits above the loop, in `selftrain`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from budgetlora.config.use import PRIOR_CORRECTION
from budgetlora.inference.mix import calibrated_probabilities


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


def train_priors(metrics: dict, num_labels: int) -> np.ndarray | None:
    """The class shares a run was trained on (its metrics' train_class_counts), or None when not recorded."""
    counts = metrics.get("train_class_counts")
    if not counts or len(counts) != num_labels or min(counts) <= 0:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    return counts / counts.sum()


def corrected_probabilities(loaded, texts: list[str], progress: bool = False) -> tuple[np.ndarray, PriorEstimate]:
    """Raw and prior-corrected posteriors of a loaded run (inference.load.LoadedRun) on unlabelled texts."""
    probs = calibrated_probabilities(loaded.logits(texts, progress=progress), loaded.metrics.get("temperature"))
    return probs, estimate_priors(probs, train_priors(loaded.metrics, loaded.cfg.model.num_labels))


# -- a second estimate, and the gate ----------------------------------------------------------------------------------
@dataclass
class BBSEEstimate:
    priors: np.ndarray  # (C,) estimated class priors of the unlabelled set
    weights: np.ndarray  # (C,) q(y) / p(y): target over validation priors, negatives clipped to 0
    source_priors: np.ndarray  # (C,) the validation class shares the confusion matrix was counted on
    condition: float  # condition number of the joint confusion matrix: large = the inversion amplifies noise

    def as_dict(self) -> dict:
        return {"priors": self.priors.round(6).tolist(), "weights": self.weights.round(6).tolist(),
                "source_priors": self.source_priors.round(6).tolist(), "condition": round(self.condition, 3)}


def bbse_priors(confusion, target_pred_counts) -> BBSEEstimate:
    """Black-box shift estimation (Lipton, Wang & Smola 2018) from hard predictions.

    confusion[i][j]: validation rows of true class i predicted j (metrics.json val_confusion_matrix). Under label
    shift p(ŷ|y) stays fixed, so the target's predicted shares μ satisfy μ = C w with C[ŷ, y] = p_val(ŷ, y) and
    w = q(y) / p_val(y); solving that linear system needs neither calibration nor the target's posteriors, which
    makes it an independent check on EM."""
    cm = np.asarray(confusion, dtype=np.float64)
    mu = np.asarray(target_pred_counts, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.sum() <= 0 or (cm < 0).any():
        raise ValueError(f"confusion must be a square non-negative count matrix, got shape {cm.shape}")
    if mu.shape != (cm.shape[0],) or mu.sum() <= 0 or (mu < 0).any():
        raise ValueError(f"target_pred_counts must be {cm.shape[0]} non-negative counts, got {mu.tolist()}")
    joint = cm.T / cm.sum()  # rows: predicted class, columns: true class
    p_val = cm.sum(axis=1) / cm.sum()
    if (p_val <= 0).any():
        raise ValueError("confusion: every class needs validation rows to estimate its prior")
    w = np.linalg.lstsq(joint, mu / mu.sum(), rcond=None)[0]
    w = np.clip(w, 0.0, None)  # a negative prior is estimation noise; the nearest valid one is 0
    q = w * p_val
    q = q / q.sum() if q.sum() > 0 else p_val.copy()
    return BBSEEstimate(q, w, p_val, float(np.linalg.cond(joint)))


def total_variation(p, q) -> float:
    return float(0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


# Gate thresholds. MAX_DISAGREEMENT: EM and BBSE fail in different ways when the texts moved (EM trusts posteriors
# that are no longer calibrated, BBSE a confusion matrix that no longer holds), so two estimates more than this far
# apart (total variation) mean the label-shift model does not fit. MAX_SEPARABILITY: held-out AUC of a train-vs-target
# classifier on pooled features, with the training side reweighted to the estimated target priors so that a pure
# change of class mix reads about 0.5; above it, p(x|y) itself moved and Bayes' prior rule no longer applies.
# MIN_SHIFT: below this distance from the training priors there is nothing worth correcting, and EM's small
# drift on an unshifted set would only add noise. MAX_CONDITION: an ill-conditioned confusion matrix (a classifier
# that confuses classes wholesale) makes BBSE noise, not an estimate.
MAX_DISAGREEMENT = 0.1
MAX_SEPARABILITY = 0.65
MIN_SHIFT = 0.05
MAX_CONDITION = 50.0
MODES = PRIOR_CORRECTION


@dataclass
class Decision:
    apply: bool
    mode: str
    reasons: list[str]  # why it was applied or refused, one line each
    checks: dict  # the numbers the decision was made on

    def as_dict(self) -> dict:
        return {"apply": self.apply, "mode": self.mode, "reasons": self.reasons, "checks": self.checks}


def decide(mode: str, em: PriorEstimate, bbse: BBSEEstimate | None, auc_adjusted: float | None,
           max_disagreement: float = MAX_DISAGREEMENT, max_auc: float = MAX_SEPARABILITY,
           min_shift: float = MIN_SHIFT, max_condition: float = MAX_CONDITION) -> Decision:
    """Whether to use the EM-corrected posteriors. mode 'on' and 'off' force it (the checks are still recorded);
    'auto' applies it only when every check passes: both estimates exist, agree within `max_disagreement`, the shift
    they agree on is at least `min_shift` from the training priors, and the texts are not separable (label-adjusted
    AUC below `max_auc`)."""
    if mode not in MODES:
        raise ValueError(f"prior correction mode must be one of {', '.join(MODES)}, got {mode!r}")
    checks = {"em_priors": em.priors.round(4).tolist(), "train_priors": em.train_priors.round(4).tolist(),
              "em_shift_tv": round(total_variation(em.priors, em.train_priors), 4), "em_converged": em.converged,
              "max_disagreement": max_disagreement, "max_auc": max_auc, "min_shift": min_shift}
    failed = []
    if bbse is None:
        failed.append("no validation confusion matrix in metrics.json: BBSE cannot check EM")
    else:
        checks.update(bbse_priors=bbse.priors.round(4).tolist(), bbse_condition=round(bbse.condition, 2),
                      disagreement_tv=round(total_variation(em.priors, bbse.priors), 4))
        if bbse.condition > max_condition:
            failed.append(f"the validation confusion matrix is ill-conditioned ({bbse.condition:.0f} > "
                          f"{max_condition:.0f}): BBSE is unreliable")
        if checks["disagreement_tv"] > max_disagreement:
            failed.append(f"EM and BBSE disagree (total variation {checks['disagreement_tv']:.3f} > "
                          f"{max_disagreement}): more than the class mix changed")
    if auc_adjusted is None:
        failed.append("no separability measurement")
    else:
        checks["auc_adjusted"] = round(float(auc_adjusted), 4)
        if auc_adjusted >= max_auc:
            failed.append(f"train and target texts are separable (label-adjusted AUC {auc_adjusted:.3f} >= "
                          f"{max_auc}): the texts moved, not only the class priors")
    if not em.converged:
        failed.append("EM did not converge")
    if checks["em_shift_tv"] < min_shift:
        failed.append(f"estimated priors are within {min_shift} (total variation) of the training priors: "
                      "nothing to correct")
    if mode == "on":
        return Decision(True, mode, ["forced on"] + [f"(would refuse: {f})" for f in failed], checks)
    if mode == "off":
        return Decision(False, mode, ["off"], checks)
    if failed:
        return Decision(False, mode, failed, checks)
    return Decision(True, mode, [f"label shift only: EM and BBSE agree (TV {checks['disagreement_tv']:.3f}), "
                                 f"texts not separable (AUC {auc_adjusted:.3f}), priors moved by TV "
                                 f"{checks['em_shift_tv']:.3f}"], checks)


def val_confusion(metrics: dict) -> np.ndarray | None:
    """The run's validation confusion matrix (true x predicted counts), or None for runs that did not record it."""
    cm = metrics.get("val_confusion_matrix")
    return np.asarray(cm, dtype=np.float64) if cm else None
