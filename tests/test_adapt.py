"""Prior correction (EM), pseudo-label selection, the noisy-label filter wiring and a self-training round."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from budgetlora import runs
from budgetlora.adapters.budget import plan
from budgetlora.cli import main
from budgetlora.config import ConfigError
from budgetlora.shift.priors import estimate_priors, train_priors
from budgetlora.shift.selftrain import mix_repeats, select_pseudo_labels, self_train

from .conftest import tiny_config

QUIET = {"log": lambda *a, **k: None}


# -- prior correction -------------------------------------------------------------------------------------------------
def _gaussian_sample(priors, n, seed, train_priors=None):
    """1-D Gaussian classes (means -3,-1,1,3, sd 1.2) sampled under `priors`, with the exact posteriors a
    calibrated classifier trained under `train_priors` (default uniform) would output."""
    rng = np.random.default_rng(seed)
    means = np.array([-3.0, -1.0, 1.0, 3.0])
    y = rng.choice(len(means), size=n, p=priors)
    x = rng.normal(means[y], 1.2)
    tp = np.full(len(means), 0.25) if train_priors is None else np.asarray(train_priors)
    logp = -((x[:, None] - means[None]) ** 2) / (2 * 1.2 ** 2) + np.log(tp)
    post = np.exp(logp - logp.max(1, keepdims=True))
    return post / post.sum(1, keepdims=True), y


@pytest.mark.parametrize("true_priors,train_pri", [
    ([0.6, 0.2, 0.1, 0.1], None),
    ([0.1, 0.1, 0.2, 0.6], None),
    ([0.25, 0.25, 0.25, 0.25], [0.55, 0.15, 0.15, 0.15]),
])
def test_em_recovers_shifted_priors(true_priors, train_pri):
    probs, y = _gaussian_sample(true_priors, 20_000, seed=1, train_priors=train_pri)
    est = estimate_priors(probs, train_pri)
    assert est.converged
    assert np.abs(est.priors - np.array(true_priors)).max() < 0.03, est.priors
    assert np.allclose(est.posteriors.sum(1), 1.0)
    # the naive estimate (mean uncorrected posterior) is further off; correction helps accuracy and log-loss
    assert np.abs(est.priors - true_priors).max() < np.abs(probs.mean(0) - true_priors).max()
    assert (est.posteriors.argmax(1) == y).mean() >= (probs.argmax(1) == y).mean()
    nll = lambda p: -np.log(p[np.arange(len(y)), y]).mean()  # noqa: E731
    assert nll(est.posteriors) < nll(probs)


def test_em_without_shift_stays_put_and_rejects_bad_priors():
    probs, _ = _gaussian_sample([0.25] * 4, 20_000, seed=2)
    assert np.abs(estimate_priors(probs).priors - 0.25).max() < 0.03
    with pytest.raises(ValueError, match="positive"):
        estimate_priors(probs, [0.5, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="non-empty"):
        estimate_priors(np.zeros((0, 4)))


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


# -- noisy filter ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory, small_csvs):
    """A tiny run trained with the noisy-label filter: 222 rows -> 22 validation + 200 training rows."""
    from budgetlora.training.train import train

    cfg = tiny_config(small_csvs, **{"data.train_limit": 222, "data.test_limit": 40, "train.max_steps": 6,
                                     "filter.noisy_fraction": 0.05})
    return train(cfg, root=tmp_path_factory.mktemp("runs"), **QUIET)


def test_noisy_filter_report_in_metrics(noisy_run):
    m = runs.read_json(noisy_run / runs.METRICS)
    rep = m["filters"]["noisy_fraction"]
    assert rep["removed"] == round(0.05 * 200) == sum(rep["per_class"])
    assert len(rep["per_class"]) == 4 and rep["records"] == 3
    assert rep["kept"] == m["filters"]["kept"] == 190 == sum(m["train_class_counts"])


# -- prediction with prior correction and self-training ---------------------------------------------------------------
@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory, small_csvs):
    """100 test texts without their label column: nothing downstream can read a gold label."""
    path = tmp_path_factory.mktemp("unl") / "unlabelled.csv"
    pd.read_csv(small_csvs[1])[["text"]].head(100).to_csv(path, index=False)
    return path


def test_predict_with_prior_correction(noisy_run, unlabelled, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    assert main(["predict", str(noisy_run), "--input", str(unlabelled), "--output", str(out),
                 "--prior-correction"]) == 0  # the flag alone is the gated mode
    est = json.loads((tmp_path / "sub.csv.priors.json").read_text())
    assert abs(sum(est["priors"]) - 1) < 1e-5 and len(est["priors"]) == 4  # six decimals each
    # from metrics.json train_class_counts
    assert np.allclose(est["train_priors"], train_priors(runs.read_json(noisy_run / runs.METRICS), 4))
    assert sum(est["label_counts_corrected"]) == 100 == len(pd.read_csv(out))
    assert abs(sum(est["bbse"]["priors"]) - 1) < 1e-5  # from metrics.json val_confusion_matrix
    d = est["decision"]
    assert d["mode"] == "auto" and d["reasons"] and 0 <= est["separability"]["auc_label_adjusted"] <= 1
    written = np.bincount(pd.read_csv(out)["Label"], minlength=4).tolist()
    assert written == est["label_counts_written"]
    assert written == est["label_counts_corrected" if d["apply"] else "label_counts_uncorrected"]
    printed = capsys.readouterr().out
    assert "estimated class priors" in printed and "prior correction" in printed
    # forced on: the corrected labels are written whatever the checks say
    assert main(["predict", str(noisy_run), "--input", str(unlabelled), "--output", str(out),
                 "--prior-correction", "on"]) == 0
    est = json.loads((tmp_path / "sub.csv.priors.json").read_text())
    assert est["decision"]["apply"] and est["label_counts_written"] == est["label_counts_corrected"]


def test_predict_prints_the_decision_it_made(noisy_run, unlabelled, tmp_path, capsys, monkeypatch):
    """The decision printed is the one made, not read back: the priors file vanishes as soon as it is written."""
    from budgetlora.shift import predict as shift_predict

    write_json, written = runs.write_json, []

    def write_then_lose(path, obj):
        write_json(path, obj)
        if str(path).endswith(".priors.json"):
            written.append(obj)
            path.unlink()

    monkeypatch.setattr(shift_predict.runs, "write_json", write_then_lose)
    out = tmp_path / "sub.csv"
    assert main(["predict", str(noisy_run), "--input", str(unlabelled), "--output", str(out),
                 "--prior-correction", "on"]) == 0
    assert not (tmp_path / "sub.csv.priors.json").exists() and len(written) == 1
    printed = capsys.readouterr().out
    assert f"estimated class priors {written[0]['priors']}" in printed
    assert "prior correction applied (on): forced on" in printed
    done = shift_predict.predict(noisy_run, str(unlabelled), out, "auto")
    assert done.decision == done.priors["decision"] and done.decision["mode"] == "auto"
    assert done.labels.tolist() == pd.read_csv(out)["Label"].tolist()
    assert shift_predict.predict(noisy_run, str(unlabelled), out).priors is None  # off: argmax, no estimate


def test_self_train_settings():
    from budgetlora.config.sections import SelfTrainConfig

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


def test_self_train_round(noisy_run, unlabelled, tmp_path):
    parent_m = runs.read_json(noisy_run / runs.METRICS)
    records = []
    # a gate no round can pass (validation accuracy must rise by a whole point): the round runs, is refused,
    # and is not returned
    made = self_train(noisy_run, str(unlabelled), tmp_path / "st", threshold=0.3, max_per_class=10,
                      overrides={"train.max_steps": 4, "filter.noisy_fraction": 0.0}, max_val_drop=-1.0,
                      records=records, **QUIET)
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


def test_temperature_scaling_recovers_a_known_temperature():
    """Calibrated logits flattened by a factor 4: the fit must sharpen them back (T about 1/4)."""
    from budgetlora.training.evaluate import fit_temperature, softmax

    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 3, size=(4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    assert abs(fit_temperature(true_logits / 4.0, labels) - 0.25) < 0.03
    assert abs(fit_temperature(true_logits, labels) - 1.0) < 0.1
