"""Running a sweep spec (see `spec`) on Optuna: the study (in a storage `storage` opens: SQLite or any SQLAlchemy
URL, shared between processes and machines), local worker processes, grid points drawn one sweep at a time, the
objective that plans, trains and records each trial, dead workers' trials failed and retried (`retries`), the time
budget (`timebudget`), and the summary (`summary`).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import os
import time
from pathlib import Path

from budgetlora import runs
from budgetlora.config import Config, ConfigError
from budgetlora.experiments import timebudget
from budgetlora.experiments.retries import fail_dead_trials, failed_as_stale, point_of, queue_retries
from budgetlora.experiments.spec import Runner, Spec, param_key, trial_config
from budgetlora.experiments.storage import masked, open_storage
from budgetlora.experiments.summary import format_summary, summary  # noqa: F401  (part of this module's API)

logger = logging.getLogger(__name__)


def default_storage(spec: Spec) -> str:
    return f"sqlite:///{(spec.folder / 'study.db').resolve()}"


def _sampler(spec: Spec, worker: int):
    import optuna

    if not spec.grid:
        return optuna.samplers.TPESampler(seed=spec.seed + worker)  # distinct seeds: workers explore differently
    sampler = optuna.samplers.GridSampler(spec.grid, seed=spec.seed)  # one seed: grid ids agree between workers
    choose = sampler.before_trial

    def before_trial(study, trial) -> None:
        # a first heartbeat before anything that can wait: a worker that dies from here on is found by the usual
        # stale-heartbeat check, not only by the slower never-heard-from one (storage._never_beating)
        study._storage.record_heartbeat(trial._trial_id)
        # GridSampler picks among the points no trial holds and records its pick; two sweeps doing that at once
        # (with one seed, their random picks agree) would both take the same point
        with _draw_lock(spec):
            choose(study, trial)

    sampler.before_trial = before_trial
    return sampler


def _draw_lock(spec: Spec):
    """Held while a sweep queues retries or a new grid trial takes its point. In the runs folder, which every
    sweep of the study shares (on one machine or several), so separately started sweeps take turns too."""
    return runs.run_lock(spec.runs, f"sweep-{spec.name}")


def open_study(spec: Spec, storage: str, worker: int = 0):
    import optuna

    pruner = optuna.pruners.MedianPruner(n_startup_trials=3) if spec.prune == "median" else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=spec.name, storage=open_storage(storage, spec.heartbeat_s, spec.grace_s),
                                sampler=_sampler(spec, worker), pruner=pruner,
                                direction=spec.direction, load_if_exists=True)
    known = study.user_attrs.get("budgetlora_spec")
    if known is None:
        study.set_user_attr("budgetlora_spec", spec.fingerprint())
    elif known != spec.fingerprint():
        raise ConfigError(f"study {spec.name!r} in {masked(storage)} was made from a different spec (base, space or "
                          "objective changed); give the spec another `name:` or use another storage")
    return study


# -- one trial -------------------------------------------------------------------------------------------------
def train_runner(cfg: Config, root: Path, on_record=None) -> Path:
    """The real runner: train (or find finished) `cfg` under `root`; `on_record` sees each history record (the
    pruner's view of the periodic validation)."""
    from budgetlora.training.train import train

    return train(cfg, root=root, on_record=on_record)


def _takes_records(runner: Runner) -> bool:
    """A runner that cannot report validation records as they come (a stand-in, an external trainer) is never
    pruned: it runs to the end."""
    try:
        return "on_record" in inspect.signature(runner).parameters
    except (TypeError, ValueError):
        return False


def _pruning_reporter(spec: Spec, trial):
    """An on_record callback: report the objective at each validation, and stop the run when the pruner says so.
    The run keeps its checkpoint, so a config the sweep meets again resumes instead of starting over."""
    import optuna

    def on_record(record: dict) -> None:
        if record.get(spec.objective) is None:
            return
        trial.report(float(record[spec.objective]), int(record["step"]))
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", int(record["step"]))
            trial.set_user_attr("pruned", f"below the median at step {record['step']}")
            raise optuna.TrialPruned(f"pruned at step {record['step']}")

    return on_record


def _objective(spec: Spec, runner: Runner):
    import optuna

    from budgetlora.adapters.budget import fill, plan

    def objective(trial) -> float:
        started = timebudget.clock()
        try:
            cfg = trial_config(spec, trial)
            p = plan(cfg)  # meta-device shapes only: nothing is loaded for a config we are about to refuse
            if spec.fill and p.setting:  # (IA)3 has no size to fill: it runs as planned
                r = p.fill_size()
                if r < 1:
                    trial.set_user_attr("trainable_params", p.fixed_params + p.per_rank)
                    trial.set_user_attr("pruned", "over budget: no rank fits these targets")
                    raise optuna.TrialPruned("no rank fits the budget")
                cfg, p = fill(cfg)
                trial.set_user_attr(p.setting, r)
            trial.set_user_attr("run_id", cfg.run_id)
            trial.set_user_attr("trainable_params", p.total)
            if not p.fits:
                trial.set_user_attr("pruned", f"over budget: {p.total:,} > {p.max_params:,}")
                raise optuna.TrialPruned(f"over budget: {p.total:,} trainable parameters")
            values = []
            for i, seed_cfg in enumerate(spec.seed_configs(cfg)):
                m = _run_one(spec, trial, seed_cfg, runner, first=i == 0)
                if spec.objective not in m:
                    raise KeyError(f"objective {spec.objective!r} is not in {spec.runs / seed_cfg.run_id}")
                values.append(float(m[spec.objective]))
            if spec.seeds > 1:
                trial.set_user_attr("seed_values", values)
            return sum(values) / len(values)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # recorded on the trial; optimize(catch=...) then marks it FAIL and goes on
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            raise
        finally:  # what the time budget judges the next trial by
            trial.set_user_attr(timebudget.ELAPSED, round(timebudget.clock() - started, 3))

    return objective


def _run_one(spec: Spec, trial, cfg: Config, runner: Runner, first: bool) -> dict:
    """Train (or reuse) one seed of a trial's config and return its metrics; the first seed's run is the trial's."""
    import optuna

    out = runs.run_dir(cfg, spec.runs)
    with runs.run_lock(spec.runs, cfg.run_id):
        if runs.is_finished(out):
            twin = _twin(trial, cfg.run_id) if spec.grid and first else None
            if twin is not None:  # a concurrent worker drew the same grid point and already did it
                trial.set_user_attr("pruned", f"duplicate of trial {twin}")
                raise optuna.TrialPruned(f"duplicate of trial {twin}")
            trial.set_user_attr("reused", True)
        else:
            prunable = spec.prune != "none" and first and _takes_records(runner)
            kwargs = {"on_record": _pruning_reporter(spec, trial)} if prunable else {}
            out = Path(runner(cfg, spec.runs, **kwargs))
            if not runs.is_finished(out):
                raise RuntimeError(f"the runner returned {out}, which is not a finished run folder")
        if first:
            trial.set_user_attr("run_dir", str(out))  # set under the lock: marks this trial as the owner
    m = runs.read_json(out / runs.METRICS)
    if first:
        for k in ("val_accuracy", "test_accuracy", "val_loss", "wall_time_s"):
            if k in m:
                trial.set_user_attr(k, m[k])
    return m


def _twin(trial, run_id: str) -> int | None:
    """Another trial that completed this run id, or is about to (RUNNING, past its runner). A RUNNING trial
    without `run_dir` is one whose worker died mid-run: it does not count, so the point is still recorded."""
    from optuna.trial import TrialState

    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number != trial.number and t.user_attrs.get("run_id") == run_id and \
                (t.state == TrialState.COMPLETE or "run_dir" in t.user_attrs):
            return t.number
    return None


# -- workers ---------------------------------------------------------------------------------------------------
def _grid_pending(spec: Spec, study, since: int) -> int:
    """Grid points with no trial that counts: COMPLETE, PRUNED, RUNNING, WAITING or failed during this sweep."""
    from optuna.trial import TrialState

    covered = {point_of(spec, study, t) for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
               or (t.state == TrialState.FAIL and t.number >= since)}
    return sum(param_key(p) not in covered for p in spec.points())


def _done_count(study, since: int) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number >= since) for t in study.get_trials(deepcopy=False))


