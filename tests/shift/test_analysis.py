"""The shift building blocks: BBSE, separability (weighted AUC, domain classifier), the prior-correction gate, and
the `shift` report of a real (tiny) run."""
import json

import numpy as np
import pandas as pd
import pytest

from budgetlora.cli import build_parser, main
from budgetlora.config import Config, from_flags
from budgetlora.shift.analysis import domain_auc, vocab_overlap, weighted_auc
from budgetlora.shift.priors import bbse_priors, decide, estimate_priors, total_variation

# p(ŷ | y): rows true class, columns predicted; a classifier that is right 70-90% of the time
P_PRED = np.array([[0.80, 0.10, 0.05, 0.05],
                   [0.05, 0.90, 0.03, 0.02],
                   [0.10, 0.05, 0.70, 0.15],
                   [0.05, 0.05, 0.15, 0.75]])


def test_bbse_recovers_priors_from_an_exact_confusion_matrix():
    val_priors = np.array([0.25, 0.25, 0.25, 0.25])
    confusion = 1000 * val_priors[:, None] * P_PRED  # counts, true x predicted
    for q in ([0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25] * 4):
        predicted = 5000 * (np.asarray(q) @ P_PRED)  # what the classifier predicts on a target with priors q
        est = bbse_priors(confusion, predicted)
        assert np.allclose(est.priors, q, atol=1e-9), est.priors
        assert np.allclose(est.weights, np.asarray(q) / val_priors, atol=1e-9)
        assert est.condition < 10
    # the naive estimate (predicted shares) is biased toward the confusions; BBSE is not
    q = np.array([0.6, 0.2, 0.1, 0.1])
    assert total_variation(q @ P_PRED, q) > 0.05


def test_bbse_from_sampled_counts_and_unequal_validation_priors():
    rng = np.random.default_rng(0)
    val_priors, q = np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.1, 0.2, 0.3, 0.4])
    y_val = rng.choice(4, 4000, p=val_priors)
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (y_val, [rng.choice(4, p=P_PRED[y]) for y in y_val]), 1)
    y_tgt = rng.choice(4, 8000, p=q)
    predicted = np.bincount([rng.choice(4, p=P_PRED[y]) for y in y_tgt], minlength=4)
    est = bbse_priors(confusion, predicted)
    assert np.abs(est.priors - q).max() < 0.03, est.priors
    assert abs(est.priors.sum() - 1) < 1e-9 and (est.priors >= 0).all()


def test_bbse_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        bbse_priors(np.ones((3, 4)), [1, 1, 1])
    with pytest.raises(ValueError, match="counts"):
        bbse_priors(np.eye(4), [1, 1, 1])
    with pytest.raises(ValueError, match="every class"):
        bbse_priors(np.diag([5.0, 5.0, 5.0, 0.0]), [1, 1, 1, 1])


def test_weighted_auc():
    assert weighted_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert weighted_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert weighted_auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5  # ties count half
    # a weight of 0 removes a negative: only the one below the positive is left
    assert weighted_auc(np.array([0.0, 5.0]), np.array([1.0]), np.array([1.0, 0.0])) == 1.0


# -- a synthetic world: 4 Gaussian classes in 16 dimensions ------------------------------------------------------------
MEANS = np.random.default_rng(7).normal(0, 1.0, size=(4, 16))


def _sample(priors, n, seed, offset=0.0):
    """Features, labels and the exact posteriors of a classifier trained under uniform priors; `offset` moves
    every feature (p(x|y) changes: a text shift), which those posteriors know nothing about."""
    rng = np.random.default_rng(seed)
    y = rng.choice(4, n, p=priors)
    x = MEANS[y] + rng.normal(0, 1.0, size=(n, 16)) + offset
    logp = -((x[:, None, :] - MEANS[None]) ** 2).sum(-1) / 2
    post = np.exp(logp - logp.max(1, keepdims=True))
    return x, y, post / post.sum(1, keepdims=True)


def _gate(target_priors, offset):
    x_val, y_val, p_val = _sample([0.25] * 4, 1500, seed=1)
    x_t, _, p_t = _sample(target_priors, 1500, seed=2, offset=offset)
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (y_val, p_val.argmax(1)), 1)
    em = estimate_priors(p_t, [0.25] * 4)
    bbse = bbse_priors(confusion, np.bincount(p_t.argmax(1), minlength=4))
    share = np.bincount(y_val, minlength=4) / len(y_val)
    auc_raw = domain_auc(x_val, x_t)
    auc_adj = domain_auc(x_val, x_t, (em.priors / share)[y_val])
    return decide("auto", em, bbse, auc_adj), auc_raw, auc_adj, em


def test_gate_accepts_pure_label_shift():
    decision, auc_raw, auc_adj, em = _gate([0.55, 0.25, 0.12, 0.08], offset=0.0)
    assert auc_raw > 0.6 > auc_adj  # the class mix alone is visible; reweighted, the texts look the same
    assert abs(auc_adj - 0.5) < 0.06
    assert decision.apply, decision.reasons
    assert np.abs(em.priors - [0.55, 0.25, 0.12, 0.08]).max() < 0.04


def test_gate_refuses_a_separable_shift():
    decision, _, auc_adj, _ = _gate([0.55, 0.25, 0.12, 0.08], offset=0.6)
    assert auc_adj > 0.9
    assert not decision.apply
    assert any("separable" in r for r in decision.reasons)


def test_gate_refuses_when_nothing_moved_and_modes_force():
    decision, _, auc_adj, em = _gate([0.25] * 4, offset=0.0)
    assert auc_adj < 0.6 and not decision.apply
    assert any("nothing to correct" in r for r in decision.reasons)
    on = decide("on", em, None, None)
    assert on.apply and any("would refuse" in r for r in on.reasons)
    assert not decide("off", em, None, 0.5).apply
    with pytest.raises(ValueError, match="off, auto, on"):
        decide("sometimes", em, None, 0.5)


def test_gate_refuses_when_the_estimates_disagree():
    _, _, _, em = _gate([0.55, 0.25, 0.12, 0.08], offset=0.0)
    confusion = 100 * np.eye(4)  # a BBSE that reads the target's predicted shares as uniform
    decision = decide("auto", em, bbse_priors(confusion, [1, 1, 1, 1]), 0.5)
    assert not decision.apply and any("disagree" in r for r in decision.reasons)


def test_vocab_overlap():
    v = vocab_overlap(["the cat sat"] * 3, ["the dog sat"] * 5 + ["the cat"])
    assert v["target_tokens_covered"] == pytest.approx(12 / 17, abs=1e-4)  # 'dog' x5 is the only unseen word
    assert v["type_jaccard"] == pytest.approx(3 / 4, abs=1e-4)
    assert v["target_overrepresented"][0] == "dog"


