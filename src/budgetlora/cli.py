"""`budgetlora COMMAND`: one small function per command; the logic lives in the modules they call."""
from __future__ import annotations

import argparse
import json
import os
import sys

from budgetlora import config as config_mod
from budgetlora.config.flags import add_flag, add_section_flags
from budgetlora.config.use import LONG_TEXTS, PRIOR_CORRECTION, SelfTrainConfig, ServeConfig, SubmitConfig
from budgetlora.errors import BudgetloraError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenise in one call per split; no fork warnings


def cmd_plan(args) -> int:
    from budgetlora.adapters.budget import fill, format_plan, plan

    cfg = config_mod.from_flags(args)
    if args.members:  # an ensemble: what its runs train, summed, against this config's budget
        from budgetlora.inference.ensemble import format_members

        text, fits = format_members(args.members, cfg.budget.max_params, args.json)
        print(text)
        return 0 if fits else 3
    p = fill(cfg)[1] if args.fill else plan(cfg)
    print(json.dumps(p.as_dict(), indent=2) if args.json else format_plan(p))
    return 0 if p.fits else 3


def cmd_train(args) -> int:
    from budgetlora.training.result import train_run

    print(train_run(config_mod.from_flags(args), root=args.runs, force=args.force, track=args.track).summary())
    return 0


def cmd_evaluate(args) -> int:
    from budgetlora import runs
    from budgetlora.inference.predict import evaluate_run
    from budgetlora.tasks import task_of

    run = args.run if len(args.run) > 1 else args.run[0]  # several: their ensemble
    m = evaluate_run(run, args.input, base=args.base, long_texts=args.long_texts)
    print(json.dumps({k: m[k] for k in task_of(runs.load_config(args.run[0])).evaluate_keys}, indent=2))
    return 0


def cmd_predict(args) -> int:
    from budgetlora.inference.predict import predict
    from budgetlora.shift.predict import post_processor

    run = args.run if len(args.run) > 1 else args.run[0]  # several: their ensemble
    done = predict(run, args.input, args.output, base=args.base, max_length=args.max_length, proba=args.proba,
                   top_k=args.top_k, post=post_processor(args.prior_correction, args.target_prior),
                   long_texts=args.long_texts)
    print("\n".join(done.summary()))
    return 0


def cmd_self_train(args) -> int:
    from budgetlora import runs
    from budgetlora.shift.selftrain import self_training

    runs.check_output(args.runs, "into")  # a mistyped --runs is refused, not made with every folder above it
    done = self_training(args.run, args.input, args.runs, config_mod.from_flags(args).self_train, base=args.base)
    print("\n".join(done.summary()))
    return 0


def cmd_serve(args) -> int:
    from budgetlora.inference.serve import serve

    serve(args.run, config_mod.from_flags(args).serve, verify=not args.no_verify, base=args.base,
          long_texts=args.long_texts)
    return 0


def cmd_export(args) -> int:
    from budgetlora.inference.export import export_merged, export_onnx

    if not (args.merged or args.onnx):
        raise config_mod.ConfigError("export: say what to write: --merged OUT, --onnx OUT, or both")
    if args.quantize and not args.onnx:
        raise config_mod.ConfigError("--quantize applies to --onnx exports")
    from budgetlora import runs

    for out in filter(None, (args.merged, args.onnx)):  # both, before the first export spends minutes
        runs.check_output(out, "folder")
    if args.merged:
        export_merged(args.run, args.merged, force=args.force, tolerance=args.tolerance, base=args.base)
        print(f"wrote merged model to {args.merged}")
    if args.onnx:
        export_onnx(args.run, args.onnx, force=args.force, tolerance=args.tolerance, base=args.base,
                    quantize=args.quantize)
        print(f"wrote ONNX model to {args.onnx}")
    return 0


def cmd_sweep(args) -> int:
    from budgetlora.experiments.leaderboard import write_report
    from budgetlora.experiments.spec import load_spec
    from budgetlora.experiments.summary import format_summary, run_folders
    from budgetlora.experiments.sweep import run_sweep
    from budgetlora.experiments.timebudget import parse_duration

    spec = load_spec(args.spec, root=args.root)
    s = run_sweep(spec, storage=args.storage, workers=args.workers, n_trials=args.n_trials, track=args.track,
                  time_budget=parse_duration(args.time_budget, "--time-budget"))
    print(format_summary(s))
    if s["states"].get("COMPLETE"):
        done = write_report(spec.folder, title=spec.name, run_dirs=run_folders(spec, s["storage"]), source=spec.runs)
        print(f"report: {done['html']}")
    return 0 if not s["failed"] else 1


