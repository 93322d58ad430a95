"""Choosing between `tune`'s finalists: a paired comparison on the same validation rows, seed by seed, where a
difference that is not there at 95% goes to the cheaper one."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.config import ConfigError


def read_val_answers(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, gold, predicted) of a run's validation answers, sorted by row."""
    from budgetlora.experiments.compare import read_answers

    return read_answers(Path(run) / runs.VAL_PREDICTIONS)


def paired_choice(finalists: list[dict], objective: str, num_labels: int) -> dict:
    """Pick among finalists (each {"name", "runs": [run folders, one per seed, same seeds for all], "samples_s"}):
    the best by mean objective over seeds, unless a cheaper one is not worse at 95% on the same validation rows
    (paired bootstrap over (seed, row) pairs; McNemar beside it for accuracy), in which case the cheapest such wins.
    Returns {"winner", "best", "comparisons": {name: paired result vs the best}, "why"}."""
    from budgetlora.experiments.stats import paired, paired_macro_f1

    answers = {}
    for f in finalists:
        per_seed = [read_val_answers(r) for r in f["runs"]]
        answers[f["name"]] = per_seed
    first = answers[finalists[0]["name"]]
    for f in finalists[1:]:  # the same seeds hold out the same rows: anything else is not a paired comparison
        if any(not np.array_equal(a[0], b[0]) for a, b in zip(first, answers[f["name"]])):
            raise ConfigError(f"finalist {f['name']} was validated on other rows than {finalists[0]['name']}")
    gold = np.concatenate([a[1] for a in first])
    preds = {name: np.concatenate([a[2] for a in per_seed]) for name, per_seed in answers.items()}

    scores = {f["name"]: float(np.mean([m for m in f["values"]])) for f in finalists}
    best = max(finalists, key=lambda f: (scores[f["name"]], f["name"]))
    comparisons = {}
    for f in finalists:
        if f is best:
            continue
        if objective == "val_macro_f1":  # F1 is no mean over rows: the bootstrap rescores each resample
            iv = paired_macro_f1(gold, preds[best["name"]], preds[f["name"]], num_labels)
            comparisons[f["name"]] = {"difference": iv.as_dict(), "significant": iv.low > 0 or iv.high < 0}
        else:
            p = paired(preds[best["name"]] == gold, preds[f["name"]] == gold)
            comparisons[f["name"]] = p.as_dict()
    cheaper = [f for f in finalists if f is not best and f["samples_s"] > best["samples_s"]
               and not comparisons[f["name"]]["significant"]]
    if cheaper:
        winner = max(cheaper, key=lambda f: f["samples_s"])
        d = comparisons[winner["name"]]["difference"]
        why = (f"{best['name']} scored higher on validation ({scores[best['name']]:.4f} vs "
               f"{scores[winner['name']]:.4f}), but not at 95% on the same {len(gold):,} (seed, row) pairs "
               f"(difference {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]); {winner['name']} trains faster "
               f"({winner['samples_s']:.1f} vs {best['samples_s']:.1f} samples/s), so it wins")
    else:
        winner = best
        others = ", ".join(f"{n}: {c['difference']['mean']:+.4f} [{c['difference']['low']:+.4f}, "
                           f"{c['difference']['high']:+.4f}]" + (" (better at 95%)" if c["significant"] else
                                                                 " (not at 95%, and not cheaper)")
                           for n, c in comparisons.items())
        why = (f"{best['name']} has the best mean {objective} over the seeds ({scores[best['name']]:.4f})"
               + (f"; its lead on the same {len(gold):,} (seed, row) pairs over {others}" if others else ""))
    return {"winner": winner["name"], "best": best["name"], "scores": scores, "comparisons": comparisons,
            "rows": int(len(gold)), "why": why}
