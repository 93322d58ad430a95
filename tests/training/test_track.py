"""`budgetlora train --track`: the values a dashboard shows are the ones history.csv and metrics.json hold, and
tracking does not change the run id."""
from __future__ import annotations

import csv
import json

import pytest

from budgetlora import runs
from budgetlora.cli import main
from budgetlora.config import ConfigError
from budgetlora.training.track import FINAL_TAGS, check, open_tracker, record_values
from tests.conftest import tiny_config

REL = 1e-6  # event files store scalars as float32


def _flags(small_csvs) -> list[str]:
    """The tiny_run fixture's config as CLI flags."""
    train, test = small_csvs
    return ["--data.train", str(train), "--data.test", str(test), "--data.val_fraction", "0.1",
            "--model.max_length", "32", "--train.max_steps", "10", "--train.lr", "5e-3", "--train.batch_size", "16",
            "--train.eval_every", "5"]


def _history(run) -> list[dict]:
    with open(run / runs.HISTORY) as f:
        return list(csv.DictReader(f))


def _column(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h[key])) for h in history if h.get(key)]


def _close(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    return [s for s, _ in got] == [s for s, _ in want] and all(
        abs(g - w) <= REL * max(1.0, abs(w)) for (_, g), (_, w) in zip(got, want))


@pytest.mark.slow
def test_tensorboard_events_hold_history_and_final_metrics(small_csvs, tiny_run, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "runs"
    assert main(["train", *_flags(small_csvs), "--runs", str(root), "--track", "tensorboard"]) == 0
    run_id = tiny_config(small_csvs).run_id
    # the same config, tracked or not, is the same run id (and the same folder as the untracked tiny_run)
    assert run_id == tiny_run.name and (root / run_id / runs.METRICS).is_file()
    events = EventAccumulator(str(root / "tensorboard" / run_id))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/loss", "val/accuracy", "final/test_accuracy", "final/val_loss"} <= tags

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    history = _history(root / run_id)
    for key, tag in (("train_loss", "train/loss"), ("lr", "train/lr"), ("val_loss", "val/loss"),
                     ("val_accuracy", "val/accuracy")):
        assert _column(history, key), key
        assert _close(scalars(tag), _column(history, key)), (tag, scalars(tag), _column(history, key))
    m = json.loads((root / run_id / runs.METRICS).read_text())
    for key, tag in FINAL_TAGS.items():
        assert _close(scalars(tag), [(m["steps"], m[key])]), (tag, scalars(tag), m[key])


@pytest.mark.slow
def test_mlflow_store_holds_what_it_was_given(tiny_run, tmp_path):
    """The MLflow backend, fed the tiny run's real history records and final metrics, reads back the same."""
    import mlflow

    cfg = runs.load_config(tiny_run)
    history = [{k: float(v) if k != "step" else int(v) for k, v in h.items() if v} for h in _history(tiny_run)]
    m = json.loads((tiny_run / runs.METRICS).read_text())
    tracker = open_tracker("mlflow", cfg, tmp_path)
    for h in history:
        tracker.scalars(record_values(h), h["step"])
    tracker.scalars({tag: m[k] for k, tag in FINAL_TAGS.items()}, m["steps"])
    tracker.close()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("budgetlora").experiment_id])
    assert run.info.run_name == cfg.run_id and run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == str(cfg.lora.r)
    got = [(x.step, x.value) for x in client.get_metric_history(run.info.run_id, "train/loss")]
    assert _close(sorted(got), _column(_history(tiny_run), "train_loss"))
    assert run.data.metrics["final/test_accuracy"] == m["test_accuracy"]


def test_unknown_tracker_is_refused():
    with pytest.raises(ConfigError, match="--track must be one of"):
        check("wandb")


def _sweep(tmp_path, kind):
    from budgetlora.experiments.spec import load_spec
    from budgetlora.experiments.sweep import run_sweep
    from tests.experiments.test_sweep import fake_runner, write_spec

    tmp_path.mkdir()
    spec = load_spec(write_spec(tmp_path, grid={"lora.r": [1, 2]}), root=tmp_path / "sweeps")
    run_sweep(spec, runner=fake_runner, track=kind)
    metrics = {}
    for run in runs.list_runs(spec.runs):
        cfg, m = runs.load_config(run), runs.read_json(run / runs.METRICS)
        metrics[cfg.lora.r] = m
    return spec, metrics


@pytest.mark.slow
def test_sweep_tracks_each_trial_with_the_same_writers(tmp_path):
    """`sweep --track` goes through training.track's writers: one TensorBoard folder per finished trial, and one
    MLflow run per trial in the sweep's own store, each holding what the trial's metrics.json says."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, metrics = _sweep(tmp_path / "tb", "tensorboard")
    folders = sorted(p.name for p in (spec.folder / "tensorboard").iterdir())
    assert folders == ["trial-0000", "trial-0001"]
    got = set()
    for number, folder in enumerate(folders):
        events = EventAccumulator(str(spec.folder / "tensorboard" / folder))
        events.Reload()
        (point,) = events.Scalars("sweep/val_accuracy")
        assert point.step == number
        got.add(round(point.value, 5))
        assert "sweep/trainable_params" in events.Tags()["scalars"]
    assert got == {round(m["val_accuracy"], 5) for m in metrics.values()}

    import mlflow

    spec, metrics = _sweep(tmp_path / "mlflow", "mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{spec.folder / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert sorted(r.info.run_name for r in found) == ["trial-0000", "trial-0001"]
    for r in found:
        m = metrics[int(r.data.params["lora.r"])]
        assert r.info.status == "FINISHED" and r.data.tags["trial"] == r.info.run_name[-1]
        assert r.data.metrics["sweep/val_accuracy"] == m["val_accuracy"]
        assert r.data.metrics["sweep/trainable_params"] == m["trainable_params"]


def test_train_and_sweep_share_the_flag_name(capsys):
    from budgetlora.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sweep", "s.yaml", "--track", "mlflow"]).track == "mlflow"
    assert parser.parse_args(["sweep", "s.yaml", "--tracking", "tensorboard"]).track == "tensorboard"  # old name
    assert parser.parse_args(["sweep", "s.yaml"]).track is None
    assert parser.parse_args(["train", "--track", "tensorboard"]).track == "tensorboard"
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--help"])
    shown = capsys.readouterr().out
    assert "--track" in shown and "--tracking" not in shown  # the old name still works, unlisted
