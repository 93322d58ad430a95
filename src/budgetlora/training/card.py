"""The model card: `README.md` in every run folder, in the Hugging Face Hub's format.

A YAML header (base_model, library_name: peft, pipeline_tag, datasets, metrics and a `model-index` holding the test
results) so the folder can be pushed to the Hub as it is, and a body that says what was trained under which budget,
on what data, how well it did per class, and what it is fit for. Every number comes from the metrics dict written
to metrics.json beside it, so the two cannot disagree.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from budgetlora.adapters import methods
from budgetlora.tasks import class_names, task_of

CARD = "README.md"
# the hub ids of the bases we ship or know, so `base_model` links to the real model page
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "roberta-base": "FacebookAI/roberta-base",
           "roberta-large": "FacebookAI/roberta-large"}


def base_model_id(cfg) -> str:
    name = cfg.model.name
    if name in HUB_IDS:
        return HUB_IDS[name]
    return name if not Path(name).exists() else Path(name).name  # a local folder: its name, not this machine's path


def dataset_id(source: str) -> str:
    """'' is the default AG News copy; a hub name stays as it is; a local file is named by its file name only."""
    if not source:
        return "ag_news"
    return Path(source).name if Path(source).suffix else source


def header(cfg, m: dict) -> dict:
    dataset = dataset_id(cfg.data.test)  # '' is the default test split, not the train source
    results = [
        {"type": "accuracy", "value": m["test_accuracy"], "name": "Test accuracy"},
        {"type": "f1", "value": m["test_macro_f1"], "name": "Test macro-F1", "args": {"average": "macro"}},
        {"type": "loss", "value": m["test_loss"], "name": "Test cross-entropy"},
    ]
    return {
        "base_model": base_model_id(cfg),
        "library_name": "peft",
        "pipeline_tag": "text-classification",
        "tags": [getattr(cfg, "method", "lora"), "budgetlora", "text-classification"]
        + (["random-init"] if cfg.model.random_init else []),
        "datasets": sorted({dataset_id(cfg.data.train), dataset}),
        "metrics": ["accuracy", "f1"],
        "model-index": [{
            "name": m.get("name") or m["run_id"],
            "results": [{
                "task": {"type": "text-classification", "name": "Text Classification"},
                "dataset": {"name": dataset, "type": dataset, "split": "test"},
                "metrics": results,
            }],
        }],
    }


def _method(cfg) -> tuple[str, str]:
    """The adapter method's display name and its settings, e.g. ('LoRA', 'r=8, alpha=16'), from its record."""
    method = methods.get(cfg.method)
    return method.title(cfg), method.describe(cfg)


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _intended_use(cfg) -> list[str]:
    if cfg.model.random_init:
        return ["The base model was built with **random weights** (`model.random_init: true`). This run exists to "
                "check speed, shapes and parameter counts only; its predictions mean nothing and it must not be "
                "used to classify anything."]
    lines = [f"Classifying short English texts into the {cfg.model.num_labels} classes above, for the kind of text "
             "it was trained on. Inputs are truncated to "
             f"{cfg.model.max_length} tokens, so only the beginning of a longer text is read."]
    if cfg.model.name == "minilm":
        lines += ["", "The base is the embedded all-MiniLM-L6-v2 (a 6-layer, 22M-parameter sentence-embedding "
                     "model shipped inside a pip package so that training runs offline on a CPU). The accuracy "
                     "above is that model's; it is not a measure of what the same recipe reaches on a larger base "
                     "such as RoBERTa-base."]
    return lines


def _limits(cfg, m: dict, names: list[str]) -> list[str]:
    out = ["- Measured on one test split only; texts from another source, period or style (a shifted test set) "
           "can score lower. `budgetlora predict --prior-correction` re-estimates class priors for such a set.",
           "- " + task_of(cfg).probabilities_note.format(temperature=m.get("temperature", 1.0))]
    per = m.get("test_per_class_accuracy") or []
    if per and not cfg.model.random_init:
        worst = min(range(len(per)), key=per.__getitem__)
        out.append(f"- The weakest class is {names[worst]} (test accuracy {per[worst]:.4f}).")
    return out


