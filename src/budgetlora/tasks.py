"""What kind of answer a run gives, chosen once from its config (`task_of`): single-label (one class per text: softmax,
argmax, accuracy and a confusion matrix) or multi-label (a set of labels per text: one sigmoid per label, each with
a threshold tuned on validation, subset accuracy and F1). A task owns its labels' shape, metrics, the decision
settings fitted on validation, the decision rule, the columns of an answers file and the card's wording; the rest
of the package asks it rather than testing shapes or `problem_type` strings.

numpy only: the ONNX service, which runs without torch, answers through the same functions as training scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from budgetlora.errors import RunFolderError

AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # the default dataset's label ids 0-3
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


# -- the numbers both tasks are built from ----------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def label_sets(logits: np.ndarray, thresholds) -> np.ndarray:
    """The 0/1 matrix of labels whose probability reaches their threshold."""
    return (sigmoid(logits) >= np.asarray(thresholds, dtype=np.float64)[None, :]).astype(np.int64)


def set_ids(logits: np.ndarray, thresholds) -> list[list[int]]:
    """Each row's label ids at or above their thresholds ([] for none)."""
    return [np.flatnonzero(row).tolist() for row in label_sets(logits, thresholds)]


def format_sets(matrix: np.ndarray, delimiter: str = ";") -> list[str]:
    """Each row's label ids joined by `delimiter` ('1;2'; '' for none), the form the training data uses."""
    return [delimiter.join(str(j) for j in np.flatnonzero(row)) for row in np.asarray(matrix)]


def _per_class(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, F1) of each class from a confusion matrix (rows gold, columns predicted); 0 where undefined."""
    tp = np.diag(conf).astype(float)
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=support + predicted > 0)  # 2PR/(P+R)
    return recall, f1


def confusion(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> np.ndarray:
    conf = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(conf, (np.asarray(gold), np.asarray(pred)), 1)
    return conf


def macro_f1(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> float:
    """The mean over classes of each class's F1, from gold and predicted class ids."""
    return float(_per_class(confusion(gold, pred, num_labels))[1].mean())


