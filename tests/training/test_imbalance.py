"""Imbalanced classes: class weights (listed or counted from the training rows), focal loss, and the validation
metric that picks the kept state. The losses and the selection are checked on constructed numbers; one tiny run
checks that they train together and report what a comparison needs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from budgetlora import runs
from budgetlora.config import Config, ConfigError
from budgetlora.errors import DataError
from budgetlora.training import loop
from budgetlora.training.losses import FocalLoss, auto_class_weights, class_weights, make_loss
from tests.conftest import PUBLISHED, tiny_config


def _labels(*counts: int) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def test_auto_weights_are_inverse_frequency_with_mean_one():
    w = np.array(auto_class_weights(_labels(60, 25, 10, 5), 4))
    inverse = 1 / np.array([60, 25, 10, 5])
    np.testing.assert_allclose(w, inverse / inverse.mean())
    assert w.mean() == pytest.approx(1.0) and w[3] / w[0] == pytest.approx(12.0)
    np.testing.assert_allclose(auto_class_weights(_labels(7, 7, 7, 7), 4), [1, 1, 1, 1])


def test_auto_weights_refuse_a_class_without_rows():
    with pytest.raises(DataError, match=r"class\(es\) \[2\] have no training rows") as e:
        auto_class_weights(_labels(5, 5, 0, 5), 4)
    assert "\n" not in str(e.value)


def test_class_weights_from_the_config():
    labels = _labels(60, 25, 10, 5)
    assert class_weights(Config(), labels) is None
    listed = class_weights(Config().replace(**{"train.class_weights": "1,2,4,8"}), labels)
    assert listed.tolist() == [1.0, 2.0, 4.0, 8.0]
    auto = class_weights(Config().replace(**{"train.class_weights": "auto"}), labels)
    np.testing.assert_allclose(auto.numpy(), auto_class_weights(labels, 4), rtol=1e-6)


def _batch():
    torch.manual_seed(0)
    return torch.randn(64, 4) * 3, torch.randint(0, 4, (64,))


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, targets = _batch()
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert FocalLoss(0.0)(logits, targets).item() == pytest.approx(ce.item(), rel=1e-6)
    weight = torch.tensor([0.5, 1.0, 1.5, 2.0])
    weighted_ce = torch.nn.CrossEntropyLoss(weight=weight)(logits, targets)
    assert FocalLoss(0.0, weight)(logits, targets).item() == pytest.approx(weighted_ce.item(), rel=1e-6)


def test_focal_discounts_confident_correct_rows():
    targets = torch.tensor([0, 1, 2, 3])
    confident = torch.eye(4) * 6  # p(correct) ~ 0.99 on every row
    ce = torch.nn.functional.cross_entropy(confident, targets).item()
    focal = FocalLoss(2.0)(confident, targets).item()
    assert 0 < focal < ce / 50
    wrong = torch.eye(4).roll(1, dims=1) * 6  # confidently wrong: (1 - p)^2 ~ 1, nearly the whole CE is kept
    assert FocalLoss(2.0)(wrong, targets).item() == pytest.approx(
        torch.nn.functional.cross_entropy(wrong, targets).item(), rel=0.01)


def test_focal_gradient_stays_finite_at_certainty():
    logits = torch.tensor([[80.0, 0.0], [0.0, 80.0]], requires_grad=True)
    FocalLoss(0.5)(logits, torch.tensor([0, 1])).backward()
    assert torch.isfinite(logits.grad).all()


def test_make_loss_follows_the_config():
    tc = Config().train
    assert isinstance(make_loss(tc), torch.nn.CrossEntropyLoss)
    focal = make_loss(Config().replace(**{"train.loss": "focal", "train.focal_gamma": 1.5}).train)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5 and focal.weight is None


def test_class_weights_reach_the_training_loss():
    """setup_training (the one setup of both the run and the noisy pass) weighs its loss by the training rows."""
    labels = _labels(60, 25, 10, 5)
    logits, targets = _batch()
    losses = {}
    for spec in ("none", "auto"):
        cfg = Config().replace(**{"train.class_weights": spec, "train.precision": "fp32"})
        acc = loop.make_accelerator(cfg.train)
        loss_fn = loop.setup_training(acc, torch.nn.Linear(8, 4), cfg, 10, labels).loss_fn
        losses[spec] = loss_fn(logits, targets).item()
        if spec == "auto":
            np.testing.assert_allclose(loss_fn.weight.cpu().numpy(), auto_class_weights(labels, 4), rtol=1e-6)
    assert losses["none"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert abs(losses["auto"] - losses["none"]) > 1e-3


# -- train.select -------------------------------------------------------------------------------------------------
POINTS = [  # (step, loss, accuracy, macro_f1) of four validation points
    (10, 0.50, 0.80, 0.60),
    (20, 0.40, 0.82, 0.55),  # lowest loss
    (30, 0.60, 0.81, 0.70),  # best macro-F1
    (40, 0.45, 0.83, 0.65),  # best accuracy
]


def _select(select: str, patience: int = 0, points=POINTS) -> tuple[dict, list[int]]:
    tc = Config().replace(**{"train.select": select, "train.patience": patience}).train
    state, stopped = loop.TrainState(), []
    for step, loss, acc, f1 in points:
        state.step = step
        m = {"loss": loss, "accuracy": acc, "macro_f1": f1}
        if loop.keep_best(tc, m, state, lambda step=step: {"from_step": step}):
            stopped.append(step)
            break
    return state, stopped


@pytest.mark.parametrize("select,step,score", [("loss", 20, 0.40), ("macro_f1", 30, 0.70), ("accuracy", 40, 0.83)])
def test_select_keeps_the_best_state_by_its_metric(select, step, score):
    state, stopped = _select(select)
    assert state.best == {"from_step": step} and state.best_step == step and not stopped
    assert state.best_score == score
    assert state.best_loss == next(p[1] for p in POINTS if p[0] == step)  # the kept state's own loss


def test_patience_counts_evaluations_without_improvement_of_the_selected_metric():
    # by macro-F1: 20 falls short of 10, then 30 improves and resets the count; 40 alone falls short of 30
    state, stopped = _select("macro_f1", patience=2)
    assert not stopped and state.bad_evals == 1
    # by loss: 30 and 40 do not beat 20, so patience 2 stops at 40
    state, stopped = _select("loss", patience=2)
    assert stopped == [40] and state.best_step == 20
    # equal scores are no improvement: the earlier state stays
    flat = [(10, 0.5, 0.8, 0.6), (20, 0.4, 0.8, 0.6)]
    state, stopped = _select("macro_f1", patience=1, points=flat)
    assert stopped == [20] and state.best_step == 10


def test_a_checkpoint_from_before_select_resumes_by_loss():
    saved = {k: v for k, v in loop.TrainState().to_dict().items() if k not in ("best_score", "eval_time", "probe")}
    saved.update(best_loss=0.3, best={"from_step": 5}, best_step=5)
    old = loop.TrainState.from_dict(saved)
    assert old.best_score is None and old.eval_time == 0.0
    tc = Config().train
    assert not loop.keep_best(tc, {"loss": 0.35, "accuracy": 0.9, "macro_f1": 0.9}, old, dict)
    assert old.best_step == 5 and old.bad_evals == 1
    old.step = 7
    loop.keep_best(tc, {"loss": 0.2, "accuracy": 0.9, "macro_f1": 0.9}, old, lambda: {"from_step": 7})
    assert old.best_step == 7 and old.best_score == 0.2


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"train.class_weights": "1,2,3"}, "lists 3 weights for 4 classes"),
    ({"train.class_weights": "1,2,-3,4"}, "must all be positive"),
    ({"train.class_weights": "1,2,0,4"}, "must all be positive"),
    ({"train.class_weights": "1,2,nan,4"}, "must all be positive"),
    ({"train.class_weights": "heavy"}, "must be none, auto or 4 comma-separated numbers"),
    ({"train.class_weights": "1,2", "model.num_labels": 3}, "lists 2 weights for 3 classes"),
    ({"train.loss": "hinge"}, "train.loss must be one of ce, focal"),
    ({"train.select": "f1"}, "train.select must be one of loss, accuracy, macro_f1"),
    ({"train.loss": "focal", "train.focal_gamma": -1}, "train.focal_gamma must be >= 0"),
    ({"train.focal_gamma": 3}, "applies to train.loss focal only"),
    ({"train.loss": "focal", "train.label_smoothing": 0.1}, "label_smoothing applies to train.loss ce only"),
])
def test_bad_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        Config().replace(**overrides)
    assert "\n" not in str(e.value)


def test_listed_weights_read_from_yaml_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  class_weights: [1, 2, 4, 8]\n  loss: focal\n  select: macro_f1\n")
    cfg = Config.from_yaml(path)
    assert class_weights(cfg, None).tolist() == [1.0, 2.0, 4.0, 8.0]
    from budgetlora.cli import build_parser
    from budgetlora.config import from_flags

    args = build_parser().parse_args(["train", "--config", "minilm-quick", "--train.class_weights", "auto",
                                      "--train.loss", "focal", "--train.select", "macro_f1"])
    flagged = from_flags(args)
    assert (flagged.train.class_weights, flagged.train.loss, flagged.train.select) == ("auto", "focal", "macro_f1")


def test_run_ids_of_existing_configs_are_unchanged():
    preset = Config.from_yaml("minilm-default").replace(**PUBLISHED)
    assert preset.run_id == "a18e192f1c"
    spelled_out = preset.replace(**{"train.class_weights": "none", "train.loss": "ce", "train.focal_gamma": 2.0,
                                    "train.select": "loss"})
    assert spelled_out.run_id == preset.run_id
    changed = {preset.replace(**{k: v}).run_id for k, v in (("train.class_weights", "auto"),
                                                             ("train.loss", "focal"),
                                                             ("train.select", "macro_f1"))}
    assert len(changed) == 3 and preset.run_id not in changed
    focal = preset.replace(**{"train.loss": "focal"})
    assert focal.replace(**{"train.focal_gamma": 1.0}).run_id != focal.run_id


@pytest.mark.slow
def test_weighted_focal_run_selected_by_macro_f1(small_csvs, tmp_path):
    from budgetlora.training.train import train

    cfg = tiny_config(small_csvs, **{"train.class_weights": "auto", "train.loss": "focal",
                                     "train.select": "macro_f1", "train.max_steps": 4, "train.eval_every": 2,
                                     "data.train_limit": 200, "data.test_limit": 40})
    records = []
    out = train(cfg, root=tmp_path, on_record=records.append)
    m = runs.read_json(out / runs.METRICS)
    assert m["steps"] == 4
    for key in ("val_macro_f1", "test_macro_f1"):
        assert 0 <= m[key] <= 1
    assert len(m["test_per_class_accuracy"]) == 4 and all(0 <= r <= 1 for r in m["test_per_class_accuracy"])
    evals = [r for r in records if "val_macro_f1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    best = max(evals, key=lambda r: r["val_macro_f1"])  # ties keep the earlier state, as max does
    assert m["best_step"] == best["step"]
    assert runs.load_config(out).train.select == "macro_f1" and not math.isnan(m["test_loss"])


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_noisy_pass_and_run_train_under_the_same_loss(small_csvs, tmp_path, monkeypatch):
    """Both passes reach the loop with the same focal loss, weighted by the same skewed training rows (the loop
    itself is stopped before its first step: only its inputs are compared)."""
    from budgetlora.data.readers import load_data
    from budgetlora.training.noisy import training_probabilities
    from budgetlora.training.train import train

    cfg = tiny_config(small_csvs, **{"train.class_weights": "auto", "train.loss": "focal", "train.focal_gamma": 1.0})
    data = load_data(cfg)
    labels = data["train"].labels
    keep = np.concatenate([np.flatnonzero(labels == c)[: n] for c, n in enumerate((60, 25, 10, 5))])
    data["train"] = data["train"].subset(keep)
    seen = []

    def spy(fit, *args, **kwargs):
        seen.append(fit.loss_fn)
        raise _Stop

    monkeypatch.setattr(loop, "run", spy)
    with pytest.raises(_Stop):
        training_probabilities(cfg, data["train"])
    with pytest.raises(_Stop):
        train(cfg, root=tmp_path, data=data)
    first, run = seen
    assert isinstance(first, FocalLoss) and isinstance(run, FocalLoss) and first.gamma == run.gamma == 1.0
    expected = auto_class_weights(_labels(60, 25, 10, 5), 4)
    np.testing.assert_allclose(first.weight.cpu().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(run.weight.cpu().numpy(), expected, rtol=1e-6)
