"""`budgetlora COMMAND`: one small function per command; the logic lives in the modules they call."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import config as config_mod

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenise in one call per split; no fork warnings


def cmd_plan(args) -> int:
    from .budget import format_plan, plan

    cfg = config_mod.from_flags(args)
    p = plan(cfg)
    if args.max_rank:
        r = p.max_rank()
        if r < 1:
            raise config_mod.ConfigError(f"no rank fits: the fixed part alone trains {p.fixed_params:,} parameters")
        p = plan(cfg.replace(**{"lora.r": r}))
    print(json.dumps(p.as_dict(), indent=2) if args.json else format_plan(p))
    return 0 if p.fits else 3


def cmd_train(args) -> int:
    from .train import train

    cfg = config_mod.from_flags(args)
    out = train(cfg, root=args.runs, force=args.force)
    m = json.loads((out / "metrics.json").read_text())
    print(f"test accuracy {m['test_accuracy']:.4f} ({cfg.model.name}, {m['trainable_params']:,} trainable params) "
          f"-> {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .predict import evaluate_run

    m = evaluate_run(args.run, args.data)
    print(json.dumps({k: m[k] for k in ("accuracy", "loss", "macro_f1", "per_class_accuracy", "n")}, indent=2))
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_file

    labels = predict_file(args.run, args.input, args.output)
    counts = {int(k): int(v) for k, v in zip(*__import__("numpy").unique(labels, return_counts=True))}
    print(f"wrote {len(labels):,} predictions to {args.output} (label counts {counts})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="count what a config trains, from the model config alone")
    config_mod.add_flags(p)
    p.add_argument("--max-rank", action="store_true", help="solve for the largest rank within the budget")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train one config into runs/<run id>/")
    config_mod.add_flags(p)
    p.add_argument("--runs", default="runs", help="folder holding run folders")
    p.add_argument("--force", action="store_true", help="retrain even if this run id already finished")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a saved run on its test split or another labelled file")
    p.add_argument("run")
    p.add_argument("--data", default="", help="labelled file (default: the run's test split)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write ID,Label predictions for a file, after re-checking the saved adapter")
    p.add_argument("run")
    p.add_argument("--input", required=True, help="texts to label (.csv/.csv.gz/.parquet/.pkl with a text column)")
    p.add_argument("--output", required=True, help="CSV to write (ID,Label)")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv=None) -> int:
    from .architectures import ModelNotFound
    from .data import DataError

    args = build_parser().parse_args(argv)
    expected = (config_mod.ConfigError, DataError, ModelNotFound, FileNotFoundError)
    try:
        from .model import AdapterError
        from .predict import VerificationError

        expected += (AdapterError, VerificationError)
        return args.func(args)
    except expected as e:
        print(f"budgetlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("budgetlora: interrupted; a rerun of the same command resumes from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
