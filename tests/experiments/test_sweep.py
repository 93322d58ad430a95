"""Sweeps: shared studies across worker processes, resume after a kill, budget pruning before any weight loads,
failures recorded without stopping the sweep, the real training path, and the HTML report in a real browser."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from budgetlora import runs
from budgetlora.adapters.budget import plan
from budgetlora.config import ConfigError
from budgetlora.experiments.leaderboard import collect, pareto_front, write_report
from budgetlora.experiments.spec import load_spec
from budgetlora.experiments.sweep import run_sweep


def fake_runner(cfg, root):
    """Stands in for training: logs the call, waits a little (so workers overlap), writes a finished run folder."""
    root = Path(root)
    calls = root.parent / "calls"
    calls.mkdir(parents=True, exist_ok=True)
    (calls / f"{cfg.run_id}.{os.getpid()}.{uuid.uuid4().hex}").touch()
    time.sleep(float(os.environ.get("FAKE_RUN_S", "0.05")))
    out = root / cfg.run_id
    out.mkdir(parents=True, exist_ok=True)
    runs.write_text(out / runs.CONFIG, cfg.to_yaml())
    for name in runs.ADAPTER_FILES:
        (out / name).write_bytes(b"")
    acc = 0.5 + cfg.lora.r / 100 + cfg.lora.alpha / 1000
    runs.write_json(out / runs.METRICS, {"val_accuracy": acc, "test_accuracy": acc - 0.01, "val_loss": 1 - acc,
                                         "trainable_params": plan(cfg).total, "wall_time_s": 0.1})
    return out


class InterruptAt:
    """Runs the fake runner, but the n-th call is killed (KeyboardInterrupt) right after its run folder is
    written, the worst moment: the run finished, the study never heard of it."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, cfg, root):
        self.calls += 1
        out = fake_runner(cfg, root)
        if self.calls == self.n:
            raise KeyboardInterrupt
        return out


def calls(spec) -> list[str]:
    folder = spec.runs.parent / "calls"
    return sorted(p.name.split(".")[0] for p in folder.iterdir()) if folder.is_dir() else []


def write_spec(tmp_path, name="s", **body) -> Path:
    body.setdefault("base", {"model": {"name": "minilm"}})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def trials(spec, state):
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.folder / 'study.db'}")
    return [t for t in study.get_trials() if t.state == state]


GRID = {"lora.r": [1, 2, 4, 8], "lora.alpha": [8, 16]}


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_RUN_S", "1.0")  # inherited by the spawned workers
    spec = load_spec(write_spec(tmp_path, grid=GRID), root=tmp_path / "sweeps")
    s = run_sweep(spec, workers=2, runner=fake_runner)
    done = trials(spec, optuna.trial.TrialState.COMPLETE)
    assert len(done) == 8 == s["states"]["COMPLETE"]
    assert len({tuple(sorted(t.params.items())) for t in done}) == 8  # every grid point once
    c = calls(spec)
    assert len(c) == len(set(c)) == 8  # every config trained exactly once
    pids = {p.name.split(".")[1] for p in (spec.runs.parent / "calls").iterdir()}
    assert len(pids) == 2, "both workers should have taken trials"
    assert s["best"]["params"] == {"lora.r": 8, "lora.alpha": 16}


@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining(tmp_path):
    path = write_spec(tmp_path, grid=GRID)
    spec = load_spec(path, root=tmp_path / "sweeps")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, runner=InterruptAt(3))
    first = calls(spec)
    assert len(first) == 3 and len(trials(spec, optuna.trial.TrialState.COMPLETE)) == 2
    s = run_sweep(load_spec(path, root=tmp_path / "sweeps"), runner=fake_runner)
    done = trials(spec, optuna.trial.TrialState.COMPLETE)
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done) == 8
    second = calls(spec)
    assert len(second) == 8 and len(set(second)) == 8  # 5 new trainings: nothing finished was trained again
    assert sum(bool(t.user_attrs.get("reused")) for t in done) == 1  # the killed-after-writing run was reused
    # a third run has nothing left to do
    again = run_sweep(load_spec(path, root=tmp_path / "sweeps"), runner=fake_runner)
    assert again["trials"] == s["trials"] and calls(spec) == second


