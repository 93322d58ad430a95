"""How sure a comparison is: intervals over seeds and over test rows, and paired tests between two configs that were
scored on the same test rows.

Every function takes per-row correctness, a (seeds, rows) boolean matrix: row j of every seed is the same test
text, so two configs can be compared row by row. Resampling the rows (not the seeds) is what makes the bootstrap
honest about the test set's size: 7,600 rows give an accuracy interval of about +-0.6 points around 0.9, and a
difference between two configs evaluated on the same rows is measured far more tightly than either accuracy alone,
because most rows are answered alike by both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def _as_matrix(correct) -> np.ndarray:
    m = np.asarray(correct, dtype=bool)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[1] == 0:
        raise ValueError(f"per-row correctness must be a (seeds, rows) matrix with rows, got shape {m.shape}")
    return m


def seed_interval(values, level: float = LEVEL) -> Interval:
    """Mean of one score over seeds with a Student-t interval; a single seed has no spread to show (low = high)."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return Interval(mean, mean, mean)
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return Interval(mean, mean - half, mean + half)


def _bootstrap_means(per_row: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `per_row` over rows drawn with replacement, `resamples` times; drawn in chunks so that 7,600 rows
    x 2,000 resamples never sit in memory at once."""
    rng, out = np.random.default_rng(seed), []
    for start in range(0, resamples, 250):
        idx = rng.integers(0, len(per_row), size=(min(250, resamples - start), len(per_row)))
        out.append(per_row[idx].mean(axis=1))
    return np.concatenate(out)


def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    return float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))


def row_interval(correct, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Accuracy pooled over seeds, with a percentile bootstrap over test rows (the same rows drawn for every seed)."""
    m = _as_matrix(correct)
    per_row = m.mean(axis=0)  # each row's share of seeds that got it right
    return Interval(float(per_row.mean()), *_percentiles(_bootstrap_means(per_row, resamples, seed), level))


@dataclass(frozen=True)
class Paired:
    difference: Interval  # accuracy of a minus b, pooled over seeds, bootstrap over rows
    mcnemar_p: float  # exact McNemar test on the discordant (seed, row) pairs
    only_a: int  # (seed, row) pairs a got right and b wrong
    only_b: int

    @property
    def significant(self) -> bool:
        """Different at the level the interval was drawn at: the interval of the difference excludes zero."""
        return self.difference.low > 0 or self.difference.high < 0

    def as_dict(self) -> dict:
        return {"difference": self.difference.as_dict(), "mcnemar_p": self.mcnemar_p, "only_a": self.only_a,
                "only_b": self.only_b, "significant": self.significant}


def paired(correct_a, correct_b, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Paired:
    """Compare two configs on the same test rows. Seeds are paired by position when both have as many, else each
    config's seeds are averaged per row first; either way rows are resampled jointly, so the interval reflects the
    rows' shared difficulty instead of counting it twice."""
    a, b = _as_matrix(correct_a), _as_matrix(correct_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired comparison needs the same test rows: {a.shape[1]} vs {b.shape[1]} rows")
    diff_rows = a.mean(axis=0) - b.mean(axis=0)
    if not diff_rows.any():  # identical answers on every row: no resampling can make them differ
        return Paired(Interval(0.0, 0.0, 0.0), 1.0, 0, 0)
    interval = Interval(float(diff_rows.mean()), *_percentiles(_bootstrap_means(diff_rows, resamples, seed), level))
    if a.shape[0] == b.shape[0]:
        only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    else:  # seeds cannot be paired: a sign test on the rows whose mean answer over seeds differs (a majority vote
        # would count a row one seed of two got right as right, and find differences between equals)
        only_a, only_b = int((diff_rows > 0).sum()), int((diff_rows < 0).sum())
    p = float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return Paired(interval, p, only_a, only_b)


def paired_macro_f1(gold, pred_a, pred_b, num_labels: int, level: float = LEVEL, resamples: int = RESAMPLES // 4,
                    seed: int = 0) -> Interval:
    """Macro-F1 of a minus b on the same rows, with a paired percentile bootstrap: F1 is not a mean over rows, so
    the score itself is recomputed on each resample of the rows, the same resample for both."""
    from budgetlora.tasks import macro_f1

    gold, pred_a, pred_b = (np.asarray(x) for x in (gold, pred_a, pred_b))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(gold), len(gold))
        diffs.append(macro_f1(gold[i], pred_a[i], num_labels) - macro_f1(gold[i], pred_b[i], num_labels))
    d = macro_f1(gold, pred_a, num_labels) - macro_f1(gold, pred_b, num_labels)
    return Interval(d, *_percentiles(np.asarray(diffs), level))
