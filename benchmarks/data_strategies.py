"""Data strategies on one small common setup: test accuracy with and without augmentation, row filters and the
noisy-label filter, then, on the unlabelled competition file, the predicted class distribution without and with
prior correction and after one self-training round.

    python benchmarks/data_strategies.py [--runs runs/data_strategies] [--unlabelled PATH]

Every variant trains the same config (the embedded MiniLM unless --model is given) apart from its own change;
one training process runs at a time. Prints markdown tables.
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
from budgetlora.inference.predict import read_unlabelled
from budgetlora.shift.priors import corrected_probabilities
from budgetlora.shift.selftrain import self_train
from budgetlora.training.train import train

# LoRA on q,v only and one validation pass per epoch: a cheap common setup, pinned so results stay comparable
COMMON = {"data.train_limit": 3000, "data.test_limit": 2000, "model.max_length": 64, "train.epochs": 1.0,
          "train.lr": 2e-3, "lora.targets": "q,v", "train.eval_every": 0}
VARIANTS = {
    "baseline": {},
    "augment (synonym .15, delete .05, swap .05)": {"augment.synonym": 0.15, "augment.delete": 0.05,
                                                    "augment.swap": 0.05},
    "filter (max_words 100, max_non_alnum .1)": {"filter.max_words": 100, "filter.max_non_alnum": 0.1},
    "noisy filter 0.05": {"filter.noisy_fraction": 0.05},
}
DEFAULT_UNLABELLED = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews_kaggle" / "test_unlabelled.pkl"


def shares(labels: np.ndarray, n: int) -> str:
    counts = np.bincount(labels, minlength=n)
    return " / ".join(f"{c / counts.sum():.3f}" for c in counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/data_strategies")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--unlabelled", default=str(DEFAULT_UNLABELLED))
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--max-per-class", type=int, default=200)
    ap.add_argument("--train-limit", type=int, default=COMMON["data.train_limit"])
    ap.add_argument("--test-limit", type=int, default=COMMON["data.test_limit"])
    args = ap.parse_args()
    COMMON.update({"data.train_limit": args.train_limit, "data.test_limit": args.test_limit})
    base = Config().replace(**COMMON, **{"model.name": args.model})

    rows = []
    for name, change in VARIANTS.items():
        t0 = time.time()
        out = train(base.replace(**change, name=name), root=args.runs)
        m = runs.read_json(out / runs.METRICS)
        removed = sum(v["removed"] for v in m["filters"].values() if isinstance(v, dict))
        rows.append((name, sum(m["train_class_counts"]), removed, m["val_accuracy"], m["test_accuracy"],
                     m["wall_time_s"], out))
        print(f"done {name}: test acc {m['test_accuracy']:.4f} ({time.time() - t0:.0f}s)", flush=True)

    print(f"\n## Test accuracy, {args.model}, LoRA q,v, train_limit {COMMON['data.train_limit']}, test_limit "
          f"{COMMON['data.test_limit']}, max_length 64, 1 epoch, lr 2e-3\n")
    print("| variant | train rows | removed | val acc | test acc | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, removed, va, ta, wall, _ in rows:
        print(f"| {name} | {n:,} | {removed:,} | {va:.4f} | {ta:.4f} | {wall:.0f} |")

    # -- the unlabelled competition file --------------------------------------------------------------------------
    baseline = rows[0][-1]
    loaded = load_run(baseline)
    n = loaded.cfg.model.num_labels
    texts = read_unlabelled(args.unlabelled, loaded.cfg)
    probs, est = corrected_probabilities(loaded, texts)
    del loaded
    conf = probs.max(1)
    # a short run is rarely 90% sure of anything: never ask for more confidence than half the texts reach
    threshold = float(min(args.threshold, np.quantile(conf, 0.5)))

    print(f"\n## Predicted class shares on {Path(args.unlabelled).name} ({len(texts):,} texts; "
          f"World / Sports / Business / Sci-Tech)\n")
    print("| model | predictions | class shares | labelled test acc |")
    print("|---|---|---|---:|")
    print(f"| baseline | argmax | {shares(probs.argmax(1), n)} | {rows[0][4]:.4f} |")
    print(f"| baseline | prior-corrected (EM, {est.iterations} it.) | {shares(est.posteriors.argmax(1), n)} | |")
    print(f"| baseline | EM prior estimate | {' / '.join(f'{p:.3f}' for p in est.priors)} | |", flush=True)

    (child,) = self_train(baseline, args.unlabelled, args.runs, threshold=threshold, balance=True,
                          max_per_class=args.max_per_class)
    child_loaded = load_run(child)
    child_probs, child_est = corrected_probabilities(child_loaded, texts)
    cm = runs.read_json(child / runs.METRICS)
    pseudo = runs.load_config(child).data.pseudo_labels
    print(f"| self-train 1 round | argmax | {shares(child_probs.argmax(1), n)} | {cm['test_accuracy']:.4f} |")
    print(f"| self-train 1 round | prior-corrected | {shares(child_est.posteriors.argmax(1), n)} | |")
    print(f"\nbaseline max-probability quantiles (10/50/90%): {np.quantile(conf, [0.1, 0.5, 0.9]).round(3).tolist()}")
    print(f"self-training: threshold {threshold:.3f}, balanced, max {args.max_per_class} per class -> "
          f"{len(pd.read_csv(pseudo))} pseudo-labelled rows; child run {child} "
          f"({cm['trainable_params']:,} trainable params, parent {runs.load_config(child).train.init_from})")


if __name__ == "__main__":
    main()
