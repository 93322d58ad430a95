"""A trained run is usable wherever it lands: trained in bf16, checked in fp32; copied elsewhere with its base model
moved, loaded once told where the base is, refused in one line when not."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import budgetlora
from budgetlora import runs
from budgetlora.adapters.architectures import ModelNotFound, resolve_name
from budgetlora.cli import main
from budgetlora.hardware import inference_dtype
from budgetlora.inference.load import LOGIT_TOLERANCE, VerificationError, load_run, verify_reload
from budgetlora.inference.predict import predict
from budgetlora.training.train import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, small_csvs) -> Path:
    cfg = tiny_config(small_csvs, **{"train.precision": "bf16"})
    return train(cfg, root=tmp_path_factory.mktemp("bf16"))


@pytest.mark.slow
def test_bf16_run_stores_plain_fp32_logits(bf16_run):
    """The verification sample comes from the model without its autocast wrapper: a fp32 reload matches it far
    inside the tolerance (bf16 logits drift by ~1e-3 on this model)."""
    loaded = load_run(bf16_run, verify=False)
    ref = runs.read_json(bf16_run / runs.VERIFY)
    stored = np.asarray(ref["logits"], dtype=np.float32)
    got = loaded.logits(ref["texts"], exact=True)
    assert np.abs(got - stored).max() < 1e-5
    assert ref["precision"] == "fp32"
    # predictions themselves run in the run's precision where the CPU has bf16: close to fp32, not equal
    fast = loaded.logits(ref["texts"])
    if inference_dtype("bf16", "cpu") is not None:
        assert 0 < np.abs(fast - stored).max() < 0.1


@pytest.mark.slow
def test_bf16_run_predicts_loads_serves_and_exports(bf16_run, small_csvs, tmp_path):
    from fastapi.testclient import TestClient

    from budgetlora.inference.export import export_merged
    from budgetlora.inference.serve import create_app

    _, test_csv = small_csvs
    labels = predict(bf16_run, str(test_csv), tmp_path / "sub.csv").labels
    assert (tmp_path / "sub.csv").read_text().count("\n") == len(labels) + 1
    clf = budgetlora.load(bf16_run)
    assert clf.predict(["Stocks fell as oil rose."])[0] in range(4)
    with TestClient(create_app(clf)) as client:
        r = client.post("/predict", json={"texts": ["The team won the final."]})
        assert r.status_code == 200, r.text
    info = export_merged(bf16_run, tmp_path / "merged")
    assert info["max_abs_logit_diff"] <= 1e-4


def _fake_loaded(tmp_path: Path, expected: np.ndarray, got: np.ndarray):
    runs.write_json(tmp_path / runs.VERIFY, {"texts": ["a"] * len(expected), "logits": expected.tolist()})
    return SimpleNamespace(path=tmp_path, logits=lambda texts, exact=False: got.astype(np.float32))


def test_near_tie_may_flip_within_tolerance(tmp_path):
    eps = LOGIT_TOLERANCE / 4
    expected = np.array([[1.0, 1.0 + eps, -2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    got = expected.copy()
    got[0, 1] -= 2 * eps  # the near-tie flips, every logit within the tolerance
    assert verify_reload(_fake_loaded(tmp_path, expected, got)) <= LOGIT_TOLERANCE


def test_decided_label_change_or_drift_is_refused(tmp_path):
    expected = np.array([[1.0, 2.0, 0.0, 0.0]])
    with pytest.raises(VerificationError, match="1 of 1 validation labels changed"):
        verify_reload(_fake_loaded(tmp_path, expected, np.array([[2.5, 2.0, 0.0, 0.0]])))
    with pytest.raises(VerificationError, match="max logit difference"):
        verify_reload(_fake_loaded(tmp_path, expected, expected + 5 * LOGIT_TOLERANCE))


@pytest.mark.slow
def test_moved_run_with_moved_base(tmp_path, small_csvs, capsys):
    """Train on a local base folder, then move both: loading needs --base, and works with it."""
    first = tmp_path / "models" / "base-a"
    first.parent.mkdir()
    first.symlink_to(resolve_name("minilm"), target_is_directory=True)
    cfg = tiny_config(small_csvs, **{"model.name": str(first), "train.max_steps": 4})
    run = train(cfg, root=tmp_path / "runs")
    moved_run = tmp_path / "elsewhere" / run.name
    shutil.move(str(run), moved_run)
    second = first.rename(tmp_path / "models" / "base-b")

    with pytest.raises(ModelNotFound, match="--base"):
        load_run(moved_run)
    _, test_csv = small_csvs
    out = tmp_path / "sub.csv"
    capsys.readouterr()  # the training's progress bars
    assert main(["predict", str(moved_run), "--input", str(test_csv), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(first) in err and "--base" in err
    assert not out.exists()

    assert main(["predict", str(moved_run), "--input", str(test_csv), "--output", str(out),
                 "--base", str(second)]) == 0
    assert out.read_text().startswith("ID,Label\n")
    assert budgetlora.load(moved_run, base=str(second)).predict(["A new chip was announced."])[0] in range(4)
    assert json.loads((moved_run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(first)