@pytest.mark.slow
def test_over_budget_is_pruned_before_loading_and_failures_are_recorded(tmp_path, monkeypatch):
    import budgetlora.adapters.model

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(budgetlora.adapters.model, "build", no_weights)
    monkeypatch.setattr(budgetlora.adapters.model, "build_base", no_weights)

    def runner(cfg, root):
        assert cfg.lora.r != 2048, "the over-budget config reached the runner"
        if cfg.lora.r == 8:
            raise RuntimeError("boom: out of memory")
        return fake_runner(cfg, root)

    spec = load_spec(write_spec(tmp_path, grid={"lora.r": [4, 8, 2048]}), root=tmp_path / "sweeps")
    s = run_sweep(spec, runner=runner)
    assert s["states"] == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 1}
    (pruned,) = trials(spec, optuna.trial.TrialState.PRUNED)
    assert pruned.params["lora.r"] == 2048 and pruned.user_attrs["trainable_params"] > 1_000_000
    assert "over budget" in pruned.user_attrs["pruned"]
    (failed,) = trials(spec, optuna.trial.TrialState.FAIL)
    assert failed.params["lora.r"] == 8 and "boom" in failed.user_attrs["error"]
    assert not (spec.runs / ".locks").exists() or all(p.suffix == ".lock" for p in (spec.runs / ".locks").iterdir())


def test_fill_solves_the_size_for_the_budget(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"lora.targets": ["q,v", "q,k,v,o"]}, fill=True,
                                base={"model": {"name": "minilm"}, "budget": {"max_params": 100_000}}),
                     root=tmp_path / "sweeps")
    run_sweep(spec, runner=fake_runner)
    for t in trials(spec, optuna.trial.TrialState.COMPLETE):
        cfg = spec.base.replace(**t.params)
        r = t.user_attrs["lora.r"]
        assert r == plan(cfg).fill_size() and t.user_attrs["trainable_params"] <= 100_000
        assert plan(cfg.replace(**{"lora.r": r + 1})).total > 100_000


def test_bad_specs_and_tracking_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key"):
        load_spec(write_spec(tmp_path, grid={"lora.rank": [1, 2]}))
    with pytest.raises(ConfigError, match="exactly one"):
        load_spec(write_spec(tmp_path, grid={"lora.r": [1]}, search={"train.lr": {"low": 1e-4, "high": 1e-3}}))
    with pytest.raises(ConfigError, match="n_trials"):
        load_spec(write_spec(tmp_path, search={"train.lr": {"low": 1e-4, "high": 1e-3}}))
    spec = load_spec(write_spec(tmp_path, grid={"lora.r": [1]}), root=tmp_path / "sweeps")
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="--track tensorboard needs"):
            run_sweep(spec, runner=fake_runner, track="tensorboard")


@pytest.mark.slow
def test_search_runs_n_trials(tmp_path):
    spec = load_spec(write_spec(tmp_path, n_trials=5, search={"lora.r": {"low": 1, "high": 8},
                                                             "lora.alpha": {"choices": [8, 16]}}),
                     root=tmp_path / "sweeps")
    s = run_sweep(spec, runner=fake_runner)
    assert s["states"]["COMPLETE"] == 5 and len(calls(spec)) == len(set(calls(spec))) <= 5


@pytest.mark.slow
def test_real_training_sweep(tmp_path, small_csvs):
    """Two grid points through the real training loop on tiny data, then the report."""
    train, test = small_csvs
    base = {"model": {"name": "minilm", "max_length": 32},
            "data": {"train": str(train), "test": str(test), "train_limit": 200, "test_limit": 100,
                     "val_fraction": 0.1},
            "train": {"max_steps": 5, "batch_size": 16, "lr": 5e-3, "eval_every": 5}}
    spec = load_spec(write_spec(tmp_path, base=base, grid={"lora.r": [2, 4]}), root=tmp_path / "sweeps")
    s = run_sweep(spec)
    assert s["states"] == {"COMPLETE": 2}, s
    rows = collect(spec.folder)
    assert sorted(r["r"] for r in rows) == [2, 4]
    assert all(0 <= r["val_accuracy"] <= 1 and r["trainable_params"] > 0 for r in rows)
    assert (spec.folder / "study.db").is_file() and write_report(spec.folder)["html"].is_file()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed: run .ci/setup-chromium.sh")
        pytest.skip("chromium not installed (run .ci/setup-chromium.sh)")
    spec = load_spec(write_spec(tmp_path, grid={"lora.r": [1, 2, 4], "lora.targets": ["q,v", "q,k,v,o"]}),
                     root=tmp_path / "sweeps")
    run_sweep(spec, runner=fake_runner)
    from budgetlora.cli import main

    assert main(["report", str(spec.folder)]) == 0
    n = len(runs.list_runs(spec.folder))
    assert n == 6
    csv_lines = (spec.folder / "leaderboard.csv").read_text().strip().splitlines()
    assert len(csv_lines) == n + 1 and csv_lines[0].startswith("run_id,name,model,r,alpha")
    rows = collect(spec.folder)
    assert [r["val_accuracy"] for r in rows] == sorted((r["val_accuracy"] for r in rows), reverse=True)
    assert [r["r"] for r in pareto_front(rows)] == [1, 2, 4]  # fake accuracy grows with rank: q,v alone is the front
    profile = tmp_path / "chrome-profile"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", "--dump-dom", (spec.folder / "report.html").resolve().as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<body[^>]*data-images-loaded="(\d+)/(\d+)"', dom)
    assert m, f"the page's load script did not run:\n{dom[:500]}"
    assert m.group(1) == m.group(2) == "5"  # four ablation plots and the intervals, all decoded
    assert len(re.findall(r'<tr class="run', dom)) == n


