"""The candidate space of a search under a budget: every candidate planned within the budget and filled to the
largest size that fits; a budget nothing fits is one line."""
from __future__ import annotations

import pytest

from budgetlora.adapters import budget, methods
from budgetlora.config import Config, ConfigError
from budgetlora.experiments.space import METHODS, candidate_space


@pytest.fixture(scope="module")
def space():
    return candidate_space(Config())


def test_every_candidate_fits_and_is_filled(space):
    names = [c.name for c in space]
    assert len(names) == len(set(names))
    assert {n.split("-")[0] for n in names} == set(METHODS)
    assert {c.cfg.lora.layers == [] for c in space} == {True, False}  # every layer, and the top half only
    for key in {(c.cfg.method, c.cfg.lora.dora, tuple(c.cfg.lora.targets), tuple(c.cfg.lora.layers)): c
                for c in space}.values():  # one check per adapter (the learning rates share it)
        p = budget.plan(key.cfg)
        assert p.total == key.trainable <= key.cfg.budget.max_params, key.name
        if p.setting and p.r != p.fill_cap:  # one more unit of the method's size would not fit
            bigger = budget.plan(methods.get(key.cfg.method).with_rank(key.cfg, p.r + 1))
            assert not bigger.fits, key.name


def test_learning_rates_are_the_methods_own(space):
    for c in space:
        assert c.cfg.train.lr in METHODS[c.name.split("-")[0]][1]


def test_a_budget_nothing_fits_is_one_line():
    with pytest.raises(ConfigError, match=r"no candidate fits the budget of 1,000 trainable parameters: the "
                                          r"smallest adapter with the head needs [\d,]+"):
        candidate_space(Config().replace(**{"budget.max_params": 1000}))
