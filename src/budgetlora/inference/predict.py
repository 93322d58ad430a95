"""Predictions from a finished run: metrics on a labelled file, ID,Label for an unlabelled one."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.data.readers import load_split
from budgetlora.inference.load import load_run
from budgetlora.training.evaluate import metrics


def evaluate_run(run: str | Path, source: str = "", base: str | None = None) -> dict:
    """Metrics of a saved run on a labelled file (default: the config's test split)."""
    loaded = load_run(run, base=base)
    cfg = loaded.cfg
    data = load_split(source or cfg.data.test, "test", cfg.data, cfg.model.num_labels)
    return metrics(loaded.logits(data.texts, progress=True), data.labels, cfg.model.num_labels)


def read_unlabelled(source: str, cfg: Config) -> list[str]:
    return load_split(source, "test", cfg.data, cfg.model.num_labels, labelled=False).texts


def write_submission(path: str | Path, labels: np.ndarray) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ID", "Label"])
    w.writerows(enumerate(int(x) for x in labels))
    runs.write_text(Path(path), buf.getvalue())


def predict_file(run: str | Path, source: str, output: str | Path, base: str | None = None,
                 max_length: int = 0) -> np.ndarray:
    """Argmax labels for every row of `source`, in row order, written as ID,Label after the reload check passed.
    max_length: tokens read per text (0 = the run's model.max_length); longer reads long texts past the training cut.
    Prior-corrected labels come from `budgetlora.shift.predict.predict_adapted`, which composes the shift analysis.
    """
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is written
    loaded.max_length = max_length
    labels = loaded.logits(read_unlabelled(source, loaded.cfg), progress=True).argmax(1)
    write_submission(output, labels)
    return labels
