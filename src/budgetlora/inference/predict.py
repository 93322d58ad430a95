"""Predictions from a finished run: metrics on a labelled file, ID,Label for an unlabelled one (with, on request,
the probabilities the labels came from)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.data.readers import load_split
from budgetlora.errors import ConfigError, RunFolderError
from budgetlora.inference.classifier import _class_names
from budgetlora.inference.load import load_run
from budgetlora.training.evaluate import metrics, softmax
from budgetlora.training.multilabel import format_sets, label_sets, multilabel_metrics


def evaluate_run(run: str | Path, source: str = "", base: str | None = None) -> dict:
    """Metrics of a saved run on a labelled file (default: the config's test split)."""
    loaded = load_run(run, base=base)
    cfg = loaded.cfg
    multi = cfg.model.problem_type == "multi"
    data = load_split(source or cfg.data.test, "test", cfg.data, cfg.model.num_labels, multi=multi)
    logits = loaded.logits(data.texts, progress=True)
    if multi:  # at the thresholds the run was reported with
        return multilabel_metrics(logits, data.labels, loaded.metrics.get("thresholds"))
    return metrics(logits, data.labels, cfg.model.num_labels)


def read_unlabelled(source: str, cfg: Config) -> list[str]:
    return load_split(source, "test", cfg.data, cfg.model.num_labels, labelled=False).texts


@dataclass(frozen=True)
class Columns:
    """What a predictions file holds after ID,Label: with `proba`, one probability per class (p_<class name>);
    with `top_k`, the K most probable label ids, each followed by its probability (top1, top1_p, ...)."""

    proba: bool = False
    top_k: int = 0
    names: tuple[str, ...] = ()  # the run's class names, which the p_ columns are named by

    @property
    def wanted(self) -> bool:
        return self.proba or self.top_k > 0

    def named(self, loaded) -> Columns:
        """These columns, named by a loaded run's class names."""
        return replace(self, names=tuple(_class_names(loaded)))

    def header(self, num_labels: int) -> list[str]:
        names = list(self.names)
        # a column name must say which class it is: unnamed, mismatched or repeated names fall back to the ids
        if len(names) != num_labels or len(set(names)) != num_labels:
            names = [str(i) for i in range(num_labels)]
        out = [f"p_{x}" for x in names] if self.proba else []
        for k in range(1, self.top_k + 1):
            out += [f"top{k}", f"top{k}_p"]
        return out

    def values(self, probs: np.ndarray) -> list[list[str]]:
        """One row of cells per text. Each probability is written as the shortest text that reads back as the
        same float, so the written columns rank the classes exactly as the labels were chosen (argmax == Label)."""
        # stable, so equal probabilities keep the lower id first, as argmax does
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
        rows = []
        for p, top in zip(probs, order):
            row = [str(x) for x in p] if self.proba else []
            for i in top:
                row += [str(int(i)), str(p[i])]
            rows.append(row)
        return rows


def columns(run: str | Path, proba: bool = False, top_k: int | None = None) -> Columns:
    """The columns asked for, checked against the run's config before anything is loaded or written. top_k: None
    for none; otherwise 1 to the run's number of classes."""
    if top_k is None:
        return Columns(proba=bool(proba))
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigError(f"--top-k must be a whole number of at least 1, got {top_k!r}")
    n = runs.load_config(Path(run)).model.num_labels
    if top_k > n:
        raise ConfigError(f"--top-k {top_k} is more than the run's {n} classes")
    return Columns(proba=bool(proba), top_k=int(top_k))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Plain softmax, as `Classifier.predict_proba` answers; in float64, where two different logits never share
    a probability, so argmax of the probabilities is argmax of the logits."""
    return softmax(np.asarray(logits, dtype=np.float64))


def write_submission(path: str | Path, labels: np.ndarray, probs: np.ndarray | None = None,
                     cols: Columns | None = None) -> None:
    """ID,Label, and the probability columns of `cols` when it asks for any (computed from `probs`)."""
    cols = cols if cols is not None and cols.wanted else None
    if cols is not None and (probs is None or len(probs) != len(labels)):
        raise ValueError("probability columns need one row of probabilities per label")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if cols is None:
        w.writerow(["ID", "Label"])
        w.writerows(enumerate(int(x) for x in labels))
    else:
        w.writerow(["ID", "Label", *cols.header(probs.shape[1])])
        w.writerows([i, int(x), *cells] for i, (x, cells) in enumerate(zip(labels, cols.values(probs))))
    runs.write_text(Path(path), buf.getvalue())


def predict_file(run: str | Path, source: str, output: str | Path, base: str | None = None,
                 max_length: int = 0, proba: bool = False, top_k: int | None = None) -> np.ndarray:
    """Argmax labels for every row of `source`, in row order, written as ID,Label after the reload check passed;
    `proba` / `top_k` add the softmax probabilities (see `Columns`).
    max_length: tokens read per text (0 = the run's model.max_length); longer reads long texts past the training cut.
    Prior-corrected labels come from `budgetlora.shift.predict.predict_adapted`, which composes the shift analysis.
    """
    cols = columns(run, proba, top_k)  # a bad --top-k is refused before the model loads
    runs.check_output(output)
    # a folder that is no run is refused by load_run below, in its words
    if (Path(run) / runs.CONFIG).is_file() and runs.load_config(Path(run)).model.problem_type == "multi":
        if cols.wanted:
            raise ConfigError("--proba and --top-k apply to single-label runs only (model.problem_type single)")
        return predict_sets(run, source, output, base=base, max_length=max_length)
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is written
    loaded.max_length = max_length
    logits = loaded.logits(read_unlabelled(source, loaded.cfg), progress=True)
    labels = logits.argmax(1)
    write_submission(output, labels, probabilities(logits) if cols.wanted else None, cols.named(loaded))
    return labels


def predict_sets(run: str | Path, source: str, output: str | Path, base: str | None = None,
                 max_length: int = 0) -> np.ndarray:
    """A multi-label run's answers: ID,Labels, each row's label ids at or above their thresholds (metrics.json
    `thresholds`) joined by data.label_delimiter, '' for none. Returns the (n, num_labels) 0/1 matrix."""
    runs.check_output(output)
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is written
    loaded.max_length = max_length
    thresholds = loaded.metrics.get("thresholds")
    if not isinstance(thresholds, list) or len(thresholds) != loaded.cfg.model.num_labels:
        raise RunFolderError(f"{run}: metrics.json holds no per-label thresholds for this multi-label run")
    chosen = label_sets(loaded.logits(read_unlabelled(source, loaded.cfg), progress=True), thresholds)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ID", "Labels"])
    w.writerows(enumerate(format_sets(chosen, loaded.cfg.data.label_delimiter)))
    runs.write_text(Path(output), buf.getvalue())
    return chosen
