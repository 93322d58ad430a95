"""Self-training: pseudo-label selection, mixing, the settings section, a round, and starting from a parent run."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from budgetlora import runs
from budgetlora.adapters.budget import plan
from budgetlora.config import ConfigError
from budgetlora.shift.selftrain import mix_repeats, select_pseudo_labels, self_train


def test_select_pseudo_labels():
    probs = np.array([[0.95, 0.05, 0, 0], [0.99, 0.01, 0, 0], [0.92, 0.08, 0, 0],
                      [0.1, 0.9, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.97, 0.03]])
    rows, labels = select_pseudo_labels(probs, threshold=0.9, balance=True)  # smallest non-empty class has 1
    assert rows.tolist() == [1, 3, 5] and labels.tolist() == [0, 1, 2]
    rows, labels = select_pseudo_labels(probs, threshold=0.9, balance=False)
    assert rows.tolist() == [0, 1, 2, 3, 5]
    rows, _ = select_pseudo_labels(probs, threshold=0.9, balance=True, max_per_class=2)
    assert rows.tolist() == [0, 1, 3, 5]  # class 0 gives its two most confident rows, 1 and 0
    assert len(select_pseudo_labels(probs, threshold=0.999)[0]) == 0


def test_select_pseudo_labels_by_share():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, size=100)
    pred = np.repeat([0, 1, 2, 3], [40, 30, 20, 10])
    probs = np.zeros((100, 4))
    probs[np.arange(100), pred] = conf
    probs[np.arange(100), (pred + 1) % 4] = 1 - conf  # argmax stays pred for conf > 0.5 ...
    low = conf < 0.5
    probs[low, pred[low]], probs[low, (pred[low] + 1) % 4] = 0.51, 0.49  # ... and is forced for the rest
    rows, labels = select_pseudo_labels(probs, threshold=0.0, balance=False, share=0.3)
    assert np.bincount(labels, minlength=4).tolist() == [12, 9, 6, 3]  # ceil(30%) of 40, 30, 20, 10
    for c in range(4):  # each class's most confident rows, none of its others above them
        taken, left = rows[labels == c], np.setdiff1d(np.flatnonzero(pred == c), rows)
        assert probs[taken].max(1).min() >= probs[left].max(1).max()
    rows, labels = select_pseudo_labels(probs, threshold=0.0, balance=True, share=0.3)
    assert np.bincount(labels, minlength=4).tolist() == [3, 3, 3, 3]  # cut to the smallest class's share
    with pytest.raises(ConfigError, match="share"):
        select_pseudo_labels(probs, share=1.5)


def test_mix_repeats():
    assert mix_repeats(3000, 300, 0.0) == 1
    assert mix_repeats(3000, 300, 0.25) == round(0.25 / 0.75 * 10)  # 3 copies: 900 of 3,900 rows
    assert mix_repeats(100, 1000, 0.3) == 1  # never fewer than one copy
    with pytest.raises(ConfigError, match="mix"):
        mix_repeats(100, 10, 1.0)


def test_self_train_settings():
    from budgetlora.config.use import SelfTrainConfig

    assert SelfTrainConfig().min_confidence == 0.9 and SelfTrainConfig(share=0.3).min_confidence == 0.0
    assert SelfTrainConfig(share=0.3, threshold=0.5).min_confidence == 0.5
    assert SelfTrainConfig().overrides == {}
    assert SelfTrainConfig(max_steps=0, lr=1e-3).overrides == {"train.max_steps": 0, "train.lr": 1e-3}
    for bad, message in [({"rounds": 0}, "self_train.rounds"), ({"mix": 1.0}, "self_train.mix"),
                         ({"prior_correction": "sometimes"}, "off, auto, on"), ({"threshold": 2.0}, "threshold")]:
        with pytest.raises(ConfigError, match=message):
            SelfTrainConfig(**bad)
    with pytest.raises(ConfigError, match="self_train.share"):  # checked before any run is loaded
        self_train("no-such-run", "no-such-file", "out", share=1.5)


@pytest.mark.slow
def test_self_train_round(noisy_run, unlabelled, tmp_path):
    parent_m = runs.read_json(noisy_run / runs.METRICS)
    records = []
    # a gate no round can pass (validation accuracy must rise by a whole point): the round runs, is refused,
    # and is not returned
    made = self_train(noisy_run, str(unlabelled), tmp_path / "st", threshold=0.3, max_per_class=10,
                      overrides={"train.max_steps": 4, "filter.noisy_fraction": 0.0}, max_val_drop=-1.0,
                      records=records)
    assert made == [] and len(records) == 1 and not records[0]["accepted"]
    assert records[0]["val_accuracy_parent"] == parent_m["val_accuracy"]
    child = Path(records[0]["run"])
    cfg = runs.load_config(child)
    assert cfg.train.init_from == str(noisy_run.resolve())
    assert cfg.data.unlabelled == str(unlabelled.resolve())
    pseudo = pd.read_csv(cfg.data.pseudo_labels)
    assert 0 < len(pseudo) <= 40 and pseudo["label"].value_counts().max() <= 10
    assert set(pseudo["text"]) <= set(pd.read_csv(unlabelled)["text"])
    m = runs.read_json(child / runs.METRICS)
    p = plan(cfg)
    assert m["trainable_params"] == p.total == parent_m["trainable_params"] <= cfg.budget.max_params
    assert sum(m["train_class_counts"]) == 200 + len(pseudo)  # labelled train rows + pseudo rows
    assert records[0]["test_accuracy"] == m["test_accuracy"] and records[0]["trainable_params"] == p.total


@pytest.mark.slow
def test_init_from_loads_parent_weights_and_refuses_other_setups(noisy_run):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from budgetlora.adapters.model import build
    from budgetlora.training.train import init_from_run

    cfg = runs.load_config(noisy_run).replace(**{"train.init_from": str(noisy_run)})
    model, _ = build(cfg)
    fresh = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    init_from_run(model, cfg)
    saved, now = load_file(noisy_run / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    assert set(saved) == set(now) and any("classifier" in k for k in saved)  # LoRA matrices and the head
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert not all(torch.equal(fresh[k], saved[k]) for k in saved)  # it really changed the fresh model
    other = cfg.replace(**{"lora.r": 4})
    with pytest.raises(ConfigError, match="different model or LoRA"):
        init_from_run(build(other)[0], other)


def test_pseudo_labels_from_posteriors_fitted_to_a_known_mix_undo_the_skew():
    from budgetlora.config import SelfTrainConfig
    from budgetlora.shift.selftrain import fitted_posteriors

    rng = np.random.default_rng(0)
    y = np.arange(4000) % 4  # balanced truth; the model leans toward class 3, as on texts that moved
    logits = rng.normal(0, 1.0, (4000, 4)) + 2.0 * np.eye(4)[y] + np.array([0, 0, 0, 0.8])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert fitted_posteriors(probs, "") is probs  # off by default: nothing changes
    # each predicted class's top 30%, unbalanced: the skewed model over-fills class 3, the fitted one does not
    _, raw_labels = select_pseudo_labels(probs, 0.0, False, 0, 0.3)
    fit_rows, fit_labels = select_pseudo_labels(fitted_posteriors(probs, "uniform"), 0.0, False, 0, 0.3)
    raw_share, fit_share = (np.bincount(x, minlength=4) / len(x) for x in (raw_labels, fit_labels))
    assert raw_share[3] > 0.28 and np.abs(fit_share - 0.25).max() < 0.01
    assert (fit_labels == y[fit_rows]).mean() > 0.95
    with pytest.raises(ConfigError, match="not both"):
        SelfTrainConfig(target_prior="uniform", prior_correction="on")
