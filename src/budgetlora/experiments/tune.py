"""`budgetlora tune`: a parameter budget and a time budget in, the best adapter out, with how sure the choice is.

Read top to bottom, one phase after another, all inside `--time` (measured from the command's start):

1. **Space**: every candidate the budget holds (`space.candidate_space`: method x targets x layers, each filled to the
   largest size that fits, x learning rate), from the model's config alone; ordered so that any prefix of it spreads
   over methods and target sets.
2. **Probe**: one short run of the first candidate measures this machine: seconds per training step and the fixed
   cost of a trial (loading, tokenising, validating, writing the run).
3. **Search**: successive halving (keep the best third, give it three times the steps) over as many candidates as the
   search's share of the time holds at a useful number of steps; each rung is an Optuna grid sweep of the candidates
   as variants (`sweep.run_sweep`: its study, resume, time budget, per-trial records), on one fixed validation set.
   The steps of each later rung are sized again from the speed the rung before actually ran at.
4. **Finalists**: the best two of the last rung run again under more seeds (the first seed is the rung's own run,
   reused), and the winner is chosen by a paired comparison on the same validation rows, seed by seed: when the
   better-scoring finalist is not better at 95%, the cheaper one (more training samples a second) wins. Where time
   is left, the two at half the budget each are tried as one ensemble, kept only if better than the winner at 95%
   (`tune_ensemble`).
5. **Final**: the winner trained on all the training data for the time left (`train.max_time` stops it on time),
   starting from the weights its longest search run ended with, in its own run folder, used like any run by
   predict, serve and export.

Everything it decides is kept in OUT/tune.json as it is decided, so a killed tune rerun with the same command takes
the same fidelities, reuses every finished run (trials are run ids) and resumes the unfinished one from its
checkpoint; the rerun has `--time` again for what is left. OUT/report.md says what was tried, at what fidelity, what
it cost, the finalists with intervals, why the winner won and what the time bought.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.config import Config, ConfigError
from budgetlora.experiments import sizing, timebudget
from budgetlora.experiments.choice import paired_choice
from budgetlora.experiments.sizing import (ETA, FINALISTS, Speed, first_steps, later_steps,  # noqa: F401
                                           measured_speed, rung_sizes, size_search, steady_step_s)
from budgetlora.experiments.space import Candidate, candidate_space
from budgetlora.experiments.tune_ensemble import MEMBERS, half_variants, judge
from budgetlora.experiments.tune_report import report

logger = logging.getLogger(__name__)

MAX_SEEDS = 3  # finalists' seeds at most (the first is the rung's own run)
SHARES = {"search": 0.55, "finalists": 0.17, "final": 0.28}  # of the time after the probe and the margin
MARGIN = 0.05  # of --time, kept back for what estimates miss
MIN_TIME_S = 30.0  # below this not even the probe and one trial fit anywhere
PROBE_STEPS = 12
MIN_STEPS = 30  # a rung-0 trial trains at least this many steps (or one epoch of a small set) to be worth ranking
TRIAL_TEST_ROWS = 100  # trials are chosen on validation; their test score is never read, so it is kept small
STATE = "tune.json"
REPORT = "report.md"
OBJECTIVES = ("val_accuracy", "val_macro_f1")
# the order a prefix of the space is taken in: favoured learning rate first, then target sets, then methods
FAVOURITE_LR = {"lora": 2e-3, "dora": 2e-3, "ia3": 2e-2, "vera": 2e-2}
WHERE_ORDER = ("attn-all", "all-top", "all-all", "attn-top", "qv-all", "qv-top")
METHOD_ORDER = ("lora", "ia3", "dora", "vera")


# -- the space, in the order a prefix of it is tried --------------------------------------------------------------
def ordered(space: list[Candidate]) -> list[Candidate]:
    def key(c: Candidate):
        method, targets, layers, _ = c.name.split("-", 3)
        lr_rank = abs(math.log(c.cfg.train.lr / FAVOURITE_LR.get(method, c.cfg.train.lr)))
        where = f"{targets}-{layers}"
        return (round(lr_rank, 6), WHERE_ORDER.index(where) if where in WHERE_ORDER else len(WHERE_ORDER),
                METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), c.name)

    return sorted(space, key=key)


def overrides(base: Config, cfg: Config) -> dict:
    """The dotted fields in which `cfg` differs from `base`: a candidate as a sweep variant."""
    from budgetlora.config.flags import flatten

    a, b = flatten(base.to_dict()), flatten(cfg.to_dict())
    return {k: v for k, v in b.items() if a.get(k) != v and k != "name"}


# -- the command ---------------------------------------------------------------------------------------------------
class State:
    """OUT/tune.json: every decision as it is made (written atomically), so a rerun repeats none of them."""

    def __init__(self, out: Path, key: dict):
        self.path = out / STATE
        self.d = runs.read_json(self.path) if self.path.is_file() else {}
        if self.d and self.d.get("key") != key:
            raise ConfigError(f"{out} holds a tune of another config, budget or --time; give another --out, or the "
                              "same flags to resume it")
        self.d["key"] = key

    def get(self, name: str, default=None):
        return self.d.get(name, default)

    def set(self, name: str, value) -> None:
        self.d[name] = value
        runs.write_json(self.path, self.d)


def _metrics(run: Path) -> dict | None:
    return runs.read_json(run / runs.METRICS) if runs.is_finished(run) else None


def tune(cfg: Config, seconds: float, out: str | Path, objective: str = "val_accuracy", runner=None) -> dict:
    """Search cfg's budget within `seconds` into `out`; returns the tune's record (also OUT/tune.json) with the
    winner's run folder under "winner_run"."""
    from budgetlora.data.readers import load_data
    from budgetlora.experiments.spec import VARIANT, Spec
    from budgetlora.experiments.sweep import run_sweep, train_runner

    runner = runner or train_runner
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if seconds < MIN_TIME_S:
        raise ConfigError(f"--time {timebudget.format_duration(seconds)} is too short for one trial and the final run: "
                          f"give at least {MIN_TIME_S:.0f}s")
    clock = timebudget.Deadline(seconds, MARGIN)
    space = ordered(candidate_space(cfg))  # an impossible budget is refused here, before anything loads
    out = runs.check_output(out, "into")
    with runs.writing(out):
        out.mkdir(parents=True, exist_ok=True)
    state = State(out, {"config": cfg.run_id, "time_s": seconds, "objective": objective})
    run_root = out / "runs"
    storage = f"sqlite:///{(out / 'study.db').resolve()}"

    # one validation set and one small test sample for every trial
    rows, test_rows = state.get("rows"), state.get("test_rows")
    if rows is None:
        splits = load_data(cfg)
        rows, test_rows = len(splits["train"]) + len(splits["val"]), len(splits["test"])
        state.set("test_rows", test_rows)
        state.set("rows", rows)
    val_fraction = sizing.val_fraction(rows)
    test_limit = min(cfg.data.test_limit or TRIAL_TEST_ROWS, TRIAL_TEST_ROWS)
    search_base = cfg.replace(**{"data.val_fraction": val_fraction, "data.test_limit": test_limit,
                                 "train.eval_every": 0, "train.patience": 0})
    per_epoch = math.ceil(round(rows * (1 - val_fraction)) / cfg.train.batch_size)
    logger.info(f"tune: {len(space)} candidates within {cfg.budget.max_params:,} trainable parameters; {rows:,} "
                f"training rows, {round(rows * val_fraction):,} held out for validation; {clock.line()}")

    def at_steps(c: Config, steps: int) -> Config:
        return c.replace(**{"train.max_steps": steps, "train.epochs": max(1, math.ceil(steps / per_epoch))})

    # 2. probe
    probe = state.get("probe")
    if probe is None:
        first = at_steps(space[0].cfg.replace(**{k: v for k, v in overrides(cfg, search_base).items()}),
                         PROBE_STEPS)
        logger.info(f"tune [probe]: {PROBE_STEPS} steps of {space[0].name} to measure this machine; {clock.line()}")
        t0 = timebudget.clock()
        m = _metrics(Path(runner(first, run_root)))
        took = timebudget.clock() - t0
        speed = measured_speed([m], [took], Speed(took / PROBE_STEPS, took / 2))
        steady = steady_step_s(run_root / first.run_id)
        if steady:  # the first steps pay for warming up once; a trial's later steps run at the steady pace
            speed = Speed(steady, max(0.5, took - steady * m["steps"]))
        probe = {"candidate": space[0].name, "run_id": first.run_id, "seconds": round(took, 2),
                 "step_s": speed.step_s, "trial_s": speed.trial_s,
                 # seconds to score one row: what scoring the whole test split at the end will take
                 "row_s": m.get("val_time_s", 0.0) / max(1, round(rows * val_fraction))}
        state.set("probe", probe)
    speed = Speed(probe["step_s"], probe["trial_s"])
    budget_s = clock.left()
    shares = {k: v * budget_s for k, v in SHARES.items()}

    # 3. search
    min_steps = min(MIN_STEPS, per_epoch)
    # a trial never trains past three epochs of the search data, nor longer than the final run's share can train
    # the winner again (with the whole test split scored at the end)
    final_steps = (shares["final"] - speed.trial_s - probe["row_s"] * test_rows) / speed.step_s
    max_steps = max(min_steps, min(3 * per_epoch, int(final_steps)))
    plan = state.get("search")
    if plan is None:
        sizes, steps0 = size_search(len(space), shares["search"], speed, min_steps, max_steps)
        if not sizes:
            one = speed.trial_s + min_steps * speed.step_s
            least = one * FINALISTS / SHARES["search"] / (1 - MARGIN) + clock.used()
            raise ConfigError(f"--time {timebudget.format_duration(seconds)} is too short on this machine: one trial "
                              f"of {min_steps} steps takes about {one:.0f}s here; give at least "
                              f"{timebudget.format_duration(least)}")
        plan = {"sizes": sizes, "steps": [steps0], "candidates": [c.name for c in space[:sizes[0]]]}
        state.set("search", plan)
    by_name = {c.name: c for c in space}
    variants = {c.name: overrides(cfg, c.cfg) for c in space}  # the adapter and its rate: what candidates differ in
    search_end = timebudget.clock() + shares["search"]
    rungs = state.get("rungs", [])
    plan.setdefault("names", [plan["candidates"]])
    results: dict[str, dict] = {}
    for i, n in enumerate(plan["sizes"]):
        phase = f"search rung {i + 1}/{len(plan['sizes'])}"
        if len(plan["names"]) <= i:  # promoted now; kept, so a rerun runs the same rung
            plan["names"].append([r["name"] for r in sorted(results.values(), key=lambda r: -r[objective])][:n])
            # sized now, from how fast the rungs so far really ran
            speed = measured_speed([r["metrics"] for r in results.values()],
                                   [r["seconds"] for r in results.values()], speed)
            plan["steps"].append(later_steps(plan["sizes"], i, max(0.0, search_end - timebudget.clock()), speed,
                                             plan["steps"][-1], max_steps))
            state.set("search", plan)
        names, steps = plan["names"][i], plan["steps"][i]
        spec = Spec(name=f"rung{i}", base=at_steps(search_base, steps), grid={VARIANT: list(names)}, search={},
                    n_trials=None, objective=objective, fill=False, runs=run_root, folder=out,
                    variants={k: variants[k] for k in names})
        logger.info(f"tune [{phase}]: {len(names)} candidates at {steps} steps ({steps * cfg.train.batch_size:,} "
                    f"rows); {clock.line()}")
        later = sum(m * (speed.trial_s + steps * ETA ** (j + 1) * speed.step_s)
                    for j, m in enumerate(plan["sizes"][i + 1:]))  # what the rungs after this one are planned to take
        _in_order(spec, storage, names)
        if i == len(plan["sizes"]) - 1:  # the last rung may borrow the finalists' share: a search that ran slow
            later = -shares["finalists"]  # (slower methods than the probe's) still ends with its finalists
        run_sweep(spec, storage=storage, runner=runner, time_budget=max(1.0, search_end - timebudget.clock() - later),
                  on_trial=_progress(phase, len(names), clock, objective))
        results = _rung_results(spec, storage, names, objective)
        if not results:
            raise ConfigError("no trial of the search finished; give more --time")
        rungs = rungs[:i] + [{"rung": i, "steps": steps, "rows": steps * cfg.train.batch_size,
                              "tried": list(names), "results": {k: {kk: v[kk] for kk in ("value", "seconds", "run_id")}
                                                                for k, v in results.items()}}]
        state.set("rungs", rungs)

    # 4. finalists over seeds
    ranked = sorted(results.values(), key=lambda r: -r[objective])
    finalists = [r["name"] for r in ranked[:FINALISTS]]
    top_steps = plan["steps"][len(plan["sizes"]) - 1]
    halves = half_variants(cfg, finalists, overrides)  # the finalists at half the budget each, if two and it holds
    seeds = state.get("seeds")
    if seeds is None:
        # a trial as the top rung really took it (sweep overhead included), never less than the estimate (a
        # reused run measures 0 s)
        trial = max([speed.trial_s + top_steps * speed.step_s] + [r["seconds"] for r in ranked[:FINALISTS]])
        # the final run's share, or what its whole training needs where that is less (a small set): the rest
        # buys evidence
        whole = max(math.ceil(cfg.train.epochs * per_epoch), top_steps)
        whole = min(whole, cfg.train.max_steps) if cfg.train.max_steps else whole
        state.set("final_s", round(min(shares["final"], speed.trial_s + whole * speed.step_s
                                       + probe["row_s"] * (test_rows + 3 * round(rows * val_fraction))), 1))
        # what is left before it, one trial kept as slack; one finalist has nothing to be compared with; an
        # ensemble is tried only where the finalists still get a second seed beside it
        room, per_seed = clock.left() - state.get("final_s") - trial, trial * len(finalists)
        with_ensemble = int(max(0.0, room - MEMBERS * trial) // per_seed) if halves else 0
        state.set("ensemble_planned", with_ensemble >= 1)
        extra = with_ensemble if with_ensemble >= 1 else int(max(0.0, room) // per_seed)
        seeds = max(1, min(MAX_SEEDS, 1 + extra)) if len(finalists) > 1 else 1
        state.set("seeds", seeds)
        state.set("trial_s", round(trial, 1))
    ensemble_s = MEMBERS * state.get("trial_s", 0.0) if state.get("ensemble_planned") else 0.0
    top_base = at_steps(search_base, top_steps)
    if seeds > 1:
        spec = Spec(name="finalists", base=top_base, grid={VARIANT: finalists}, search={}, n_trials=None,
                    objective=objective, fill=False, runs=run_root, folder=out,
                    variants={k: variants[k] for k in finalists}, seeds=seeds)
        logger.info(f"tune [finalists]: {', '.join(finalists)} over {seeds} seeds at {top_steps} steps; {clock.line()}")
        run_sweep(spec, storage=storage, runner=runner,
                  time_budget=max(1.0, clock.left() - state.get("final_s", shares["final"]) - ensemble_s),
                  on_trial=_progress("finalists", len(finalists), clock, objective))
    members = []
    for name in finalists:
        cfg_f = top_base.replace(**variants[name])
        seed_runs = [run_root / c.run_id for c in
                     [cfg_f] + [cfg_f.replace(**{"train.seed": cfg_f.train.seed + s}) for s in range(1, seeds)]]
        done = [r for r in seed_runs if runs.is_finished(r)]
        ms = [runs.read_json(r / runs.METRICS) for r in done]
        members.append({"name": name, "runs": done, "values": [m[objective] for m in ms],
                        "samples_s": float(np.mean([m.get("train_samples_per_s", 0.0) for m in ms])),
                        "trainable_params": by_name[name].trainable})
    n_seeds = min(len(m["runs"]) for m in members)
    for m in members:  # compare on the seeds every finalist has
        m["runs"], m["values"] = m["runs"][:n_seeds], m["values"][:n_seeds]
    choice = paired_choice(members, objective, cfg.model.num_labels) if len(members) > 1 else \
        {"winner": members[0]["name"], "best": members[0]["name"], "scores": {members[0]["name"]:
         float(np.mean(members[0]["values"]))}, "comparisons": {}, "rows": 0, "why": "the only finalist"}
    state.set("choice", choice)
    logger.info(f"tune [finalists]: {choice['why']}; {clock.line()}")
    winner = by_name[choice["winner"]]
    won = [m for m in members if m["name"] == choice["winner"]][0]

    # 4b. the finalists at half the budget each, as one ensemble, against the winner alone
    ensemble = state.get("ensemble")
    if ensemble is None and state.get("ensemble_planned") and halves:
        spec = Spec(name="ensemble", base=top_base, grid={VARIANT: list(halves)}, search={}, n_trials=None,
                    objective=objective, fill=False, runs=run_root, folder=out, variants=halves)
        logger.info(f"tune [ensemble]: {' + '.join(halves)} at {top_steps} steps; {clock.line()}")
        _in_order(spec, storage, list(halves))
        run_sweep(spec, storage=storage, runner=runner,
                  time_budget=max(1.0, clock.left() - state.get("final_s", shares["final"])),
                  on_trial=_progress("ensemble", len(halves), clock, objective))
        member_runs = [run_root / top_base.replace(**v).run_id for v in halves.values()]
        if all(runs.is_finished(r) for r in member_runs):
            from budgetlora.inference.ensemble import members_total

            ensemble = judge({"name": winner.name, "run": won["runs"][0], "value": won["values"][0],
                              "samples_s": won["samples_s"]}, member_runs, out, objective, cfg.model.num_labels)
            ensemble.update(variants=list(halves), trainable_params=members_total(member_runs)[0])
        else:
            ensemble = {"kept": False, "variants": list(halves), "why": "its members did not finish in time"}
        state.set("ensemble", ensemble)
        logger.info(f"tune [ensemble]: {'kept' if ensemble['kept'] else 'not kept'}: {ensemble['why']}; "
                    f"{clock.line()}")

    # 5. the winner (or the ensemble's members) on all the training data, for the time left
    if ensemble and ensemble.get("kept"):
        finals = [(n, halves[n], Path(r)) for n, r in zip(ensemble["variants"], ensemble["members"])]
    else:
        finals = [(winner.name, variants[winner.name], Path(won["runs"][0]))]
    final = state.get("final")
    if final is None:
        seen = [runs.read_json(r / runs.METRICS) for r in
                ([Path(r) for r in ensemble["members"]] if len(finals) > 1 else won["runs"])]
        wspeed = measured_speed(seen, [probe["trial_s"] + m["steps"] * speed.step_s for m in seen], speed)
        scoring = probe["row_s"] * (test_rows + 3 * round(rows * val_fraction))
        train_s = (clock.left() - len(finals) * (speed.trial_s + scoring)) / len(finals)  # each member's share
        full_steps = max(math.ceil(cfg.train.epochs * per_epoch), top_steps)  # as long as the search's longest
        steps = int(min(full_steps, max(0.0, train_s) / wspeed.step_s))
        if cfg.train.max_steps:
            steps = min(steps, cfg.train.max_steps)
        final = {"steps": steps, "planned_steps": full_steps, "per_epoch": per_epoch,
                 "train_s": round(max(0.0, train_s), 1), "configs": []}
        if steps >= min(top_steps, full_steps):
            for _, variant, start in finals:
                # it starts from the weights its longest search run ended with: the steps the search paid for are
                # kept
                fcfg = cfg.replace(**{**variant, "data.val_fraction": val_fraction,
                                      "train.init_from": str(start.resolve()),
                                      "train.epochs": max(cfg.train.epochs, math.ceil(steps / per_epoch)),
                                      "train.max_steps": steps, "train.max_time": round(max(train_s, 1.0), 1)})
                final["configs"].append(fcfg.to_dict())
        state.set("final", final)
    what = " + ".join(n for n, _, _ in finals)
    if final["configs"]:
        logger.info(f"tune [final]: {what} on all {rows:,} rows, up to {final['steps']:,} steps "
                    f"({final['steps'] / max(1, final['planned_steps']):.0%} of {cfg.train.epochs:g} epoch(s)); "
                    f"{clock.line()}")
        winner_runs = [Path(runner(Config.from_dict(c), run_root)) for c in final["configs"]]
        final["trained"] = True
    else:  # the time left holds no more than the search already gave it: the search's runs are the winner's
        winner_runs = [start for _, _, start in finals]
        final["trained"] = False
        logger.info(f"tune [final]: the time left holds no longer run than the search's; {what}'s run(s) from the "
                    "search are the winner's")
    record = {**state.d, "winner": what, "winner_run": str(winner_runs[0]),
              "winner_runs": [str(r) for r in winner_runs], "space": len(space),
              "finalists": [{k: (v if k != "runs" else [str(p) for p in v]) for k, v in m.items()} for m in members],
              "final": final, "elapsed_s": round(clock.used(), 1)}
    state.set("winner_run", record["winner_run"])
    state.set("winner_runs", record["winner_runs"])
    runs.write_text(out / REPORT, report(record, cfg, objective))
    state.set("elapsed_s", round(clock.used(), 1))
    logger.info(f"tune: winner {what} -> {' '.join(record['winner_runs'])} ({clock.used():.0f}s of {seconds:.0f}s); "
                f"report {out / REPORT}")
    return {**record, "elapsed_s": round(clock.used(), 1)}


def _in_order(spec, storage: str, names: list[str]) -> None:
    """Queue the rung's candidates in their order (the space's, or best first), so that a rung cut short by its
    time has run its most promising ones; the grid sampler alone would draw them at random."""
    from budgetlora.experiments.spec import VARIANT
    from budgetlora.experiments.sweep import open_study

    study = open_study(spec, storage)
    seen = {t.params.get(VARIANT, t.system_attrs.get("fixed_params", {}).get(VARIANT))
            for t in study.get_trials(deepcopy=False)}
    for name in names:
        if name not in seen:
            study.enqueue_trial({VARIANT: name})


def _progress(phase: str, total: int, clock: timebudget.Deadline, objective: str):
    """A study callback: one line per finished trial with the phase, the trials done and the time left."""
    def on_trial(study, trial) -> None:
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        value = f"{objective} {trial.value:.4f}" if trial.value is not None else trial.state.name.lower()
        logger.info(f"tune [{phase}] trial {done}/{total}: {trial.params.get('variant', '')} {value}; {clock.line()}")

    return on_trial


def _rung_results(spec, storage: str, names: list[str], objective: str) -> dict[str, dict]:
    """Each candidate's finished trial in a rung: its value, how long it took and its run's metrics."""
    from budgetlora.experiments.summary import load

    out = {}
    for t in load(spec, storage).get_trials(deepcopy=False):
        name = t.params.get("variant")
        if t.state.name != "COMPLETE" or name not in names or "run_dir" not in t.user_attrs:
            continue
        m = _metrics(Path(t.user_attrs["run_dir"]))
        if m is None:
            continue
        out[name] = {"name": name, objective: float(t.value), "value": float(t.value), "metrics": m,
                     "seconds": float(t.user_attrs.get(timebudget.ELAPSED, m.get("wall_time_s", 0.0))),
                     "run_id": t.user_attrs.get("run_id")}
    return out
