"""Experiment tracking: `budgetlora train --track tensorboard|mlflow` for one training run, and the same
writers for `budgetlora sweep --track`, which logs each finished trial.

The loop hands each history record to `on_record` as it is made (train loss and learning rate at every logging
point, validation loss and accuracy at every evaluation); the tracker writes them to TensorBoard event files or a
local MLflow store straight away, so a dashboard follows the run live. When training ends, the final validation and
test metrics of metrics.json are logged at the last step. Tracking is an option of the command, not a config field:
the same config trains into the same run id whether it is tracked or not.

Logs go beside the run folders, not into them (a run folder only receives whole files, renamed into place):
`<runs>/tensorboard/<run id>/` (`tensorboard --logdir runs/tensorboard`), or the MLflow store `<runs>/mlflow.db`
(`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`; experiment "budgetlora", run name = run id). MLflow's
plain-folder store is in maintenance mode and refuses to start by default, hence SQLite (which optuna's
dependencies already bring). A sweep logs the same way inside its own folder: `<sweep>/tensorboard/trial-NNNN/` or
`<sweep>/mlflow.db` (experiment = the sweep's name, run name = trial-NNNN).
"""
from __future__ import annotations

import logging
import importlib.util
import os
import time
from pathlib import Path

import yaml

from budgetlora import runs
from budgetlora.config import Config, ConfigError
from budgetlora.config.flags import flatten

logger = logging.getLogger(__name__)

EXPERIMENT = "budgetlora"  # the MLflow experiment of single runs; a sweep logs to one named after it
KINDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # kind -> the module it needs (mlflow-skinny has it)
# history keys -> scalar names, grouped the way TensorBoard shows them
RECORD_TAGS = {"train_loss": "train/loss", "lr": "train/lr", "val_loss": "val/loss", "val_accuracy": "val/accuracy"}
# metrics.json's evaluation of the kept (best) state: its own group, since the best step need not be the last one
FINAL_TAGS = {k: f"final/{k}" for k in ("val_accuracy", "val_loss", "val_macro_f1", "test_accuracy", "test_loss",
                                         "test_macro_f1")}


def check(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"--track must be one of {', '.join(KINDS)}, got {kind!r}")
    if importlib.util.find_spec(KINDS[kind]) is None:
        raise ConfigError(f"--track {kind} needs the {KINDS[kind]} package: pip install 'budgetlora[track]'")


class TensorBoardTracker:
    """One event folder per tracked run; its parameters shown as YAML text beside the scalars."""

    def __init__(self, folder: Path, params: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(params, sort_keys=False) + "\n```")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a dashboard watching the folder sees each point as it is made

    def close(self, ok: bool = True) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run in the SQLite store `db`: its parameters flattened to dotted names."""

    def __init__(self, db: Path, name: str, params: dict, experiment: str = EXPERIMENT, tags: dict | None = None):
        import mlflow
        from mlflow.entities import Param

        self.folder = db
        db.parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags or {}).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flatten(params).items()]
        self.client.log_batch(self.run_id, params=params)  # one transaction, not one per field

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in values.items()])

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")




class NoTracker:
    """What the other processes of a data-parallel run get: only the main process logs."""
    folder = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self, ok: bool = True) -> None:
        pass


def open_writer(kind: str, root: str | Path, name: str, params: dict, experiment: str = EXPERIMENT,
                tags: dict | None = None):
    """A tracker for one run called `name` under `root`: the event folder `root/tensorboard/<name>/`, or a run of
    `experiment` in the MLflow store `root/mlflow.db`. `train --track` opens one per run, `sweep --track` one per
    finished trial."""
    check(kind)
    root = Path(root)
    if kind == "tensorboard":
        return TensorBoardTracker(root / "tensorboard" / name, params)
    return MlflowTracker(root / "mlflow.db", name, params, experiment, tags)


def open_tracker(kind: str, cfg: Config, root: str | Path):
    check(kind)
    if int(os.environ.get("RANK", "0")) != 0:  # set by torch.distributed.run / accelerate for every process
        return NoTracker()
    return open_writer(kind, root, cfg.run_id, cfg.to_dict(), tags={"run_id": cfg.run_id})


def record_values(entry: dict) -> dict[str, float]:
    return {tag: float(entry[k]) for k, tag in RECORD_TAGS.items() if entry.get(k) is not None}


def train_tracked(cfg: Config, kind: str, root: str | Path = runs.DEFAULT_ROOT, force: bool = False) -> Path:
    """`train` with each history record and the final metrics sent to a tracker; returns the run folder."""
    from budgetlora.training.train import train

    tracker = open_tracker(kind, cfg, root)
    if tracker.folder is not None:
        logger.info(f"tracking run {cfg.run_id} with {kind} in {tracker.folder}")
    try:
        out = train(cfg, root=root, force=force,
                    on_record=lambda entry: tracker.scalars(record_values(entry), entry["step"]))
        m = runs.read_json(out / runs.METRICS)
        tracker.scalars({tag: float(m[k]) for k, tag in FINAL_TAGS.items() if m.get(k) is not None}, m["steps"])
    except BaseException:  # a killed or failed run shows as failed in MLflow; its points so far are kept
        tracker.close(ok=False)
        raise
    tracker.close()
    return out
