"""The configs a search under a parameter budget chooses among, built from the budget and the model's config alone
(no weights load): each adapter method on each set of target modules and layers, filled to the largest size the
budget holds, at the learning rates that suit the method. A candidate over the budget is never made: every one is
planned, and the plan must fit.

The sets are the ones the experiment tables (docs/experiments.md) found to matter at one budget: which modules
(query/value, all attention, every linear layer), whether the bottom half of the encoder is adapted at all, the
method, and its learning rate (vector-only methods want higher rates)."""
from __future__ import annotations

from dataclasses import dataclass

from budgetlora.adapters import budget
from budgetlora.adapters.architectures import load_model_config
from budgetlora.config import Config, ConfigError

TARGETS = {"qv": ["q", "v"], "attn": ["q", "k", "v", "o"], "all": ["q", "k", "v", "o", "ffn_in", "ffn_out"]}
LAYERS = ("all", "top")  # every layer, or the top half only
# method -> the variant's changes and its learning rates (the better of each pair in the methods table, and one more)
METHODS = {
    "lora": ({"method": "lora"}, (1e-3, 2e-3, 6e-3)),
    "dora": ({"method": "lora", "lora.dora": True}, (2e-3, 6e-3)),
    "vera": ({"method": "vera"}, (6e-3, 2e-2)),
    "ia3": ({"method": "ia3"}, (6e-3, 2e-2)),
}


@dataclass(frozen=True)
class Candidate:
    name: str  # method-targets-layers-lr, e.g. lora-attn-top-2e-03
    cfg: Config  # filled to the largest size that fits
    trainable: int  # planned trainable parameters, head included


def layer_choice(which: str, num_layers: int) -> list[int]:
    """lora.layers for a LAYERS choice: [] (every layer) or the top half's indices."""
    return [] if which == "all" else list(range(num_layers // 2, num_layers))


def candidate_space(cfg: Config, methods: tuple[str, ...] = tuple(METHODS)) -> list[Candidate]:
    """Every (method, targets, layers, learning rate) filled to cfg's budget, each planned and within it; the same
    adapter at another learning rate is another candidate. One line (ConfigError) when none fits: the budget is
    smaller than the head and the smallest adapter."""
    config = load_model_config(cfg.model.name, cfg.model.num_labels)
    num_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layers", 0))
    out, smallest = [], None
    for method in methods:
        changes, rates = METHODS[method]
        for targets, modules in TARGETS.items():
            for layers in LAYERS:
                where = {"lora.targets": modules, "lora.layers": layer_choice(layers, num_layers)}
                if changes["method"] == "ia3":  # the inputs it scales must be among its targets
                    where["ia3.feedforward"] = [m for m in cfg.ia3.feedforward if m in modules]
                trial = cfg.replace(**changes, **where)
                try:
                    filled, plan = budget.fill(trial, config)
                except budget.BudgetError:
                    p = budget.plan(trial, config)
                    least = p.fixed_params + (p.per_rank if p.setting else p.lora_params)
                    smallest = least if smallest is None else min(smallest, least)
                    continue
                if not plan.fits:  # a method without a size ((IA)3) is as large as its targets make it
                    smallest = plan.total if smallest is None else min(smallest, plan.total)
                    continue
                for lr in rates:
                    out.append(Candidate(f"{method}-{targets}-{layers}-{lr:.0e}",
                                         filled.replace(**{"train.lr": lr}), plan.total))
    if not out:
        raise ConfigError(f"no candidate fits the budget of {cfg.budget.max_params:,} trainable parameters: the "
                          f"smallest adapter with the head needs {smallest:,}")
    return out