def cmd_tune(args) -> int:
    from budgetlora.experiments.timebudget import parse_count, parse_duration
    from budgetlora.experiments.tune import tune

    cfg = config_mod.from_flags(args)
    shortcuts = {"data.train": args.tune_data, "model.name": args.tune_model,
                 "budget.max_params": parse_count(args.tune_budget, "--budget") if args.tune_budget else None}
    cfg = cfg.replace(**{k: v for k, v in shortcuts.items() if v is not None})
    r = tune(cfg, parse_duration(args.time, "--time"), args.out, objective=args.objective)
    print(f"winner: {r['winner']} -> {' '.join(r['winner_runs'])}\nreport: {os.path.join(args.out, 'report.md')}\n"
          f"took {r['elapsed_s']:.0f}s of {r['key']['time_s']:.0f}s")
    return 0


def cmd_report(args) -> int:
    from budgetlora.experiments.leaderboard import write_report

    for kind, path in write_report(args.dir).items():
        print(f"{kind}: {path}")
    return 0


def cmd_shift(args) -> int:
    from budgetlora.shift.submit import shift_analysis

    result, files = shift_analysis(args.run, args.input, args.output, max_length=args.max_length, base=args.base)
    print("\n".join(result.report["advice"]))
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


def cmd_submit(args) -> int:
    from budgetlora.shift.submit import submit, submit_members

    cfg = config_mod.from_flags(args)
    rep = (submit_members(args.members, args.input, args.output, cfg.submit) if args.members else
           submit(cfg, args.input, args.output, root=args.runs))
    print("\n".join(rep["summary"]))
    print(f"report: {args.output}.summary.txt / .summary.json")
    return 0


def add_long_texts_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--long-texts", choices=LONG_TEXTS, default="truncate",
                   help="a text longer than the run reads (max_length): truncate = its start (default); chunk = all "
                        "of it, in windows sharing a quarter of their tokens, their logits pooled (mean; a "
                        "multi-label run: max)")


def add_base_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, metavar="PATH",
                   help="where the run's base model lives now, if it was trained on a local folder that has moved")


def add_settings_flags(p: argparse.ArgumentParser, cls, section: str) -> None:
    """`--config FILE` (of which only the `section:` section is read) and one flag per field of the section."""
    p.add_argument("--config", help=f"YAML config file, or a shipped preset by name, whose {section}: section sets "
                                    "these (the flags below override it)")
    add_section_flags(p, cls, section)


def _plan_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="count what a config trains, from the model config alone")
    config_mod.add_flags(p)
    p.add_argument("--fill", "--max-rank", dest="fill", action="store_true",
                   help="solve for the method's largest setting within the budget (lora.r, adalora.init_r, vera.r, "
                        "loha.r, lokr.r); --max-rank is the same flag")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--members", nargs="+", metavar="RUN", default=None,
                   help="plan an ensemble of these run folders instead: their trainable parameters summed, against "
                        "--budget.max_params (exit 3 when over)")
    p.set_defaults(func=cmd_plan)
    return p


def _train_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train one config into runs/<run id>/")
    config_mod.add_flags(p)
    p.add_argument("--runs", default="runs", help="folder holding run folders")
    p.add_argument("--force", action="store_true", help="retrain even if this run id already finished")
    p.add_argument("--track", choices=("tensorboard", "mlflow"), default=None,
                   help="log train loss, learning rate, validation and final test metrics as the run goes, to "
                        "RUNS/tensorboard/<run id>/ or the MLflow store RUNS/mlflow.db (does not change the run id)")
    p.set_defaults(func=cmd_train)
    return p


def _evaluate_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="metrics of a saved run on its test split or another labelled file")
    p.add_argument("run", nargs="+", help="a run folder, or several: their ensemble (calibrated probabilities "
                                          "averaged; the members' trainable parameters summed within the budget)")
    add_base_flag(p)
    add_flag(p, "--input", "--data", default="", help="labelled file (default: the run's test split)")
    add_long_texts_flag(p)
    p.set_defaults(func=cmd_evaluate)
    return p


