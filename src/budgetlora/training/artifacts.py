"""What a finished run leaves behind: adapter, metrics, history, plots, versions, and the verification sample."""
from __future__ import annotations

import logging
import csv
import io
import json
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.adapters.methods import save_adapter
from budgetlora.hardware import inference_dtype
from budgetlora.training.card import CARD, model_card
from budgetlora.tasks import class_names, softmax, task_of
from budgetlora.training.evaluate import exact_fp32, predict_logits

logger = logging.getLogger(__name__)

VERIFY_ROWS = 256  # validation rows whose logits are stored, so a reloaded adapter can be checked against them


def history_csv(history: list[dict]) -> str:
    cols = ["step", "epoch", "train_loss", "lr", "val_loss", "val_accuracy", "elapsed_s", "train_s"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def write_run_artifacts(out: Path, cfg, model, tokenizer, val, test, state, plan, record: dict,
                        memory=None) -> dict:
    """Evaluate the best state (`state`: loop.TrainState) on val and test, then write every artifact; metrics.json
    last marks completion. `record`: what the run reports beside its metrics (wall time, filters, training class
    counts, what it cost); `memory`: the run's PeakMemory, read after the final evaluation so that its peak
    counts too. A write that fails (a full disk) is a RunFolderError naming the folder, raised before
    anything is marked finished."""
    n, ml, bs = cfg.model.num_labels, cfg.model.max_length, cfg.train.eval_batch_size
    names, task = class_names(cfg), task_of(cfg)
    dtype = inference_dtype(cfg.train.precision, next(model.parameters()).device)  # as `evaluate` will score it
    val_logits = predict_logits(model, tokenizer, val.texts, ml, bs, dtype=dtype)
    test_logits = predict_logits(model, tokenizer, test.texts, ml, bs, progress=True, dtype=dtype)
    # the task's metrics at the decision settings it fitted on validation (a temperature; per-label thresholds)
    val_m, test_m, per_task = task.run_metrics(val_logits, val.labels, test_logits, test.labels, n)
    result = {
        "run_id": cfg.run_id, "name": cfg.name, "model": cfg.model.name,
        "val_accuracy": val_m["accuracy"], "val_loss": val_m["loss"], "val_macro_f1": val_m["macro_f1"],
        "test_accuracy": test_m["accuracy"], "test_loss": test_m["loss"], "test_macro_f1": test_m["macro_f1"],
        **per_task,
        "trainable_params": plan.total, "budget": plan.max_params, "best_step": state.best_step,
        "steps": state.step, "train_time_s": round(state.train_time, 2),
        # placed here so metrics.json keeps its order (the rest of `record` follows)
        "wall_time_s": record.get("wall_time_s"), "filters": record.get("filters"), "class_names": names,
        # wall_time_s, filters, train_class_counts (the label shares the model was trained under: the reference
        # priors for prior correction), and what the run cost: precision, threads, validation time inside
        # train_time_s, throughput, peak memory (MiB)
        **record, **(memory.as_dict() if memory is not None else {}),
    }
    # the card is built from the JSON form of the same dict (below), so its numbers are exactly metrics.json's
    with runs.staged_files(out) as stage:  # a retrain over a finished run replaces it whole or not at all
        save_adapter(model, stage)  # PEFT format; PiSSA/OLoRA converted to plain LoRA on the original base
        result["adapter_bytes"] = sum((stage / f).stat().st_size for f in runs.ADAPTER_FILES)
        runs.write_json(stage / runs.VERIFY, verification_sample(model, tokenizer, val.texts[:VERIFY_ROWS], ml))
        if not task.sets:  # paired comparisons read one gold and one predicted class per row
            runs.write_text(stage / runs.PREDICTIONS, predictions_csv(test, test_logits))
            runs.write_text(stage / runs.VAL_PREDICTIONS, predictions_csv(val, val_logits))
            runs.write_text(stage / runs.VAL_PROBABILITIES,
                            probabilities_csv(val, val_logits, per_task.get("temperature")))
        runs.write_text(stage / runs.HISTORY, history_csv(state.history))
        runs.write_json(stage / runs.VERSIONS, runs.versions())
        plot_run(stage, state.history, test_m.get("confusion_matrix"), names,
                 title=cfg.name or cfg.run_id)
        runs.write_text(stage / CARD, model_card(cfg, json.loads(json.dumps(result, default=runs._jsonable)),
                                                 plan.as_dict()))
        runs.write_json(stage / runs.METRICS, result)
    logger.info(f"run {cfg.run_id}: val acc {val_m['accuracy']:.4f}, test acc {test_m['accuracy']:.4f} "
        f"({test_m['n']:,} rows), {plan.total:,} trainable params, {result['wall_time_s']:.0f}s -> {out}")
    return result


def predictions_csv(test, logits) -> str:
    """Per-row answers on a split (test, or validation for choosing between runs), one line each (source row, gold label, predicted label): what a paired comparison of
    two runs scored on the same rows needs, at a few bytes a row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "label", "predicted"])
    w.writerows(zip(test.source_rows().tolist(), np.asarray(test.labels).tolist(), logits.argmax(1).tolist()))
    return buf.getvalue()


def probabilities_csv(split, logits, temperature: float | None) -> str:
    """Per-row calibrated probabilities (softmax(logits / T), T the validation temperature), one line each (source
    row, p_0 ... p_n-1): what averaging runs into an ensemble is judged on, without loading them again."""
    probs = softmax(np.asarray(logits, dtype=np.float64) / (temperature or 1.0))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", *(f"p_{c}" for c in range(probs.shape[1]))])
    w.writerows([r, *(f"{p:.6g}" for p in ps)] for r, ps in zip(split.source_rows().tolist(), probs))
    return buf.getvalue()


def verification_sample(model, tokenizer, texts: list[str], max_length: int) -> dict:
    """Logits a reload must reproduce: plain fp32 (no autocast, no TF32), so any machine can recompute them."""
    with exact_fp32():
        logits = predict_logits(model, tokenizer, texts, max_length)
    return {"texts": texts, "logits": logits.tolist(), "precision": "fp32"}


def plot_run(out: Path, history: list[dict], confusion, names: list[str], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [h for h in history if h.get("train_loss") is not None]
    ev = [h for h in history if h.get("val_loss") is not None]
    cm = np.asarray(confusion if confusion is not None else [[0]], dtype=float)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)

    def loss_ax(ax):
        ax.plot([h["step"] for h in tr], [h["train_loss"] for h in tr], label="train", lw=1)
        ax.plot([h["step"] for h in ev], [h["val_loss"] for h in ev], "o-", label="validation")
        ax.set(xlabel="step", ylabel="loss", title="loss")
        ax.legend()

    def acc_ax(ax):
        ax.plot([h["step"] for h in ev], [h["val_accuracy"] for h in ev], "o-", color="C2")
        ax.set(xlabel="step", ylabel="accuracy", title="validation accuracy")

    def cm_ax(ax):
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
        ax.set(xticks=range(len(names)), yticks=range(len(names)), xlabel="predicted", ylabel="true",
               title="test confusion (row-normalised)")
        ax.set_xticklabels(names, rotation=30)
        ax.set_yticklabels(names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center",
                        color="white" if cm[i, j] > 0.5 else "black", fontsize=8)

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    panels = [("loss", loss_ax, (6, 4)), ("val_accuracy", acc_ax, (6, 4))]
    if confusion is not None:  # a multi-label run has none
        panels.append(("confusion_matrix", cm_ax, (5, 4.5)))
    for name, draw, size in panels:
        fig, ax = plt.subplots(figsize=size)
        draw(ax)
        _save(fig, plots / f"{name}.png")
    fig, axes = plt.subplots(1, len(panels), figsize=(16 * len(panels) / 3, 4.5))
    for (_, draw, _), ax in zip(panels, axes):
        draw(ax)
    fig.suptitle(title)
    _save(fig, plots / "summary.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with runs.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