def _work(spec: Spec, storage: str, worker: int, since: int, n_trials: int | None, runner: Runner,
          track: str | None, deadline: float | None = None, on_trial=None) -> None:
    """One worker: draw and run trials until the grid is covered, the study holds n_trials, or the time left
    before `deadline` (a `timebudget.clock` reading) cannot hold another trial."""
    from optuna.trial import TrialState

    study = open_study(spec, storage, worker)
    objective = _objective(spec, runner)
    callbacks = ([_trial_tracker(spec, track)] if track else []) + ([on_trial] if on_trial else [])
    limit = n_trials if n_trials is not None else (None if spec.grid else spec.n_trials)
    while True:
        fail_dead_trials(study)  # a dead worker's trial: FAIL, and its retry queued (WAITING) for us to take
        # checked before every trial: GridSampler alone would re-draw a point another worker is still running
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        covered = spec.grid and _grid_pending(spec, study, since) == 0
        enough = limit is not None and _done_count(study, since) + running >= limit
        if (covered or enough) and not waiting:
            if not running:
                break
            if deadline is not None and timebudget.clock() >= deadline:
                break  # out of time: a dead worker's point is left to the next sweep
            # only other workers' trials are left. Stay until they end: if their worker died, its heartbeat goes
            # stale, the trial is failed above and retried here; leaving now would leave that point undone.
            time.sleep(min(spec.heartbeat_s, 2))
            continue
        if not timebudget.next_fits(deadline, _durations(study, since)):
            break
        taken: list = []
        try:
            study.optimize(lambda trial: objective(taken.append(trial) or trial), n_trials=1, catch=(Exception,),
                           callbacks=callbacks, gc_after_trial=True)
        except Exception:
            if not (taken and failed_as_stale(study, taken[0])):
                raise
            # the database was away longer than the grace period and another worker took this live trial for
            # dead: it was failed and queued again, and its retry reuses the run this worker has just finished
            logging.getLogger(__name__).warning(f"trial {taken[0].number} was failed by another worker while the "
                                                "study storage was away; its retry takes the finished run")


