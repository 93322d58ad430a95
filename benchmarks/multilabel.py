"""Several labels per text: a multi-label set built from the shipped AG News split, and what the multi-label run
scores on it, at its tuned per-label thresholds against a fixed 0.5 and against one label per text (what a
single-label classifier can give).

    python benchmarks/multilabel.py [--rows 3000] [--test-rows 2000] [--pairs 0.5] [--seeds 2] [--runs runs/multilabel]

The set: rows of the train (or test) split; a `--pairs` share of them are two texts of different classes joined
into one, carrying both labels ('0;2'), the rest single texts with their one label. Train rows come from the train
split, test rows from the test split, so no text is in both. Written once under --runs: a killed benchmark resumes
and finished runs are reused. The model is the embedded all-MiniLM-L6-v2 with LoRA on every projection; scores are
this small model's. Prints a markdown table, mean +- half the range over seeds. `--smoke`: 3 steps, 100 test rows.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.inference.load import load_run
from budgetlora.tasks import multilabel_metrics
from budgetlora.training.train import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ag_news"
COMMON = {"model.name": "minilm", "model.problem_type": "multi", "model.max_length": 128, "train.epochs": 1.0,
          "train.lr": 2e-3, "lora.targets": "q,k,v,o,ffn_in,ffn_out", "train.base_dropout": 0.0,
          "lora.dropout": 0.0, "data.val_fraction": 0.1}


def joined_set(source: Path, rows: int, pairs: float, out: Path, seed: int) -> Path:
    """`rows` rows: round(rows * pairs) joined pairs of different classes, the rest single texts; written once."""
    if out.is_file():
        return out
    df = pd.read_csv(source).sample(frac=1, random_state=seed).reset_index(drop=True)
    n_pairs = round(rows * pairs)
    first, second = df.iloc[:n_pairs], df.iloc[n_pairs:]
    taken, made = set(), []
    pool = second.groupby("label")
    by_class = {c: list(g.index) for c, g in pool}
    rng = np.random.default_rng(seed)
    for text, y in zip(first.text, first.label):
        other = int(rng.choice([c for c in by_class if c != y]))
        j = by_class[other].pop()
        taken.add(j)
        made.append((text + " " + df.text[j], ";".join(map(str, sorted((int(y), other))))))
    singles = second.drop(index=list(taken)).head(rows - n_pairs)
    made += [(t, str(int(y))) for t, y in zip(singles.text, singles.label)]
    data = pd.DataFrame(made, columns=["text", "label"]).sample(frac=1, random_state=seed)
    with runs.atomic_path(out) as tmp:
        data.to_csv(tmp, index=False)
    return out


def matrix(cells: pd.Series, num_labels: int = 4) -> np.ndarray:
    m = np.zeros((len(cells), num_labels), dtype=np.int64)
    for i, cell in enumerate(cells.astype(str)):
        m[i, [int(x) for x in cell.split(";")]] = 1
    return m


def spread(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4f} ± {(v.max() - v.min()) / 2:.4f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000, help="training rows (default 3000)")
    ap.add_argument("--test-rows", type=int, default=2000, help="test rows, from the test split (default 2000)")
    ap.add_argument("--pairs", type=float, default=0.5, help="share of rows that are joined pairs (default 0.5)")
    ap.add_argument("--seeds", type=int, default=2, help="training seeds (default 2)")
    ap.add_argument("--runs", default="runs/multilabel", help="run folders and the written sets")
    ap.add_argument("--smoke", action="store_true", help="3 steps and 100 test rows: checks the script")
    args = ap.parse_args(argv)
    root = Path(args.runs)
    test_rows = 100 if args.smoke else args.test_rows
    tag = f"{args.rows}_{args.pairs:g}"
    train_csv = joined_set(DATA / "train.csv.gz", args.rows, args.pairs, root / "data" / f"train_{tag}.csv", 0)
    test_csv = joined_set(DATA / "test.csv.gz", test_rows, args.pairs, root / "data" / f"test_{test_rows}.csv", 1)
    test = pd.read_csv(test_csv)
    gold = matrix(test.label)
    common = {**COMMON, "data.train": str(train_csv.resolve()), "data.test": str(test_csv.resolve())}
    if args.smoke:
        common["train.max_steps"] = 3

    rows = {"tuned thresholds (stored in the run)": [], "fixed threshold 0.5": [], "one label per text (argmax)": []}
    for seed in range(1, args.seeds + 1):
        t0 = time.time()
        run = train(Config().replace(**common, **{"train.seed": seed}, name=f"multilabel seed {seed}"), root=root)
        m = runs.read_json(run / runs.METRICS)
        logits = load_run(run).logits(test.text.tolist())
        top1 = np.zeros_like(gold)
        top1[np.arange(len(gold)), logits.argmax(1)] = 1
        rows["tuned thresholds (stored in the run)"].append(multilabel_metrics(logits, gold, m["thresholds"]))
        rows["fixed threshold 0.5"].append(multilabel_metrics(logits, gold))
        rows["one label per text (argmax)"].append(multilabel_metrics(np.where(top1 == 1, 20.0, -20.0), gold))
        print(f"seed {seed}: test micro-F1 {m['test_micro_f1']:.4f}, subset accuracy {m['test_subset_accuracy']:.4f}, "
              f"thresholds {m['thresholds']} ({time.time() - t0:.0f}s)", flush=True)

    pairs = int(test.label.astype(str).str.contains(";").sum())
    print(f"\n## Multi-label AG News: {args.rows:,} training rows, {len(test):,} test rows ({pairs:,} joined pairs of "
          f"two classes), embedded all-MiniLM-L6-v2, {args.seeds} seed(s)\n")
    print("| decision | micro-F1 | macro-F1 | subset accuracy | " + " | ".join(
        f"F1 {n}" for n in ("World", "Sports", "Business", "Sci/Tech")) + " |")
    print("|---|---:|---:|---:|" + "---:|" * 4)
    for name, ms in rows.items():
        per = [spread([m["per_label_f1"][j] for m in ms]) for j in range(4)]
        print(f"| {name} | {spread([m['micro_f1'] for m in ms])} | {spread([m['macro_f1'] for m in ms])} | "
              f"{spread([m['subset_accuracy'] for m in ms])} | " + " | ".join(per) + " |")
    print(f"\nmean ± half the range over seeds; runs under {root}")


if __name__ == "__main__":
    main()
