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

from . import runs
from .adapt import corrected_probabilities
from .budget import check, plan
from .config import Config, ConfigError
from .predict import load_run, read_unlabelled
from .train import train


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


def self_train(run: str | Path, unlabelled: str, out: str | Path, rounds: int = 1, threshold: float = 0.9,
               balance: bool = True, max_per_class: int = 0, prior_correction: bool = False,
               overrides: dict | None = None, base: str | None = None, log=print) -> list[Path]:
    """Pseudo-label `unlabelled` with the run's model and continue training its adapter; one new run per round,
    each the parent of the next. `overrides` are dotted config changes for the new runs (e.g. train.epochs,
    train.max_steps, train.lr); the model and LoRA setup are never changed, so the budget plan is the parent's."""
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
        loaded = load_run(parent, base=base if r == 1 else None)  # reload check: the pseudo labels come from exactly the saved adapter
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