def class_metrics(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """Accuracy, mean cross-entropy, macro-F1, per-class accuracy (recall) and the confusion matrix."""
    labels = np.asarray(labels)
    pred = np.asarray(logits).argmax(axis=1)
    logp = np.log(np.clip(softmax(logits), 1e-12, 1.0))
    conf = confusion(labels, pred, num_labels)
    recall, f1 = _per_class(conf)
    return {
        "accuracy": float((pred == labels).mean()),
        "loss": float(-logp[np.arange(len(labels)), labels].mean()),
        "macro_f1": float(f1.mean()),
        "per_class_accuracy": recall.round(6).tolist(),
        "confusion_matrix": conf.tolist(),
        "n": int(len(labels)),
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising validation NLL of softmax(logits / T) (Guo et al. 2017): calibrated posteriors are what
    prior correction by EM assumes. A log-spaced grid, then a finer one around the best point: 1-D and cheap."""
    labels = np.asarray(labels)

    def nll(t):
        logp = np.log(np.clip(softmax(logits / t), 1e-12, 1.0))
        return -logp[np.arange(len(labels)), labels].mean()

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = best * np.exp(np.linspace(-0.12, 0.12, 25))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


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


# -- the tasks ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str  # model.problem_type
    sets: bool  # labels are an (n, num_labels) 0/1 matrix of label sets, not one class id per row
    answer_column: str  # the answers file's column after ID
    evaluate_keys: tuple[str, ...]  # what `budgetlora evaluate` prints
    probabilities_note: str  # the card's sentence on what its probabilities are

    def metrics(self, logits, labels, num_labels: int, settings: dict | None = None) -> dict:
        raise NotImplementedError

    def fit(self, val_logits, val_labels) -> dict:
        """The decision settings fitted on validation, as metrics.json keeps them."""
        raise NotImplementedError

    def run_metrics(self, val_logits, val_labels, test_logits, test_labels, num_labels: int):
        """Validation and test metrics at the settings fitted on validation, and the task's keys of metrics.json."""
        raise NotImplementedError

    def settings(self, metrics: dict, num_labels: int, where) -> dict:
        """A run's decision settings, read from its metrics.json (`where` names the run in the error)."""
        return {}

    def decide(self, logits, settings: dict) -> np.ndarray:
        """Answers from logits: class ids (n,), or a 0/1 label-set matrix (n, num_labels)."""
        raise NotImplementedError

    def answer_cells(self, decided: np.ndarray, delimiter: str) -> list:
        raise NotImplementedError

    def label_counts(self, labels, num_labels: int) -> list[int]:
        """Training rows per class (a multi-label row counts once per label of its set)."""
        raise NotImplementedError

    def pool(self, window_logits: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
        """One row of logits per text from the logits of its windows (`owner`: each window's text)."""
        raise NotImplementedError


class SingleLabel(Task):
    def metrics(self, logits, labels, num_labels, settings=None):
        return class_metrics(logits, labels, num_labels)

    def fit(self, val_logits, val_labels):
        return {"temperature": fit_temperature(val_logits, val_labels)}

    def run_metrics(self, val_logits, val_labels, test_logits, test_labels, num_labels):
        val_m = class_metrics(val_logits, val_labels, num_labels)
        test_m = class_metrics(test_logits, test_labels, num_labels)
        keys = {"test_per_class_accuracy": test_m["per_class_accuracy"],
                "test_confusion_matrix": test_m["confusion_matrix"],
                "val_confusion_matrix": val_m["confusion_matrix"],
                # softmax temperature calibrated on validation; prior correction divides logits by it first
                **self.fit(val_logits, val_labels)}
        return val_m, test_m, keys

    def decide(self, logits, settings):
        return np.asarray(logits).argmax(axis=1)

    def answer_cells(self, decided, delimiter):
        return [int(x) for x in decided]

    def label_counts(self, labels, num_labels):
        return np.bincount(np.asarray(labels), minlength=num_labels).tolist()

    def pool(self, window_logits, owner, n):
        # the mean of the windows' logits: each window's evidence counts by its length share of the text, and an
        # equal vote is what a text of one topic throughout needs (benchmarks/long_texts.py compares the rules)
        return _pooled(window_logits, owner, n, np.add.at) / np.bincount(owner, minlength=n)[:, None]


class MultiLabel(Task):
    def metrics(self, logits, labels, num_labels, settings=None):
        return multilabel_metrics(logits, labels, (settings or {}).get("thresholds"))

    def fit(self, val_logits, val_labels):
        return {"thresholds": tune_thresholds(val_logits, val_labels)}

    def run_metrics(self, val_logits, val_labels, test_logits, test_labels, num_labels):
        settings = self.fit(val_logits, val_labels)
        val_m = self.metrics(val_logits, val_labels, num_labels, settings)
        test_m = self.metrics(test_logits, test_labels, num_labels, settings)
        keys = {"problem_type": "multi", **settings,
                "val_micro_f1": val_m["micro_f1"], "test_micro_f1": test_m["micro_f1"],
                "val_subset_accuracy": val_m["subset_accuracy"], "test_subset_accuracy": test_m["subset_accuracy"],
                "val_per_label_f1": val_m["per_label_f1"], "test_per_label_f1": test_m["per_label_f1"],
                "val_rows": val_m["n"], "test_rows": test_m["n"]}
        return val_m, test_m, keys

    def settings(self, metrics, num_labels, where):
        thresholds = metrics.get("thresholds")
        if not isinstance(thresholds, list) or len(thresholds) != num_labels:
            raise RunFolderError(f"{where}: metrics.json holds no per-label thresholds for this multi-label run")
        return {"thresholds": [float(t) for t in thresholds]}

    def decide(self, logits, settings):
        return label_sets(logits, settings["thresholds"])

    def answer_cells(self, decided, delimiter):
        return format_sets(decided, delimiter)

    def label_counts(self, labels, num_labels):
        return np.asarray(labels).sum(axis=0).astype(int).tolist()

    def pool(self, window_logits, owner, n):
        # the largest logit per label: a label of any one part of a text is a label of the text
        return _pooled(window_logits, owner, n, np.maximum.at, start=-np.inf)


def _pooled(window_logits: np.ndarray, owner: np.ndarray, n: int, combine, start: float = 0.0) -> np.ndarray:
    out = np.full((n, window_logits.shape[1]), start, dtype=np.float64)
    combine(out, owner, np.asarray(window_logits, dtype=np.float64))
    return out.astype(np.float32)


TASKS: dict[str, Task] = {
    "single": SingleLabel(
        "single", sets=False, answer_column="Label",
        evaluate_keys=("accuracy", "loss", "macro_f1", "per_class_accuracy", "n"),
        probabilities_note="The probabilities are softmax outputs; metrics.json holds a temperature fitted on "
                           "validation (T = {temperature:.3g}) for calibrated use."),
    "multi": MultiLabel(
        "multi", sets=True, answer_column="Labels",
        evaluate_keys=("accuracy", "loss", "micro_f1", "macro_f1", "per_label_f1", "thresholds", "n"),
        probabilities_note="The probabilities are one sigmoid per label; a label is predicted at or above its "
                           "threshold, tuned on validation (metrics.json `thresholds`)."),
}


def task_of(cfg) -> Task:
    """The task a config trains (model.problem_type)."""
    return TASKS[cfg.model.problem_type]


def class_names(cfg, stored=None) -> list[str]:
    """The names a run's classes go by: those it was reported with (`stored`, metrics.json), the config's
    (data.class_names), a multi-label run's own 0/1 label columns, the default dataset's (AG News) when it trains on
    that, else the label ids."""
    n = cfg.model.num_labels
    if isinstance(stored, list) and len(stored) == n:
        return [str(x) for x in stored]
    if cfg.data.class_names:
        return [str(c) for c in cfg.data.class_names]
    if cfg.data.label_columns:
        return [str(c) for c in cfg.data.label_columns]
    if cfg.data.train in ("", "ag_news") and n == len(AG_NEWS_CLASSES):
        return list(AG_NEWS_CLASSES)
    return [str(i) for i in range(n)]
