"""Self-training on an unlabelled set: pseudo-label the texts the model is confident about and continue training the
same adapter on train + pseudo-labelled rows, under the same budget plan, into a new run folder whose config names
its parent run (train.init_from), the unlabelled source (data.unlabelled) and the pseudo-label file.

The unlabelled texts are only ever read as texts: every pseudo label comes from the model's own predictions.
Adapting only the top layers needs nothing here: it is the config field `lora.layers` (e.g. `[-2, -1]`), and a
self-trained run keeps its parent's layers.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.adapters.budget import check, plan
from budgetlora.config import Config, ConfigError
from budgetlora.inference.load import load_run
from budgetlora.inference.predict import read_unlabelled
from budgetlora.shift.priors import corrected_probabilities, estimate_priors, train_priors
from budgetlora.training.train import train


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


def self_train(run: str | Path, unlabelled: str, out: str | Path, rounds: int = 1, threshold: float = 0.9,
               balance: bool = True, max_per_class: int = 0, prior_correction: bool = False,
               overrides: dict | None = None, base: str | None = None, share: float = 0.0, mix: float = 0.0,
               max_val_drop: float | None = None, records: list | None = None, first_probs=None,
               log=print) -> list[Path]:
    """Pseudo-label `unlabelled` with the run's model and continue training its adapter; one new run per round,
    each the parent of the next. `overrides` are dotted config changes for the new runs (e.g. train.epochs,
    train.max_steps, train.lr); the model and LoRA setup are never changed, so the budget plan is the parent's.

    share: pseudo-label each predicted class's most confident share (see select_pseudo_labels); mix: repeat the
    pseudo rows until they are about this share of the training rows (see mix_repeats).
    max_val_drop: the round gate. A round whose run loses more than this validation accuracy against its parent
    (the same held-out labelled rows) is refused: its run is not returned and no further round starts from it.
    The gate can only see labelled rows, so it guards against forgetting the task, not against confirmed mistakes
    on the target; None accepts every round. `records` (a list) receives one dict per round.
    first_probs: the calibrated posteriors of the unlabelled texts under `run`, when the caller already computed
    them (shift.analyse does): round 1 then skips its own pass over the texts."""
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
    labelled = sum(runs.read_json(parent / runs.METRICS).get("train_class_counts") or [0])
    for r in range(1, rounds + 1):
        loaded = load_run(parent, base=base if r == 1 else None)  # reload check: the pseudo labels come from exactly the saved adapter
        if texts is None:
            texts = read_unlabelled(unlabelled, loaded.cfg)
        if r == 1 and first_probs is not None and len(first_probs) == len(texts):
            probs = np.asarray(first_probs)
            est = estimate_priors(probs, train_priors(loaded.path, loaded.cfg.model.num_labels))
        else:
            probs, est = corrected_probabilities(loaded, texts, progress=True)
        if prior_correction:
            probs = est.posteriors
        rows, labels = select_pseudo_labels(probs, threshold, balance, max_per_class, share)
        counts = np.bincount(labels, minlength=loaded.cfg.model.num_labels).tolist()
        log(f"self-train round {r}: {len(rows):,} of {len(texts):,} unlabelled texts pseudo-labelled "
            f"(per class {counts}); estimated priors {est.priors.round(3).tolist()}")
        if not len(rows):
            raise ConfigError(f"self-train: no unlabelled text reaches confidence {threshold}; lower --threshold")
        repeats = mix_repeats(labelled, len(rows), mix)
        if repeats > 1:
            log(f"self-train round {r}: pseudo rows repeated {repeats}x to make about {mix:.0%} of "
                f"{labelled:,} labelled + pseudo rows")
        pseudo = _write_pseudo_csv(out / "pseudo_labels", loaded.cfg, [texts[i] for i in rows] * repeats,
                                   np.tile(labels, repeats))
        name = f"{loaded.cfg.name or loaded.cfg.run_id} self-train {r}"
        cfg = loaded.cfg.replace(**{"train.init_from": str(parent), "data.unlabelled": source,
                                    "data.pseudo_labels": str(pseudo), "name": name, **(overrides or {})})
        child_plan, parent_plan = check(plan(cfg)), plan(loaded.cfg)  # check raises when over budget
        if child_plan.total != parent_plan.total:
            raise ConfigError(f"self-train: plan changed from {parent_plan.total:,} to {child_plan.total:,} params")
        del loaded  # one model in memory while the next trains
        child = train(cfg, root=out, log=log).resolve()
        before = runs.read_json(parent / runs.METRICS)["val_accuracy"]
        after = runs.read_json(child / runs.METRICS)["val_accuracy"]
        accepted = max_val_drop is None or after >= before - max_val_drop
        if records is not None:
            records.append({"round": r, "run": str(child), "parent": str(parent), "pseudo_rows": int(len(rows)),
                            "per_class": counts, "repeats": repeats, "val_accuracy_parent": before,
                            "val_accuracy": after, "accepted": accepted})
        if not accepted:
            log(f"self-train round {r} refused: validation accuracy {after:.4f} < parent's {before:.4f} - "
                f"{max_val_drop}; keeping {parent}")
            break
        parent = child
        made.append(parent)
    return made
