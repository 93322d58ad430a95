"""Train the embedded default on the whole shipped train split and print test accuracy, wall time and params.

    python benchmarks/full_train.py [--epochs 1] [--runs /tmp/budgetlora-full] [any --section.field override]

Prints the numbers of the model it trained (all-MiniLM-L6-v2 by default), never anyone else's.
"""
import argparse
import json
import time

from budgetlora import config as config_mod
from budgetlora.log import setup
from budgetlora.runs import versions
from budgetlora.training.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs-benchmark")
    config_mod.add_flags(parser)
    args = parser.parse_args()
    setup()  # the run's own lines (validation, the final metrics), as `budgetlora train` shows them
    cfg = config_mod.from_flags(args).replace(**{"data.train_limit": 0, "data.test_limit": 0})
    t0 = time.time()
    out = train(cfg, root=args.runs)
    m = json.loads((out / "metrics.json").read_text())
    v = versions()
    print(f"\nmodel {cfg.model.name} | targets {','.join(cfg.lora.targets)} r={cfg.lora.r} alpha={cfg.lora.alpha} | "
          f"{cfg.train.epochs:g} epoch(s), lr {cfg.train.lr:g}, max_length {cfg.model.max_length}")
    print(f"train rows {m['steps'] * cfg.train.batch_size // max(cfg.train.epochs, 1):,.0f} (approx.), "
          f"trainable params {m['trainable_params']:,}")
    print(f"val accuracy  {m['val_accuracy']:.4f}")
    print(f"test accuracy {m['test_accuracy']:.4f}  (AG News test, {sum(map(sum, m['test_confusion_matrix'])):,} rows)")
    print(f"train time {m['train_time_s']:.0f}s, wall time {time.time() - t0:.0f}s on {v['device']}")


if __name__ == "__main__":
    main()
