"""`predict --proba / --top-k`: the probabilities the labels were taken from, written beside them. Each row sums to 1
and its largest probability is its label, with or without prior correction; the top-k columns rank the classes; a
bad K is refused before anything loads; and without the flags the file is the plain ID,Label one."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import budgetlora
from budgetlora import runs
from budgetlora.cli import main
from budgetlora.config import Config
from budgetlora.errors import ConfigError
from budgetlora.inference.mix import fit_to_mix, known_mix
from budgetlora.inference.predict import Columns, columns, write_answers, write_prediction

NAMES = ["World", "Sports", "Business", "Sci/Tech"]
P_COLS = [f"p_{x}" for x in NAMES]
RUN_COLS = [f"p_{i}" for i in range(4)]  # the tiny run trains on a CSV of its own: its classes go by their ids


def _predict(run, source, out, *flags) -> pd.DataFrame:
    assert main(["predict", str(run), "--input", str(source), "--output", str(out), *flags]) == 0
    return pd.read_csv(out)


def _check_rows(df: pd.DataFrame, k: int) -> np.ndarray:
    """Sums, argmax and the top-k columns of a written file; returns its probabilities."""
    probs = df[[c for c in df.columns if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (probs >= 0).all()
    assert (probs.argmax(axis=1) == df["Label"].to_numpy()).all()
    assert (df["top1"] == df["Label"]).all()
    ids = df[[f"top{i}" for i in range(1, k + 1)]].to_numpy()
    ps = df[[f"top{i}_p" for i in range(1, k + 1)]].to_numpy()
    assert (np.diff(ps, axis=1) <= 0).all(), "top-k probabilities must not rise"
    np.testing.assert_array_equal(np.take_along_axis(probs, ids, axis=1), ps)  # each topK_p is that class's p_
    np.testing.assert_array_equal(ps, -np.sort(-probs, axis=1)[:, :k])
    return probs


def _config_only_run(tmp_path):
    """A folder with a config and no model: anything refused here was refused before a model could load."""
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.CONFIG).write_text(Config().to_yaml())
    return run


# -- without a model ---------------------------------------------------------------------------------------------------
def test_columns_rank_ties_by_the_lower_id_and_read_back_exactly(tmp_path):
    probs = np.array([[0.25, 0.25, 0.5, 0.0], [1 / 3, 1 / 3 - 1e-16, 1 / 3 + 1e-16, 0.0]])
    labels = probs.argmax(axis=1)
    out = tmp_path / "p.csv"
    write_answers(out, labels, probs, Columns(proba=True, top_k=3, names=tuple(NAMES)))
    df = pd.read_csv(out)
    assert list(df.columns) == ["ID", "Label", *P_COLS, "top1", "top1_p", "top2", "top2_p", "top3", "top3_p"]
    assert df[["top1", "top2", "top3"]].to_numpy().tolist() == [[2, 0, 1], [2, 0, 1]]
    np.testing.assert_array_equal(df[P_COLS].to_numpy(), probs)  # every digit that tells the classes apart survives
    assert (df[P_COLS].to_numpy().argmax(axis=1) == df["Label"]).all()


def test_columns_fall_back_to_label_ids_without_usable_names(tmp_path):
    probs = np.array([[0.1, 0.9]])
    for names in ((), ("a", "a"), ("only one",)):
        out = tmp_path / "p.csv"
        write_answers(out, probs.argmax(1), probs, Columns(proba=True, names=names))
        assert out.read_text().splitlines()[0] == "ID,Label,p_0,p_1"


def test_known_mix_columns_are_the_fitted_posteriors(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) + np.array([2.0, 0, 0, 0])  # skewed toward class 0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    fit = fit_to_mix(probs, np.full(4, 0.25))
    assert fit.changed > 0  # the fit moved labels: the columns must follow the fit, not argmax of `probs`
    out = tmp_path / "mix.csv"
    write_prediction(out, known_mix(fit, "target.csv", 32), Columns(proba=True, top_k=2, names=tuple(NAMES)))
    df = pd.read_csv(out)
    written = _check_rows(df, 2)
    np.testing.assert_allclose(written, fit.posteriors, rtol=0, atol=0)
    np.testing.assert_allclose(written.mean(axis=0), 0.25, atol=1e-5)


@pytest.mark.parametrize("k", ["0", "-1", "5"])
def test_bad_top_k_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, k):
    run = _config_only_run(tmp_path)
    out = tmp_path / "out.csv"
    assert main(["predict", str(run), "--input", str(tmp_path / "texts.csv"), "--output", str(out),
                 "--top-k", k]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budgetlora: error:") and "--top-k" in err and "\n" not in err, err
    assert not out.exists() and not (tmp_path / "out.csv.priors.json").exists()
    assert main(["predict", str(run), "--input", "t.csv", "--output", str(out), "--top-k", k,
                 "--target-prior", "uniform"]) == 2
    assert not out.exists()


def test_top_k_bounds_in_python(tmp_path):
    run = _config_only_run(tmp_path)
    assert columns(run, top_k=4).top_k == 4 and columns(run).top_k == 0
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ConfigError):
            columns(run, top_k=bad)


# -- on the tiny trained run -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_output_is_unchanged_and_proba_matches_the_python_api(tiny_run, unlabelled, tmp_path):
    plain = tmp_path / "plain.csv"
    assert main(["predict", str(tiny_run), "--input", str(unlabelled), "--output", str(plain)]) == 0
    df = _predict(tiny_run, unlabelled, tmp_path / "proba.csv", "--proba", "--top-k", "2")
    assert list(df.columns) == ["ID", "Label", *RUN_COLS, "top1", "top1_p", "top2", "top2_p"]
    assert len(df) == 100 and df["ID"].tolist() == list(range(100))
    expected = "ID,Label\n" + "".join(f"{i},{x}\n" for i, x in enumerate(df["Label"]))
    assert plain.read_bytes() == expected.encode()  # the plain file, byte for byte, with the same labels
    probs = _check_rows(df, 2)
    texts = pd.read_csv(unlabelled)["text"].tolist()
    # bulk prediction runs in the run's precision (bf16 where the CPU has it), the API in fp32: close, not equal
    np.testing.assert_allclose(probs, budgetlora.load(tiny_run).predict_proba(texts), atol=0.05)


@pytest.mark.slow
def test_full_top_k_ranks_every_class(tiny_run, unlabelled, tmp_path):
    df = _predict(tiny_run, unlabelled, tmp_path / "top.csv", "--top-k", "4")
    assert list(df.columns) == ["ID", "Label"] + [c for k in range(1, 5) for c in (f"top{k}", f"top{k}_p")]
    ids = df[[f"top{k}" for k in range(1, 5)]].to_numpy()
    assert (np.sort(ids, axis=1) == np.arange(4)).all()  # each class once per row
    ps = df[[f"top{k}_p" for k in range(1, 5)]].to_numpy()
    np.testing.assert_allclose(ps.sum(axis=1), 1.0, atol=1e-9)
    assert (np.diff(ps, axis=1) <= 0).all() and (df["top1"] == df["Label"]).all()


@pytest.mark.slow
def test_known_mix_writes_the_posteriors_its_labels_came_from(tiny_run, unlabelled, tmp_path):
    plain = _predict(tiny_run, unlabelled, tmp_path / "plain.csv", "--proba")
    out = tmp_path / "mix.csv"
    df = _predict(tiny_run, unlabelled, out, "--proba", "--top-k", "4", "--target-prior", "0.7,0.1,0.1,0.1")
    probs = _check_rows(df, 4)
    fit = json.loads((tmp_path / "mix.csv.priors.json").read_text())
    assert fit["converged"]  # the run gives every class some mass, so the mix is reachable
    np.testing.assert_allclose(probs.mean(axis=0), [0.7, 0.1, 0.1, 0.1], atol=1e-4)
    assert fit["labels_changed"] == int((df["Label"] != plain["Label"]).sum()) > 0
    assert np.bincount(df["Label"], minlength=4).tolist() == fit["label_counts_written"]


@pytest.mark.slow
def test_prior_correction_writes_the_corrected_posteriors(tiny_run, unlabelled, tmp_path):
    out = tmp_path / "corrected.csv"
    df = _predict(tiny_run, unlabelled, out, "--proba", "--top-k", "2", "--prior-correction", "on")
    probs = _check_rows(df, 2)
    est = json.loads((tmp_path / "corrected.csv.priors.json").read_text())
    assert est["decision"]["apply"] is True
    assert np.bincount(df["Label"], minlength=4).tolist() == est["label_counts_written"]
    assert est["converged"]
    # EM's fixed point: the corrected posteriors average to the priors it estimated
    np.testing.assert_allclose(probs.mean(axis=0), est["priors"], atol=1e-4)
