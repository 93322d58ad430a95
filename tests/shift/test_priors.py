"""Prior correction: EM on known posteriors, the gated correction through `predict`, temperature scaling."""
import json

import numpy as np
import pandas as pd
import pytest

from budgetlora import runs
from budgetlora.cli import main
from budgetlora.shift.priors import estimate_priors, train_priors


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_predict_prints_the_decision_it_made(noisy_run, unlabelled, tmp_path, capsys, monkeypatch):
    """The decision printed is the one made, not read back: the priors file vanishes as soon as it is written."""
    from budgetlora.inference.predict import predict
    from budgetlora.shift.predict import PriorCorrection

    write_json, written = runs.write_json, []

    def write_then_lose(path, obj):
        write_json(path, obj)
        if str(path).endswith(".priors.json"):
            written.append(obj)
            path.unlink()

    monkeypatch.setattr(runs, "write_json", write_then_lose)
    out = tmp_path / "sub.csv"
    assert main(["predict", str(noisy_run), "--input", str(unlabelled), "--output", str(out),
                 "--prior-correction", "on"]) == 0
    assert not (tmp_path / "sub.csv.priors.json").exists() and len(written) == 1
    printed = capsys.readouterr().out
    assert f"estimated class priors {written[0]['priors']}" in printed
    assert "prior correction applied (on): forced on" in printed
    done = predict(noisy_run, str(unlabelled), out, post=PriorCorrection("auto"))
    assert done.decision == done.priors["decision"] and done.decision["mode"] == "auto"
    assert done.labels.tolist() == pd.read_csv(out)["Label"].tolist()
    assert predict(noisy_run, str(unlabelled), out).priors is None  # no post-processor: argmax, no estimate


def test_temperature_scaling_recovers_a_known_temperature():
    """Calibrated logits flattened by a factor 4: the fit must sharpen them back (T about 1/4)."""
    from budgetlora.tasks import fit_temperature, softmax

    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 3, size=(4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    assert abs(fit_temperature(true_logits / 4.0, labels) - 0.25) < 0.03
    assert abs(fit_temperature(true_logits, labels) - 1.0) < 0.1


def test_predict_with_a_known_class_mix(noisy_run, unlabelled, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    assert main(["predict", str(noisy_run), "--input", str(unlabelled), "--output", str(out),
                 "--target-prior", "uniform"]) == 0
    fit = json.loads((tmp_path / "sub.csv.priors.json").read_text())
    assert fit["decision"]["mode"] == "known-mix" and fit["rows"] == 100 and fit["target_prior"] == [0.25] * 4
    labels = pd.read_csv(out)["Label"].to_numpy()
    assert np.bincount(labels, minlength=4).tolist() == fit["label_counts_written"]
    moved = np.abs(np.asarray(fit["label_counts_written"]) - np.asarray(fit["label_counts_uncorrected"])).sum()
    assert fit["labels_changed"] >= moved // 2  # every net move between classes is at least one changed label
    assert max(abs(x - 0.25) for x in fit["shares_after"]) <= max(abs(x - 0.25) for x in fit["shares_before"])
    assert "fitted to the class mix" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--target-prior", "0.5,0.5"], "has 2 shares"),
    (["--target-prior", "0.4,0.4,0.4,-0.2"], ">= 0"),
    (["--target-prior", "0.3,0.3,0.3,0.3"], "sum to 1"),
    (["--target-prior", "uniform", "--prior-correction", "auto"], "not both"),
])
def test_a_malformed_class_mix_is_one_line_and_writes_nothing(noisy_run, unlabelled, tmp_path, capsys, flags,
                                                               message):
    out = tmp_path / "sub.csv"
    assert main(["predict", str(noisy_run), "--input", str(unlabelled), "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetlora: error:") and message in err[0]
    assert not out.exists() and not (tmp_path / "sub.csv.priors.json").exists()
