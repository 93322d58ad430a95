"""Fitting a target set's posteriors to a known class mix."""
from __future__ import annotations

import numpy as np
import pytest

from budgetlora.errors import ConfigError
from budgetlora.inference.mix import fit_to_mix, parse_prior, shares_differ


def _skewed(rng, n=4000, c=4, bias=(0.0, 0.0, 0.0, 0.8)) -> tuple[np.ndarray, np.ndarray]:
    """Balanced true classes, posteriors tilted toward the last class, as a model is on texts that moved."""
    y = np.arange(n) % c
    logits = rng.normal(0, 1.0, (n, c)) + 2.0 * np.eye(c)[y] + np.asarray(bias)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y


def test_fit_reaches_the_mix_and_recovers_accuracy():
    p, y = _skewed(np.random.default_rng(0))
    fit = fit_to_mix(p, parse_prior("uniform", 4))
    assert fit.converged and np.abs(fit.posteriors.mean(0) - 0.25).max() < 1e-5
    assert np.abs(fit.shares_after - 0.25).max() < np.abs(fit.shares_before - 0.25).max() / 3
    assert (fit.labels == y).mean() > (p.argmax(1) == y).mean() + 0.01  # the tilt cost accuracy; the fit wins it back
    assert fit.changed == int((fit.labels != p.argmax(1)).sum()) > 0


def test_nothing_changes_when_the_posteriors_already_average_to_the_mix():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=1000)
    p = np.concatenate([p, p[:, [1, 2, 3, 0]], p[:, [2, 3, 0, 1]], p[:, [3, 0, 1, 2]]])  # column means exactly equal
    fit = fit_to_mix(p, parse_prior("uniform", 4))
    assert fit.changed == 0 and fit.iterations == 1 and np.allclose(fit.posteriors, p)


def test_a_label_shift_prior_is_reached():
    p, _ = _skewed(np.random.default_rng(2), bias=(0, 0, 0, 0))
    target = parse_prior("0.4,0.3,0.2,0.1", 4)
    fit = fit_to_mix(p, target)
    assert np.allclose(fit.posteriors.mean(0), target, atol=1e-5)
    assert fit.shares_after[0] > fit.shares_after[3]
    assert set(fit.as_dict()) >= {"target_prior", "shares_before", "shares_after", "labels_changed", "weights"}


@pytest.mark.parametrize("spec, msg", [("0.5,0.5", "has 2 shares"), ("0.5,0.5,0.5,-0.5", ">= 0"),
                                       ("0.3,0.3,0.3,0.3", "sum to 1"), ("uniformish", "expected 'uniform'"),
                                       ("nan,0.5,0.25,0.25", "finite")])
def test_a_malformed_prior_is_one_clear_error(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_prior(spec, 4)


def test_shares_that_stray_beyond_noise_are_named():
    rng = np.random.default_rng(3)
    balanced = rng.integers(0, 4, 8000)
    assert shares_differ(balanced, np.full(4, 0.25)) == []
    skewed = np.where(rng.random(8000) < 0.1, 3, balanced)  # about 32.5% class 3
    assert 3 in shares_differ(skewed, np.full(4, 0.25))
