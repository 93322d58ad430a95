"""Every adapter method: one record each, the planner's count equals peft's on built models, `--fill` finds the
largest setting that fits, and one tiny run per method trains, saves in PEFT format, reloads to the same logits and
merges to them."""
import dataclasses
import json

import numpy as np
import pytest

from budgetlora import cli
from budgetlora.adapters import methods
from budgetlora.adapters.budget import BudgetError, fill, plan
from budgetlora.config import METHODS, Config, ConfigError
from budgetlora.config.sections import METHOD_SECTIONS
from tests.conftest import tiny_config

ROBERTA = Config().replace(**{"model.name": "roberta-base", "model.random_init": True, "model.tokenizer": "minilm",
                              "lora.targets": "q,v"})
MINILM = Config().replace(**{"model.random_init": True})
ROBERTA_HEAD, MINILM_HEAD = 593_668, 1_540

# (base, overrides, expected total), each worked out by hand from the shapes: RoBERTa-base q,v = 24 Linear(768, 768);
# MiniLM's six targets per layer = 4 Linear(384, 384) + Linear(384, 1536) + Linear(1536, 384), 6 layers.
# LoKr splits 768 = 24 x 32, 384 = 16 x 24, 1536 = 32 x 48.
CASES = {
    "lora": (ROBERTA, {"lora.r": 8}, 24 * 8 * 1536 + ROBERTA_HEAD),
    "dora": (ROBERTA, {"lora.r": 8, "lora.dora": True}, 24 * (8 * 1536 + 768) + ROBERTA_HEAD),
    "rslora+pissa+lora+": (ROBERTA, {"lora.r": 8, "lora.rslora": True, "lora.init": "pissa", "lora.b_lr_ratio": 16},
                           24 * 8 * 1536 + ROBERTA_HEAD),
    "adalora": (ROBERTA, {"method": "adalora", "adalora.init_r": 10, "adalora.target_r": 6},
                24 * (10 * 1536 + 10) + ROBERTA_HEAD),
    "vera": (ROBERTA, {"method": "vera", "vera.r": 256}, 24 * (768 + 256) + ROBERTA_HEAD),
    "loha": (ROBERTA, {"method": "loha", "loha.r": 4}, 24 * 2 * 4 * 1536 + ROBERTA_HEAD),
    "lokr": (ROBERTA, {"method": "lokr", "lokr.r": 8}, 24 * (24 * 24 + 8 * (32 + 32)) + ROBERTA_HEAD),
    "ia3": (ROBERTA, {"method": "ia3", "lora.targets": "k,v,ffn_out"}, 12 * (768 + 768 + 3072) + ROBERTA_HEAD),
    "minilm-lora": (MINILM, {}, 6 * 8 * (4 * 768 + 2 * 1920) + MINILM_HEAD),
    "minilm-adalora": (MINILM, {"method": "adalora"}, 6 * (4 * (12 * 768 + 12) + 2 * (12 * 1920 + 12)) + MINILM_HEAD),
    "minilm-vera": (MINILM, {"method": "vera"}, 6 * (4 * 384 + 1536 + 384 + 6 * 256) + MINILM_HEAD),
    "minilm-loha": (MINILM, {"method": "loha", "loha.r": 4}, 6 * 8 * (4 * 768 + 2 * 1920) + MINILM_HEAD),
    # 384x384: 16*16 + 4(24 + 24); 384->1536: 32*16 + 4(48 + 24); 1536->384: 16*32 + 4(24 + 48)
    "minilm-lokr": (MINILM, {"method": "lokr", "lokr.r": 4}, 6 * (4 * 448 + 2 * 800) + MINILM_HEAD),
    "minilm-lokr-full": (MINILM, {"method": "lokr", "lokr.r": 24},  # r >= max/2 everywhere: both factors full
                         6 * (4 * (256 + 576) + 2 * (512 + 1152)) + MINILM_HEAD),
    # ffn_out scales its 1536 inputs, the other five their outputs
    "minilm-ia3": (MINILM, {"method": "ia3"}, 6 * (4 * 384 + 1536 + 1536) + MINILM_HEAD),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_planner_matches_peft(case):
    """The plan (meta device, no weights) equals the hand count and peft's own count on the built model."""
    from budgetlora.adapters.model import build, count_trainable

    base, overrides, total = CASES[case]
    cfg = base.replace(**overrides)
    assert plan(cfg).total == total
    model, p = build(cfg)  # build itself refuses a disagreement; counted again here, independently
    assert count_trainable(model) == p.total == total
    assert p.head_params == (ROBERTA_HEAD if base is ROBERTA else MINILM_HEAD)
    heads = [n for n, prm in model.named_parameters() if prm.requires_grad and "modules_to_save" in n]
    assert heads, "the head must be trained in full (modules_to_save) for every method"


def test_one_record_per_method():
    """Every method the config accepts has exactly one complete record, a Config section of its own, and a case in
    the planner-vs-peft test above and a tiny run below, so a new method cannot skip either."""
    import peft

    assert list(METHODS) == list(METHOD_SECTIONS) and sorted(methods.METHODS) == sorted(METHODS)
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    for name in METHODS:
        record = methods.get(name)
        assert record.name == name and record.section is METHOD_SECTIONS[name] is sections[name]
        assert record.display and callable(record.build) and callable(record.module_params)
        assert record.rank_field is None or record.rank(Config().replace(method=name)) >= 1
        cfg = Config().replace(**{"method": name, "lora.targets": "q,v,ffn_out"})
        built = record.build(cfg, {"target_modules": "query", "task_type": peft.TaskType.SEQ_CLS}, "")
        assert isinstance(built, peft.PeftConfig) and built.peft_type.value.lower() == name
    planned = {base.replace(**overrides).method for base, overrides, _ in CASES.values()}
    assert planned == set(METHODS), "every method needs a case in test_planner_matches_peft"
    assert {o.get("method", "lora") for o in RUNS.values()} == set(METHODS), "and a tiny run"
    assert methods.get("lora").title(Config().replace(**{"lora.dora": True})) == "DoRA"
    with pytest.raises(ConfigError, match="unknown method 'prefix'"):
        methods.get("prefix")


def _largest_fitting(p) -> int:
    """Brute force, the reference for the planner's solver."""
    room = p.max_params - p.fixed_params
    r = 0
    while (p.fill_cap is None or r < p.fill_cap) and p.adapter_at(r + 1) <= room:
        r += 1
    return r


@pytest.mark.parametrize("method,field,want", [
    ("lora", "lora.r", 11), ("adalora", "adalora.init_r", 11), ("loha", "loha.r", 5),
    ("vera", "vera.r", methods.VERA_MAX_R), ("lokr", "lokr.r", 16)])
def test_fill_roberta_one_million(method, field, want):
    cfg, p = fill(ROBERTA.replace(method=method))
    section, leaf = field.split(".")
    assert getattr(getattr(cfg, section), leaf) == p.r == want == _largest_fitting(p)
    assert p.fits
    if method in ("lora", "adalora", "loha"):  # budget-bound: one more does not fit
        assert not plan(methods.get(method).with_rank(cfg, want + 1)).fits


def test_fill_small_budget_is_budget_bound_for_every_method():
    """With small budgets on MiniLM, VeRA and LoKr are bound by the budget, not by their caps."""
    for method, budget in (("lora", 100_000), ("adalora", 100_000), ("vera", 50_000), ("loha", 100_000),
                           ("lokr", 30_000)):
        cfg = MINILM.replace(**{"method": method, "budget.max_params": budget})
        p0 = plan(cfg)
        filled, p = fill(cfg)
        assert p.r == _largest_fitting(p0) and p.fits and p.total <= budget, method
        assert p.r < (p0.fill_cap or p.r + 1), method
        assert not plan(methods.get(method).with_rank(filled, p.r + 1)).fits, method
    # VeRA: 50,000 - head 1,540 - the lambda_b vectors (6 x 3,456) leave 27,724 for 36 lambda_d of length r
    assert fill(MINILM.replace(**{"method": "vera", "budget.max_params": 50_000}))[1].r == 27_724 // 36
    adalora, _ = fill(MINILM.replace(**{"method": "adalora", "budget.max_params": 150_000}))
    assert adalora.adalora.target_r == max(1, round(adalora.adalora.init_r * 8 / 12))  # the 2/3 ratio is kept
    ia3 = MINILM.replace(method="ia3")
    assert fill(ia3)[0] == ia3  # nothing to solve
    with pytest.raises(BudgetError, match="no loha.r fits"):
        fill(MINILM.replace(**{"method": "loha", "budget.max_params": 5_000}))


def test_adalora_budget_counts_the_initial_rank():
    """Pruning to target_r later does not make an init_r that is over budget acceptable."""
    cfg = ROBERTA.replace(**{"method": "adalora", "adalora.init_r": 12, "adalora.target_r": 2})
    p = plan(cfg)
    assert p.total == 24 * (12 * 1536 + 12) + ROBERTA_HEAD > 1_000_000 and not p.fits
    from budgetlora.adapters.model import build

    with pytest.raises(BudgetError, match="adalora.init_r that fits these targets is 11"):
        build(cfg)


def test_cli_plan_fill_and_max_rank_alias(capsys):
    assert cli.main(["plan", "--model.name", "roberta-base", "--lora.targets", "q,k,v", "--max-rank", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["r"] == 7
    assert cli.main(["plan", "--model.name", "roberta-base", "--lora.targets", "q,v", "--method", "loha",
                     "--fill", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "loha" and out["r"] == 5 and out["total"] == 24 * 2 * 5 * 1536 + ROBERTA_HEAD
    assert cli.main(["plan", "--model.name", "roberta-base", "--method", "vera", "--vera.r", "300000"]) == 3
    assert "OVER BUDGET" in capsys.readouterr().out


def test_config_errors_and_run_ids():
    with pytest.raises(ConfigError, match="method must be one of"):
        Config().replace(method="prefix")
    with pytest.raises(ConfigError, match="lora.dora applies to method lora only"):
        Config().replace(**{"method": "vera", "lora.dora": True})
    with pytest.raises(ConfigError, match="subset of lora.targets"):
        Config().replace(**{"method": "ia3", "lora.targets": "q,v"})
    with pytest.raises(ConfigError, match="target_r <= init_r"):
        Config().replace(**{"adalora.init_r": 4, "adalora.target_r": 6})
    lora = Config()
    # another method's section does not change a LoRA run's id; LoRA-only fields at their defaults do not either
    assert lora.replace(**{"vera.r": 64, "adalora.init_r": 20}).run_id == lora.run_id
    assert lora.replace(**{"lora.b_lr_ratio": 16}).run_id != lora.run_id
    vera = lora.replace(method="vera")
    assert vera.run_id != lora.run_id and vera.replace(**{"vera.r": 64}).run_id != vera.run_id
    assert vera.replace(**{"loha.r": 2}).run_id == vera.run_id


def test_lora_plus_param_groups():
    from budgetlora.adapters.model import build

    model, _ = build(Config().replace(**{"lora.targets": "q,v", "lora.r": 2}))
    groups = methods.param_groups(model, 0.01, 1e-3, b_lr_ratio=16)
    by_lr: dict[float, int] = {}
    for g in groups:
        by_lr[g["lr"]] = by_lr.get(g["lr"], 0) + sum(p.numel() for p in g["params"])
    assert by_lr == {1e-3 * 16: 12 * 2 * 384, 1e-3: 12 * 2 * 384 + MINILM_HEAD}
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim == 1 for p in g["params"]))


# -- one tiny run per method: train, save, reload-and-verify, predict, merge -----------------------------------------
RUNS = {
    "lora+": {"lora.b_lr_ratio": 16.0},
    "pissa": {"lora.init": "pissa", "lora.targets": "q,v"},
    "olora": {"lora.init": "olora", "lora.targets": "q,v"},
    "dora": {"lora.dora": True, "lora.targets": "q,v"},
    "adalora": {"method": "adalora", "adalora.init_r": 6, "adalora.target_r": 2, "adalora.delta_t": 2,
                "lora.targets": "q,v"},
    "vera": {"method": "vera", "vera.r": 32, "train.lr": 2e-2},
    "loha": {"method": "loha", "loha.r": 2, "lora.targets": "q,v"},
    "lokr": {"method": "lokr", "lokr.r": 2},
    "ia3": {"method": "ia3", "lora.targets": "k,v,ffn_out", "train.lr": 2e-2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_tiny_run_reloads_and_merges(name, small_csvs, tmp_path):
    from safetensors.torch import load_file

    from budgetlora import runs
    from budgetlora.inference.export import export_merged
    from budgetlora.inference.load import load_run
    from budgetlora.training.train import train

    cfg = tiny_config(small_csvs, **RUNS[name])
    out = train(cfg, root=tmp_path / "runs")
    m = runs.read_json(out / runs.METRICS)
    assert m["trainable_params"] == plan(cfg).total
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"lora": "LORA", "adalora": "ADALORA", "vera": "VERA", "loha": "LOHA",
                                  "lokr": "LOKR", "ia3": "IA3"}[cfg.method]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("classifier" in k for k in weights)
    if cfg.lora.init in ("pissa", "olora"):  # converted: a plain rank-2r LoRA that fits the untouched base
        assert saved["r"] == 2 * cfg.lora.r and saved["init_lora_weights"] is True
    if cfg.method == "adalora":  # pruned to target_r per module on average, and saved at those ranks
        pattern = saved["rank_pattern"]
        assert pattern and sum(sum(v) for v in pattern.values()) == cfg.adalora.target_r * 12
    loaded = load_run(out, verify=True)  # raises unless the reload reproduces the trained model's logits
    assert loaded.logits(["Stocks fell.", "The team won."]).shape == (2, 4)
    info = export_merged(out, tmp_path / "merged")
    assert info["max_abs_logit_diff"] <= 1e-4
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from budgetlora.training.evaluate import predict_logits

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any(k.startswith(("lora", "vera", "hada", "lokr", "ia3")) for n, _ in merged.named_modules()
                   for k in n.split(".")[-1:])
    texts = ["Stocks fell as oil prices rose.", "The team won the final.", "A new chip doubles battery life."]
    got = predict_logits(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"), texts, cfg.model.max_length)
    assert np.abs(got - loaded.logits(texts, exact=True)).max() <= 1e-4  # the plain folder computes the adapter's
    if name == "vera":  # continuing from a VeRA run: its file also holds the frozen projections, which never train
        child = train(cfg.replace(**{"train.init_from": str(out), "train.max_steps": 2}), root=tmp_path / "runs")
        assert runs.is_finished(child)


def test_export_refuses_a_method_that_cannot_merge(tmp_path, monkeypatch):
    """Every shipped method merges (checked per method above); one marked otherwise is refused before loading."""
    import dataclasses

    from budgetlora import runs
    from budgetlora.inference.export import ExportError, export_merged

    monkeypatch.setitem(methods.METHODS, "ia3", dataclasses.replace(methods.METHODS["ia3"], mergeable=False))
    run = tmp_path / "run"
    runs.write_text(run / runs.CONFIG, Config().replace(method="ia3").to_yaml())
    with pytest.raises(ExportError, match="method ia3 cannot be merged into the base weights"):
        export_merged(run, tmp_path / "out")


@pytest.mark.slow
def test_methods_sweep_one_trial_per_variant_at_its_filled_setting(tmp_path):
    """The shipped methods spec: one trial per variant, each at its largest setting under the same budget, with
    the same data, steps and seed; the leaderboard names every method."""
    from pathlib import Path

    from budgetlora import runs
    from budgetlora.experiments.leaderboard import _axis, collect, write_report
    from budgetlora.experiments.spec import load_spec
    from budgetlora.experiments.sweep import run_sweep
    from tests.experiments.test_sweep import fake_runner

    spec_path = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "methods-minilm.yaml"
    spec = load_spec(spec_path, root=tmp_path / "sweeps")
    assert spec.grid == {"variant": ["lora", "dora", "rslora", "lora-plus", "pissa", "olora", "adalora", "vera",
                                     "loha", "lokr", "ia3"]}
    full = load_spec(spec_path.with_name("methods-minilm-full.yaml"), root=tmp_path / "sweeps")
    assert full.variants == spec.variants and full.base.data.train_limit == 0
    s = run_sweep(spec, runner=fake_runner)
    assert s["states"] == {"COMPLETE": 11}
    rows = collect(spec.folder)
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"lora", "dora", "rslora", "lora+ (B lr x16)", "pissa", "olora", "adalora", "vera",
                              "loha", "lokr", "ia3"}
    settings = {m: (r["setting"], r["r"], r["trainable_params"]) for m, r in by_method.items()}
    assert settings["lora"] == ("lora.r", 24, 996_868) and settings["dora"][1] == 23
    assert settings["adalora"] == ("adalora.init_r", 24, 997_732) and settings["loha"][:2] == ("loha.r", 12)
    assert settings["vera"][1] == methods.VERA_MAX_R and settings["lokr"][1] == 24 and settings["ia3"][1] is None
    for r in rows:
        cfg = runs.load_config(spec.folder / r["path"])
        assert r["trainable_params"] == plan(cfg).total <= 1_000_000
        assert (cfg.data, cfg.train, cfg.lora.targets) == (spec.base.data, spec.base.train, spec.base.lora.targets)
    # the ablation axes name each method's own size and scale fields ((IA)3 has neither, VeRA no scale)
    assert _axis(rows, "r", "setting") == "adalora.init_r, loha.r, lokr.r, lora.r, vera.r"
    assert _axis(rows, "alpha", "alpha_setting") == "loha.alpha, lokr.alpha, lora.alpha"
    assert _axis([r for r in rows if r["method"] == "vera"], "r", "setting") == "vera.r"
    written = write_report(spec.folder)
    assert written["pareto"].stat().st_size > 0 and "vera" in written["md"].read_text()
