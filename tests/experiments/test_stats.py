"""Intervals and paired marks on constructed per-row results, where the right answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from budgetlora.experiments.stats import paired, row_interval, seed_interval


def _correct(rng, accuracy: float, seeds: int = 3, rows: int = 2000) -> np.ndarray:
    return rng.random((seeds, rows)) < accuracy


def test_seed_interval_is_the_t_interval():
    iv = seed_interval([0.90, 0.91, 0.92])
    # mean 0.91, sd 0.01, t(0.975, 2) = 4.303: half width 4.303 * 0.01 / sqrt(3) = 0.02484
    assert iv.mean == pytest.approx(0.91)
    assert iv.half_width == pytest.approx(0.02484, abs=1e-4)
    one = seed_interval([0.9])
    assert one.low == one.high == 0.9


def test_row_interval_covers_the_truth_and_narrows_with_rows():
    rng = np.random.default_rng(0)
    small, large = row_interval(_correct(rng, 0.9, rows=500)), row_interval(_correct(rng, 0.9, rows=8000))
    assert small.low < 0.9 < small.high and large.low < 0.9 < large.high
    assert large.half_width < small.half_width / 2  # 16x the rows: a quarter of the width
    # one seed, 8,000 rows: binomial standard error sqrt(0.09 / 8000) = 0.00335, a 95% interval about +-1.96 of it
    assert row_interval(_correct(rng, 0.9, seeds=1, rows=8000)).half_width == pytest.approx(1.96 * 0.00335, rel=0.2)


def test_identical_predictions_are_never_marked_different():
    rng = np.random.default_rng(1)
    c = _correct(rng, 0.85)
    res = paired(c, c.copy())
    assert not res.significant and res.difference.mean == 0 and res.mcnemar_p == 1.0


def test_a_known_difference_is_detected_and_its_sign_kept():
    rng = np.random.default_rng(2)
    base = _correct(rng, 0.88)
    better = base.copy()
    wrong = np.argwhere(~better)
    fix = wrong[rng.choice(len(wrong), size=len(wrong) // 5, replace=False)]  # fix a fifth of the errors
    better[fix[:, 0], fix[:, 1]] = True
    res = paired(better, base)
    assert res.significant and res.difference.low > 0 and res.mcnemar_p < 0.001
    assert res.only_b == 0 and res.only_a == len(fix)
    assert paired(base, better).difference.high < 0


def test_a_difference_within_noise_is_not_marked():
    rng = np.random.default_rng(3)
    a, b = _correct(rng, 0.9, rows=1000), _correct(rng, 0.9, rows=1000)  # independent draws at the same accuracy
    assert not paired(a, b).significant


def test_rows_must_match():
    with pytest.raises(ValueError, match="same test rows"):
        paired(np.ones((1, 10), bool), np.ones((1, 11), bool))


def test_configs_with_different_seed_counts_and_the_same_accuracy_are_not_marked():
    # two seeds that each get a different half of the rows right against one seed right on half of them: the same
    # accuracy per row on average, so no test may call them different
    rng = np.random.default_rng(1)
    n = 4000
    first = rng.random(n) < 0.5
    a = np.stack([first, ~first])  # every row right exactly once in two seeds
    b = rng.permutation(np.arange(n) < n // 2)[None, :]  # exactly half right
    d = paired(a, b)
    assert d.difference.mean == 0.0 and not d.significant
    assert d.mcnemar_p > 0.01


def test_macro_f1_is_sklearns_and_its_paired_bootstrap_finds_a_real_gap():
    from sklearn.metrics import f1_score

    from budgetlora.experiments.stats import paired_macro_f1
    from budgetlora.tasks import macro_f1

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, 3000)
    good = np.where(rng.random(3000) < 0.9, gold, rng.integers(0, 4, 3000))
    poor = np.where(rng.random(3000) < 0.8, gold, 3)  # misses pile into class 3: a skew that F1 punishes
    for pred in (good, poor, np.full(3000, 2)):  # a class never predicted counts as F1 0, as in sklearn
        assert macro_f1(gold, pred, 4) == pytest.approx(f1_score(gold, pred, average="macro", zero_division=0))
    gap = paired_macro_f1(gold, good, poor, 4)
    assert gap.mean == pytest.approx(macro_f1(gold, good, 4) - macro_f1(gold, poor, 4))
    assert 0 < gap.low < gap.mean < gap.high
    same = paired_macro_f1(gold, good, good, 4)
    assert same.low == same.high == 0.0
