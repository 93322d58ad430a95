"""Self-training on an unlabelled set: pseudo-label the texts the model is confident about and continue training the
same adapter on train + pseudo-labelled rows, under the same budget plan, into a new run folder whose config names
its parent run (train.init_from), the unlabelled source (data.unlabelled) and the pseudo-label file.

The unlabelled texts are only ever read as texts: every pseudo label comes from the model's own predictions.
Adapting only the top layers needs nothing here: it is the config field `lora.layers` (e.g. `[-2, -1]`), and a
self-trained run keeps its parent's layers.
"""
from __future__ import annotations

import logging
import dataclasses
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.adapters.budget import check, plan
from budgetlora.config import Config, ConfigError
from budgetlora.config.use import SelfTrainConfig
from budgetlora.inference.load import load_run
from budgetlora.inference.predict import read_unlabelled
from budgetlora.shift.analysis import analyse
from budgetlora.inference.mix import fit_to_mix, parse_prior
from budgetlora.shift.priors import PriorEstimate, corrected_probabilities, estimate_priors, train_priors
from budgetlora.training.train import train

logger = logging.getLogger(__name__)


# -- self-training --------------------------------------------------------------------------------------------------
def select_pseudo_labels(probs: np.ndarray, threshold: float = 0.9, balance: bool = True,
                         max_per_class: int = 0, share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rows (indices) to pseudo-label and their labels: predictions with confidence >= threshold.

    share (0 < share <= 1): of each predicted class, only its most confident `share` of rows (rounded up), so that
    every class contributes its own surest texts even when a shifted set leaves no row above a fixed threshold.
    balance: the same number per predicted class, the most confident first: k = max_per_class when given (classes
    with fewer confident rows give what they have), else the smallest non-empty class's count. Without balance,
    every confident row, at most max_per_class (when > 0) per class. Returned in row order.
    """
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"self-train: share must be in [0, 1], got {share}")
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    per_class = []
    for c in range(probs.shape[1]):
        predicted = np.flatnonzero(pred == c)
        rows = predicted[conf[predicted] >= threshold]
        rows = rows[np.argsort(-conf[rows], kind="stable")]
        if share > 0:
            rows = rows[:int(np.ceil(share * len(predicted)))]
        per_class.append(rows)
    sizes = [len(r) for r in per_class if len(r)]
    if not sizes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    k = max_per_class if max_per_class > 0 else (min(sizes) if balance else max(sizes))
    rows = np.sort(np.concatenate([r[:k] for r in per_class]))
    return rows, pred[rows]


def fitted_posteriors(probs: np.ndarray, target_prior: str) -> np.ndarray:
    """The posteriors pseudo labels are drawn from: as given, or fitted to a known class mix (inference.mix), so that
    each class's top share comes from the balanced assignment rather than from the model's skew on moved texts."""
    if not target_prior:
        return probs
    return fit_to_mix(probs, parse_prior(target_prior, probs.shape[1])).posteriors


def mix_repeats(labelled_rows: int, pseudo_rows: int, mix: float) -> int:
    """How many copies of the pseudo-labelled rows make them about `mix` of the training rows (at least one):
    against tens of thousands of labelled rows a few thousand target texts would otherwise hardly be seen."""
    if not 0.0 <= mix < 1.0:
        raise ConfigError(f"self-train: mix must be in [0, 1), got {mix}")
    if mix == 0 or pseudo_rows == 0:
        return 1
    return max(1, round(mix / (1 - mix) * labelled_rows / pseudo_rows))


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


@dataclass
class SelfTraining:
    """One `self-train`: a record per round that trained (kept or refused), and the kept runs, each the parent of the
    next."""

    runs: list[Path]
    rounds: list[dict]

    def summary(self) -> list[str]:
        """What `budgetlora self-train` prints: one line per kept run (refused rounds were logged as they ended)."""
        return [f"test accuracy {r['test_accuracy']:.4f} ({r['trainable_params']:,} trainable params) -> {r['run']}"
                for r in self.rounds if r["accepted"]]


def self_train(run: str | Path, unlabelled: str, out: str | Path, settings: SelfTrainConfig | None = None, *,
               overrides: dict | None = None, base: str | None = None, records: list | None = None,
               first_probs=None, **changes) -> list[Path]:
    """`self_training`, returning only the kept runs; `records` (a list) receives one dict per round."""
    result = self_training(run, unlabelled, out, settings, overrides=overrides, base=base, first_probs=first_probs,
                           **changes)
    if records is not None:
        records.extend(result.rounds)
    return result.runs


def self_training(run: str | Path, unlabelled: str, out: str | Path, settings: SelfTrainConfig | None = None, *,
                  overrides: dict | None = None, base: str | None = None, first_probs=None,
                  **changes) -> SelfTraining:
    """Pseudo-label `unlabelled` with the run's model and continue training its adapter; one new run per round,
    each the parent of the next. `settings` (the self_train: section of the config), with `changes` to its fields
    (e.g. threshold=0.3), say how (see SelfTrainConfig); `overrides` are further dotted config changes for the new
    runs (e.g. train.warmup). The model and adapter setup are never changed, so the budget plan is the parent's.

    The round gate (settings.max_val_drop): a round whose run loses more than this validation accuracy against its
    parent (the same held-out labelled rows) is refused: its run is not kept and no further round starts from it.
    The gate can only see labelled rows, so it guards against forgetting the task, not against confirmed mistakes
    on the target. first_probs: the calibrated posteriors of the unlabelled texts under `run`, when the caller
    already computed them (analysis.analyse does): round 1 then skips its own pass over the texts."""
    s = dataclasses.replace(settings or SelfTrainConfig(), **changes)  # __post_init__ checks every field
    overrides = {**s.overrides, **(overrides or {})}
    bad = [k for k in overrides if k.split(".")[0] in ("model", "lora", "budget")]
    if bad:
        raise ConfigError(f"self-train keeps the parent's model, LoRA and budget; cannot override {', '.join(bad)}")
    out = runs.check_output(out, "into", parents=True)  # before the first model loads; callers may nest it deep
    source = str(Path(unlabelled).resolve()) if Path(unlabelled).exists() else unlabelled
    parent, result, texts, labelled = Path(run).resolve(), SelfTraining([], []), None, 0
    for r in range(1, s.rounds + 1):
        # the reload check runs here: the pseudo labels come from exactly the saved adapter
        loaded = load_run(parent, base=base if r == 1 else None)
        if texts is None:
            texts = read_unlabelled(unlabelled, loaded.cfg)
            labelled = sum(loaded.metrics.get("train_class_counts") or [0])
        before = loaded.metrics["val_accuracy"]
        cfg, record = _pseudo_round(r, loaded, texts, s, overrides, labelled, source, out,
                                    first_probs if r == 1 else None)
        del loaded  # one model in memory while the next trains
        child = train(cfg, root=out).resolve()
        m = runs.read_json(child / runs.METRICS)  # the child is trained, not loaded: its metrics are read here
        record.update(run=str(child), parent=str(parent), val_accuracy_parent=before, val_accuracy=m["val_accuracy"],
                      test_accuracy=m["test_accuracy"], trainable_params=m["trainable_params"],
                      accepted=m["val_accuracy"] >= before - s.max_val_drop)
        result.rounds.append(record)
        if not record["accepted"]:
            logger.info(f"self-train round {r} refused: validation accuracy {m['val_accuracy']:.4f} < parent's "
                f"{before:.4f} - {s.max_val_drop}; keeping {parent}")
            break
        parent = child
        result.runs.append(child)
    return result


def _pseudo_round(r: int, loaded, texts: list[str], s: SelfTrainConfig, overrides: dict, labelled: int, source: str,
                  out: Path, first_probs) -> tuple[Config, dict]:
    """Round r's pseudo labels, written beside the runs, and the config of the run that trains on them."""
    probs, est = _posteriors(loaded, texts, s.prior_correction, first_probs)
    probs = fitted_posteriors(probs, s.target_prior)
    rows, labels = select_pseudo_labels(probs, s.min_confidence, s.balance, s.max_per_class, s.share)
    counts = np.bincount(labels, minlength=loaded.cfg.model.num_labels).tolist()
    logger.info(f"self-train round {r}: {len(rows):,} of {len(texts):,} unlabelled texts pseudo-labelled "
        f"(per class {counts}); estimated priors {est.priors.round(3).tolist()}")
    if not len(rows):
        raise ConfigError(f"self-train: no unlabelled text reaches confidence {s.min_confidence}; lower --threshold")
    repeats = mix_repeats(labelled, len(rows), s.mix)
    if repeats > 1:
        logger.info(f"self-train round {r}: pseudo rows repeated {repeats}x to make about {s.mix:.0%} of "
            f"{labelled:,} labelled + pseudo rows")
    pseudo = _write_pseudo_csv(out / "pseudo_labels", loaded.cfg, [texts[i] for i in rows] * repeats,
                               np.tile(labels, repeats))
    name = f"{loaded.cfg.name or loaded.cfg.run_id} self-train {r}"
    cfg = loaded.cfg.replace(**{"train.init_from": str(loaded.path.resolve()), "data.unlabelled": source,
                                "data.pseudo_labels": str(pseudo), "name": name, **overrides})
    child_plan, parent_plan = check(plan(cfg)), plan(loaded.cfg)  # check raises when over budget
    if child_plan.total != parent_plan.total:
        raise ConfigError(f"self-train: plan changed from {parent_plan.total:,} to {child_plan.total:,} params")
    return cfg, {"round": r, "pseudo_rows": int(len(rows)), "per_class": counts, "repeats": repeats}


def _posteriors(loaded, texts: list[str], mode: str, first_probs) -> tuple[np.ndarray, PriorEstimate]:
    """The posteriors to pseudo-label from (prior-corrected or not, as `mode` says) and the EM estimate."""
    if mode == "auto":  # the shift analysis' gate: corrected only where only the class mix moved
        result = analyse(loaded, texts, mode="auto")
        return (result.em.posteriors if result.decision.apply else result.probs), result.em
    if first_probs is not None and len(first_probs) == len(texts):
        probs = np.asarray(first_probs)
        est = estimate_priors(probs, train_priors(loaded.metrics, loaded.cfg.model.num_labels))
    else:
        probs, est = corrected_probabilities(loaded, texts, progress=True)
    return (est.posteriors if mode == "on" else probs), est
