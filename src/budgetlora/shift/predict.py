"""Prior-corrected predictions for a file: the shift analysis decides (EM and BBSE agree, the texts did not move)
whether the corrected posteriors replace argmax; the labels and the decision are written side by side."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.inference.load import load_run
from budgetlora.inference.predict import read_unlabelled, write_submission
from budgetlora.shift.analysis import analyse
from budgetlora.shift.priors import priors_path


def predict_adapted(run: str | Path, source: str, output: str | Path, mode: str = "auto", base: str | None = None,
                    max_length: int = 0) -> np.ndarray:
    """Labels for every row of `source` with prior correction: 'auto' (EM-corrected posteriors only where
    priors.decide lets them) or 'on' (always). The estimates, the separability and the decision are written to
    `<output>.priors.json`, the labels to `output` as ID,Label."""
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is written
    loaded.max_length = max_length
    texts = read_unlabelled(source, loaded.cfg)
    return write_adapted(output, analyse(loaded, texts, mode=mode, progress=True), source)


def write_adapted(output: str | Path, result, source: str) -> np.ndarray:
    """The labels a shift.ShiftResult decided on, written as ID,Label, with `<output>.priors.json` beside them."""
    labels, n = result.labels, result.probs.shape[1]
    runs.write_json(priors_path(output), {
        **result.em.as_dict(), "bbse": None if result.bbse is None else result.bbse.as_dict(),
        "source": str(source), "rows": len(labels), "read_length": result.report["read_length"],
        "decision": result.decision.as_dict(), "separability": result.report["separability"],
        "label_counts_uncorrected": np.bincount(result.probs.argmax(1), minlength=n).tolist(),
        "label_counts_corrected": np.bincount(result.em.posteriors.argmax(1), minlength=n).tolist(),
        "label_counts_written": np.bincount(labels, minlength=n).tolist()})
    write_submission(output, labels)
    return labels