def _predict_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="write ID,Label predictions for a file, after re-checking the saved adapter")
    p.add_argument("run", nargs="+", help="a run folder, or several: their ensemble (calibrated probabilities "
                                          "averaged; the members' trainable parameters summed within the budget)")
    add_base_flag(p)
    add_flag(p, "--input", required=True, help="texts to label (.csv/.csv.gz/.parquet/.pkl with a text column)")
    add_flag(p, "--output", required=True, help="CSV to write (ID,Label; a multi-label run: ID,Labels)")
    p.add_argument("--prior-correction", nargs="?", const="auto", default="off", choices=PRIOR_CORRECTION,
                   help="correct the posteriors for the input's class priors: auto (the flag alone) only where EM "
                        "and BBSE agree and the texts did not move, on = always, off = argmax (default); writes "
                        "OUTPUT.priors.json with the estimates and the decision")
    p.add_argument("--target-prior", default="", metavar="MIX",
                   help="the input's class mix when it is known: 'uniform' or one share per class "
                        "('0.4,0.2,0.2,0.2'); the posteriors of all its texts are fitted to it before argmax, and "
                        "the shares before and after go to OUTPUT.priors.json (serve answers per request: no mix)")
    p.add_argument("--max-length", type=int, default=0,
                   help="tokens read per text (0 = the run's model.max_length; 256 reads long texts further)")
    p.add_argument("--proba", action="store_true",
                   help="add one probability column per class after ID,Label (p_<class name>): the softmax, or the "
                        "corrected posteriors the labels were taken from under --prior-correction / --target-prior")
    add_long_texts_flag(p)
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="add the K most probable label ids and their probabilities (top1, top1_p, ..., topK, "
                        "topK_p); 1 to the run's number of classes")
    p.set_defaults(func=cmd_predict)
    return p


def _self_train_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("self-train", help="pseudo-label confident unlabelled texts and continue training the "
                                          "run's adapter on train + pseudo-labelled rows (a new run per round)")
    p.add_argument("run")
    add_base_flag(p)
    add_flag(p, "--input", "--unlabelled", required=True, help="texts to pseudo-label (.csv/.csv.gz/.parquet/.pkl)")
    add_flag(p, "--runs", "--out", default="runs", help="folder holding run folders: the new ones go there")
    add_settings_flags(p, SelfTrainConfig, "self_train")
    p.set_defaults(func=cmd_self_train)
    return p


def _serve_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="HTTP service for runs: POST /predict, GET /health, GET /info, /docs")
    p.add_argument("run", nargs="+", help="run folders, or folders of runs (every finished run inside); runs on one "
                                          "base share it, and a request names its run by {\"model\": RUN_ID} (the "
                                          "first run answers requests that name none)")
    add_base_flag(p)
    p.add_argument("--no-verify", action="store_true", help="skip re-checking the adapter against verify.json")
    add_long_texts_flag(p)
    add_settings_flags(p, ServeConfig, "serve")
    p.set_defaults(func=cmd_serve)
    return p


def _export_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="merge the adapter into the base and save a plain transformers model folder "
                                      "and/or an ONNX model for onnxruntime")
    p.add_argument("run")
    add_base_flag(p)
    out = p.add_argument_group("what to write (one or both)")
    out.add_argument("--merged", metavar="OUT", help="a transformers model folder (must be empty or absent)")
    out.add_argument("--onnx", metavar="OUT", help="an ONNX model + tokenizer folder for `serve --backend onnx` "
                                                  "(needs the onnx extra: pip install 'budgetlora[onnx]')")
    out.add_argument("--quantize", choices=("int8",), default=None,
                     help="with --onnx: 8-bit weights (onnxruntime dynamic quantization), about 4x smaller and "
                          "faster on a CPU; checked by answers agreeing with the adapter's, not by logits")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |merged - unmerged| logit difference")
    p.set_defaults(func=cmd_export)
    return p


def _sweep_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="run or resume an Optuna sweep from a spec YAML (see budgetlora.experiments.spec)")
    p.add_argument("spec", help="sweep spec YAML (grid: or search:)")
    p.add_argument("--storage", default=None, help="study storage URL (default: sqlite under sweeps/<name>/)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study")
    p.add_argument("--n-trials", type=int, default=None, help="cap on counted trials (default: the spec's)")
    p.add_argument("--root", default="sweeps", help="folder holding sweep folders")
    p.add_argument("--track", choices=("tensorboard", "mlflow"), default=None,
                   help="also log each finished trial's metrics and parameters to SWEEP/tensorboard/trial-NNNN/ or "
                        "the MLflow store SWEEP/mlflow.db (needs the track extra)")
    p.add_argument("--tracking", dest="track", choices=("tensorboard", "mlflow"), help=argparse.SUPPRESS)
    p.add_argument("--time-budget", default=None, metavar="TIME",
                   help="start no trial the time left cannot hold (90s, 30m, 1.5h; default: the spec's "
                        "time_budget, else none); a rerun continues where it stopped")
    p.set_defaults(func=cmd_sweep)
    return p