def _per_class(m: dict, names: list[str], test_cm) -> list[str]:
    return [
        "Per-class test accuracy (recall):",
        "",
        *_table(["class", "accuracy", "rows"],
                [[c, f"{a:.4f}", f"{sum(row):,}"]
                 for c, a, row in zip(names, m["test_per_class_accuracy"], test_cm)]),
        "",
        "Test confusion matrix (rows: true class, columns: predicted):",
        "",
        *_table(["true \\ predicted", *names], [[c, *row] for c, row in zip(names, test_cm)]),
        "",
        "![test confusion matrix, row-normalised](plots/confusion_matrix.png)",
    ]


def _per_label(m: dict, names: list[str]) -> list[str]:
    """A multi-label run's results: accuracy above is subset accuracy (the whole label set right)."""
    return [
        f"Multi-label: accuracy is subset accuracy (exact label set); test micro-F1 {m['test_micro_f1']:.4f}, "
        "loss is binary cross-entropy. Per-label test F1 at the thresholds tuned on validation:",
        "",
        *_table(["label", "F1", "threshold"],
                [[c, f"{f:.4f}", f"{t:.2f}"] for c, f, t in zip(names, m["test_per_label_f1"], m["thresholds"])]),
    ]


def model_card(cfg, m: dict, plan: dict | None = None) -> str:
    """The card's text from the run's config, its metrics.json dict and (optionally) its parameter plan."""
    names = class_names(cfg, m.get("class_names"))
    plan = plan or {}
    test_cm, val_cm = m.get("test_confusion_matrix") or [], m.get("val_confusion_matrix") or []
    # a multi-label run has no confusion matrix: it states its row counts
    n_test, n_val = m.get("test_rows") or sum(map(sum, test_cm)), m.get("val_rows") or sum(map(sum, val_cm))
    counts = m.get("train_class_counts") or []
    trainable, budget = m["trainable_params"], m["budget"]
    title = m.get("name") or f"budgetlora run {m['run_id']}"
    tc, lc = cfg.train, cfg.lora
    method, settings = _method(cfg)
    body = [
        f"# {title}",
        "",
        f"A {method} adapter with a fully trained classification head on **{base_model_id(cfg)}** for "
        f"{cfg.model.num_labels}-class text classification ({', '.join(names)}), trained by budgetlora under a hard "
        f"budget of **{budget:,} trainable parameters**: it trains **{trainable:,}** "
        f"({100 * trainable / budget:.1f}% of the budget), head included. Run id `{m['run_id']}`.",
        "",
        f"Test accuracy **{m['test_accuracy']:.4f}**, macro-F1 {m['test_macro_f1']:.4f} on {n_test:,} test rows "
        f"(validation accuracy {m['val_accuracy']:.4f} on {n_val:,} rows).",
        "",
        "## Parameter plan",
        "",
        *_table(["part", "trainable parameters"], [
            [f"{method} ({settings}) on {', '.join(map(str, lc.targets))}"
             + (f" (layers {', '.join(map(str, lc.layers))})" if lc.layers else " (all layers)")
             + f", {len(plan.get('modules', {})) or '?'} modules", f"{plan['lora']:,}" if "lora" in plan else "?"],
            ["classification head (trained in full)", f"{plan['head']:,}" if "head" in plan else "?"],
            ["biases", f"{plan.get('bias', 0):,}"],
            *([["DoRA magnitudes", f"{plan['dora']:,}"]] if plan.get("dora") else []),
            ["**total**", f"**{trainable:,}**"],
            ["budget", f"{budget:,}"],
        ]),
        "",
        "## Data",
        "",
        f"- Train: `{dataset_id(cfg.data.train)}`"
        + (f", a stratified sample of {cfg.data.train_limit:,} rows" if cfg.data.train_limit else "")
        # a multi-label row counts once per label, so the per-class counts do not add up to the rows
        + (f"; {sum(counts):,} rows trained on" if not task_of(cfg).sets else "")
        + (f" (per class: {', '.join(map(str, counts))})" if counts else "")
        + f", after a seeded stratified {cfg.data.val_fraction:g} validation hold-out of {n_val:,} rows.",
        f"- Test: `{dataset_id(cfg.data.test)}`, {n_test:,} rows.",
    ]
    if m.get("filters"):
        body.append(f"- Row filters: {', '.join(k for k in m['filters'] if isinstance(m['filters'][k], dict)) or 'on'}"
                    " (see metrics.json `filters`).")
    if cfg.augment.enabled:
        body.append("- Training texts augmented every epoch (see config.yaml `augment`).")
    if cfg.data.pseudo_labels:
        body.append("- Pseudo-labelled rows added to training (self-training; see config.yaml `data`).")
    body += [
        "",
        "## Training",
        "",
        *_table(["setting", "value"], [
            ["epochs / steps", f"{tc.epochs:g} / {m['steps']:,}" + (f" (max_steps {tc.max_steps})" if tc.max_steps
                                                                   else "")],
            ["best step (lowest validation loss, kept)", m.get("best_step")],
            ["batch size", tc.batch_size],
            ["optimizer, peak learning rate", f"{tc.optimizer}, {tc.lr:g}"],
            ["schedule, warmup", f"{tc.schedule}, {tc.warmup:g} of the steps"],
            ["weight decay, label smoothing, grad clip", f"{tc.weight_decay:g}, {tc.label_smoothing:g}, "
                                                         f"{tc.grad_clip:g}"],
            *([["LoRA dropout", f"{lc.dropout:g}"]] if method in ("LoRA", "DoRA") else []),
            ["max length (tokens)", cfg.model.max_length],
            ["precision, seed", f"{tc.precision}" + (f" (ran {m['precision']})" if m.get("precision") else "")
                                + f", {tc.seed}"],
            ["training time", f"{m['train_time_s']:.0f} s (wall {m['wall_time_s']:.0f} s)"
                              + (f", {m['threads']} thread(s)" if m.get("threads") else "")],
            *([["peak memory", f"{m['peak_rss_mb']:,.0f} MiB resident"
                               + (f", {m['peak_gpu_mb']:,.0f} MiB on the GPU" if m.get("peak_gpu_mb") else "")]]
              if m.get("peak_rss_mb") else []),
        ]),
        "",
        "The full configuration is in `config.yaml`; package versions and device in `versions.json`; the loss "
        "and accuracy curves in `plots/`.",
        "",
        "## Results",
        "",
        *_table(["split", "accuracy", "macro-F1", "cross-entropy", "rows"], [
            ["validation", f"{m['val_accuracy']:.4f}", f"{m['val_macro_f1']:.4f}", f"{m['val_loss']:.4f}",
             f"{n_val:,}"],
            ["test", f"{m['test_accuracy']:.4f}", f"{m['test_macro_f1']:.4f}", f"{m['test_loss']:.4f}",
             f"{n_test:,}"],
        ]),
        "",
        *(_per_label(m, names) if task_of(cfg).sets else _per_class(m, names, test_cm)),
        "",
        "## Intended use",
        "",
        *_intended_use(cfg),
        "",
        "## Limits",
        "",
        *_limits(cfg, m, names),
        "",
        "## How to use",
        "",
        "```python",
        "import budgetlora",
        'clf = budgetlora.load("path/to/this/folder")   # re-checks the adapter against verify.json first',
        'clf.predict(["Stocks rallied as oil fell."])',
        "```",
        "",
        "or with peft alone: `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("
        f"\"{base_model_id(cfg)}\", num_labels={cfg.model.num_labels}), \"path/to/this/folder\")`. "
        "`budgetlora export` writes a merged model (`--merged`) or an ONNX model for onnxruntime (`--onnx`).",
        "",
    ]
    head = yaml.safe_dump(header(cfg, m), sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n" + "\n".join(body)


def read_header(text: str) -> dict:
    """The YAML header of a card (what the Hub reads)."""
    if not text.startswith("---\n"):
        raise ValueError("model card has no YAML header")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])
