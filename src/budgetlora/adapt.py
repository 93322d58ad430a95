"""Adapting a trained run to an unlabelled, possibly shifted set: class-prior correction and self-training.

* `estimate_priors` re-estimates the class priors of an unlabelled set by EM (Saerens, Latinne & Decaestecker,
  2002) and returns the posteriors corrected for them: the classifier's p(y|x) was learnt under the training
  priors, and Bayes' rule says how it changes when only the priors change. EM trusts the posteriors to be
  calibrated, so the logits are first divided by the temperature fitted on validation at the end of training
  (metrics.json "temperature"); an uncalibrated, under-confident model drifts toward degenerate priors even when
  nothing shifted. Check `<output>.priors.json` before using the corrected labels.
* `self_train` pseudo-labels the unlabelled texts the model is confident about and continues training the same
  adapter on train + pseudo-labelled rows, under the same budget plan, into a new run folder whose config names
  its parent run (train.init_from), the unlabelled source (data.unlabelled) and the pseudo-label file.

The unlabelled texts are only ever read as texts: every pseudo label comes from the model's own predictions.

Adapting only the top layers needs nothing here: it is the config field `lora.layers` (e.g. `[-2, -1]`, or the
string "-2,-1" in a sweep grid or on the command line), and a self-trained run keeps its parent's layers.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import runs
from .config import Config, ConfigError
from .data import Split, load_split


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


# -- self-training --------------------------------------------------------------------------------------------------
def select_pseudo_labels(probs: np.ndarray, threshold: float = 0.9, balance: bool = True,
                         max_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows (indices) to pseudo-label and their labels: predictions with confidence >= threshold.

    balance: the same number per predicted class, the most confident first: k = max_per_class when given (classes
    with fewer confident rows give what they have), else the smallest non-empty class's count. Without balance,
    every confident row, at most max_per_class (when > 0) per class. Returned in row order.
    """
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    per_class = []
    for c in range(probs.shape[1]):
        rows = np.flatnonzero((pred == c) & (conf >= threshold))
        per_class.append(rows[np.argsort(-conf[rows], kind="stable")])
    sizes = [len(r) for r in per_class if len(r)]
    if not sizes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    k = max_per_class if max_per_class > 0 else (min(sizes) if balance else max(sizes))
    rows = np.sort(np.concatenate([r[:k] for r in per_class]))
    return rows, pred[rows]


def _write_pseudo_csv(folder: Path, cfg: Config, texts: list[str], labels: np.ndarray) -> Path:
    """text,label CSV named by its content hash, so different selections never share a run id."""
    import pandas as pd

    buf = io.StringIO()
    pd.DataFrame({cfg.data.text_column: texts, cfg.data.label_column: labels.astype(int)}).to_csv(buf, index=False)
    text = buf.getvalue()
    path = folder / f"{hashlib.sha1(text.encode()).hexdigest()[:12]}.csv"
    if not path.is_file():
        runs.write_text(path, text)
    return path.resolve()


def with_pseudo_labels(train: Split, cfg: Config) -> Split:
    """The labelled training split followed by the rows of cfg.data.pseudo_labels."""
    extra = load_split(cfg.data.pseudo_labels, "train", cfg.data, cfg.model.num_labels)
    return Split(train.texts + extra.texts, np.concatenate([train.labels, extra.labels]))


def self_train(run: str | Path, unlabelled: str, out: str | Path, rounds: int = 1, threshold: float = 0.9,
               balance: bool = True, max_per_class: int = 0, prior_correction: bool = False,
               overrides: dict | None = None, log=print) -> list[Path]:
    """Pseudo-label `unlabelled` with the run's model and continue training its adapter; one new run per round,
    each the parent of the next. `overrides` are dotted config changes for the new runs (e.g. train.epochs,
    train.max_steps, train.lr); the model and LoRA setup are never changed, so the budget plan is the parent's."""
    from .budget import check, plan
    from .predict import load_run, read_unlabelled
    from .train import train

    if rounds < 1:
        raise ConfigError("self-train: rounds must be >= 1")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"self-train: threshold must be in [0, 1], got {threshold}")
    bad = [k for k in (overrides or {}) if k.split(".")[0] in ("model", "lora", "budget")]
    if bad:
        raise ConfigError(f"self-train keeps the parent's model, LoRA and budget; cannot override {', '.join(bad)}")
    out = Path(out)
    source = str(Path(unlabelled).resolve()) if Path(unlabelled).exists() else unlabelled
    parent, made = Path(run).resolve(), []
    texts: list[str] | None = None
    for r in range(1, rounds + 1):
        loaded = load_run(parent)  # reload check: the pseudo labels come from exactly the saved adapter
        if texts is None:
            texts = read_unlabelled(unlabelled, loaded.cfg)
        probs, est = corrected_probabilities(loaded, texts, progress=True)
        if prior_correction:
            probs = est.posteriors
        rows, labels = select_pseudo_labels(probs, threshold, balance, max_per_class)
        counts = np.bincount(labels, minlength=loaded.cfg.model.num_labels).tolist()
        log(f"self-train round {r}: {len(rows):,} of {len(texts):,} unlabelled texts pseudo-labelled "
            f"(per class {counts}); estimated priors {est.priors.round(3).tolist()}")
        if not len(rows):
            raise ConfigError(f"self-train: no unlabelled text reaches confidence {threshold}; lower --threshold")
        pseudo = _write_pseudo_csv(out / "pseudo_labels", loaded.cfg, [texts[i] for i in rows], labels)
        name = f"{loaded.cfg.name or loaded.cfg.run_id} self-train {r}"
        cfg = loaded.cfg.replace(**{"train.init_from": str(parent), "data.unlabelled": source,
                                    "data.pseudo_labels": str(pseudo), "name": name, **(overrides or {})})
        child_plan, parent_plan = check(plan(cfg)), plan(loaded.cfg)  # check raises when over budget
        if child_plan.total != parent_plan.total:
            raise ConfigError(f"self-train: plan changed from {parent_plan.total:,} to {child_plan.total:,} params")
        del loaded  # one model in memory while the next trains
        parent = train(cfg, root=out, log=log).resolve()
        made.append(parent)
    return made
