"""`budgetlora sweep` as a user runs it, with the training replaced by the fake runner: the closing report reads the
runs wherever the spec's `runs:` puts them, a spec's base may be a shipped preset's name, and a time budget stops
the sweep before a trial it cannot hold, a rerun finishing the rest."""
from __future__ import annotations

import optuna
import pytest

from budgetlora import runs
from budgetlora.cli import main
from budgetlora.config import Config, ConfigError
from budgetlora.experiments import timebudget
from budgetlora.experiments.spec import load_spec
from budgetlora.experiments.sweep import run_sweep
from budgetlora.experiments.timebudget import parse_duration
from tests.experiments.test_sweep import calls, fake_runner, trials, write_spec


class FakeClock:
    """Time that moves only when a trial trains: TRIAL_S per trial, nothing for the sweep's own work."""

    TRIAL_S = 10.0

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(timebudget, "clock", c)
    return c


@pytest.fixture
def fake_training(monkeypatch, clock):
    """`budgetlora sweep`'s real runner calls training.train.train: the fake runner stands in for it."""
    import budgetlora.training.train

    def train(cfg, root, on_record=None, **kwargs):
        clock.now += FakeClock.TRIAL_S
        return fake_runner(cfg, root)

    monkeypatch.setattr(budgetlora.training.train, "train", train)


def sweep(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["sweep", *argv])
    out, err = capsys.readouterr()
    return rc, out + err


def test_the_closing_report_reads_the_specs_runs_folder(tmp_path, capsys, fake_training):
    elsewhere = tmp_path / "shared" / "runs"
    spec_path = write_spec(tmp_path, grid={"lora.r": [2, 4]}, seeds=2, runs=str(elsewhere))
    other = fake_runner(Config.from_dict({"model": {"name": "minilm"}, "lora": {"r": 16}}), elsewhere)
    rc, out = sweep(capsys, str(spec_path), "--root", str(tmp_path / "sweeps"))
    assert rc == 0, out
    spec = load_spec(spec_path, root=tmp_path / "sweeps")
    assert f"report: {spec.folder / 'report.html'}" in out
    board = (spec.folder / "leaderboard.csv").read_text().strip().splitlines()
    assert len(board) == 1 + 4  # 2 configs x 2 seeds, all under `runs:`
    assert not any(line.startswith(other.name) for line in board)  # another sweep's run in the same folder
    assert sorted(runs.load_config(p).train.seed for p in runs.list_runs(elsewhere)) == [42, 42, 42, 43, 43]


def test_base_may_name_a_shipped_preset(tmp_path):
    spec = load_spec(write_spec(tmp_path, base="minilm-quick", grid={"lora.r": [2, 4]}), root=tmp_path / "sweeps")
    assert spec.base == Config.from_yaml("minilm-quick")
    with pytest.raises(ConfigError, match="base preset not found: no-such-preset"):
        load_spec(write_spec(tmp_path, name="bad", base="no-such-preset", grid={"lora.r": [2]}))


@pytest.mark.parametrize("given, seconds", [("90s", 90), ("30m", 1800), ("1.5h", 5400), (45, 45), ("2", 2),
                                            (" 10 M ", 600), (None, None)])
def test_durations(given, seconds):
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("bad", ["abc", "0", "-5m", "5x", "1h30m", True, 0])
def test_bad_durations(bad):
    with pytest.raises(ConfigError, match="time budget"):
        parse_duration(bad)


def test_a_time_budget_stops_before_a_trial_it_cannot_hold(tmp_path, capsys, fake_training, clock):
    """Each trial takes 10 s; 25 s hold two, and after them 5 s cannot hold a third. The rerun (a new 25 s)
    finishes the other two."""
    spec_path = write_spec(tmp_path, grid={"lora.r": [1, 2, 4, 8]})
    argv = (str(spec_path), "--root", str(tmp_path / "sweeps"), "--time-budget", "25s")
    rc, out = sweep(capsys, *argv)
    spec = load_spec(spec_path, root=tmp_path / "sweeps")
    assert rc == 0, out
    assert "this run: 2 trials in 20.0s of a 25.0s time budget; 2 left; run the same command again" in out
    assert len(calls(spec)) == 2 and len(trials(spec, optuna.trial.TrialState.COMPLETE)) == 2
    assert not trials(spec, optuna.trial.TrialState.RUNNING) and not trials(spec, optuna.trial.TrialState.FAIL)
    assert clock.now == 1020.0

    rc, out = sweep(capsys, *argv)
    assert rc == 0, out
    assert "this run: 2 trials in 20.0s of a 25.0s time budget; none left" in out
    done = trials(spec, optuna.trial.TrialState.COMPLETE)
    assert sorted(t.params["lora.r"] for t in done) == [1, 2, 4, 8]
    assert len(calls(spec)) == len(set(calls(spec))) == 4  # nothing trained twice


def test_the_specs_time_budget_and_its_override(tmp_path, clock):
    def runner(cfg, root):
        clock.now += FakeClock.TRIAL_S
        return fake_runner(cfg, root)

    spec = load_spec(write_spec(tmp_path, grid={"lora.r": [1, 2, 4, 8]}, time_budget="35s"), root=tmp_path / "sw")
    assert spec.time_budget == 35
    s = run_sweep(spec, runner=runner)
    assert (s["ran"], s["left"], s["time_s"], s["time_budget_s"]) == (3, 1, 30.0, 35)
    s = run_sweep(spec, runner=runner, time_budget=5)  # a first trial always starts
    assert (s["ran"], s["left"]) == (1, 0)
    with pytest.raises(ConfigError, match="time_budget"):
        load_spec(write_spec(tmp_path, name="bad", grid={"lora.r": [1]}, time_budget="soon"))


def test_a_bad_time_budget_flag_is_one_line(tmp_path, capsys):
    rc, out = sweep(capsys, str(write_spec(tmp_path, grid={"lora.r": [1]})), "--root", str(tmp_path / "sw"),
                    "--time-budget", "a while")
    assert rc == 2 and out.strip().splitlines() == [
        "budgetlora: error: --time-budget must be a duration like 90s, 30m or 1.5h, got 'a while'"]
