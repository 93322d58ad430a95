"""Saved adapters reload to identical logits with plain peft; broken or mismatched adapters fail clearly."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from budgetlora import runs
from budgetlora.adapters.model import AdapterError, build_base, load_tokenizer, load_trained
from budgetlora.inference.load import VerificationError, load_run, verify_reload

TEXTS = ["Stocks rallied as oil prices fell.", "The striker scored twice in the final.",
         "A new chip promises faster phones.", "Leaders met to discuss the ceasefire."]


def test_run_folder_contents(tiny_run):
    for name in (*runs.ADAPTER_FILES, runs.CONFIG, runs.METRICS, runs.HISTORY, runs.VERIFY, runs.VERSIONS,
                 runs.PREDICTIONS, "plots/loss.png", "plots/val_accuracy.png", "plots/confusion_matrix.png", "plots/summary.png"):
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / runs.CHECKPOINT).exists()
    m = runs.read_json(tiny_run / runs.METRICS)
    from budgetlora.adapters.budget import plan

    assert m["trainable_params"] == plan(runs.load_config(tiny_run)).total and 0 <= m["test_accuracy"] <= 1
    assert np.asarray(m["test_confusion_matrix"]).sum() == 120
    assert not [p for p in tiny_run.iterdir() if p.name.startswith(".staging")]
    # what the run cost, as PEFT's method comparison records it
    assert m["adapter_bytes"] == sum((tiny_run / f).stat().st_size for f in runs.ADAPTER_FILES)
    assert m["train_samples_per_s"] > 0 and m["train_tokens_per_s"] > m["train_samples_per_s"]
    assert m["peak_rss_mb"] > 100 and m["wall_time_s"] >= m["train_time_s"] > 0
    # per-row answers: one line per test row, agreeing with the accuracy and the confusion matrix
    rows = np.loadtxt(tiny_run / runs.PREDICTIONS, delimiter=",", skiprows=1, dtype=np.int64)
    assert rows.shape == (120, 3) and len(set(rows[:, 0])) == 120
    assert (rows[:, 1] == rows[:, 2]).mean() == pytest.approx(m["test_accuracy"])
    assert np.bincount(rows[:, 2], minlength=4).tolist() == np.asarray(m["test_confusion_matrix"]).sum(0).tolist()
    history = (tiny_run / runs.HISTORY).read_text().splitlines()
    assert len([r for r in history[1:] if r.split(",")[2]]) >= 2  # train loss rows are present
    weights = load_file(str(tiny_run / "adapter_model.safetensors"))
    assert any("classifier" in k for k in weights), "the trained head must be in the adapter file"


@pytest.mark.slow
def test_plain_peft_reload_gives_identical_logits(tiny_run):
    from peft import PeftModel

    cfg = runs.load_config(tiny_run)
    tok = load_tokenizer(cfg)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    a = load_trained(tiny_run, cfg)
    b = PeftModel.from_pretrained(build_base(cfg.replace(**{"train.seed": 999})), str(tiny_run)).eval()
    with torch.no_grad():
        la, lb = a(**batch).logits, b(**batch).logits
        plain = build_base(cfg).eval()(**batch).logits
    assert torch.equal(la, lb)
    assert not torch.allclose(la, plain)  # the adapter and head really changed the model
    assert verify_reload(load_run(tiny_run, verify=False)) <= 1e-5


def _copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def test_corrupt_adapter(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    (run / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="does not load"):
        load_run(run)
    (run / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="corrupt"):
        load_run(run)
    (run / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no adapter"):
        load_run(run)


def test_mismatched_num_labels_and_base(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    cfg = runs.load_config(run)
    runs.write_text(run / runs.CONFIG, cfg.replace(**{"model.num_labels": 3}).to_yaml())
    with pytest.raises(AdapterError, match="3 labels"):
        load_run(run)
    runs.write_text(run / runs.CONFIG, cfg.to_yaml())
    saved = json.loads((run / "adapter_config.json").read_text())
    saved["base_model_name_or_path"] = "some-org/other-model"
    (run / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(AdapterError, match="trained on 'some-org/other-model'"):
        load_run(run)


@pytest.mark.slow
def test_tampered_weights_fail_verification(tiny_run, tmp_path):
    from safetensors.torch import save_file

    run = _copy(tiny_run, tmp_path)
    w = load_file(str(run / "adapter_model.safetensors"))
    key = next(k for k in w if "classifier" in k and k.endswith("weight"))
    w[key] = w[key] + 0.5 * torch.randn_like(w[key])
    save_file(w, str(run / "adapter_model.safetensors"))
    with pytest.raises(VerificationError, match="disagrees"):
        load_run(run)


def test_base_dropout_sets_the_encoders_dropout_and_keeps_ids_at_its_default(small_csvs):
    from budgetlora.adapters.model import build
    from budgetlora.config import Config, ConfigError

    cfg = Config()
    assert cfg.replace(**{"train.base_dropout": -1}).run_id == cfg.run_id  # the default: ids as before
    assert cfg.replace(**{"train.base_dropout": 0}).run_id != cfg.run_id
    with pytest.raises(ConfigError, match="base_dropout"):
        cfg.replace(**{"train.base_dropout": 1.5})
    kept = build_base(cfg).config
    assert kept.hidden_dropout_prob == kept.attention_probs_dropout_prob == 0.1  # the checkpoint's own
    model, _ = build(cfg.replace(**{"train.base_dropout": 0.0, "lora.dropout": 0.0}))
    base = model.base_model.model
    assert base.config.hidden_dropout_prob == base.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for n, m in base.named_modules() if isinstance(m, torch.nn.Dropout) and "lora" not in n)
    model.train()  # with no dropout anywhere, training mode computes what eval mode does
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        a = model(input_ids=ids).logits
        model.eval()
        assert torch.allclose(a, model(input_ids=ids).logits, atol=1e-6)
