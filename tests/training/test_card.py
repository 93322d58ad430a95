"""The model card every finished run carries: a Hub YAML header whose numbers are metrics.json's, and a body that
states the budget, the plan, the data, per-class accuracy, the confusion matrix and the run's limits."""
from __future__ import annotations

import json

import pytest

from budgetlora import runs
from budgetlora.training.card import CARD, model_card, read_header


def _card(run):
    return (run / CARD).read_text(), json.loads((run / runs.METRICS).read_text())


@pytest.mark.slow
def test_card_header_parses_and_holds_the_metrics(tiny_run):
    text, m = _card(tiny_run)
    head = read_header(text)
    assert head["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert head["library_name"] == "peft"
    assert head["pipeline_tag"] == "text-classification"
    assert head["datasets"] and all(isinstance(d, str) and d for d in head["datasets"])
    (entry,) = head["model-index"]
    assert entry["name"] == m["run_id"]
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification" and result["dataset"]["split"] == "test"
    values = {x["type"]: x["value"] for x in result["metrics"]}
    # exact equality: the card is written from the same dict as metrics.json, not re-rounded
    assert values == {"accuracy": m["test_accuracy"], "f1": m["test_macro_f1"], "loss": m["test_loss"]}


def test_card_body_states_budget_plan_data_classes_and_limits(tiny_run):
    text, m = _card(tiny_run)
    body = text.split("\n---\n", 1)[1]
    assert f"**{m['budget']:,} trainable parameters**" in body and f"**{m['trainable_params']:,}**" in body
    assert "## Parameter plan" in body and "LoRA (r=8, alpha=16) on q, k, v, o, ffn_in, ffn_out" in body
    assert f"Test accuracy **{m['test_accuracy']:.4f}**" in body
    # per-class accuracy rows and the confusion matrix rows, with the class names metrics.json reports
    for name, acc, row in zip(m["class_names"], m["test_per_class_accuracy"], m["test_confusion_matrix"]):
        assert f"| {name} | {acc:.4f} | {sum(row):,} |" in body
        assert f"| {name} | {' | '.join(map(str, row))} |" in body
    assert f"{sum(m['train_class_counts']):,} rows trained on" in body
    assert "](plots/confusion_matrix.png)" in body and (tiny_run / "plots" / "confusion_matrix.png").is_file()
    assert "embedded all-MiniLM-L6-v2" in body and "not a measure of what the same recipe reaches" in body
    assert "## Limits" in body and "## Intended use" in body


def test_random_init_card_says_it_is_for_shape_checks_only(tiny_run):
    _, m = _card(tiny_run)
    cfg = runs.load_config(tiny_run).replace(**{"model.random_init": True})
    text = model_card(cfg, m)
    assert "random weights" in text and "must not be used to classify" in text
    assert "embedded all-MiniLM-L6-v2" not in text and "weakest class" not in text
    assert "random-init" in read_header(text)["tags"]
