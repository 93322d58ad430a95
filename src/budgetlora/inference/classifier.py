"""A finished run as a Python object: `Classifier.predict(texts)`, the surface `budgetlora.load` and `serve` share."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from budgetlora.errors import ConfigError
from budgetlora.inference.load import LoadedRun, check_long_texts, load_run
from budgetlora.tasks import class_names, set_ids, softmax, task_of


class Classifier:
    """A trained adapter on its base model. Batching and length sorting happen inside `LoadedRun.logits`."""

    def __init__(self, loaded: LoadedRun):
        self.run = loaded
        self.class_names: list[str] = class_names(loaded.cfg, loaded.metrics.get("class_names"))

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def num_labels(self) -> int:
        return self.run.cfg.model.num_labels

    def logits(self, texts: list[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:  # nothing to batch; keep the (0, num_labels) shape callers index into
            return np.zeros((0, self.num_labels), dtype=np.float32)
        # plain fp32, unlike bulk `predict`: under bf16 a text's probabilities move by up to ~0.004 with whatever
        # else shares its batch, and an answer here (or from `serve`, which batches requests) must not
        return self.run.logits(texts, exact=True)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts))

    def predict(self, texts: list[str]) -> list[int]:
        return [int(i) for i in self.logits(texts).argmax(axis=1)]

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label run's per-label thresholds tuned on validation (metrics.json); None for a single-label run."""
        return task_of(self.run.cfg).settings(self.run.metrics, self.num_labels, self.path).get("thresholds")

    def predict_sets(self, texts: list[str]) -> list[list[int]]:
        """A multi-label run's answers: each text's label ids at or above their thresholds tuned on validation."""
        thresholds = self.thresholds
        if thresholds is None:
            raise ConfigError("predict_sets applies to multi-label runs (model.problem_type multi) only")
        return set_ids(self.logits(texts), thresholds)

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, model={self.run.cfg.model.name!r}, classes={self.class_names})"


def load(run_dir: str | Path, verify: bool = True, base: str | None = None, long_texts: str = "truncate") -> Classifier:
    """Load a run folder; with `verify`, first prove the reloaded adapter reproduces the trained model.
    base: where the run's base model lives now, when it was trained on a local folder that has moved.
    long_texts: "truncate" reads a text's first max_length tokens; "chunk" reads all of it, in windows whose
    logits are pooled (see `LoadedRun.long_texts`)."""
    long_texts = check_long_texts(long_texts)
    loaded = load_run(run_dir, verify=verify, base=base)  # verified as trained: on each text's start
    loaded.long_texts = long_texts
    return Classifier(loaded)


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):  # a bare string would otherwise be classified character by character
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts
