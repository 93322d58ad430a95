"""Ensembles: several runs answer as one, each member calibrated by its validation temperature and the
probabilities averaged; the members' trainable parameters summed and refused over the budget, in `plan` too."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import budgetlora
from budgetlora.cli import main
from budgetlora.errors import ConfigError
from budgetlora.hardware import resolve_precision
from budgetlora.inference.ensemble import check_members, members_total
from budgetlora.tasks import softmax
from budgetlora.training.train import train
from tests.conftest import tiny_config

TEXTS = ["Stocks fell as oil prices rose", "The striker scored twice in the final",
         "A new chip doubles battery life", "Leaders met to discuss the ceasefire"]


@pytest.fixture(scope="module")
def ia3_run(tmp_path_factory, small_csvs):
    return train(tiny_config(small_csvs, **{"method": "ia3", "train.lr": 2e-2}), root=tmp_path_factory.mktemp("r"))


@pytest.fixture(scope="module")
def big_run(tmp_path_factory, small_csvs):
    """A LoRA run that alone fits, but not beside tiny_run: r=20 (830,980 trainable with the head; tiny_run 333,316)."""
    return train(tiny_config(small_csvs, **{"lora.r": 20, "train.max_steps": 2}), root=tmp_path_factory.mktemp("r"))


def test_the_ensemble_averages_its_members_calibrated_probabilities(tiny_run, ia3_run):
    ensemble = budgetlora.load([tiny_run, ia3_run])
    members = [budgetlora.load(tiny_run), budgetlora.load(ia3_run)]
    expected = np.mean([softmax(m.logits(TEXTS) / m.run.metrics["temperature"]) for m in members], axis=0)
    got = ensemble.predict_proba(TEXTS)
    assert np.allclose(got, expected, atol=1e-5) and np.allclose(got.sum(axis=1), 1)
    assert ensemble.predict(TEXTS) == expected.argmax(axis=1).tolist()
    assert ensemble.class_names == members[0].class_names


def test_predict_and_evaluate_take_several_runs(tiny_run, ia3_run, small_csvs, tmp_path, capsys):
    _, test = small_csvs
    out = tmp_path / "ens.csv"
    assert main(["predict", str(tiny_run), str(ia3_run), "--input", str(test), "--output", str(out), "--proba"]) == 0
    table = pd.read_csv(out)
    probs = table[[c for c in table.columns if c.startswith("p_")]].to_numpy()
    texts = pd.read_csv(test)["text"].tolist()
    expected = budgetlora.load([tiny_run, ia3_run]).predict_proba(texts)
    # a run predicts in the precision it trained in: under bf16 autocast (a CPU with native bf16) two reads of the
    # same texts agree to about 1e-3 only (bf16 keeps 8 bits of mantissa), and a near tie may flip one row's label
    bf16 = resolve_precision("auto", "cpu") == "bf16"
    assert len(table) == len(texts) and np.allclose(probs, expected, atol=1e-2 if bf16 else 1e-3)
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), str(ia3_run)]) == 0
    m = json.loads(capsys.readouterr().out)
    labels = pd.read_csv(test)["label"].to_numpy()
    one_row = 1.01 / len(labels) if bf16 else 1e-3
    assert m["accuracy"] == pytest.approx(float(np.mean(expected.argmax(axis=1) == labels)), abs=one_row)


def test_an_ensemble_over_the_budget_is_refused_before_loading(tiny_run, big_run, tmp_path, capsys, small_csvs):
    total, budget, counted = members_total([tiny_run, big_run])
    assert total == sum(n for _, n in counted) > budget == 1_000_000
    with pytest.raises(ConfigError, match="over the budget of 1,000,000"):
        check_members([tiny_run, big_run])
    _, test = small_csvs
    capsys.readouterr()
    rc = main(["predict", str(tiny_run), str(big_run), "--input", str(test), "--output", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "over the budget" in err and not (tmp_path / "x.csv").exists()
    rc = main(["plan", "--members", str(tiny_run), str(big_run)])
    out = capsys.readouterr().out
    assert rc == 3 and f"ensemble of 2: {total:,} trainable parameters" in out and "over the budget" in out
    rc = main(["plan", "--members", str(tiny_run), str(big_run), "--budget.max_params", str(total), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["fits"]


def test_what_cannot_be_one_ensemble_is_one_line(tiny_run, ia3_run, tmp_path, small_csvs, capsys):
    with pytest.raises(ConfigError, match="at least two"):
        check_members([tiny_run])
    with pytest.raises(ConfigError, match="the same run twice"):
        check_members([tiny_run, tiny_run])
    _, test = small_csvs
    capsys.readouterr()
    rc = main(["predict", str(tiny_run), str(ia3_run), "--input", str(test), "--output", str(tmp_path / "y.csv"),
               "--target-prior", "uniform"])
    assert rc == 2 and "take one run, not an ensemble" in capsys.readouterr().err


def test_submit_labels_with_several_runs(tiny_run, ia3_run, big_run, small_csvs, tmp_path, capsys):
    _, test = small_csvs
    out = tmp_path / "sub.csv"
    capsys.readouterr()
    assert main(["submit", "--members", str(tiny_run), str(ia3_run), "--input", str(test),
                 "--output", str(out)]) == 0
    table = pd.read_csv(out)
    texts = pd.read_csv(test)["text"].tolist()
    assert list(table.columns) == ["ID", "Label"] and len(table) == len(texts)
    assert table["Label"].tolist() == budgetlora.load([tiny_run, ia3_run]).predict(texts)
    summary = json.loads((tmp_path / "sub.csv.summary.json").read_text())
    assert summary["trainable_params"] == members_total([tiny_run, ia3_run])[0] <= summary["budget"]
    assert "an ensemble of 2 runs" in (tmp_path / "sub.csv.summary.txt").read_text()
    # refused in one line, nothing written: over the budget, one run, self-training asked for
    for argv, words in ((["--members", str(tiny_run), str(big_run)], "over the budget"),
                        (["--members", str(tiny_run)], "at least two"),
                        (["--members", str(tiny_run), str(ia3_run), "--rounds", "1"], "take one run")):
        capsys.readouterr()
        rc = main(["submit", *argv, "--input", str(test), "--output", str(tmp_path / "no.csv")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and words in err, err
        assert not list(tmp_path.glob("no.csv*"))