def _durations(study, since: int) -> list[float]:
    """How long each trial finished in this invocation of the sweep took (any worker's)."""
    return [t.user_attrs[timebudget.ELAPSED] for t in study.get_trials(deepcopy=False)
            if t.number >= since and t.state.is_finished() and timebudget.ELAPSED in t.user_attrs]


def _worker_main(*args) -> None:
    from budgetlora.log import setup

    logging.basicConfig(level=logging.WARNING)  # optuna's and the libraries' warnings
    setup()  # budgetlora's own messages at the level the sweep command was given
    _work(*args)


def _retry_failed_points(spec: Spec, study, since: int) -> int:
    """Before workers start: fail trials of dead workers, and queue one retry of every grid point that only
    ever failed (a kill or an error in an earlier sweep). Returns the number queued."""
    fail_dead_trials(study)
    if not spec.grid:
        return 0
    with _draw_lock(spec):  # another sweep starting now would queue the same points again
        return queue_retries(spec, study)


@contextlib.contextmanager
def _threads_per_worker(workers: int):
    """OMP_NUM_THREADS for the workers started inside: the free cores shared out (their torch reads it at start).
    Workers that each took every core would spin against each other and run several times slower."""
    from budgetlora.hardware import free_cores

    before = os.environ.get("OMP_NUM_THREADS")
    if before is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, free_cores() // workers))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def run_sweep(spec: Spec, storage: str | None = None, workers: int = 1, n_trials: int | None = None,
              runner: Runner = train_runner, track: str | None = None,
              time_budget: float | None = None, on_trial=None) -> dict:
    """Run (or resume) a sweep; returns {"study": name, "storage": url, "states": {state: count}, ...}.
    track: tensorboard or mlflow, to log every finished trial there (training.track). time_budget: seconds in
    which trials may start (default: the spec's `time_budget`); no trial starts that the time left cannot hold.
    on_trial: an Optuna study callback (study, trial) after each trial, with one worker (it runs in this process)."""
    started = timebudget.clock()
    budget = time_budget if time_budget is not None else spec.time_budget
    deadline = started + budget if budget else None
    if workers < 1:
        raise ConfigError("--workers must be >= 1")
    if track:
        from budgetlora.training.track import check

        check(track)
    storage = storage or default_storage(spec)
    for folder in (spec.folder, spec.runs):
        with runs.writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
    study = open_study(spec, storage)
    since = len(study.get_trials(deepcopy=False))
    queued = _retry_failed_points(spec, study, since)
    total = len(spec.points()) if spec.grid else spec.n_trials
    logger.info(f"sweep {spec.name}: {'grid of ' + str(total) + ' points' if spec.grid else str(total) + ' TPE trials'}"
        f", {since} trials already in {masked(storage)}" + (f", {queued} failed points queued again" if queued else "")
        + (f", time budget {timebudget.format_duration(budget)}" if budget else ""))
    args = (spec, storage, 0, since, n_trials, runner, track, deadline)
    if workers == 1:
        _work(*args, on_trial=on_trial)
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads or DB handles
        procs = [ctx.Process(target=_worker_main, args=(spec, storage, i, since, n_trials, runner, track, deadline),
                             name=f"sweep-worker-{i}") for i in range(workers)]
        with _threads_per_worker(workers):
            for p in procs:
                p.start()
                time.sleep(0.5)  # stagger start-up so the workers do not all create their first trial at once
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            for p in procs:
                p.join()
            raise
        # a worker killed by a signal lost at most its current trial, which the others failed and retried
        # (heartbeat); the summary shows what that left. A worker that exited with an error is a bug: raise.
        for p in procs:
            if p.exitcode is not None and p.exitcode < 0:
                logger.warning(f"{p.name} was killed (signal {-p.exitcode}); its trial was failed and queued again")
        bad = [p.name for p in procs if p.exitcode is not None and p.exitcode > 0]
        if bad:
            raise RuntimeError(f"sweep worker(s) exited with an error: {', '.join(bad)}")
    return summary(spec, storage, since=since, started=started, budget=budget, n_trials=n_trials)


# -- optional tracking -----------------------------------------------------------------------------------------
TRIAL_METRICS = ("val_accuracy", "test_accuracy", "val_loss", "trainable_params", "wall_time_s")


def _trial_tracker(spec: Spec, kind: str):
    """A study callback that logs each finished trial's metrics and parameters with training.track's writers, one
    tracked run per trial in the sweep folder (step = trial number)."""
    from budgetlora.training.track import open_writer

    def log_trial(study, trial) -> None:
        metrics = {f"sweep/{k}": float(v) for k, v in trial.user_attrs.items() if k in TRIAL_METRICS}
        if not metrics:
            return
        tags = {"trial": str(trial.number), "run_id": str(trial.user_attrs.get("run_id", ""))}
        tracker = open_writer(kind, spec.folder, f"trial-{trial.number:04d}", dict(trial.params),
                              experiment=spec.name, tags=tags)
        try:
            tracker.scalars(metrics, trial.number)
        finally:
            tracker.close()

    return log_trial
