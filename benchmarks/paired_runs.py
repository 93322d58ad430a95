"""Two finished runs compared on the same test rows: each one's accuracy with a 95% bootstrap interval over the rows,
and the paired difference (bootstrap over the same rows) with McNemar's exact p.

    python benchmarks/paired_runs.py runs/MPNET_RUN runs/MINILM_RUN

Both runs must have tested on the same rows (the same test source and test_limit): their test_predictions.csv
files are matched by source row, and anything else is refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.experiments.compare import read_predictions
from budgetlora.experiments.stats import paired, row_interval


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="run folder A (the difference is A - B)")
    ap.add_argument("b", type=Path, help="run folder B")
    args = ap.parse_args(argv)
    got = {}
    for key, run in (("a", args.a), ("b", args.b)):
        pred = read_predictions(run)
        if pred is None:
            sys.exit(f"{run}: no {runs.PREDICTIONS}")
        m = runs.read_json(run / runs.METRICS)
        cfg = runs.load_config(run)
        got[key] = (pred, m, cfg)
    (rows_a, correct_a), (rows_b, correct_b) = got["a"][0], got["b"][0]
    if not np.array_equal(rows_a, rows_b):
        sys.exit(f"the runs tested on different rows ({len(rows_a)} vs {len(rows_b)}): a paired comparison needs "
                 "the same ones")
    for key, run in (("a", args.a), ("b", args.b)):
        (_, correct), m, cfg = got[key]
        iv = row_interval(correct)
        print(f"{key.upper()} {run.name}: {cfg.model.name}, {m['trainable_params']:,} trainable, "
              f"{m['steps']} steps, train {m['train_time_s'] / 60:.1f} min, peak RSS {m.get('peak_rss_mb', 0):,.0f} MiB;"
              f" test accuracy {iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}] on {len(correct):,} rows")
    d = paired(correct_a, correct_b)
    print(f"A - B: {d.difference.mean:+.4f} [{d.difference.low:+.4f}, {d.difference.high:+.4f}] (95%, bootstrap over "
          f"the same rows); McNemar exact p {d.mcnemar_p:.2g} ({d.only_a} rows only A right, {d.only_b} only B); "
          f"{'different' if d.significant else 'the same'} at 95%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
