"""The parameter planner: exactly what a config trains, from the model config alone (no weights are loaded).

The model is built on the meta device, so shapes are the real ones for any architecture transformers knows.
LoRA on Linear(in, out) (or GPT-2's Conv1D, the same product with its weight stored (in, out)) adds r·(in + out);
DoRA adds one magnitude vector of `out`; each method's count per module is in its record in `methods`. The head
is trained in full for every method. The same resolution also yields the peft `target_modules` regex, so what is
planned is what is trained.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from budgetlora.adapters import methods
from budgetlora.adapters.architectures import (
    head_modules,
    is_conv1d,
    linear_shape,
    load_model_config,
    short_name_map,
    skeleton,
)
from budgetlora.config import Config, ConfigError

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class BudgetError(ConfigError):
    pass


@dataclass
class Plan:
    model_type: str
    num_layers: int
    matches: dict[str, list[str]]  # target name -> concrete module names it matched
    lora_per_module: dict[str, int]  # module -> what the method trains there (LoRA: r·(in + out))
    per_rank: int  # adapter params per unit of the setting, at rank 1 (exact per unit for LoRA, AdaLoRA, LoHa)
    head: dict[str, int]  # head module -> params
    bias_params: int
    dora_params: int  # per-module parameters apart from the setting (DoRA's magnitudes), summed
    r: int  # the method's setting (lora.r, adalora.init_r, vera.r, ...; 0 for (IA)3)
    max_params: int
    target_regex: str
    head_names: list[str] = field(default_factory=list)
    method: str = "lora"
    setting: str | None = "lora.r"  # the config field `r` comes from; None when the method has no size
    feedforward_regex: str = ""  # (IA)3: the modules whose input is scaled
    adapter_at: Callable[[int], int] | None = field(default=None, repr=False, compare=False)  # setting -> params
    fill_cap: int | None = None  # largest setting worth solving for (the method's `cap`)
    linear: bool = False  # the adapter's count is per_rank x the setting: solved in closed form
    fan_in_fan_out: bool = False  # the adapted layers are Conv1D, weights stored (in, out): peft must know

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

    def fill_size(self) -> int:
        """Largest setting whose total stays within the budget (0 if even rank 1 does not fit, or the method has no
        setting), at most `fill_cap`. Every method's count grows with its setting, so a bisection finds it."""
        if self.setting is None or self.adapter_at is None:
            return 0
        room = self.max_params - self.fixed_params
        if self.linear:
            best = max(0, room // self.per_rank)
            return min(best, self.fill_cap) if self.fill_cap else best
        lo, hi = 0, self.fill_cap or max(1, room)  # every method trains at least one value per unit of rank
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.adapter_at(mid) <= room:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def as_dict(self) -> dict:
        return {"method": self.method, "setting": self.setting, "total": self.total, "lora": self.lora_params,
                "head": self.head_params, "bias": self.bias_params, "dora": self.dora_params,
                "max_params": self.max_params, "fits": self.fits, "r": self.r, "fill_size": self.fill_size(),
                "fill_cap": self.fill_cap, "modules": self.lora_per_module, "head_modules": self.head,
                "matches": self.matches, "target_regex": self.target_regex}


def _linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every layer an adapter can wrap (Linear, and Conv1D), by name."""
    return {n: m for n, m in model.named_modules() if linear_shape(m) is not None}


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
        if t in short:  # relative paths anchored right after the layer index (layer.N., layers.N., h.N.)
            pattern = re.compile(rf".*\.\d+\.({'|'.join(re.escape(rel) for rel in short[t])})")
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
    config = config or load_model_config(cfg.model.name, cfg.model.num_labels)
    model = skeleton(config, cfg.model.head)
    num_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layers", 0))
    lora = cfg.lora
    method = methods.get(cfg.method)
    matches = resolve_targets(model, config.model_type, list(lora.targets), list(lora.layers), num_layers)
    modules = sorted({n for found in matches.values() for n in found})
    linear = _linear_modules(model)
    shapes = {n: linear_shape(linear[n]) for n in modules}
    conv = _conv1d_targets(cfg.method, method, config.model_type, {n: linear[n] for n in modules})
    feedforward = {n for t in method.input_scaled(cfg) for n in matches[str(t)]}

    def per_module_at(r: int) -> dict[str, int]:
        # what grows with the setting; the fixed part (DoRA's magnitudes) is reported apart, as before methods existed
        return {n: method.module_params(cfg, i, o, r, n in feedforward) for n, (i, o) in shapes.items()}

    r = method.rank(cfg)
    per_module = per_module_at(r)
    heads = head_modules(model)  # trained in full, as peft's SEQ_CLS task does
    head = {h: sum(p.numel() for p in getattr(model, h).parameters()) for h in heads}
    dora = sum(method.fixed_params(cfg, i, o) for i, o in shapes.values())
    bias = 0
    if lora.bias == "all":  # peft makes every bias of the base model trainable
        bias = sum(p.numel() for n, p in model.named_parameters() if "bias" in n and n.split(".")[0] not in heads)
    elif lora.bias == "lora_only":
        bias = sum(linear[n].bias.numel() for n in modules if linear[n].bias is not None)
    return Plan(model_type=config.model_type, num_layers=num_layers, matches=matches, lora_per_module=per_module,
                per_rank=sum(per_module_at(1).values()) if method.rank_field else 0, head=head, bias_params=bias,
                dora_params=dora, r=r, max_params=cfg.budget.max_params, target_regex=target_regex(modules),
                head_names=heads, method=cfg.method, setting=method.rank_field,
                feedforward_regex=target_regex(sorted(feedforward)) if feedforward else "",
                adapter_at=lambda k: sum(per_module_at(k).values()), fill_cap=method.cap(cfg, shapes),
                linear=method.linear, fan_in_fan_out=conv)


def _conv1d_targets(name: str, method, model_type: str, adapted: dict[str, torch.nn.Module]) -> bool:
    """Whether the adapted layers are Conv1D. peft takes one fan_in_fan_out for all of them, so a mix with Linear
    layers is refused, as is a method whose peft layers do not wrap Conv1D (LoHa, LoKr)."""
    conv = sorted(n for n, m in adapted.items() if is_conv1d(m))
    if not conv:
        return False
    if not method.conv1d:
        raise ConfigError(f"method {name} cannot adapt the Conv1D layers of this {model_type} model ({conv[0]}, ...); "
                          f"use {', '.join(methods.conv1d_methods())}")
    if len(conv) != len(adapted):
        plain = sorted(set(adapted) - set(conv))
        raise ConfigError(f"targets mix Conv1D layers ({conv[0]}) with Linear ones ({plain[0]}); peft adapts them "
                          "with one fan_in_fan_out setting, so target one kind only")
    return True


def fill(cfg: Config, config=None) -> tuple[Config, Plan]:
    """The config with its method's setting raised (or lowered) to the largest that fits the budget, and its plan.
    A method without a setting ((IA)3) comes back as it is; BudgetError when not even rank 1 fits."""
    p = plan(cfg, config)
    if p.setting is None:
        return cfg, p
    r = p.fill_size()
    if r < 1:
        raise BudgetError(f"no {p.setting} fits: at rank 1 this config trains {p.fixed_params + p.per_rank:,} "
                          f"parameters, the budget is {p.max_params:,}")
    cfg = methods.get(cfg.method).with_rank(cfg, r)
    return cfg, plan(cfg, config)


def check(p: Plan) -> Plan:
    if not p.fits:
        hint = (f"; the largest {methods.get(p.method).size_name} that fits these targets is {p.fill_size()}"
                if p.setting else "")
        raise BudgetError(f"over budget: this config trains {p.total:,} parameters, the budget is "
                          f"{p.max_params:,}{hint}")
    return p


def format_plan(p: Plan) -> str:
    method = methods.get(p.method)
    lines = [f"model type {p.model_type}, {p.num_layers} layers, {method.headline(p.r)}"]
    seen: dict[str, str] = {}  # module -> the first target that adapted it
    for target, names in p.matches.items():
        earlier = sorted({seen[n] for n in names if n in seen})
        if earlier and all(n in seen for n in names):  # q, k, v on one fused projection
            lines.append(f"  target {target!r}: the same {len(names)} modules as {', '.join(map(repr, earlier))} "
                         "(a fused projection), counted once")
            continue
        seen.update({n: target for n in names if n not in seen})
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
    fill = (f"; largest {method.size_name} that fits: {p.fill_size()}"
            + (" (the cap)" if p.fill_cap == p.fill_size() else "")
            if p.setting else "; no size to fill")
    lines.append(f"total trainable: {p.total:,} of {p.max_params:,} ({verdict}){fill}")
    return "\n".join(lines)
