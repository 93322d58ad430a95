"""Imbalanced training classes: plain cross-entropy vs class weights vs focal loss, on a skewed AG News sample.

Each variant trains on the same skewed sample and is tested on the balanced full test split.

    python benchmarks/imbalanced.py [--rows 2000] [--shares 60,25,10,5] [--seeds 2] [--runs runs/imbalanced]

The training sample takes `--shares` percent of `--rows` rows from each class in turn (World, Sports, Business,
Sci/Tech), drawn from the shipped train split; it is written once under --runs, so a killed benchmark resumes and
finished runs are reused. Every variant trains the same config apart from its own change, one seed after another.
Prints a markdown table: macro-F1 and per-class recall, mean +- half the range over seeds. `--smoke` trains 2
steps and tests on 200 rows, to check that the script runs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.training.artifacts import class_names
from budgetlora.training.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv.gz"
# the embedded model, LoRA on every projection, no dropout anywhere: pinned so results stay comparable
COMMON = {"model.name": "minilm", "model.max_length": 64, "train.epochs": 1.0, "train.lr": 2e-3,
          "lora.targets": "q,k,v,o,ffn_in,ffn_out", "train.base_dropout": 0.0, "lora.dropout": 0.0,
          "data.test": "", "data.test_limit": 0}
VARIANTS = {
    "plain cross-entropy": {},
    "class weights auto": {"train.class_weights": "auto"},
    "focal (gamma 2) + weights auto": {"train.class_weights": "auto", "train.loss": "focal"},
}


def skewed_sample(source: Path, rows: int, shares: list[float], out: Path, seed: int = 0) -> Path:
    """`shares[c]` percent of `rows` rows of class c (at least one each), shuffled; written to `out` once."""
    if out.is_file():
        return out
    df = pd.read_csv(source)
    parts = [df[df["label"] == c].sample(max(1, round(rows * s / 100)), random_state=seed)
             for c, s in enumerate(shares)]
    sample = pd.concat(parts).sample(frac=1, random_state=seed)[["text", "label"]]
    with runs.atomic_path(out) as tmp:  # a plain .csv: the temporary name has no suffix to infer compression from
        sample.to_csv(tmp, index=False)
    return out


def spread(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {(v.max() - v.min()) / 2:.3f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000, help="training rows of the skewed sample (default 2000)")
    ap.add_argument("--shares", default="60,25,10,5", help="percent of the rows per class (default 60,25,10,5)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per variant (default 2)")
    ap.add_argument("--select", default="loss", choices=("loss", "accuracy", "macro_f1"),
                    help="train.select of every variant (default loss)")
    ap.add_argument("--train", default=str(DEFAULT_TRAIN), help="the shipped train split to sample from")
    ap.add_argument("--runs", default="runs/imbalanced", help="run folders and the written sample")
    ap.add_argument("--smoke", action="store_true", help="2 steps per run and 200 test rows: checks the script")
    args = ap.parse_args(argv)
    shares = [float(s) for s in args.shares.split(",")]
    runs_dir = Path(args.runs)
    tag = f"{args.rows}_{'-'.join(f'{s:g}' for s in shares)}"
    data = skewed_sample(Path(args.train), args.rows, shares, runs_dir / "data" / f"train_{tag}.csv")
    common = {**COMMON, "data.train": str(data.resolve()), "model.num_labels": len(shares),
              "train.select": args.select}
    if args.smoke:
        common.update({"train.max_steps": 2, "data.test_limit": 200})
    base = Config().replace(**common)

    results: dict[str, list[dict]] = {}
    for name, change in VARIANTS.items():
        for seed in range(1, args.seeds + 1):
            t0 = time.time()
            out = train(base.replace(**change, **{"train.seed": seed}, name=name), root=runs_dir)
            m = runs.read_json(out / runs.METRICS)
            results.setdefault(name, []).append(m)
            print(f"done {name}, seed {seed}: test macro-F1 {m['test_macro_f1']:.4f} ({time.time() - t0:.0f}s)",
                  flush=True)

    names = class_names(len(shares))
    counts = results[next(iter(VARIANTS))][0]["train_class_counts"]
    print(f"\n## Skewed training classes ({' / '.join(f'{s:g}%' for s in shares)} of {args.rows:,} rows; trained "
          f"on {' / '.join(map(str, counts))}), balanced test split, {args.seeds} seed(s), select {args.select}\n")
    print("| variant | test macro-F1 | " + " | ".join(f"recall {n}" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for name, ms in results.items():
        recalls = [spread([m["test_per_class_accuracy"][c] for m in ms]) for c in range(len(names))]
        print(f"| {name} | {spread([m['test_macro_f1'] for m in ms])} | " + " | ".join(recalls) + " |")
    print(f"\nmean ± half the range over seeds; runs under {runs_dir}")


if __name__ == "__main__":
    main()