@pytest.mark.slow
def test_a_grid_point_drawn_twice_is_not_trained_twice(tmp_path):
    """The duplicate a racing worker could draw is recorded as a pruned duplicate, without a second training."""
    spec = load_spec(write_spec(tmp_path, grid={"lora.r": [2, 4]}), root=tmp_path / "sweeps")
    run_sweep(spec, runner=fake_runner)
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.folder / 'study.db'}")
    study.enqueue_trial({"lora.r": 4})  # what GridSampler hands a second worker in the race
    s = run_sweep(spec, runner=fake_runner)
    assert s["states"] == {"COMPLETE": 2, "PRUNED": 1} and len(calls(spec)) == 2
    (dup,) = trials(spec, optuna.trial.TrialState.PRUNED)
    assert dup.user_attrs["pruned"].startswith("duplicate of trial")


def recording_runner(cfg, root, on_record=None):
    """A fake runner that reports validation every 10 steps (accuracy growing with lora.r) before finishing, as the
    real loop does; a pruned trial stops inside on_record, leaving its folder unfinished."""
    out = Path(root) / cfg.run_id
    out.mkdir(parents=True, exist_ok=True)
    (out / runs.CHECKPOINT).mkdir(exist_ok=True)
    final = 0.5 + cfg.lora.r / 100
    for step in (10, 20, 30, 40):
        if on_record is not None:
            on_record({"step": step, "val_accuracy": final * step / 40, "val_loss": 1 - final})
    return fake_runner(cfg, root)


def test_a_pruned_trial_is_recorded_with_its_step_and_not_rerun(tmp_path):
    body = {"search": {"lora.r": {"low": 1, "high": 32}}, "n_trials": 10, "prune": "median",
            "seed": 3}
    spec = load_spec(write_spec(tmp_path, **body), root=tmp_path / "sweeps")
    run_sweep(spec, runner=recording_runner)
    pruned = [t for t in trials(spec, optuna.trial.TrialState.PRUNED) if "pruned_at_step" in t.user_attrs]
    assert pruned, "low-rank trials below the median should be stopped"
    for t in pruned:
        assert t.user_attrs["pruned_at_step"] in (10, 20, 30, 40)
        assert not runs.is_finished(spec.runs / t.user_attrs["run_id"])  # stopped: never marked finished
    done = len(trials(spec, optuna.trial.TrialState.COMPLETE))
    before = len(calls(spec))
    run_sweep(spec, runner=recording_runner)  # resumed: the study already holds n_trials
    assert len(calls(spec)) == before and len(trials(spec, optuna.trial.TrialState.COMPLETE)) == done
    assert len([t for t in trials(spec, optuna.trial.TrialState.PRUNED) if "pruned_at_step" in t.user_attrs]) \
        == len(pruned)


def test_seeds_run_every_config_once_per_seed(tmp_path):
    spec = load_spec(write_spec(tmp_path, grid={"lora.r": [2, 4]}, seeds=3), root=tmp_path / "sweeps")
    assert spec.prune == "none"  # a grid wants every point: no pruning unless asked
    run_sweep(spec, runner=fake_runner)
    assert len(calls(spec)) == 6 and len(set(calls(spec))) == 6  # 2 configs x 3 seeds, each once
    seeds = sorted(runs.load_config(p).train.seed for p in runs.list_runs(spec.runs))
    assert seeds == [42, 42, 43, 43, 44, 44]
    for t in trials(spec, optuna.trial.TrialState.COMPLETE):
        assert len(t.user_attrs["seed_values"]) == 3 and t.value == pytest.approx(sum(t.user_attrs["seed_values"]) / 3)
    with pytest.raises(ConfigError, match="seeds"):
        load_spec(write_spec(tmp_path, name="bad", grid={"lora.r": [2]}, seeds=0))
    with pytest.raises(ConfigError, match="prune"):
        load_spec(write_spec(tmp_path, name="bad2", grid={"lora.r": [2]}, prune="hyperband"))