def _tune_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tune", help="search the budget's adapters within a time budget; the winner trained on all "
                                    "the data, with a report (see budgetlora.experiments.tune)")
    config_mod.add_flags(p)
    p.add_argument("--time", required=True, metavar="TIME", help="the whole command's time: 90s, 30m, 1.5h")
    p.add_argument("--data", dest="tune_data", default=None, metavar="TRAIN", help="training file (= --data.train)")
    p.add_argument("--model", dest="tune_model", default=None, metavar="NAME", help="base model (= --model.name)")
    p.add_argument("--budget", dest="tune_budget", default=None, metavar="N",
                   help="trainable parameters at most, head included: 1000000, 1M, 500k (= --budget.max_params)")
    p.add_argument("--out", default="tune", help="folder for the tune's runs, study, state and report; the same "
                                                 "command again resumes it")
    p.add_argument("--objective", default="val_accuracy", choices=("val_accuracy", "val_macro_f1"),
                   help="what the search maximises on validation")
    p.set_defaults(func=cmd_tune)
    return p


def _report_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="leaderboard, ablation plots and report.html for a folder of runs")
    p.add_argument("dir", help="a sweep folder or any folder containing run folders")
    p.set_defaults(func=cmd_report)
    return p


def _shift_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("shift", help="compare a target file with a run's training data: lengths, vocabulary, "
                                     "confidence, class shares, separability; PNG + JSON + advice")
    p.add_argument("run")
    add_base_flag(p)
    add_flag(p, "--input", "--target", required=True, help="texts to compare (.csv/.csv.gz/.parquet/.pkl)")
    add_flag(p, "--output", "--out", default=None,
             help="folder for shift.json, shift.png, advice.txt (default RUN/shift)")
    p.add_argument("--max-length", type=int, default=0, help="tokens read per text (0 = the run's max_length)")
    p.set_defaults(func=cmd_shift)
    return p


def _submit_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("submit", help="train, adapt to a target file (gated self-training and prior correction), "
                                      "predict and write ID,Label with a summary of what was done")
    config_mod.add_flags(p)
    add_flag(p, "--input", "--target", required=True, help="the texts to label (.csv/.csv.gz/.parquet/.pkl)")
    add_flag(p, "--output", required=True, help="submission CSV to write (ID,Label)")
    p.add_argument("--runs", default="runs", help="folder holding run folders")
    p.add_argument("--members", nargs="+", metavar="RUN", help="trained runs to label with as one ensemble (their "
                   "trainable parameters summed within the budget) instead of training the config")
    add_section_flags(p, SubmitConfig, "submit")
    p.set_defaults(func=cmd_submit)
    return p


COMMANDS = (_plan_command, _train_command, _evaluate_command, _predict_command, _self_train_command, _serve_command,
            _export_command, _sweep_command, _tune_command, _report_command, _shift_command, _submit_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = command(sub)
        # on every command: how much of budgetlora's logging reaches stdout (`budgetlora.log`)
        verbosity = p.add_mutually_exclusive_group()
        verbosity.add_argument("-q", "--quiet", action="store_true",
                               help="no progress messages: the command's result, warnings and errors only")
        verbosity.add_argument("-v", "--verbose", action="store_true", help="print debug messages as well")
    return parser


def main(argv=None) -> int:
    from budgetlora.log import setup

    parser = build_parser()
    args = parser.parse_args(argv)
    setup("WARNING" if args.quiet else "DEBUG" if args.verbose else "INFO")
    missing = [flag for flag in getattr(args, "_required", ())
               if getattr(args, flag.lstrip("-").replace("-", "_")) is None]
    if missing:
        parser.error(f"{args.command}: the following arguments are required: {', '.join(missing)}")
    try:
        return args.func(args)
    except (BudgetloraError, FileNotFoundError) as e:  # expected: one line, never a traceback
        print(f"budgetlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("budgetlora: interrupted; a rerun of the same command resumes from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
