"""Prior-corrected predictions for a file: the shift analysis decides (EM and BBSE agree, the texts did not move)
whether the corrected posteriors replace argmax; the labels and the decision are written side by side, and returned
to the caller as they were made."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.errors import ConfigError
from budgetlora.inference.load import load_run
from budgetlora.inference.predict import Columns, columns, predict_file, read_unlabelled, write_submission
from budgetlora.shift.analysis import analyse
from budgetlora.shift.mix import fit_to_mix, parse_prior
from budgetlora.shift.priors import calibrated_probabilities, priors_path


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
        if self.priors is not None and self.priors["decision"]["mode"] == "known-mix":
            est = self.priors
            lines += [f"fitted to the class mix {est['target_prior']}: predicted shares {est['shares_before']} -> "
                      f"{est['shares_after']}, {est['labels_changed']:,} labels changed -> {self.priors_file}"]
        elif self.priors is not None:
            est, d = self.priors, self.priors["decision"]
            lines += [f"estimated class priors {est['priors']} (EM; BBSE {(est['bbse'] or {}).get('priors')}; trained "
                      f"under {est['train_priors']}) -> {self.priors_file}",
                      f"prior correction {'applied' if d['apply'] else 'not applied'} ({d['mode']}): "
                      + "; ".join(d["reasons"])]
        return lines


def predict(run: str | Path, source: str, output: str | Path, prior_correction: str = "off",
            base: str | None = None, max_length: int = 0, target_prior: str = "", proba: bool = False,
            top_k: int | None = None) -> Prediction:
    """`budgetlora predict`: argmax labels (prior_correction 'off'), prior-corrected ones ('auto': where
    priors.decide lets them; 'on': always), or, with `target_prior`, posteriors fitted to a known class mix; the
    last two with `<output>.priors.json` beside them. `proba` / `top_k` add the probabilities the labels were
    taken from (inference.predict.Columns): the plain softmax without correction, else the corrected posteriors."""
    if target_prior:
        if prior_correction != "off":
            raise ConfigError("give either --target-prior (a known class mix) or --prior-correction (an estimated "
                              "one), not both")
        return predict_known_mix(run, source, output, target_prior, base=base, max_length=max_length, proba=proba,
                                 top_k=top_k)
    if prior_correction == "off":
        labels = predict_file(run, source, output, base=base, max_length=max_length, proba=proba, top_k=top_k)
        return Prediction(labels, Path(output))
    return predict_adapted(run, source, output, mode=prior_correction, base=base, max_length=max_length,
                           proba=proba, top_k=top_k)


def predict_adapted(run: str | Path, source: str, output: str | Path, mode: str = "auto", base: str | None = None,
                    max_length: int = 0, proba: bool = False, top_k: int | None = None) -> Prediction:
    """Labels for every row of `source` with prior correction: 'auto' (EM-corrected posteriors only where
    priors.decide lets them) or 'on' (always). The estimates, the separability and the decision are written to
    `<output>.priors.json`, the labels to `output` as ID,Label."""
    cols = columns(run, proba, top_k)  # a bad --top-k is refused before the model loads
    _check_outputs(output)
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is written
    loaded.max_length = max_length
    texts = read_unlabelled(source, loaded.cfg)
    return write_adapted(output, analyse(loaded, texts, mode=mode, progress=True), source, cols.named(loaded))


def write_adapted(output: str | Path, result, source: str, cols: Columns | None = None) -> Prediction:
    """The labels a shift.ShiftResult decided on, written as ID,Label (and the `cols` asked for: the posteriors
    the labels are the argmax of), with `<output>.priors.json` beside them."""
    labels, n = result.labels, result.probs.shape[1]
    priors = {
        **result.em.as_dict(), "bbse": None if result.bbse is None else result.bbse.as_dict(),
        "source": str(source), "rows": len(labels), "read_length": result.report["read_length"],
        "decision": result.decision.as_dict(), "separability": result.report["separability"],
        "label_counts_uncorrected": np.bincount(result.probs.argmax(1), minlength=n).tolist(),
        "label_counts_corrected": np.bincount(result.em.posteriors.argmax(1), minlength=n).tolist(),
        "label_counts_written": np.bincount(labels, minlength=n).tolist()}
    runs.write_json(priors_path(output), priors)
    # the calibrated posteriors, corrected where the gate applied the correction: exactly what `labels` came from
    write_submission(output, labels, result.em.posteriors if result.decision.apply else result.probs, cols)
    return Prediction(labels, Path(output), priors)


def predict_known_mix(run: str | Path, source: str, output: str | Path, target_prior, base: str | None = None,
                      max_length: int = 0, proba: bool = False, top_k: int | None = None) -> Prediction:
    """Labels for every row of `source` from posteriors fitted to a class mix the user knows (shift.mix): the
    validation-calibrated posteriors of the whole set are scaled per class until they average to the mix, then
    argmax. The mix, the shares before and after and the labels changed go to `<output>.priors.json`."""
    mix = parse_prior(target_prior, runs.load_config(Path(run)).model.num_labels)  # refused before any loading
    cols = columns(run, proba, top_k)
    _check_outputs(output)
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is written
    loaded.max_length = max_length
    texts = read_unlabelled(source, loaded.cfg)
    probs = calibrated_probabilities(loaded.logits(texts, progress=True), loaded.metrics.get("temperature"))
    return write_known_mix(output, fit_to_mix(probs, mix), source, loaded.read_length, cols.named(loaded))


def write_known_mix(output: str | Path, fit, source: str, read_length: int, cols: Columns | None = None) -> Prediction:
    """The labels of a mix fit, written as ID,Label (and the `cols` asked for, from the fitted posteriors), with
    the fit and its decision in `<output>.priors.json`."""
    reasons = [f"the class mix was given: {fit.target.round(4).tolist()}"]
    if not fit.converged:
        reasons.append(f"the fit stopped after {fit.iterations} iterations without reaching it (a class the model "
                       "never predicts cannot be raised)")
    priors = {**fit.as_dict(), "source": str(source), "read_length": read_length,
              "decision": {"mode": "known-mix", "apply": True, "reasons": reasons},
              "label_counts_uncorrected": _counts(fit, before=True),
              "label_counts_written": _counts(fit, before=False)}
    runs.write_json(priors_path(output), priors)
    write_submission(output, fit.labels, fit.posteriors, cols)
    return Prediction(fit.labels, Path(output), priors)


def _check_outputs(output: str | Path) -> None:
    runs.check_output(output)
    runs.check_output(priors_path(output))


def _counts(fit, before: bool) -> list[int]:
    shares = fit.shares_before if before else fit.shares_after
    return [int(round(x * len(fit.posteriors))) for x in shares]
