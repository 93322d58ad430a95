"""all-mpnet-base-v2 (MPNet-base, 12 layers, hidden 768: the reference task's shape with real weights): planned
exactly from its built-in config, equal to peft's count for every method, the head's shape a budget choice, and a
short real run on the assembled weights that trains, reloads, predicts and exports."""
import json

import numpy as np
import pytest

from budgetlora import cli
from budgetlora.adapters.budget import fill, plan
from budgetlora.config import Config, ConfigError
from tests.adapters.test_methods import CASES, ROBERTA
from tests.conftest import tiny_config

MPNET = Config().replace(**{"model.name": "mpnet", "model.random_init": True})
HEAD, LINEAR_HEAD = 593_668, 768 * 4 + 4  # dense 768x768 + out_proj (biases) | one Linear(768, 4)
ATTENTION = 12 * 1536  # one rank of LoRA on one 768x768 projection, in all 12 layers


def test_reference_adapter_and_fills_without_the_weights():
    """The reference project's adapter counts 962,308 on MPNet as on RoBERTa-base, and the largest ranks that fit
    are the ones REFERENCE.md gives for RoBERTa-base's shapes."""
    reference = MPNET.replace(**{"lora.r": 10, "lora.alpha": 32, "lora.targets": "q,v"})
    p = plan(reference)
    assert p.model_type == "mpnet" and p.num_layers == 12 and p.head == {"classifier": HEAD}
    assert p.total == 2 * 10 * ATTENTION + HEAD == 962_308
    assert p.matches["q"][0] == "mpnet.encoder.layer.0.attention.attn.q"
    for targets, rank in (("q,v", 11), ("q,k,v", 7), ("q,k,v,o", 5), ("q,k,v,o,ffn_in,ffn_out", 2)):
        assert fill(MPNET.replace(**{"lora.targets": targets}))[1].r == rank, targets
    # ffn_out is the layer's output.dense only, never attention's output projection (attn.o)
    ffn_out = plan(MPNET.replace(**{"lora.targets": "ffn_out", "lora.r": 1}))
    assert all(n.endswith("layer.%s.output.dense" % n.split(".")[3]) for n in ffn_out.matches["ffn_out"])
    assert ffn_out.lora_params == 12 * (3072 + 768)


def test_linear_head_frees_the_budget_for_adapters(capsys):
    linear = MPNET.replace(**{"model.head": "linear", "lora.targets": "q,k,v,o"})
    cfg, p = fill(linear)
    assert p.head == {"classifier": LINEAR_HEAD} and cfg.lora.r == 13
    assert p.total == 13 * 4 * ATTENTION + LINEAR_HEAD == 961_540
    assert linear.run_id != MPNET.replace(**{"lora.targets": "q,k,v,o"}).run_id
    assert Config().run_id == Config().replace(**{"model.head": "auto"}).run_id  # the default keeps every run id
    with pytest.raises(ConfigError, match="head of this bert model is already one linear layer"):
        plan(Config().replace(**{"model.head": "linear"}))
    assert cli.main(["plan", "--model.head", "wide"]) == 2
    assert "model.head must be one of auto, linear, got 'wide'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(k for k, (base, _, _) in CASES.items() if base is ROBERTA) + ["linear-head"])
def test_planner_matches_peft(case):
    """MPNet-base has RoBERTa-base's shapes where adapters go, so every RoBERTa case's hand count holds; peft's own
    count on the built model (random weights, the real architecture) agrees."""
    from budgetlora.adapters.model import build, count_trainable

    if case == "linear-head":
        overrides, total = {"model.head": "linear", "lora.targets": "q,k,v,o", "lora.r": 13}, 961_540
    else:
        _, overrides, total = CASES[case]
        overrides = {"lora.targets": "q,v", **overrides}
    cfg = MPNET.replace(**overrides)
    assert plan(cfg).total == total
    model, p = build(cfg)
    assert count_trainable(model) == p.total == total


