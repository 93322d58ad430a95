"""Several single-label runs answering as one: each member's probabilities calibrated by the temperature it fitted on
validation (metrics.json), averaged. Kept honest about the budget: an ensemble trains the sum of its members'
trainable parameters, and one over the budget is refused like any config.

An `Ensemble` stands where a `LoadedRun` does (predict, evaluate, `budgetlora.load`): its `logits` are the log of the
averaged probabilities, so a softmax of them gives the averaged probabilities back and their argmax is the ensemble's
answer. Members on one base share it (`classifier.load_many`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.errors import ConfigError
from budgetlora.tasks import class_names, softmax, task_of


def members_total(run_dirs: list[str | Path]) -> tuple[int, int, list[tuple[Path, int]]]:
    """(the members' trainable parameters summed, the smallest budget among them, [(run, its count)]), each count
    planned from the run's config (what it trains, head included), before any weight loads."""
    from budgetlora.adapters.budget import plan

    counted = []
    budgets = []
    for run in map(Path, run_dirs):
        if not run.is_dir():
            raise FileNotFoundError(f"run folder not found: {run}")
        cfg = runs.load_config(run)
        counted.append((run, plan(cfg).total))
        budgets.append(cfg.budget.max_params)
    return sum(n for _, n in counted), min(budgets), counted


def format_members(run_dirs: list[str | Path], budget: int, as_json: bool = False) -> tuple[str, bool]:
    """`plan --members`: each run's count and their sum against `budget`, as text or JSON; and whether it fits."""
    import json

    total, _, counted = members_total(run_dirs)
    fits = total <= budget
    if as_json:
        return json.dumps({"members": {str(r): n for r, n in counted}, "total": total, "budget": budget,
                           "fits": fits}, indent=2), fits
    lines = [f"{run}: {n:,} trainable parameters" for run, n in counted]
    lines.append(f"ensemble of {len(counted)}: {total:,} trainable parameters, budget {budget:,}: "
                 + ("fits" if fits else "over the budget"))
    return "\n".join(lines), fits


def check_members(run_dirs: list[str | Path]) -> None:
    """Refuse, before any weight loads, what cannot be one ensemble: fewer than two runs, one run twice, a
    multi-label run, runs with other classes, or members that together train more than the budget."""
    if len(run_dirs) < 2:
        raise ConfigError("an ensemble needs at least two runs")
    if len({Path(r).resolve() for r in run_dirs}) < len(run_dirs):
        raise ConfigError("an ensemble names the same run twice")
    first = runs.load_config(Path(run_dirs[0]))
    for run in map(Path, run_dirs):
        cfg = runs.load_config(run)
        if task_of(cfg).sets:
            raise ConfigError(f"{run} is a multi-label run: ensembles average single-label probabilities")
        if cfg.model.num_labels != first.model.num_labels or class_names(cfg) != class_names(first):
            raise ConfigError(f"{run} has other classes than {run_dirs[0]}: an ensemble's members answer the same "
                              "question")
    total, budget, _ = members_total(run_dirs)
    if total > budget:
        raise ConfigError(f"an ensemble of {len(run_dirs)} runs trains {total:,} parameters, over the budget of "
                          f"{budget:,}: the members' sum counts")


class Ensemble:
    """Members (LoadedRun) as one run: the first member's config and class names, temperature 1 (each member is
    already calibrated by its own)."""

    def __init__(self, members: list):
        self.members = members
        first = members[0]
        self.path, self.cfg = first.path, first.cfg
        self.metrics = {**first.metrics, "temperature": 1.0, "ensemble": [str(m.path) for m in members]}
        self.model, self.tokenizer = first.model, first.tokenizer

    # settable as on a LoadedRun, passed on to every member
    @property
    def max_length(self) -> int:
        return self.members[0].max_length

    @max_length.setter
    def max_length(self, value: int) -> None:
        for m in self.members:
            m.max_length = value

    @property
    def long_texts(self) -> str:
        return self.members[0].long_texts

    @long_texts.setter
    def long_texts(self, value: str) -> None:
        for m in self.members:
            m.long_texts = value

    @property
    def task(self):
        return task_of(self.cfg)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.cfg, self.metrics.get("class_names"))

    def decide(self, logits: np.ndarray) -> np.ndarray:
        return np.asarray(logits).argmax(axis=1)

    def probabilities(self, texts: list[str], progress: bool = False, exact: bool = False) -> np.ndarray:
        """The mean over members of softmax(logits / T), T each member's validation temperature."""
        total = None
        for m in self.members:
            t = float(m.metrics.get("temperature") or 1.0)
            p = softmax(m.logits(texts, progress=progress, exact=exact) / t)
            total = p if total is None else total + p
        return total / len(self.members)

    def logits(self, texts: list[str], progress: bool = False, exact: bool = False) -> np.ndarray:
        return np.log(np.clip(self.probabilities(texts, progress, exact), 1e-300, None))


def load_ensemble(run_dirs: list[str | Path], verify: bool = True, base: str | None = None,
                  long_texts: str = "truncate") -> Ensemble:
    """Check the members (`check_members`), then load them, each verified as `load` verifies one."""
    from budgetlora.inference.classifier import load_many

    check_members(run_dirs)
    return Ensemble([c.run for c in load_many(run_dirs, verify=verify, base=base, long_texts=long_texts)])


def load_any(run: str | Path | list, verify: bool = True, base: str | None = None):
    """One run folder (a LoadedRun), or a list of several (an Ensemble)."""
    from budgetlora.inference.load import load_run

    if isinstance(run, (list, tuple)):
        if len(run) == 1:
            return load_run(run[0], verify=verify, base=base)
        return load_ensemble(list(run), verify=verify, base=base)
    return load_run(run, verify=verify, base=base)
