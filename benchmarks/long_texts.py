"""Texts longer than the model reads: `--long-texts chunk` (windows, logits pooled) against truncation, on sets built
from the shipped AG News test split, with a finished single-label run.

    python benchmarks/long_texts.py runs/RUN_ID [--n 1200]

Two sets of N texts each, seeded: `same` joins six test texts of one class (the label is that class); `mixed` joins
one text of a class with five of another (the label is the five's class, so the start of the text misleads). Each is
read four ways in one process, side by side: truncated at the run's max_length (what `predict` does by default),
truncated at 512 tokens (reading further, where the model's positions allow it), and in windows of max_length
sharing a quarter of their tokens, pooled by the mean of the windows' logits (the task's rule), by the mean of their
softmax probabilities, and by the window with the largest logit. Prints accuracy with a 95% bootstrap interval over
the texts, the paired difference of each reading against truncation, and the time each took.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from budgetlora.data.readers import default_data_dir
from budgetlora.data.tokens import windows
from budgetlora.experiments.stats import paired, row_interval
from budgetlora.inference.load import STRIDE_SHARE, load_run
from budgetlora.tasks import TASKS, softmax
from budgetlora.training.evaluate import logits_for_ids

PARTS = 6


def build_sets(texts: list[str], labels: np.ndarray, n: int, seed: int) -> dict[str, tuple[list[str], np.ndarray]]:
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    classes = sorted(by_class)
    same, same_y, mixed, mixed_y = [], [], [], []
    for i in range(n):
        c = classes[i % len(classes)]
        same.append(" ".join(texts[j] for j in rng.choice(by_class[c], PARTS, replace=False)))
        same_y.append(c)
        first = rng.choice([k for k in classes if k != c])
        parts = [texts[rng.choice(by_class[first])]] + [texts[j] for j in rng.choice(by_class[c], PARTS - 1,
                                                                                    replace=False)]
        mixed.append(" ".join(parts))
        mixed_y.append(c)
    return {"same": (same, np.array(same_y)), "mixed": (mixed, np.array(mixed_y))}


def pooled(window_logits: np.ndarray, owner: np.ndarray, n: int, rule: str) -> np.ndarray:
    if rule == "mean logits":  # the rule `--long-texts chunk` uses
        return TASKS["single"].pool(window_logits, owner, n)
    out = np.zeros((n, window_logits.shape[1]))
    if rule == "mean probabilities":
        np.add.at(out, owner, softmax(window_logits.astype(np.float64)))
        return out
    best = np.full(n, -np.inf)  # "most confident window": the window whose top logit is the largest
    for w, t in enumerate(owner):
        if window_logits[w].max() > best[t]:
            best[t], out[t] = window_logits[w].max(), window_logits[w]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=1200, help="texts per set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    test = pd.read_csv(default_data_dir() / "test.csv.gz")
    sets = build_sets(test["text"].astype(str).tolist(), test["label"].to_numpy(), args.n, args.seed)
    loaded = load_run(args.run)
    ml = loaded.cfg.model.max_length
    print(f"run {args.run.name} ({loaded.cfg.model.name}, max_length {ml}); {args.n} texts per set, {PARTS} test "
          f"texts each; windows of {ml} tokens sharing {ml // STRIDE_SHARE}")
    for name, (texts, gold) in sets.items():
        lengths = np.array([len(x) for x in loaded.tokenizer(texts)["input_ids"]])
        print(f"\n{name}: tokens per text median {int(np.median(lengths))}, min {lengths.min()}, max {lengths.max()}")
        correct, seconds = {}, {}
        for read, length in ((f"truncate at {ml}", ml), ("truncate at 512", 512)):
            loaded.max_length, t = length, time.perf_counter()
            correct[read] = loaded.logits(texts).argmax(1) == gold
            seconds[read] = time.perf_counter() - t
        loaded.max_length, t = 0, time.perf_counter()
        ids, owner = windows(loaded.tokenizer, texts, ml, ml // STRIDE_SHARE)
        pieces = logits_for_ids(loaded.model, ids, loaded.cfg.train.eval_batch_size, loaded.tokenizer.pad_token_id)
        took = time.perf_counter() - t
        for rule in ("mean logits", "mean probabilities", "most confident window"):
            correct[f"chunk, {rule}"] = pooled(pieces, owner, len(texts), rule).argmax(1) == gold
            seconds[f"chunk, {rule}"] = took
        print(f"  {len(ids)} windows ({len(ids) / len(texts):.2f} per text)")
        base = correct[f"truncate at {ml}"]
        print(f"  {'reading':<34} {'accuracy [95%]':<24} {'vs truncate at ' + str(ml) + ' [95%]':<30} {'time':>8}")
        for read, c in correct.items():
            iv = row_interval(c)
            d = paired(c, base).difference
            print(f"  {read:<34} {iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}]   "
                  f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}] pts      {seconds[read]:7.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
