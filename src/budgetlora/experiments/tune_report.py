"""`tune`'s OUT/report.md: what the time bought, every rung, the finalists with intervals, why the winner won."""
from __future__ import annotations

import numpy as np

from budgetlora.config import Config
from budgetlora.experiments import timebudget
from budgetlora.experiments.sizing import val_fraction


def report(r: dict, cfg: Config, objective: str) -> str:
    fmt = timebudget.format_duration
    probe, plan, final, choice = r["probe"], r["search"], r["final"], r["choice"]
    lines = [f"# tune: {r['winner']}", "",
             f"Budget {cfg.budget.max_params:,} trainable parameters, model {cfg.model.name}, "
             f"time {fmt(r['key']['time_s'])}"
             f" ({r['elapsed_s']:.0f}s used up to this report), objective {objective} on one validation set of "
             f"{round(r['rows'] * val_fraction(r['rows'])):,} rows held out of {r['rows']:,}.", "",
             "## What the time bought", "",
             f"- the probe: {probe['seconds']:.1f}s; a training step {probe['step_s']:.3f}s and a trial's fixed cost "
             f"{probe['trial_s']:.1f}s on this machine",
             f"- the search: {plan['sizes'][0]} of the {r['space']} candidates, successive halving over "
             f"{len(plan['sizes'])} rung(s) " + " -> ".join(f"{n} at {s} steps" for n, s in
                                                         zip(plan['sizes'], plan['steps'])),
             f"- the finalists: {len(r['finalists'])} over {r['seeds']} seed(s)",
             _ensemble_line(r.get("ensemble")),
             (f"- the final run: {final['steps']:,} steps of {cfg.train.batch_size} rows "
              f"({final['steps'] / max(1, final['per_epoch']):.2f} epochs over the "
              f"{r['rows'] - round(r['rows'] * val_fraction(r['rows'])):,} training rows), "
              f"{final['steps'] / max(1, final['planned_steps']):.0%} of the {final['planned_steps']:,} it would "
              "have trained without a clock" + (" (each member)" if len(r["winner_runs"]) > 1 else "")
              + ", starting from the weights of its longest search run"
              if final.get("trained") else "- no final run: the time left held no longer run than the search's"),
             "", "## Rungs", "", "| rung | steps | candidate | " + objective + " | seconds | run |",
             "|---|---|---|---|---|---|"]
    for rung in r.get("rungs", []):
        for name in rung["tried"]:
            res = rung["results"].get(name)
            lines.append(f"| {rung['rung'] + 1} | {rung['steps']} | {name} | "
                         + (f"{res['value']:.4f} | {res['seconds']:.1f} | {res['run_id']} |" if res else
                            "not run (no time left in the rung) | | |"))
    lines += ["", "## Finalists", "", f"| finalist | trainable | seeds | {objective} (mean) | vs the best, paired "
              "on validation | samples/s |", "|---|---|---|---|---|---|"]
    for m in r["finalists"]:
        c = choice["comparisons"].get(m["name"])
        vs = "best" if c is None else (f"{-c['difference']['mean']:+.4f} [{-c['difference']['high']:+.4f}, "
                                       f"{-c['difference']['low']:+.4f}]" + (" (worse at 95%)" if c["significant"]
                                                                             else " (same at 95%)"))
        lines.append(f"| {m['name']} | {m['trainable_params']:,} | {len(m['values'])} | "
                     f"{np.mean(m['values']):.4f} | {vs} | {m['samples_s']:.1f} |")
    lines += ["", "## Why the winner won", "", choice["why"] + "."]
    ens = r.get("ensemble")
    if ens and "comparisons" in ens:
        lines += ["", f"The ensemble of {' + '.join(ens['variants'])} ({ens['trainable_params']:,} trainable "
                  f"parameters together) against {choice['winner']} alone at the same steps: {ens['why']}; "
                  + ("kept." if ens["kept"] else "not kept.")]
    if len(r["winner_runs"]) > 1:
        lines += ["", "The winner is an ensemble; its members' run folders: " + " ".join(
            f"`{p}`" for p in r["winner_runs"]) + " (use them together: `budgetlora predict RUN RUN ...`, "
            "`evaluate`, `budgetlora.load([RUN, RUN])`).", ""]
    else:
        lines += ["", f"Winner's run folder: `{r['winner_run']}` (use it with `budgetlora predict`, `serve`, "
                  "`export`).", ""]
    return "\n".join(lines)


def _ensemble_line(ens: dict | None) -> str:
    if not ens:
        return "- an ensemble of the finalists at half the budget each: not tried (no time, or no member fits half)"
    if "comparisons" not in ens:
        return f"- an ensemble of the finalists at half the budget each: {ens['why']}"
    return (f"- an ensemble of the finalists at half the budget each ({ens['trainable_params']:,} parameters "
            f"together): {ens['value']:.4f} against {ens['single_value']:.4f} alone, "
            + ("kept" if ens["kept"] else "not kept"))
