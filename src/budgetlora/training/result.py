"""A finished training as `budgetlora train` reports it: the run folder and its metrics, read once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from budgetlora import runs
from budgetlora.config import Config


@dataclass(frozen=True)
class TrainedRun:
    path: Path
    cfg: Config
    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        return (f"test accuracy {m['test_accuracy']:.4f} ({self.cfg.model.name}, {m['trainable_params']:,} "
                f"trainable params) -> {self.path}")


def train_run(cfg: Config, root: str | Path = runs.DEFAULT_ROOT, force: bool = False,
              track: str | None = None) -> TrainedRun:
    """Train `cfg` (a finished run id is reused unless `force`), logging to a tracker when `track` names one
    (tensorboard, mlflow); returns the run folder with its metrics."""
    if track:
        from budgetlora.training.track import train_tracked

        out = train_tracked(cfg, track, root=root, force=force)
    else:
        from budgetlora.training.train import train

        out = train(cfg, root=root, force=force)
    return TrainedRun(Path(out), cfg, runs.read_json(Path(out) / runs.METRICS))
