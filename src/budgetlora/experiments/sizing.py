"""How much search a time budget buys on this machine (`tune`'s sizing): candidates per rung of successive
halving, the steps of each rung, and the speed finished runs actually ran at."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlora import runs

ETA = 3  # successive halving: a third goes on, with three times the steps
FINALISTS = 2


VAL_ROWS = 1000  # one validation set for every trial: this many rows (at most a fifth of the training rows)


def val_fraction(rows: int) -> float:
    """The share of `rows` every trial holds out: VAL_ROWS of them, at most a fifth."""
    return min(0.2, VAL_ROWS / rows)


@dataclass(frozen=True)
class Speed:
    step_s: float  # seconds per training step
    trial_s: float  # the fixed cost of a trial: everything but its training steps


def rung_sizes(n0: int) -> list[int]:
    """Candidates per rung: n0, then a third of it (rounded up), ..., down to the finalists."""
    sizes = [n0]
    while sizes[-1] > FINALISTS:
        sizes.append(max(FINALISTS, math.ceil(sizes[-1] / ETA)))
    return sizes


def first_steps(sizes: list[int], seconds: float, speed: Speed) -> int:
    """Rung 0's steps so that every rung (each ETA times the steps of the one before) fits in `seconds`."""
    weight = sum(n * ETA ** i for i, n in enumerate(sizes))
    return int((seconds - sum(sizes) * speed.trial_s) / (speed.step_s * weight))


def size_search(n_space: int, seconds: float, speed: Speed, min_steps: int, max_steps: int) -> tuple[list[int], int]:
    """The most candidates the search time holds with rung 0 at >= min_steps each: (candidates per rung, rung 0's
    steps), the top rung capped at max_steps. ([], 0) when not even the finalists fit."""
    for n0 in range(n_space, 0, -1):
        sizes = rung_sizes(n0)
        steps = first_steps(sizes, seconds, speed)
        if steps >= min_steps:
            return sizes, max(min_steps, min(steps, max_steps // ETA ** (len(sizes) - 1)))
    return [], 0


def later_steps(sizes: list[int], done: int, seconds: float, speed: Speed, floor: int, max_steps: int) -> int:
    """The steps of rung `done` (> 0), sized again for the time left and the speed measured so far; never fewer than
    the rung before (`floor` x ETA would be the plan) and never more than max_steps."""
    rest = sizes[done:]
    steps = first_steps(rest, seconds, speed)
    return max(floor, min(steps, max_steps))


def measured_speed(metrics: list[dict], seconds: list[float], fallback: Speed) -> Speed:
    """Speed from finished trials: each trial's wall seconds split into its training steps and the rest."""
    step_s = [(m["train_time_s"] - m.get("val_time_s", 0.0)) / m["steps"] for m in metrics if m.get("steps")]
    if not step_s:
        return fallback
    step = float(np.median(step_s))
    fixed = [s - step * m["steps"] for m, s in zip(metrics, seconds) if m.get("steps")]
    return Speed(step, max(float(np.median(fixed)), 0.5) if fixed else fallback.trial_s)


def steady_step_s(run: Path) -> float | None:
    """Seconds per step between the run's second logging point and its last (history.csv's train_s), or None."""
    import csv

    try:
        with open(run / runs.HISTORY) as f:
            points = [(int(r["step"]), float(r["train_s"])) for r in csv.DictReader(f) if r.get("train_loss")]
    except (OSError, ValueError, KeyError):
        return None
    if len(points) < 3 or points[-1][0] <= points[1][0]:
        return None
    return (points[-1][1] - points[1][1]) / (points[-1][0] - points[1][0])
