"""The parameter planner: exactly what a config trains, from the model config alone (no weights are loaded).

The model is built on the meta device, so shapes are the real ones for any architecture transformers knows.
LoRA on Linear(in, out) adds r·(in + out); DoRA adds one magnitude vector of `out`; the head is trained in full.
The same resolution also yields the peft `target_modules` regex, so what is planned is what is trained.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .architectures import head_modules, load_config, short_name_map, skeleton
from .config import Config, ConfigError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class BudgetError(ConfigError):
    pass


@dataclass
class Plan:
    model_type: str
    num_layers: int
    matches: dict[str, list[str]]  # target name -> concrete module names it matched
    lora_per_module: dict[str, int]  # module -> r·(in + out)
    per_rank: int  # LoRA params per unit of rank
    head: dict[str, int]  # head module -> params
    bias_params: int
    dora_params: int
    r: int
    max_params: int
    target_regex: str
    head_names: list[str] = field(default_factory=list)

    @property
    def lora_params(self) -> int:
        return sum(self.lora_per_module.values())

    @property
    def head_params(self) -> int:
        return sum(self.head.values())

    @property
    def fixed_params(self) -> int:
        """Trainable parameters that do not grow with the rank."""
        return self.head_params + self.bias_params + self.dora_params

    @property
    def total(self) -> int:
        return self.lora_params + self.fixed_params

    @property
    def fits(self) -> bool:
        return self.total <= self.max_params

    def max_rank(self) -> int:
        """Largest rank whose total stays within the budget (0 if even the fixed part does not fit)."""
        return max(0, (self.max_params - self.fixed_params) // self.per_rank)

    def as_dict(self) -> dict:
        return {"total": self.total, "lora": self.lora_params, "head": self.head_params, "bias": self.bias_params,
                "dora": self.dora_params, "max_params": self.max_params, "fits": self.fits, "r": self.r,
                "max_rank": self.max_rank(), "modules": self.lora_per_module, "head_modules": self.head,
                "matches": self.matches, "target_regex": self.target_regex}


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def resolve_targets(model: torch.nn.Module, model_type: str, targets: list[str], layers: list[int],
                    num_layers: int) -> dict[str, list[str]]:
    """Map each target name to the concrete Linear modules it means; refuse names that match nothing or the head."""
    linear = _linear_modules(model)
    heads = head_modules(model)
    short = short_name_map(model_type)
    wanted_layers = {i % num_layers for i in layers} if layers else None
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"lora.layers: {i} is out of range for a {num_layers}-layer model")
    matches: dict[str, list[str]] = {}
    for t in targets:
        t = str(t)
        if t in short:  # relative path anchored right after the layer index
            pattern = re.compile(rf".*\.\d+\.{re.escape(short[t])}")
            found = [n for n in linear if pattern.fullmatch(n)]
        else:  # a raw module suffix, with peft's own endswith semantics
            found = [n for n in linear if n == t or n.endswith("." + t)]
        in_head = [n for n in found if n.split(".")[0] in heads]
        if in_head:
            raise ConfigError(f"target {t!r} matches the classification head ({', '.join(in_head)}); the head is "
                              "already trained in full, and LoRA inside it corrupts the saved head")
        if wanted_layers is not None:
            found = [n for n in found if (m := _LAYER_INDEX.search(n)) and int(m.group(1)) in wanted_layers]
        if not found:
            known = ", ".join(short) or "none for this architecture"
            raise ConfigError(f"target {t!r} matches no Linear module of this {model_type} model "
                              f"(short names: {known})")
        matches[t] = found
    return matches


def target_regex(names: list[str]) -> str:
    """A compact regex that peft fullmatches against module names: exactly `names`, nothing more."""
    groups: dict[str, tuple[set, set]] = {}
    for n in names:
        m = re.fullmatch(r"(.*?)\.(\d+)\.(.+)", n)
        if not m:
            groups.setdefault(n, (set(), set()))
            continue
        ids, rels = groups.setdefault(m.group(1), (set(), set()))
        ids.add(int(m.group(2)))
        rels.add(m.group(3))
    parts = []
    for prefix, (ids, rels) in groups.items():
        if not ids:
            parts.append(re.escape(prefix))
            continue
        id_alt = "|".join(str(i) for i in sorted(ids))
        rel_alt = "|".join(re.escape(r) for r in sorted(rels))
        parts.append(rf"{re.escape(prefix)}\.({id_alt})\.({rel_alt})")
    regex = "|".join(parts)
    covered = {n for n in _candidates(groups) if re.fullmatch(regex, n)}
    if covered != set(names):  # the cross product of layers × modules would add modules: list them one by one
        regex = "|".join(re.escape(n) for n in sorted(names))
    return regex


def _candidates(groups):
    for prefix, (ids, rels) in groups.items():
        if not ids:
            yield prefix
        for i in ids:
            for r in rels:
                yield f"{prefix}.{i}.{r}"


def plan(cfg: Config, config=None) -> Plan:
    """Count what `cfg` trains. `config` may pass an already loaded transformers config."""
    config = config or load_config(cfg.model.name, cfg.model.num_labels)
    model = skeleton(config)
    num_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layers", 0))
    lora = cfg.lora
    matches = resolve_targets(model, config.model_type, list(lora.targets), list(lora.layers), num_layers)
    modules = sorted({n for found in matches.values() for n in found})
    linear = _linear_modules(model)
    per_module = {n: lora.r * (linear[n].in_features + linear[n].out_features) for n in modules}
    heads = head_modules(model)  # trained in full, as peft's SEQ_CLS task does
    head = {h: sum(p.numel() for p in getattr(model, h).parameters()) for h in heads}
    dora = sum(linear[n].out_features for n in modules) if lora.dora else 0
    bias = 0
    if lora.bias == "all":  # peft makes every bias of the base model trainable
        bias = sum(p.numel() for n, p in model.named_parameters() if "bias" in n and n.split(".")[0] not in heads)
    elif lora.bias == "lora_only":
        bias = sum(linear[n].bias.numel() for n in modules if linear[n].bias is not None)
    return Plan(model_type=config.model_type, num_layers=num_layers, matches=matches, lora_per_module=per_module,
                per_rank=sum(per_module.values()) // lora.r, head=head, bias_params=bias, dora_params=dora,
                r=lora.r, max_params=cfg.budget.max_params, target_regex=target_regex(modules), head_names=heads)


def check(p: Plan) -> Plan:
    if not p.fits:
        raise BudgetError(f"over budget: this config trains {p.total:,} parameters, the budget is "
                          f"{p.max_params:,}; the largest rank that fits these targets is {p.max_rank()}")
    return p


def format_plan(p: Plan) -> str:
    lines = [f"model type {p.model_type}, {p.num_layers} layers, LoRA r={p.r}"]
    for target, names in p.matches.items():
        per = sum(p.lora_per_module[n] for n in names)
        lines.append(f"  target {target!r}: {len(names)} modules, {per:,} params")
        shown = names if len(names) <= 4 else names[:2] + ["..."] + names[-1:]
        lines.extend(f"      {n}" + (f"  ({p.lora_per_module[n]:,})" if n != "..." else "") for n in shown)
    for h, n in p.head.items():
        lines.append(f"  head {h!r} (trained in full): {n:,} params")
    if p.bias_params:
        lines.append(f"  biases: {p.bias_params:,}")
    if p.dora_params:
        lines.append(f"  DoRA magnitudes: {p.dora_params:,}")
    verdict = "fits" if p.fits else "OVER BUDGET"
    lines.append(f"total trainable: {p.total:,} of {p.max_params:,} ({verdict}); largest rank that fits: "
                 f"{p.max_rank()}")
    return "\n".join(lines)
