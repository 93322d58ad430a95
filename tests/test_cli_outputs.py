"""Every command that ends by writing a file or folder checks, before it loads a model or trains, that it can write
there: an output in a folder that does not exist, or a folder where a file goes, is one line and exit 2 at once,
and whatever stood at the output is left as it was."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from budgetlora import runs
from budgetlora.cli import main
from budgetlora.config import Config
from budgetlora.errors import RunFolderError

MODULES_THAT_LOAD = ("budgetlora.inference.load", "budgetlora.inference.export",
                     "budgetlora.shift.selftrain", "budgetlora.shift.submit")
MODULES_THAT_TRAIN = ("budgetlora.training.train", "budgetlora.shift.selftrain", "budgetlora.shift.submit")


@pytest.fixture
def no_model(monkeypatch):
    """Any model load or training fails the test: the command had to stop before them."""
    import importlib

    def loaded(*a, **k):
        raise AssertionError("a model was loaded (or trained) before the output was checked")

    # every module imported before any is patched: one imported while `load_run` is patched would keep the stub
    modules = {name: importlib.import_module(name) for name in MODULES_THAT_LOAD + MODULES_THAT_TRAIN}
    for name in MODULES_THAT_LOAD:
        monkeypatch.setattr(modules[name], "load_run", loaded)
    for name in MODULES_THAT_TRAIN:
        monkeypatch.setattr(modules[name], "train", loaded)


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished-looking run folder: enough for every check that comes before loading."""
    cfg = Config.from_dict({"model": {"name": "minilm"}})
    out = tmp_path / "runs" / cfg.run_id
    out.mkdir(parents=True)
    runs.write_text(out / runs.CONFIG, cfg.to_yaml())
    for name in runs.ADAPTER_FILES:
        (out / name).write_bytes(b"")
    runs.write_json(out / runs.METRICS, {"val_accuracy": 0.5, "test_accuracy": 0.5, "trainable_params": 1})
    return out


@pytest.fixture
def texts(tmp_path) -> Path:
    path = tmp_path / "texts.csv"
    path.write_text("text\nfirst headline\nsecond headline\n")
    return path


def refused(argv: list[str], capsys, *needles: str) -> str:
    """Run the command: exit 2 with one line naming the problem, in well under a model load."""
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(argv) == 2
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budgetlora: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert took < 10, f"{took:.1f}s: the command did work before refusing"
    return lines[0]


def test_predict(tmp_path, run, texts, no_model, capsys):
    missing = tmp_path / "missing" / "out.csv"
    refused(["predict", str(run), "--input", str(texts), "--output", str(missing)], capsys,
            str(missing), "does not exist")
    for extra in (["--prior-correction"], ["--target-prior", "uniform"], ["--proba", "--top-k", "2"]):
        refused(["predict", str(run), "--input", str(texts), "--output", str(missing), *extra], capsys,
                "does not exist")
    assert not missing.parent.exists()


def test_predict_into_a_folder(tmp_path, run, texts, no_model, capsys):
    folder = tmp_path / "out.csv"
    folder.mkdir()
    refused(["predict", str(run), "--input", str(texts), "--output", str(folder)], capsys, "is a folder")
    assert folder.is_dir() and not any(folder.iterdir())


def test_predict_priors_file_that_is_a_folder(tmp_path, run, texts, no_model, capsys):
    (tmp_path / "out.csv.priors.json").mkdir()
    refused(["predict", str(run), "--input", str(texts), "--output", str(tmp_path / "out.csv"),
             "--prior-correction", "on"], capsys, "out.csv.priors.json", "is a folder")


def test_export(tmp_path, run, no_model, capsys):
    refused(["export", str(run), "--merged", str(tmp_path / "missing" / "merged")], capsys, "does not exist")
    # both outputs are checked before the first export starts
    refused(["export", str(run), "--merged", str(tmp_path / "merged"), "--onnx", str(tmp_path / "no" / "onnx")],
            capsys, str(tmp_path / "no"), "does not exist")
    (tmp_path / "a-file").write_text("kept")
    refused(["export", str(run), "--merged", str(tmp_path / "a-file")], capsys, "is a file")
    assert (tmp_path / "a-file").read_text() == "kept" and not (tmp_path / "merged").exists()


def test_self_train(tmp_path, run, texts, no_model, capsys):
    refused(["self-train", str(run), "--input", str(texts), "--runs", str(tmp_path / "missing" / "runs")],
            capsys, "does not exist")


def test_shift(tmp_path, run, texts, no_model, capsys):
    refused(["shift", str(run), "--input", str(texts), "--output", str(tmp_path / "missing" / "shift")], capsys,
            "does not exist")
    (run / "shift").write_text("a file where the analysis folder goes")
    refused(["shift", str(run), "--input", str(texts)], capsys, "is a file")


def test_submit(tmp_path, texts, no_model, capsys):
    refused(["submit", "--config", "minilm-quick", "--input", str(texts), "--runs", str(tmp_path / "runs"),
             "--output", str(tmp_path / "missing" / "submission.csv")], capsys, "does not exist")
    (tmp_path / "submission.csv.summary.json").mkdir()
    refused(["submit", "--config", "minilm-quick", "--input", str(texts), "--runs", str(tmp_path / "runs"),
             "--output", str(tmp_path / "submission.csv")], capsys, "submission.csv.summary.json", "is a folder")
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_report(tmp_path, run, capsys):
    refused(["report", str(tmp_path / "missing" / "dir")], capsys, "not a folder")
    folder = run.parent
    runs.write_text(folder / "leaderboard.csv", "the last report\n")
    (folder / "plots").write_text("a file where the plots folder goes")
    refused(["report", str(folder)], capsys, "plots", "is a file")
    assert (folder / "leaderboard.csv").read_text() == "the last report\n"  # untouched


def test_the_check_creates_nothing(tmp_path):
    for kind in runs.OUTPUT_KINDS:
        assert runs.check_output(tmp_path / kind, kind) == tmp_path / kind
    assert list(tmp_path.iterdir()) == []
    assert runs.check_output("relative-name.csv") == Path("relative-name.csv")  # the working directory's
    deep = tmp_path / "a" / "b" / "runs"
    assert runs.check_output(deep, "into", parents=True) == deep  # a caller that makes the folders itself
    with pytest.raises(RunFolderError, match="does not exist"):
        runs.check_output(deep, "into")
    (tmp_path / "a").write_text("a file where a folder goes")
    with pytest.raises(RunFolderError, match="is not a folder"):
        runs.check_output(deep, "into", parents=True)
