"""What a sweep tells when it ends: the study's trials by state, the best, the failures still standing, what this
invocation ran and left within its time budget, and which run folders its report is made of."""
from __future__ import annotations

from pathlib import Path

from budgetlora import runs
from budgetlora.experiments import timebudget
from budgetlora.experiments.spec import Spec, param_key
from budgetlora.experiments.storage import masked, open_storage

SETTLED = ("COMPLETE", "PRUNED")  # a trial in these states is done: a rerun does not draw its point again


def load(spec: Spec, storage: str):
    import optuna

    return optuna.load_study(study_name=spec.name, storage=open_storage(storage, spec.heartbeat_s, spec.grace_s))


def summary(spec: Spec, storage: str, since: int | None = None, started: float | None = None,
            budget: float | None = None, n_trials: int | None = None) -> dict:
    """The study as it stands. With `since` (the trial count when this invocation began) and `started` (its
    `timebudget.clock` reading), also what this invocation ran, how long it took, and how many trials are left."""
    study = load(spec, storage)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    settled = {param_key(t.params) for t in trials if t.state.name in SETTLED}
    best = None
    if complete:
        t = study.best_trial
        best = {"number": t.number, "value": t.value, "params": t.params, "run_id": t.user_attrs.get("run_id")}
    out = {"study": spec.name, "storage": storage, "folder": str(spec.folder), "runs": str(spec.runs),
           "trials": len(trials), "states": states, "best": best,
           # failures still standing: a later retry of the same params that finished clears them
           "failed": {t.number: t.user_attrs.get("error", "") for t in trials
                      if t.state.name == "FAIL" and param_key(t.params) not in settled},
           "left": left(spec, trials, n_trials), "time_budget_s": budget}
    if since is not None:
        out["ran"] = sum(t.number >= since and t.state.is_finished() for t in trials)
    if started is not None:
        out["time_s"] = round(timebudget.clock() - started, 1)
    return out


def left(spec: Spec, trials, n_trials: int | None = None) -> int:
    """Trials the sweep still wants: grid points without a settled trial, or a search's n_trials not yet settled
    (either capped by `n_trials`). A failed point counts as left: a rerun tries it again."""
    done = sum(t.state.name in SETTLED for t in trials)
    limit = n_trials if n_trials is not None else (None if spec.grid else spec.n_trials)
    if not spec.grid:
        return max(0, (limit or 0) - done)
    points = {param_key({k: t.params.get(k) for k in spec.grid}) for t in trials if t.state.name in SETTLED}
    pending = sum(param_key(p) not in points for p in spec.points())
    return pending if limit is None else min(pending, max(0, limit - done))


def format_summary(s: dict) -> str:
    states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(s["states"].items()))
    lines = [f"study {s['study']}: {s['trials']} trials ({states or 'none'})"]
    if s["best"]:
        b = s["best"]
        lines.append(f"best: trial {b['number']} value {b['value']:.4f} run {b['run_id']} params {b['params']}")
    for n, err in s["failed"].items():
        lines.append(f"trial {n} failed: {err}")
    if "ran" in s:
        took = f" in {timebudget.format_duration(s['time_s'])}" if "time_s" in s else ""
        budget = f" of a {timebudget.format_duration(s['time_budget_s'])} time budget" if s.get("time_budget_s") \
            else ""
        rest = f"{s['left']} left; run the same command again to continue" if s["left"] else "none left"
        lines.append(f"this run: {s['ran']} trials{took}{budget}; {rest}")
    lines.append(f"runs in {s['runs']}; study in {masked(s['storage'])}")
    return "\n".join(lines)


def run_folders(spec: Spec, storage: str) -> list[Path]:
    """The finished run folders of the study's completed trials, every seed's, wherever `runs:` put them: what the
    sweep's own report is made of (a runs folder shared with other sweeps holds theirs too)."""
    folders: list[Path] = []
    for t in load(spec, storage).get_trials(deepcopy=False):
        first = spec.runs / str(t.user_attrs.get("run_id", ""))
        if t.state.name != "COMPLETE" or not runs.is_finished(first):
            continue
        for cfg in spec.seed_configs(runs.load_config(first)):
            path = runs.run_dir(cfg, spec.runs)
            if runs.is_finished(path) and path not in folders:
                folders.append(path)
    return folders
