"""Prior-corrected predictions for a file: the shift analysis decides (EM and BBSE agree, the texts did not move)
whether the corrected posteriors replace argmax; the labels and the decision are written side by side, and returned
to the caller as they were made."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.inference.load import load_run
from budgetlora.inference.predict import predict_file, read_unlabelled, write_submission
from budgetlora.shift.analysis import analyse
from budgetlora.shift.priors import priors_path


@dataclass
class Prediction:
    """Labels written to `output`; with prior correction, also what `<output>.priors.json` holds."""

    labels: np.ndarray
    output: Path
    priors: dict | None = None  # the estimates, the separability and the decision; None without prior correction

    @property
    def decision(self) -> dict | None:
        return None if self.priors is None else self.priors["decision"]

    @property
    def priors_file(self) -> Path:
        return priors_path(self.output)

    def summary(self) -> list[str]:
        """What `budgetlora predict` prints."""
        counts = dict(enumerate(np.bincount(self.labels).tolist()))
        lines = [f"wrote {len(self.labels):,} predictions to {self.output} (label counts {counts})"]
        if self.priors is not None:
            est, d = self.priors, self.priors["decision"]
            lines += [f"estimated class priors {est['priors']} (EM; BBSE {(est['bbse'] or {}).get('priors')}; trained "
                      f"under {est['train_priors']}) -> {self.priors_file}",
                      f"prior correction {'applied' if d['apply'] else 'not applied'} ({d['mode']}): "
                      + "; ".join(d["reasons"])]
        return lines


def predict(run: str | Path, source: str, output: str | Path, prior_correction: str = "off",
            base: str | None = None, max_length: int = 0) -> Prediction:
    """`budgetlora predict`: argmax labels (prior_correction 'off'), or prior-corrected ones ('auto': where
    priors.decide lets them; 'on': always) with `<output>.priors.json` beside them."""
    if prior_correction == "off":
        labels = predict_file(run, source, output, base=base, max_length=max_length)
        return Prediction(labels, Path(output))
    return predict_adapted(run, source, output, mode=prior_correction, base=base, max_length=max_length)


def predict_adapted(run: str | Path, source: str, output: str | Path, mode: str = "auto", base: str | None = None,
                    max_length: int = 0) -> Prediction:
    """Labels for every row of `source` with prior correction: 'auto' (EM-corrected posteriors only where
    priors.decide lets them) or 'on' (always). The estimates, the separability and the decision are written to
    `<output>.priors.json`, the labels to `output` as ID,Label."""
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is written
    loaded.max_length = max_length
    texts = read_unlabelled(source, loaded.cfg)
    return write_adapted(output, analyse(loaded, texts, mode=mode, progress=True), source)


def write_adapted(output: str | Path, result, source: str) -> Prediction:
    """The labels a shift.ShiftResult decided on, written as ID,Label, with `<output>.priors.json` beside them."""
    labels, n = result.labels, result.probs.shape[1]
    priors = {
        **result.em.as_dict(), "bbse": None if result.bbse is None else result.bbse.as_dict(),
        "source": str(source), "rows": len(labels), "read_length": result.report["read_length"],
        "decision": result.decision.as_dict(), "separability": result.report["separability"],
        "label_counts_uncorrected": np.bincount(result.probs.argmax(1), minlength=n).tolist(),
        "label_counts_corrected": np.bincount(result.em.posteriors.argmax(1), minlength=n).tolist(),
        "label_counts_written": np.bincount(labels, minlength=n).tolist()}
    runs.write_json(priors_path(output), priors)
    write_submission(output, labels)
    return Prediction(labels, Path(output), priors)
