"""A damaged run folder is reported, never a traceback: each command that reads a run folder either gives its
correct result or exits 2 with one line `budgetlora: error: ...` naming the damaged file, and `budgetlora.load`
raises a BudgetloraError naming it.

One file is damaged at a time, in a copy of the shared tiny run. Every file is read through one shared function
(`load_run`, and the leaderboard for config.yaml and metrics.json), so each damage goes through `load` and one command,
and every command runs once against a corrupt config.yaml and once against a corrupt metrics.json; an absent or
sparse metrics.json, which still loads, goes to the commands that use its values."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import budgetlora
from budgetlora import runs
from budgetlora.cli import main
from budgetlora.errors import BudgetloraError

ADAPTER_CONFIG, WEIGHTS = runs.ADAPTER_FILES
DAMAGE = {
    "missing": None,
    "empty": "",
    "garbage": "{not: [valid\n",  # neither JSON nor YAML
    "list": "[1, 2, 3]\n",  # valid JSON and YAML, but not the object the file holds
    "no_keys": '{"unrelated": 1}\n',  # an object without anything the file needs
}
LOADED = (runs.CONFIG, ADAPTER_CONFIG, runs.VERIFY)  # read only on the way through load_run
CASES = [(f, d) for f in (*LOADED, runs.METRICS) for d in DAMAGE] + [(WEIGHTS, "truncated")]
# a run without metrics.json is unfinished, and one whose metrics lack optional fields still loads
MAY_LOAD = {(runs.METRICS, "missing"), (runs.METRICS, "no_keys")}
ROWS = 12
ALL = ["evaluate", "predict", "predict --prior-correction", "shift", "self-train", "export --merged", "serve", "report"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_csvs) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    rows = pd.read_csv(small_csvs[1]).groupby("label").head(ROWS // 4)
    rows.to_csv(folder / "labelled.csv", index=False)
    rows[["text"]].to_csv(folder / "texts.csv", index=False)
    return {"labelled": folder / "labelled.csv", "texts": folder / "texts.csv"}


def damaged(tiny_run: Path, tmp_path: Path, name: str, damage: str) -> Path:
    run = tmp_path / "runs" / tiny_run.name
    shutil.copytree(tiny_run, run)
    path = run / name
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif DAMAGE[damage] is None:
        path.unlink()
    else:
        path.write_text(DAMAGE[damage])
    return run


def commands(run: Path, tmp: Path, inputs: dict[str, Path], served: list) -> dict:
    """Every command that reads a run folder: its arguments, and the check of its correct result."""
    csv, texts = str(inputs["labelled"]), str(inputs["texts"])

    def rows(path: Path) -> bool:
        return pd.read_csv(path)["ID"].tolist() == list(range(ROWS))

    return {
        "evaluate": (["evaluate", run, "--input", csv], lambda out: json.loads(out)["n"] == ROWS),
        "predict": (["predict", run, "--input", texts, "--output", tmp / "p.csv"], lambda out: rows(tmp / "p.csv")),
        "predict --prior-correction": (
            ["predict", run, "--input", texts, "--output", tmp / "pc.csv", "--prior-correction"],
            lambda out: rows(tmp / "pc.csv") and (tmp / "pc.csv.priors.json").is_file()),
        "shift": (["shift", run, "--input", texts, "--output", tmp / "shift"],
                  lambda out: (tmp / "shift" / "shift.json").is_file()),
        "self-train": (["self-train", run, "--input", texts, "--runs", tmp / "st", "--max-steps", "1",
                        "--threshold", "0"], lambda out: len(runs.list_runs(tmp / "st")) == 1),
        "export --merged": (["export", run, "--merged", tmp / "merged"],
                            lambda out: (tmp / "merged" / "config.json").is_file()),
        "serve": (["serve", run], lambda out: len(served) == 1),
        "report": (["report", run.parent], lambda out: (run.parent / "leaderboard.csv").is_file()),
    }


@pytest.fixture
def served(monkeypatch) -> list:
    """`serve` builds its app, and the app is kept here instead of being served."""
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    return apps


def run_cli(argv: list, capsys, name: str, correct) -> int:
    """Run one command; a raised exception fails the test. Exit 0 must be the correct result, anything else one
    `budgetlora: error:` line that names the damaged file."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    if code == 0:
        assert correct(out), f"{argv[0]} exited 0 without its result"
        return code
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("budgetlora: error:")]
    assert code == 2 and len(errors) == 1, (code, err[-3000:])
    assert name in errors[0], errors[0]
    return code


@pytest.mark.parametrize("name,damage", CASES)
def test_load_names_the_damaged_file(tiny_run, tmp_path, name, damage):
    run = damaged(tiny_run, tmp_path, name, damage)
    if (name, damage) in MAY_LOAD:
        assert budgetlora.load(run).predict(["a text"]) in ([0], [1], [2], [3])
        return
    with pytest.raises(BudgetloraError, match=name.replace(".", r"\.")):
        budgetlora.load(run)


@pytest.mark.parametrize("name,damage", [c for c in CASES if c[0] != runs.METRICS])
def test_a_file_read_on_loading_fails_predict_in_one_line(tiny_run, tmp_path, inputs, capsys, name, damage):
    run = damaged(tiny_run, tmp_path, name, damage)
    argv, correct = commands(run, tmp_path, inputs, [])["predict"]
    assert run_cli(argv, capsys, name, correct) == 2


@pytest.mark.parametrize("command", ALL)
def test_every_command_reports_a_corrupt_config(tiny_run, tmp_path, inputs, capsys, served, command):
    run = damaged(tiny_run, tmp_path, runs.CONFIG, "garbage")
    argv, correct = commands(run, tmp_path, inputs, served)[command]
    assert run_cli(argv, capsys, runs.CONFIG, correct) == 2


# metrics.json is read by load_run (every command but report) and by the leaderboard: a damage the reader refuses is
# run through every command once; an absent or sparse file loads, so it goes to the commands that use its values
METRICS_CASES = [(c, "garbage") for c in ALL] + [("predict --prior-correction", d) for d in ("empty", "list")] + [
    (c, d) for c in ("predict --prior-correction", "self-train", "serve", "report") for d in ("missing", "no_keys")]


@pytest.mark.slow
@pytest.mark.parametrize("command,damage", METRICS_CASES)
def test_metrics_readers(tiny_run, tmp_path, inputs, capsys, served, command, damage):
    run = damaged(tiny_run, tmp_path, runs.METRICS, damage)
    argv, correct = commands(run, tmp_path, inputs, served)[command]
    if command == "report" and damage == "missing":  # the run is unfinished: there is nothing to report
        assert main([str(a) for a in argv]) == 2
        assert capsys.readouterr().err.strip() == f"budgetlora: error: no finished runs under {run.parent}"
        return
    code = run_cli(argv, capsys, runs.METRICS, correct)
    if command == "self-train":  # the round gate compares with the parent's validation accuracy
        assert code == 2
