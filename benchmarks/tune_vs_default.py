"""`budgetlora tune` against a fixed config given the same time, paired on the same test rows; and how close each tune
ends to its --time.

    python benchmarks/tune_vs_default.py --time 30m [--repeats 2] [--out bench/tune]           # AG News, MiniLM
    python benchmarks/tune_vs_default.py --task imbalanced --time 8m [--repeats 2] [--out bench/tune-imb]

agnews: `tune --config minilm-default` on every shipped training row (no train_limit, no linear probe in the
trials) against `train --config minilm-default` on every row for `--baseline-epochs` epochs, cut by train.max_time
at the same --time less a minute for loading and the final test (the preset's own 28,000 rows take 10 minutes
here). imbalanced: a 2,000-row sample with classes at 60/25/10/5 percent (benchmarks/imbalanced.py), `tune
--objective val_macro_f1` against the default config; both scored on the full balanced test split by macro-F1.

Each repeat is its own tune (train.seed 42, 43, ...) in its own folder, a separate `budgetlora` process whose wall
time is measured from its start to its exit. Prints one row per repeat: the winner, its test score against the
fixed config's on the same rows (difference with a paired bootstrap interval; McNemar for accuracy), and the clock.
Runs that finished are reused on a rerun.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT.parent / "shared" / "data" / "ag_news" / "test.csv.gz"  # the default config's test split
sys.path.insert(0, str(ROOT / "benchmarks"))


def budgetlora(*argv: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "budgetlora.cli", *argv], check=True)
    return time.monotonic() - started


def answers(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.loadtxt(run / "test_predictions.csv", delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    t = t[np.argsort(t[:, 0])]
    return t[:, 0], t[:, 1], t[:, 2]


def winner_answers(state: dict, folder: Path, test: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tune's winner's per-row test answers: its run's, or for an ensemble, `budgetlora predict RUN RUN` on the
    whole test file (rows in file order, as the runs number them)."""
    members = state.get("winner_runs") or [state["winner_run"]]
    if len(members) == 1:
        return answers(Path(members[0]))
    import pandas as pd

    output = folder / "ensemble_test.csv"
    budgetlora("predict", *members, "--input", str(test), "--output", str(output), "--quiet")
    gold = pd.read_csv(test)["label"].to_numpy()
    labels = pd.read_csv(output)["Label"].to_numpy()
    return np.arange(len(gold)), gold, labels


def compare(winner: tuple, b: Path, macro: bool) -> str:
    from budgetlora.experiments.stats import paired, paired_macro_f1
    from budgetlora.tasks import macro_f1

    ra, gold, pa = winner
    rb, gold_b, pb = answers(b)
    assert np.array_equal(ra, rb) and np.array_equal(gold, gold_b), "not the same test rows"
    if not macro:
        p = paired(pa == gold, pb == gold)
        d = p.difference
        return (f"{np.mean(pa == gold):.4f} vs {np.mean(pb == gold):.4f} on {len(gold):,} rows: "
                f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}], McNemar p={p.mcnemar_p:.2g}")
    d = paired_macro_f1(gold, pa, pb, 4, resamples=1000)
    fa, fb = macro_f1(gold, pa, 4), macro_f1(gold, pb, 4)
    return f"macro-F1 {fa:.4f} vs {fb:.4f} on {len(gold):,} rows: {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def main(argv=None) -> None:
    from budgetlora.experiments.timebudget import parse_duration

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("agnews", "imbalanced"), default="agnews")
    ap.add_argument("--time", default="30m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline-epochs", type=float, default=1.0)
    ap.add_argument("--out", default="bench/tune")
    args = ap.parse_args(argv)
    seconds, out = parse_duration(args.time), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "agnews":
        common = ["--config", "minilm-default", "--data.train_limit", "0"]
        tune_flags = [*common, "--train.probe_steps", "0"]
        base_flags = [*common, "--train.epochs", str(args.baseline_epochs), "--train.max_time", str(seconds - 60)]
    else:
        from imbalanced import DEFAULT_TRAIN, skewed_sample

        sample = skewed_sample(DEFAULT_TRAIN, 2000, [60, 25, 10, 5], out / "skewed-60-25-10-5.csv")
        tune_flags = ["--data", str(sample), "--objective", "val_macro_f1"]
        base_flags = ["--data.train", str(sample)]
    baseline_s = budgetlora("train", *base_flags, "--runs", str(out / "baseline"), "--quiet")
    baseline = next(p for p in (out / "baseline").iterdir() if (p / "metrics.json").is_file())
    rows = []
    for r in range(args.repeats):
        folder = out / f"tune-{r + 1}"
        wall = budgetlora("tune", *tune_flags, "--train.seed", str(42 + r), "--time", args.time, "--out", str(folder))
        state = json.loads((folder / "tune.json").read_text())
        vs = compare(winner_answers(state, folder, TEST), baseline, macro=args.task == "imbalanced")
        ens = state.get("ensemble") or {}
        rows.append(f"| {r + 1} | {' + '.join(ens['variants']) if ens.get('kept') else state['choice']['winner']} | {vs} | {wall:.0f}s of {seconds:.0f}s "
                    f"({wall / seconds - 1:+.1%}) | {state['search']['sizes'][0]} at {state['search']['steps']} "
                    f"steps, {state['seeds']} seed(s), final {state['final']['steps']} steps |")
        print(rows[-1], flush=True)
    print(f"\nfixed config: {baseline} ({baseline_s:.0f}s)\n")
    print("| repeat | winner | winner vs fixed config, same test rows | clock | search |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
