"""`budgetlora submit`: labelled data to a submission file in one command.

1. train the config (a finished run id is reused, as `train` always does);
2. measure the target against it (`shift`: analysis, figure and advice beside the output);
3. self-training rounds on the target texts when asked for (class-balanced top share per class, mixed into the
   labelled rows, the same budget plan), each kept only if its validation accuracy holds (the round gate of
   `selftrain.self_train`). Off by default: on the shift suite one round did not help on shifted texts, and the
   round gate can only see labelled rows, so it cannot tell a round that hurt the target;
4. predict the target with the last kept run, prior correction as gated by `priors.decide` (or forced);
5. write OUTPUT (ID,Label), OUTPUT.priors.json (estimates and the decision) and OUTPUT.summary.json / .txt (what was
   done, with the numbers it was decided on).

How it adapts is the config's submit: section (`SubmitConfig`), so a preset can carry it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.config.use import SubmitConfig
from budgetlora.hardware import process_peak_rss_mb, trim_memory
from budgetlora.inference.load import LoadedRun, load_run
from budgetlora.inference.mix import KnownMix, fit_to_mix, known_mix, parse_prior, priors_path
from budgetlora.inference.predict import Prediction, predict, read_unlabelled, write_prediction
from budgetlora.shift.analysis import ShiftResult, analyse, write_analysis
from budgetlora.shift.predict import adapted, post_processor
from budgetlora.shift.selftrain import self_training
from budgetlora.training.train import train

logger = logging.getLogger(__name__)


def submit(cfg: Config, target: str, output: str | Path, root: str | Path = runs.DEFAULT_ROOT,
           **settings) -> dict:
    """Train `cfg`, adapt to `target` as `cfg.submit` says (`settings` change its fields, e.g. rounds=1), label the
    target into `output`; returns the summary dict (also written as OUTPUT.summary.json, its "summary" as .summary.txt)."""
    if settings:
        cfg = cfg.replace(**{f"submit.{k}": v for k, v in settings.items()})
    s = cfg.submit
    if s.target_prior:
        parse_prior(s.target_prior, cfg.model.num_labels)  # a malformed mix is refused before anything trains
    if not Path(target).exists():
        raise FileNotFoundError(f"submit: target file not found: {target}")
    output, t0, times = Path(output), time.time(), {}
    for path, kind in ((output, "file"), (priors_path(output), "file"), (Path(f"{output}.shift"), "into"),
                       (Path(f"{output}.summary.json"), "file"), (Path(f"{output}.summary.txt"), "file")):
        runs.check_output(path, kind)  # an hour of training must not end in a folder that is not there
    base = train(cfg, root=root).resolve()
    trim_memory()  # the training's freed heap back to the OS before the target is read
    times["train_s"] = round(time.time() - t0, 1)

    t = time.time()
    loaded = _load(base, None, s.max_length)
    metrics = loaded.metrics
    result, files = _analyse(loaded, target, Path(f"{output}.shift"), s.prior_correction)
    del loaded  # one model in memory while self-training trains the next
    times["shift_s"] = round(time.time() - t, 1)
    for line in result.report["advice"]:
        logger.info(f"shift: {line}")

    t, final, rounds = time.time(), base, []
    if s.rounds:
        # the analysis already has the base run's posteriors at the trained length: round 1 reuses them
        same_length = not s.max_length or s.max_length == cfg.model.max_length
        done = self_training(base, target, Path(root) / "selftrain", s.self_training(),
                             overrides={"train.warmup": 0.0}, first_probs=result.probs if same_length else None)
        final, rounds = (done.runs[-1] if done.runs else base), done.rounds
    times["self_train_s"] = round(time.time() - t, 1)

    t = time.time()
    if s.target_prior and final == base:  # a known class mix, fitted to the analysis' posteriors: no second pass
        fit = fit_to_mix(result.probs, parse_prior(s.target_prior, cfg.model.num_labels))
        prediction = write_prediction(output, known_mix(fit, target, result.report["read_length"]))
    elif final == base and s.prior_correction != "off" and not s.target_prior:
        prediction = write_prediction(output, adapted(result, target))  # nothing changed since the analysis
    else:
        post = KnownMix(s.target_prior) if s.target_prior else post_processor(s.prior_correction)
        prediction = predict(final, target, output, max_length=s.max_length, post=post)
    times["predict_s"] = round(time.time() - t, 1)
    times["total_s"] = round(time.time() - t0, 1)
    report = _report(cfg, target, prediction, base, final, metrics, result, files, rounds, times)
    runs.write_json(Path(f"{output}.summary.json"), report)
    runs.write_text(Path(f"{output}.summary.txt"), "\n".join(report["summary"]) + "\n")
    return report


def submit_members(members: list[str | Path], target: str, output: str | Path, s: SubmitConfig) -> dict:
    """`submit --members RUN RUN ...`: label `target` with the runs' ensemble (their validation-calibrated
    probabilities averaged, `inference.ensemble`) into `output`, with the same summary files as `submit`. Nothing
    trains; self-training and a known class mix take one run and are refused, and prior correction is not applied
    (its estimates read one run's validation confusion matrix)."""
    from budgetlora.errors import ConfigError
    from budgetlora.inference.ensemble import check_members, members_total

    if s.rounds or s.target_prior or s.prior_correction == "on":
        raise ConfigError("submit --members labels with the ensemble as it is: self-training rounds, a target class "
                          "mix and prior correction take one run (submit.rounds 0, no target_prior)")
    if not Path(target).exists():
        raise FileNotFoundError(f"submit: target file not found: {target}")
    check_members(members)  # before any weight loads: two or more, single-label, the same classes, within budget
    output, t0 = Path(output), time.time()
    for path in (output, Path(f"{output}.summary.json"), Path(f"{output}.summary.txt")):
        runs.check_output(path)
    prediction = predict([str(m) for m in members], target, output, max_length=s.max_length)
    labels, (total, budget, counted) = prediction.labels, members_total(members)
    cfg = runs.load_config(Path(members[0]))
    report = {"target": str(target), "output": str(prediction.output), "rows": int(len(labels)),
              "members": {str(r): n for r, n in counted}, "trainable_params": total, "budget": budget,
              "prior_correction": None, "read_length": s.max_length or cfg.model.max_length,
              "label_counts": [int((labels == c).sum()) for c in range(cfg.model.num_labels)],
              "times": {"total_s": round(time.time() - t0, 1)}, "peak_rss_mb": process_peak_rss_mb()}
    report["summary"] = [
        f"submission: {report['rows']:,} rows -> {output} (an ensemble of {len(counted)} runs, {total:,} trainable "
        f"params together of {budget:,})",
        *(f"member {Path(r).name}: {n:,} trainable params" for r, n in counted),
        "prior correction: not applied (an ensemble's averaged probabilities; it takes one run)",
        f"label counts {report['label_counts']}; {report['times']['total_s']:.0f}s in all, peak memory "
        f"{report['peak_rss_mb']:,.0f} MB"]
    runs.write_json(Path(f"{output}.summary.json"), report)
    runs.write_text(Path(f"{output}.summary.txt"), "\n".join(report["summary"]) + "\n")
    return report


def _report(cfg: Config, target: str, prediction: Prediction, base: Path, final: Path, m: dict,
            result: ShiftResult, files: dict, rounds: list[dict], times: dict) -> dict:
    """What was done and the numbers it was decided on; "summary" is the same in a few lines."""
    s, labels, rep = cfg.submit, prediction.labels, result.report
    report = {
        "target": str(target), "output": str(prediction.output), "rows": int(len(labels)), "model": cfg.model.name,
        "base_run": str(base), "base_val_accuracy": m["val_accuracy"], "base_test_accuracy": m["test_accuracy"],
        "trainable_params": m["trainable_params"], "budget": m["budget"],
        "shift": {"report": str(files["json"]), "figure": str(files["png"]),
                  "auc": rep["separability"]["auc"], "auc_label_adjusted": rep["separability"]["auc_label_adjusted"],
                  "target_truncated_share": rep["token_lengths"]["target"]["truncated_share"]},
        "self_training": {"rounds_requested": s.rounds, "share": s.share, "mix": s.mix, "steps": s.steps,
                          "max_val_drop": s.max_val_drop, "rounds": rounds},
        "final_run": str(final),
        "prior_correction": prediction.decision,
        "class_mix_fit": ({k: prediction.priors[k] for k in ("target_prior", "shares_before", "shares_after",
                                                              "labels_changed", "converged")}
                          if prediction.decision and prediction.decision["mode"] == "known-mix" else None),
        "read_length": s.max_length or cfg.model.max_length,
        "label_counts": [int((labels == c).sum()) for c in range(cfg.model.num_labels)], "times": times,
        "peak_rss_mb": process_peak_rss_mb(),  # the whole command's: training, analysis and prediction
    }
    report["summary"] = _summary(report, s, Path(base).name, Path(final).name)
    return report


def _summary(report: dict, s: SubmitConfig, base: str, final: str) -> list[str]:
    sh = report["shift"]
    lines = [f"submission: {report['rows']:,} rows -> {report['output']} ({report['model']}, "
             f"{report['trainable_params']:,} trainable params of {report['budget']:,})",
             f"trained {base}: val accuracy {report['base_val_accuracy']:.4f}, test accuracy "
             f"{report['base_test_accuracy']:.4f}",
             f"shift: AUC {sh['auc']:.3f} (label-adjusted {sh['auc_label_adjusted']:.3f}), "
             f"{sh['target_truncated_share']:.1%} of target texts cut at max_length; {sh['report']}"]
    for r in report["self_training"]["rounds"]:
        lines.append(f"self-training round {r['round']}: {r['pseudo_rows']:,} pseudo labels (x{r['repeats']}), val "
                     f"accuracy {r['val_accuracy_parent']:.4f} -> {r['val_accuracy']:.4f}: "
                     f"{'kept' if r['accepted'] else 'refused'}")
    if not s.rounds:
        lines.append("self-training: not requested")
    d = report["prior_correction"]
    if d is not None and d["mode"] == "known-mix":
        f = report["class_mix_fit"]
        lines.append(f"class mix given {f['target_prior']}: predicted shares {f['shares_before']} -> "
                     f"{f['shares_after']}, {f['labels_changed']:,} labels changed")
    elif d is not None:
        lines.append(f"prior correction ({d['mode']}): {'applied' if d['apply'] else 'not applied'} - "
                     + "; ".join(d["reasons"]))
    lines.append(f"predicted with {final} reading {report['read_length']} tokens; label counts "
                 f"{report['label_counts']}; {report['times']['total_s']:.0f}s in all, peak memory "
                 f"{report['peak_rss_mb']:,.0f} MB")
    return lines


def shift_analysis(run: str | Path, target: str, out: str | Path | None = None, mode: str = "auto",
                 max_length: int = 0, base: str | None = None) -> tuple[ShiftResult, dict[str, Path]]:
    """`budgetlora shift`: load and verify the run, read the target texts, analyse, write the analysis into `out`
    (default RUN/shift); returns the analysis and the files written."""
    out = Path(run) / "shift" if out is None else Path(out)
    if out.parent != Path(run) or Path(run).is_dir():  # a missing run is load_run's to name, in its own words
        runs.check_output(out, "into")
    loaded = _load(run, base, max_length)
    return _analyse(loaded, target, out, mode)


def _load(run: str | Path, base: str | None, max_length: int) -> LoadedRun:
    loaded = load_run(run, base=base)  # verify_reload runs here, before anything is read or written
    loaded.max_length = max_length
    return loaded


def _analyse(loaded: LoadedRun, target: str, out: str | Path, mode: str) -> tuple[ShiftResult, dict[str, Path]]:
    texts = read_unlabelled(target, loaded.cfg)
    result = analyse(loaded, texts, mode=mode, progress=True)
    result.report["target"] = str(target)
    return result, write_analysis(result, out)
