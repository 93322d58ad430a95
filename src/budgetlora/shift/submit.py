"""`budgetlora submit`: labelled data to a submission file in one command.

1. train the config (a finished run id is reused, as `train` always does);
2. measure the target against it (`shift`: report, figure and advice beside the output);
3. self-training rounds on the target texts when asked for (class-balanced top share per class, mixed into the
   labelled rows, the same budget plan), each kept only if its validation accuracy holds (the round gate of
   `selftrain.self_train`). Off by default: on the shift suite one round did not help on shifted texts, and the
   round gate can only see labelled rows, so it cannot tell a round that hurt the target;
4. predict the target with the last kept run, prior correction as gated by `adapt.decide` (or forced);
5. write OUTPUT (ID,Label), OUTPUT.priors.json (estimates and the decision) and OUTPUT.report.json / .txt (what was
   done, with the numbers it was decided on).
"""
from __future__ import annotations

import time
from pathlib import Path

from budgetlora import runs
from budgetlora.config import Config, ConfigError
from budgetlora.inference.load import load_run
from budgetlora.inference.predict import predict_file, read_unlabelled
from budgetlora.shift.analysis import analyse, write_report
from budgetlora.shift.predict import predict_adapted, write_adapted
from budgetlora.shift.priors import priors_path
from budgetlora.shift.selftrain import self_train
from budgetlora.training.train import train


def submit(cfg: Config, target: str, output: str | Path, root: str | Path = runs.DEFAULT_ROOT, rounds: int = 0,
           share: float = 0.3, mix: float = 0.25, steps: int = 300, lr: float = 5e-4, max_val_drop: float = 0.005,
           prior_correction: str = "auto", max_length: int = 0, log=print) -> dict:
    if rounds < 0:
        raise ConfigError("submit: rounds must be >= 0")
    if not Path(target).exists():
        raise FileNotFoundError(f"submit: target file not found: {target}")
    output, t0, times = Path(output), time.time(), {}
    base = train(cfg, root=root, log=log).resolve()
    times["train_s"] = round(time.time() - t0, 1)

    t = time.time()
    result, files = shift_report(base, target, Path(f"{output}.shift"), mode=prior_correction,
                                 max_length=max_length, log=log)
    times["shift_s"] = round(time.time() - t, 1)
    for line in result.report["advice"]:
        log(f"shift: {line}")

    t, records, final = time.time(), [], base
    if rounds:
        made = self_train(base, target, Path(root) / "selftrain", rounds=rounds, threshold=0.0, share=share,
                          mix=mix, max_val_drop=max_val_drop, records=records, log=log,
                          # the analysis already has the base run's posteriors at the trained length: reuse them
                          first_probs=None if max_length and max_length != cfg.model.max_length else result.probs,
                          overrides={"train.max_steps": steps, "train.lr": lr, "train.warmup": 0.0})
        final = made[-1] if made else base
    times["self_train_s"] = round(time.time() - t, 1)

    t = time.time()
    if final == base and prior_correction != "off":  # nothing changed since the analysis: its labels stand
        labels = write_adapted(output, result, target)
    elif prior_correction == "off":
        labels = predict_file(final, target, output, max_length=max_length)
    else:
        labels = predict_adapted(final, target, output, mode=prior_correction, max_length=max_length)
    times["predict_s"] = round(time.time() - t, 1)
    times["total_s"] = round(time.time() - t0, 1)
    priors = runs.read_json(priors_path(output)) if prior_correction != "off" else None
    m = runs.read_json(base / runs.METRICS)
    report = {
        "target": str(target), "output": str(output), "rows": int(len(labels)), "model": cfg.model.name,
        "base_run": str(base), "base_val_accuracy": m["val_accuracy"], "base_test_accuracy": m["test_accuracy"],
        "trainable_params": m["trainable_params"], "budget": m["budget"],
        "shift": {"report": str(files["json"]), "figure": str(files["png"]),
                  "auc": result.report["separability"]["auc"],
                  "auc_label_adjusted": result.report["separability"]["auc_label_adjusted"],
                  "target_truncated_share": result.report["token_lengths"]["target"]["truncated_share"]},
        "self_training": {"rounds_requested": rounds, "share": share, "mix": mix, "steps": steps,
                          "max_val_drop": max_val_drop, "rounds": records},
        "final_run": str(final),
        "prior_correction": None if priors is None else priors["decision"],
        "read_length": max_length or cfg.model.max_length,
        "label_counts": [int((labels == c).sum()) for c in range(cfg.model.num_labels)], "times": times,
    }
    lines = [f"submission: {len(labels):,} rows -> {output} ({cfg.model.name}, {m['trainable_params']:,} trainable "
             f"params of {m['budget']:,})",
             f"trained {base.name}: val accuracy {m['val_accuracy']:.4f}, test accuracy {m['test_accuracy']:.4f}",
             f"shift: AUC {report['shift']['auc']:.3f} (label-adjusted {report['shift']['auc_label_adjusted']:.3f}), "
             f"{report['shift']['target_truncated_share']:.1%} of target texts cut at max_length; {files['json']}"]
    for r in records:
        lines.append(f"self-training round {r['round']}: {r['pseudo_rows']:,} pseudo labels (x{r['repeats']}), val "
                     f"accuracy {r['val_accuracy_parent']:.4f} -> {r['val_accuracy']:.4f}: "
                     f"{'kept' if r['accepted'] else 'refused'}")
    if not rounds:
        lines.append("self-training: not requested")
    if priors is not None:
        d = priors["decision"]
        lines.append(f"prior correction ({d['mode']}): {'applied' if d['apply'] else 'not applied'} - "
                     + "; ".join(d["reasons"]))
    lines.append(f"predicted with {final.name} reading {report['read_length']} tokens; label counts "
                 f"{report['label_counts']}; {times['total_s']:.0f}s in all")
    report["summary"] = lines
    runs.write_json(Path(f"{output}.report.json"), report)
    runs.write_text(Path(f"{output}.report.txt"), "\n".join(lines) + "\n")
    return report


def shift_report(run: str | Path, target: str, out: str | Path, mode: str = "auto", max_length: int = 0,
                 base: str | None = None, log=print) -> tuple:
    """`budgetlora shift`: load and verify the run, read the target texts, analyse, write the report."""
    loaded = load_run(run, base=base)
    loaded.max_length = max_length
    texts = read_unlabelled(target, loaded.cfg)
    result = analyse(loaded, texts, mode=mode, progress=True, log=log)
    result.report["target"] = str(target)
    return result, write_report(result, out)
