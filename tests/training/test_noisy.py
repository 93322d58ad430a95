"""The noisy-label filter's first pass: where it scores the rows, what it returns, and that it trains exactly as the
run it filters for (the loop's own optimizer groups, schedule and method step hooks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from budgetlora import runs
from budgetlora.data.readers import load_data
from budgetlora.training import loop
from budgetlora.training.noisy import record_points, training_probabilities
from budgetlora.training.train import train
from tests.conftest import tiny_config


def test_record_points():
    cfg = tiny_config(("x", "y"), **{"train.max_steps": 0, "train.eval_every": 0, "train.epochs": 3.0,
                                     "train.batch_size": 10})
    assert record_points(cfg, 100) == (30, [10, 20, 30])  # one per epoch
    assert record_points(cfg.replace(**{"train.epochs": 1.0}), 100) == (10, [3, 7, 10])  # spread when < 3
    steps = loop.count_steps(cfg.train, 100)  # the one step count the loop and the first pass share
    assert (steps.total, steps.per_epoch, steps.eval_every) == (30, 10, 10)
    assert loop.count_steps(cfg.replace(**{"train.max_steps": 7}).train, 100).total == 7


@pytest.mark.slow
def test_training_probabilities_shape(small_csvs):
    cfg = tiny_config(small_csvs, **{"data.train_limit": 60, "train.max_steps": 3})
    train_split = load_data(cfg)["train"]
    probs = training_probabilities(cfg, train_split)
    assert probs.shape == (3, len(train_split), 4)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert not np.allclose(probs[0], probs[-1])  # the model moved between records


class LoopSpy:
    """Wraps loop.run: records each pass's optimizer groups (as set up, before the schedule moves them), the
    method hooks' calls, and the trained weights at the end."""

    def __init__(self, monkeypatch):
        self.passes: list[dict] = []
        self.real = loop.run
        monkeypatch.setattr(loop, "run", self)

    def __call__(self, fit, *args, **kwargs):
        hooks = fit.hooks
        seen = {"groups": sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in fit.optimizer.param_groups),
                "hooks": type(hooks).__name__, "after_step": [], "penalty": 0}
        after, penalty = hooks.after_step, hooks.penalty

        def spied_after(m, step):
            seen["after_step"].append(step)
            return after(m, step)

        def spied_penalty(m):
            seen["penalty"] += 1
            return penalty(m)

        hooks.after_step, hooks.penalty = spied_after, spied_penalty
        state = self.real(fit, *args, **kwargs)
        seen["weights"] = loop.trainable_state(fit.module)
        self.passes.append(seen)
        return state


@pytest.mark.slow
@pytest.mark.parametrize("overrides,hooks", [
    ({"method": "lora", "lora.b_lr_ratio": 4.0}, "StepHooks"),
    ({"method": "adalora", "adalora.init_r": 4, "adalora.target_r": 2, "adalora.delta_t": 1}, "AdaLoraHooks"),
])
def test_first_pass_trains_as_the_run_does(small_csvs, tmp_path, monkeypatch, overrides, hooks):
    """LoRA+ and AdaLoRA: the first pass over some rows and a run over the same rows set up the same optimizer
    groups, call the method's hooks at the same steps, and end on the same weights."""
    cfg = tiny_config(small_csvs, **{"data.train_limit": 80, "train.max_steps": 4, "train.eval_every": 4,
                                     "train.threads": 1, **overrides})
    data = load_data(cfg)
    spy = LoopSpy(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run sets train.threads: the same summation order in both passes
    try:
        training_probabilities(cfg, data["train"])
    finally:
        torch.set_num_threads(threads)
    train(cfg, root=tmp_path, data=data)
    first, run = spy.passes
    assert first["groups"] == run["groups"]
    if cfg.method == "lora":  # LoRA+: the B matrices have their own, larger learning rate in both
        assert {lr for lr, _, _ in first["groups"]} == {cfg.train.lr, cfg.train.lr * 4.0}
    assert first["hooks"] == run["hooks"] == hooks
    assert first["after_step"] == run["after_step"] == [0, 1, 2, 3]
    assert first["penalty"] == run["penalty"] == 4
    assert first["weights"].keys() == run["weights"].keys()
    for name, w in first["weights"].items():
        torch.testing.assert_close(w, run["weights"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_noisy_filter_report_in_metrics(noisy_run):
    m = runs.read_json(noisy_run / runs.METRICS)
    rep = m["filters"]["noisy_fraction"]
    assert rep["removed"] == round(0.05 * 200) == sum(rep["per_class"])
    assert len(rep["per_class"]) == 4 and rep["records"] == 3
    assert rep["kept"] == m["filters"]["kept"] == 190 == sum(m["train_class_counts"])


def test_the_noisy_pass_borrows_the_runs_accelerator(small_csvs, tmp_path, monkeypatch):
    """One Accelerator per run: making a second one resets accelerate's process-wide state, which the noisy-label
    pass inside a live run must not do (and its model is let go before the run prepares its own)."""
    made = []
    make = loop.make_accelerator
    monkeypatch.setattr(loop, "make_accelerator", lambda tc: made.append(make(tc)) or made[-1])
    cfg = tiny_config(small_csvs, **{"data.train_limit": 120, "data.test_limit": 20, "train.max_steps": 2,
                                     "filter.noisy_fraction": 0.05})
    out = train(cfg, root=tmp_path)
    assert runs.is_finished(out) and len(made) == 1
    assert runs.read_json(out / runs.METRICS)["filters"]["noisy_fraction"]["removed"] > 0
