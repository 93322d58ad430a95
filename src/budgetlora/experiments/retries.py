"""Trials that need running again: those of workers that died (their heartbeat stopped, or never started), failed
and queued again; grid points that only ever failed, queued once more when a sweep starts; and the grid point a
trial holds, however far it got before its worker died."""
from __future__ import annotations

import warnings

from budgetlora.experiments.spec import Spec, param_key


def point_of(spec: Spec, study, t) -> str:
    """The grid point a trial holds (as `param_key`): its parameters, the ones it was queued with, or, for a
    trial whose worker died before drawing them, the point its grid id names."""
    params = t.params or t.system_attrs.get("fixed_params")
    if not params and "grid_id" in t.system_attrs and hasattr(study.sampler, "_all_grids"):
        params = dict(zip(study.sampler._param_names, study.sampler._all_grids[t.system_attrs["grid_id"]]))
    return param_key({k: (params or {}).get(k) for k in spec.grid})


def fail_dead_trials(study) -> None:
    """RUNNING trials whose worker is gone (storage._get_stale_trial_ids), failed; their callback queues each again."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def failed_as_stale(study, trial) -> bool:
    """Whether `trial` was failed by a heartbeat check and queued again (Optuna then refuses to record its end)."""
    from optuna.trial import TrialState

    if study._storage.get_trial(trial._trial_id).state != TrialState.FAIL:
        return False
    return any(t.system_attrs.get("failed_trial") == trial.number for t in study.get_trials(deepcopy=False))


def queue_retries(spec: Spec, study) -> int:
    """One retry of every grid point whose trials all failed; returns how many were queued."""
    from optuna.trial import TrialState

    by_point: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False):
        by_point.setdefault(point_of(spec, study, t), []).append(t)
    queued = 0
    for point in spec.points():
        trials = by_point.get(param_key(point), [])
        if trials and all(t.state == TrialState.FAIL for t in trials):
            study.enqueue_trial(point, user_attrs={"retry_of": trials[-1].number})
            queued += 1
    return queued
