"""The planner's counts are exact, agree with peft's own count, and show what each target name matches."""
import pytest

from budgetlora.adapters.budget import BudgetError, check, format_plan, plan
from budgetlora.config import Config, ConfigError

ROBERTA = Config().replace(**{"model.name": "roberta-base", "model.random_init": True, "model.tokenizer": "minilm",
                              "lora.targets": "q,v"})

EXPECTED = [
    (8, "q,v", 888_580),
    (10, "q,v", 962_308),
    (4, "q,k,v", 814_852),
    (4, "q,k,v,o", 888_580),
    (2, "q,k,v,ffn_in,ffn_out", 888_580),
    (2, "q,k,v,o,ffn_in,ffn_out", 925_444),
]


@pytest.mark.parametrize("r,targets,total", EXPECTED)
def test_roberta_base_counts(r, targets, total):
    p = plan(ROBERTA.replace(**{"lora.r": r, "lora.targets": targets}))
    assert p.total == total
    assert p.head_params == 593_668


@pytest.mark.slow
def test_counts_match_peft():
    """Build the real (random-weight) model for two configs and let peft count."""
    from budgetlora.adapters.model import build, count_trainable

    for r, targets, total in (EXPECTED[1], EXPECTED[5]):
        model, p = build(ROBERTA.replace(**{"lora.r": r, "lora.targets": targets}))
        assert count_trainable(model) == p.total == total
        lora_modules = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                        for n, _ in model.named_modules() if n.endswith("lora_A.default")}
        assert lora_modules == set(p.lora_per_module)


def test_suffix_trap_is_visible():
    """peft's suffix 'output.dense' also matches attention.output.dense; the short name ffn_out does not."""
    raw = plan(ROBERTA.replace(**{"lora.r": 2, "lora.targets": "query,key,value,intermediate.dense,output.dense"}))
    assert raw.total == 925_444
    assert len(raw.matches["output.dense"]) == 24
    assert any("attention.output.dense" in n for n in raw.matches["output.dense"])
    short = plan(ROBERTA.replace(**{"lora.r": 2, "lora.targets": "q,k,v,ffn_in,ffn_out"}))
    assert len(short.matches["ffn_out"]) == 12
    assert not any("attention" in n for n in short.matches["ffn_out"])


def test_fill_size_and_over_budget():
    qv = plan(ROBERTA.replace(**{"lora.r": 12}))
    assert not qv.fits and qv.total == 1_036_036
    with pytest.raises(BudgetError, match="largest rank that fits these targets is 11"):
        check(qv)
    for targets, rank in [("q,v", 11), ("q,k,v", 7), ("q,k,v,o", 5), ("q,k,v,o,ffn_in,ffn_out", 2)]:
        p = plan(ROBERTA.replace(**{"lora.targets": targets}))
        assert p.fill_size() == rank
        assert plan(ROBERTA.replace(**{"lora.targets": targets, "lora.r": rank})).fits
        assert not plan(ROBERTA.replace(**{"lora.targets": targets, "lora.r": rank + 1})).fits


def test_layers_dora_bias_and_minilm():
    top2 = plan(ROBERTA.replace(**{"lora.r": 8, "lora.layers": [-2, -1]}))
    assert top2.total == 2 * 2 * 8 * 1536 + 593_668
    assert all(".10." in n or ".11." in n for n in top2.lora_per_module)
    dora = plan(ROBERTA.replace(**{"lora.r": 8, "lora.dora": True}))
    assert dora.total == 888_580 + 24 * 768
    mini = plan(Config().replace(**{"lora.targets": "q,v"}))
    assert mini.head_params == 1_540  # BERT keeps its pooler in the base model
    assert mini.total == 6 * 2 * 8 * (384 + 384) + 1_540
    every = plan(Config().replace(**{"lora.targets": "q,k,v,o,ffn_in,ffn_out"}))
    assert every.total == 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536)) + 1_540


def test_format_plan_names_each_method_by_its_record():
    """The plan's first and last lines name the method's size as its record says: LoRA speaks of its rank."""
    cases = (({"lora.r": 8}, "LoRA r=8", "largest rank that fits: 11"),
             ({"method": "vera"}, "vera vera.r=256", "largest vera.r that fits: 1024 (the cap)"),
             ({"method": "ia3", "lora.targets": "k,v,ffn_out"}, "ia3", "no size to fill"))
    for overrides, headline, fill in cases:
        lines = format_plan(plan(ROBERTA.replace(**overrides))).splitlines()
        assert lines[0].endswith(f"layers, {headline}") and lines[-1].endswith(fill), lines
    dora = format_plan(plan(ROBERTA.replace(**{"lora.dora": True})))
    assert "  DoRA magnitudes: 18,432" in dora.splitlines()


def test_head_targets_refused():
    with pytest.raises(ConfigError, match="classification head"):
        plan(ROBERTA.replace(**{"lora.targets": "q,v,classifier.dense"}))
    with pytest.raises(ConfigError, match="matches no Linear module"):
        plan(ROBERTA.replace(**{"lora.targets": "nonexistent"}))