def test_builtin_config_is_the_packaged_one():
    """The planner's built-in config (used before the weights are assembled) is the assembled folder's config.json
    in every value that decides a shape or a computation."""
    from transformers import AutoConfig

    from budgetlora.adapters.architectures import _builtin_config, resolve_name

    real = AutoConfig.from_pretrained(resolve_name("mpnet")).to_dict()
    builtin = _builtin_config("mpnet").to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "layer_norm_eps", "max_position_embeddings", "pad_token_id",
            "bos_token_id", "eos_token_id", "relative_attention_num_buckets", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "initializer_range")
    assert {k: real[k] for k in keys} == {k: builtin[k] for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize("head", ["auto", "linear"])
def test_real_mpnet_trains_reloads_predicts_and_exports(head, small_csvs, tmp_path):
    """The assembled weights: a two-step run of the reference adapter (or a linear head), reloaded against its
    verification logits, predicted through the CLI, exported merged (auto head) or to ONNX (linear head: a plain
    transformers folder has no such head, so --merged is refused with one line)."""
    from budgetlora import runs
    from budgetlora.inference.export import ExportError, export_merged, export_onnx
    from budgetlora.inference.load import load_run
    from budgetlora.training.train import train

    cfg = tiny_config(small_csvs, **{"model.name": "mpnet", "model.head": head, "lora.r": 10, "lora.alpha": 32,
                                     "lora.targets": "q,v", "train.max_steps": 2, "train.eval_every": 0,
                                     "train.base_dropout": 0.0, "data.test_limit": 40})
    run = train(cfg, root=tmp_path / "runs")
    metrics = runs.read_json(run / runs.METRICS)
    assert metrics["trainable_params"] == plan(cfg).total == (962_308 if head == "auto" else 2 * 10 * ATTENTION
                                                              + LINEAR_HEAD)
    texts = ["Stocks fell as oil prices rose.", "The striker scored twice in the final."]
    loaded = load_run(run, verify=True)
    want = loaded.logits(texts, exact=True)
    assert want.shape == (2, 4) and np.isfinite(want).all()
    (tmp_path / "in.csv").write_text("text\n" + "\n".join(texts) + "\n")
    assert cli.main(["predict", str(run), "--input", str(tmp_path / "in.csv"), "--output",
                     str(tmp_path / "out.csv")]) == 0
    labels = (tmp_path / "out.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[1]) for line in labels] == want.argmax(1).tolist()
    if head == "auto":
        info = export_merged(run, tmp_path / "merged")
        assert info["max_abs_logit_diff"] <= 1e-4
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "mpnet"
    else:
        with pytest.raises(ExportError, match="model.head linear: a plain transformers folder has only"):
            export_merged(run, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        info = export_onnx(run, tmp_path / "onnx")
        assert info["max_abs_logit_diff"] <= 1e-4


def test_fused_attention_is_the_eager_arithmetic():
    """MPNet's self-attention through SDPA (position bias + padding as one mask): the same logits and gradients as
    transformers' eager code, with padded rows, and the eager path still serves output_attentions."""
    import copy

    import torch
    from transformers import AutoModelForSequenceClassification, MPNetConfig

    from budgetlora.adapters.attention import fuse

    torch.manual_seed(0)
    config = MPNetConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                         num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    eager = AutoModelForSequenceClassification.from_config(config).train()
    fused = fuse(copy.deepcopy(eager))
    ids, mask = torch.randint(5, 500, (4, 70)), torch.ones(4, 70, dtype=torch.long)
    mask[1, 40:], mask[2, 3:] = 0, 0
    targets = torch.tensor([0, 1, 2, 3])
    results = []
    for model in (eager, fused):
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits, targets).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    attentions = fused(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (4, 4, 70, 70)
    torch.testing.assert_close(attentions[0].sum(-1), torch.ones(4, 4, 70))
