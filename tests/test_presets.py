"""Every YAML under configs/ loads: presets plan to their documented counts, sweep specs expand, the deliberately
invalid presets are refused, and every preset keeps its published run id. Globbed, so a new file is checked the day
it is added."""
import json
import re
from pathlib import Path

import pytest

from budgetlora.adapters.budget import plan
from budgetlora.config import Config, ConfigError
from budgetlora.experiments.spec import load_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL = sorted(CONFIGS.glob("**/*.yaml"))
PRESETS = [p for p in ALL if p.parent == CONFIGS]
SWEEPS = [p for p in ALL if p.parent.name == "sweeps"]
INVALID = [p for p in ALL if p.parent.name == "invalid"]
# the published run ids: every preset's, and those of configs that set each field the run id treats specially
RUN_IDS = json.loads((Path(__file__).resolve().parent / "preset_run_ids.json").read_text())

# the reference project's RoBERTa-base runs and their trainable-parameter counts (head included)
ROBERTA = {
    "roberta-m1": (8, 16, ["q", "v"], 3, 888_580),
    "roberta-m2": (10, 16, ["q", "v"], 4, 962_308),
    "roberta-m3": (10, 32, ["q", "v"], 4, 962_308),
    "roberta-m7": (2, 12, ["q", "k", "v", "o", "ffn_in", "ffn_out"], 6, 925_444),
    "roberta-m10": (10, 32, ["q", "v"], 4, 962_308),
}


def test_every_yaml_is_covered():
    assert set(ALL) == set(PRESETS) | set(SWEEPS) | set(INVALID), "a YAML outside configs/, sweeps/, invalid/"
    assert {p.stem for p in PRESETS} >= set(ROBERTA) | {"minilm-default", "minilm-quick"}
    assert INVALID and SWEEPS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_plans_within_budget(path):
    cfg = Config.from_yaml(path)
    assert cfg.name == path.stem
    p = plan(cfg)
    assert p.fits, f"{path.name} trains {p.total:,} > {p.max_params:,}"
    if path.stem in ROBERTA:
        r, alpha, targets, epochs, total = ROBERTA[path.stem]
        assert (cfg.model.name, cfg.lora.r, cfg.lora.alpha, cfg.lora.targets) == ("roberta-base", r, alpha, targets)
        assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size, cfg.model.max_length) == (epochs, 2e-4, 32, 512)
        assert (cfg.lora.bias, cfg.lora.dropout, cfg.train.warmup, cfg.train.weight_decay) == ("none", 0.1, 0.1, 0.01)
        assert (cfg.train.patience, cfg.train.eval_every, cfg.train.schedule, cfg.train.optimizer) == \
            (2, 0, "linear", "adamw")
        assert p.total == total


def test_m10_is_m3_plus_data_strategies():
    m3, m10 = Config.from_yaml(CONFIGS / "roberta-m3.yaml"), Config.from_yaml(CONFIGS / "roberta-m10.yaml")
    assert (m10.augment.synonym, m10.augment.delete, m10.augment.swap) == (0.15, 0.05, 0.05)
    assert (m10.filter.max_words, m10.filter.max_non_alnum) == (100, 0.10)
    stripped = m10.replace(**{"augment.synonym": 0.0, "augment.delete": 0.0, "augment.swap": 0.0,
                              "filter.max_words": 0, "filter.max_non_alnum": 1.0})
    assert stripped.run_id == m3.run_id


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_documented_count_is_the_planned_count(path):
    """A count quoted in a preset's header comment is what the planner says, so the comment cannot drift."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    quoted = re.findall(r"(\d{1,3}(?:,\d{3})+) trainable param", header)
    for n in quoted:
        assert plan(Config.from_yaml(path)).total == int(n.replace(",", ""))


def test_embedded_presets_use_the_embedded_model():
    for stem in ("minilm-default", "minilm-quick"):
        cfg = Config.from_yaml(CONFIGS / f"{stem}.yaml")
        assert cfg.model.name == "minilm" and plan(cfg).fits


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_preset_is_refused(path):
    cfg = Config.from_yaml(path)  # well-formed YAML: the planner is what refuses it
    with pytest.raises(ConfigError, match="classification head"):
        plan(cfg)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_spec_expands(path, tmp_path):
    spec = load_spec(path, root=tmp_path)
    if spec.grid:
        points = spec.points()
        assert len(points) >= 2
        for point in points:  # every grid point is a valid config that plans
            plan(spec.config(point))
    else:
        assert spec.n_trials and spec.search


def test_minilm_mini_is_small():
    spec = load_spec(CONFIGS / "sweeps" / "minilm-mini.yaml")
    assert spec.base.model.name == "minilm" and len(spec.points()) >= 6
    assert spec.base.data.train_limit <= 2000 and spec.base.model.max_length <= 64 and spec.base.train.epochs == 1


def test_mpnet_presets():
    """mpnet-seed is the reference project's adapter exactly; mpnet-submit trains what mpnet-cpu trains (one run id,
    so a finished mpnet-cpu run is reused by submit); all three plan from MPNet's built-in config, no weights."""
    seed, cpu, submit = (Config.from_yaml(CONFIGS / f"mpnet-{k}.yaml") for k in ("seed", "cpu", "submit"))
    assert (seed.model.name, seed.lora.r, seed.lora.alpha, seed.lora.targets, seed.model.head) == \
        ("mpnet", 10, 32, ["q", "v"], "auto")
    assert plan(seed).total == 962_308 and plan(seed).head == {"classifier": 593_668}
    assert submit.run_id == cpu.run_id and submit.submit.target_prior == "uniform"


def _preset_key(path: Path) -> str:
    return path.relative_to(CONFIGS).with_suffix("").as_posix()


def test_every_preset_has_a_published_run_id():
    recorded, shipped = set(RUN_IDS["presets"]), {_preset_key(p) for p in PRESETS + INVALID}
    assert shipped <= recorded, f"record the run id of {sorted(shipped - recorded)} in tests/preset_run_ids.json"
    assert recorded <= shipped, f"presets gone or renamed: {sorted(recorded - shipped)}"


@pytest.mark.parametrize("path", PRESETS + INVALID, ids=_preset_key)
def test_preset_run_id_is_unchanged(path):
    assert Config.from_yaml(path).run_id == RUN_IDS["presets"][_preset_key(path)]


@pytest.mark.parametrize("name", sorted(RUN_IDS["configs"]))
def test_config_run_id_is_unchanged(name):
    """Every method, multi-label, the linear head, and the training fields that count only away from their
    defaults (loss, class weights, probe steps, base dropout, select, label columns, ...)."""
    case = RUN_IDS["configs"][name]
    base = Config.from_yaml(case["preset"]) if "preset" in case else Config()
    assert base.replace(**case["overrides"]).run_id == case["run_id"]

