"""Prior correction as a post-processor of `inference.predict.predict`: the shift analysis estimates the target's
class priors (EM, checked against BBSE) and decides whether the corrected posteriors replace argmax (`auto`: where
EM and BBSE agree and the texts did not move; `on`: always). `post_processor` turns the predict flags into the
post-processor they ask for."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from budgetlora.errors import ConfigError
from budgetlora.inference.mix import Adjusted, KnownMix
from budgetlora.shift.analysis import ShiftResult, analyse


def adapted(result: ShiftResult, source: str) -> Adjusted:
    """The labels a shift analysis decided on, the posteriors they are the argmax of (corrected where the gate
    applied the correction), and the record of the estimates, the separability and the decision."""
    labels, n = result.labels, result.probs.shape[1]
    record = {
        **result.em.as_dict(), "bbse": None if result.bbse is None else result.bbse.as_dict(),
        "source": str(source), "rows": len(labels), "read_length": result.report["read_length"],
        "decision": result.decision.as_dict(), "separability": result.report["separability"],
        "label_counts_uncorrected": np.bincount(result.probs.argmax(1), minlength=n).tolist(),
        "label_counts_corrected": np.bincount(result.em.posteriors.argmax(1), minlength=n).tolist(),
        "label_counts_written": np.bincount(labels, minlength=n).tolist()}
    return Adjusted(labels, result.em.posteriors if result.decision.apply else result.probs, record)


@dataclass(frozen=True)
class PriorCorrection:
    mode: str = "auto"  # auto (gated) or on (always)
    windows = False  # the analysis reads each text's start (its features come from one pass)

    def check(self, cfg) -> None:
        pass  # the mode was checked where it was parsed (config.use.PRIOR_CORRECTION)

    def __call__(self, loaded, texts: list[str], source: str) -> Adjusted:
        return adapted(analyse(loaded, texts, mode=self.mode, progress=True), source)


def post_processor(prior_correction: str = "off", target_prior: str = ""):
    """The post-processor `predict --prior-correction MODE` or `--target-prior MIX` asks for; None for neither."""
    if target_prior and prior_correction != "off":
        raise ConfigError("give either --target-prior (a known class mix) or --prior-correction (an estimated "
                          "one), not both")
    if target_prior:
        return KnownMix(target_prior)
    return PriorCorrection(prior_correction) if prior_correction != "off" else None