# -- the report of a real run -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_shift_analysis_files(tiny_run, small_csvs, tmp_path, capsys):
    test = pd.read_csv(small_csvs[1])
    target = tmp_path / "target.csv"
    # a text shift a reader can see: every text doubled, so far more of them pass max_length
    pd.DataFrame({"text": [t + " " + t for t in test.text]}).to_csv(target, index=False)
    assert main(["shift", str(tiny_run), "--input", str(target), "--output", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "shift.json").read_text())
    png = (tmp_path / "rep" / "shift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    advice = (tmp_path / "rep" / "advice.txt").read_text().strip().splitlines()
    assert len(advice) >= 3 and advice == rep["advice"]
    assert "advice" not in capsys.readouterr().err
    tl = rep["token_lengths"]
    assert tl["target"]["mean"] > 1.8 * tl["train"]["mean"]
    assert 0 <= tl["train"]["truncated_share"] < tl["target"]["truncated_share"] <= 1
    assert rep["rows"]["target"] == len(test)
    for key in ("train_priors", "target_predicted", "em_priors", "bbse_priors"):
        assert abs(sum(rep["class_shares"][key]) - 1) < 1e-3 and len(rep["class_shares"][key]) == 4
    assert 0.0 <= rep["separability"]["auc"] <= 1.0 and 0.0 <= rep["separability"]["auc_label_adjusted"] <= 1.0
    assert 0.0 < rep["confidence"]["target_mean"] <= 1.0
    voc = rep["vocabulary"]  # other AG News texts: mostly the same words, never all of them
    assert 0.5 < voc["target_tokens_covered"] < 1.0 and 0.0 < voc["type_jaccard"] < 1.0
    assert rep["prior_correction"]["mode"] == "auto" and isinstance(rep["prior_correction"]["apply"], bool)


def test_shift_refuses_a_tiny_target(tiny_run, tmp_path, capsys):
    target = tmp_path / "few.csv"
    pd.DataFrame({"text": ["one text", "another"]}).to_csv(target, index=False)
    assert main(["shift", str(tiny_run), "--input", str(target), "--output", str(tmp_path / "r")]) == 2
    assert "at least 10" in capsys.readouterr().err


@pytest.mark.slow
def test_submit_end_to_end(tiny_run, small_csvs, tmp_path):
    """Train (the tiny run is found finished and reused), analyse, one gated self-training round, gated prior
    correction, ID,Label CSV and the report of what was done."""
    train_csv, test_csv = small_csvs
    target = tmp_path / "target.csv"
    pd.read_csv(test_csv)[["text"]].to_csv(target, index=False)
    out = tmp_path / "submission.csv"
    flags = ["--data.train", str(train_csv), "--data.test", str(test_csv), "--data.val_fraction", "0.1",
             "--model.max_length", "32", "--train.max_steps", "10", "--train.lr", "0.005", "--train.batch_size", "16",
             "--train.eval_every", "5"]
    assert main(["submit", *flags, "--runs", str(tiny_run.parent), "--input", str(target), "--output", str(out),
                 "--rounds", "1", "--steps", "2", "--share", "0.5", "--max-val-drop", "1.0"]) == 0
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["ID", "Label"] and sub["ID"].tolist() == list(range(120))
    assert sub["Label"].between(0, 3).all()
    rep = json.loads((tmp_path / "submission.csv.summary.json").read_text())
    assert rep["base_run"] == str(tiny_run.resolve())
    (rnd,) = rep["self_training"]["rounds"]
    assert rnd["accepted"] and rep["final_run"] == rnd["run"] != rep["base_run"]  # a 1.0 drop always passes
    assert 0 < rnd["pseudo_rows"] <= 60 and len(set(rnd["per_class"]) - {0}) == 1  # balanced classes
    assert rep["prior_correction"]["mode"] == "auto" and rep["label_counts"] == np.bincount(
        sub["Label"], minlength=4).tolist()
    assert (tmp_path / "submission.csv.shift" / "shift.png").is_file()
    assert (tmp_path / "submission.csv.priors.json").is_file()
    assert (tmp_path / "submission.csv.summary.txt").read_text().splitlines() == rep["summary"]
    # without self-training the analysis' own decision is what gets written: no second pass over the target
    assert main(["submit", *flags, "--runs", str(tiny_run.parent), "--input", str(target), "--output", str(out),
                 "--prior-correction", "on"]) == 0
    rep = json.loads((tmp_path / "submission.csv.summary.json").read_text())
    priors = json.loads((tmp_path / "submission.csv.priors.json").read_text())
    assert rep["final_run"] == rep["base_run"] and rep["self_training"]["rounds"] == []
    assert priors["decision"]["apply"] and priors["label_counts_written"] == priors["label_counts_corrected"]
    assert np.bincount(pd.read_csv(out)["Label"], minlength=4).tolist() == priors["label_counts_corrected"]
    # a known class mix: the analysis' posteriors fitted to it, the fit in the report and the priors file
    assert main(["submit", *flags, "--runs", str(tiny_run.parent), "--input", str(target), "--output", str(out),
                 "--target-prior", "uniform"]) == 0
    rep = json.loads((tmp_path / "submission.csv.summary.json").read_text())
    fit = rep["class_mix_fit"]
    assert rep["prior_correction"]["mode"] == "known-mix" and fit["target_prior"] == [0.25] * 4
    assert max(abs(x - 0.25) for x in fit["shares_after"]) <= max(abs(x - 0.25) for x in fit["shares_before"])
    assert np.bincount(pd.read_csv(out)["Label"], minlength=4).tolist() == \
        json.loads((tmp_path / "submission.csv.priors.json").read_text())["label_counts_written"]


def test_submit_settings_come_from_the_preset_and_flags(tmp_path):
    """The submit preset carries its adaptation settings; flags (old spellings included) override them, and none of
    them changes the run id."""
    preset = Config.from_yaml("minilm-submit")
    assert (preset.submit.rounds, preset.submit.share, preset.submit.prior_correction) == (0, 0.3, "auto")
    args = build_parser().parse_args(["submit", "--config", "minilm-submit", "--input", "t.csv", "--output", "o.csv",
                                      "--rounds", "2", "--st-lr", "0.001", "--prior-correction", "off"])
    cfg = from_flags(args)
    assert (cfg.submit.rounds, cfg.submit.lr, cfg.submit.prior_correction) == (2, 0.001, "off")
    # the rest from the preset: trained at 128 tokens, the target read at 256
    assert (cfg.submit.share, cfg.submit.steps, cfg.model.max_length, cfg.submit.max_length) == (0.3, 300, 128, 256)
    assert cfg.run_id == preset.run_id
    yaml = tmp_path / "st.yaml"
    yaml.write_text("self_train:\n  share: 0.3\n  prior_correction: auto\n")
    args = build_parser().parse_args(["self-train", "run", "--input", "u.csv", "--config", str(yaml),
                                      "--mix", "0.25", "--balance", "false"])
    st = from_flags(args).self_train
    assert (st.share, st.mix, st.balance, st.prior_correction, st.min_confidence) == (0.3, 0.25, False, "auto", 0.0)

