"""The adapter methods one budget can buy, one `Method` record each: what one adapted Linear(in, out) trains at a
given setting (from its shape alone, so the planner needs no weights), the peft config that builds it, how --fill
writes a size back, what it needs from the training loop, whether it folds into the base weights, and how the card
and reports name it. The planner, the model builder, the loop, the card and the leaderboard ask the record; adding
a method is adding its record here and its section to config.sections.METHOD_SECTIONS.

    lora     r(in + out), + out with DoRA                                  --fill solves lora.r
    adalora  r(in + out) + r at init_r: the peak, before pruning            adalora.init_r
    vera     out + r (its r x in and out x r matrices are frozen, shared)  vera.r
    loha     2r(in + out)                                                  loha.r
    lokr     with in = c*d and out = a*b (peft's factorisation): a*c, plus  lokr.r
             b*d once r >= max(b, d)/2, else r(b + d)
    ia3      out, or in for the feed-forward targets (their input is scaled)  nothing: no size

LoRA's training-only variants live in the lora section: LoRA+ (`lora.b_lr_ratio`, a larger learning rate for B)
and PiSSA / OLoRA (`lora.init`, which move the principal part of W into A and B and leave the residual in the
base; `saving` converts such an adapter into a plain LoRA of rank 2r on the untouched base).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from budgetlora.adapters.hooks import StepHooks, adalora_hooks, adalora_schedule
from budgetlora.adapters.saving import keep_initial, save_adapter  # noqa: F401  (save_adapter: the run's writer)
from budgetlora.config import METHODS as CONFIG_METHODS, Config, ConfigError
from budgetlora.config.sections import METHOD_SECTIONS

VERA_MAX_R = 1024  # see _vera_cap
Shapes = dict[str, tuple[int, int]]  # adapted module -> (in, out)


def _zero(*_) -> int:
    return 0


def _no_cap(_cfg: Config, _shapes: Shapes) -> int | None:
    return None


def _no_inputs(_cfg: Config) -> Sequence:
    return ()


@dataclass(frozen=True)
class Method:
    """One adapter method. What one adapted Linear(in, out) trains is module_params (what grows with the setting)
    plus fixed_params; the planner reports the two apart."""

    name: str  # the `method` value, also the name of its config section
    display: str  # how the model card and reports write it
    section: type  # its config section (config.sections.METHOD_SECTIONS[name])
    build: Callable[[Config, dict, str], Any]  # (cfg, peft arguments every method shares, input-scaled regex)
    module_params: Callable[[Config, int, int, int, bool], int]  # (cfg, in, out, r, input scaled) -> grows with r
    rank_field: str | None = None  # dotted config field that --fill solves; None when the method has no size
    fixed_params: Callable[[Config, int, int], int] = _zero  # (cfg, in, out): per module, apart from r (DoRA)
    linear: bool = False  # module_params is r times its value at r = 1: the planner solves in closed form
    cap: Callable[[Config, Shapes], int | None] = _no_cap  # the largest setting worth solving for; None: none
    resized: Callable[[Config, int], dict] | None = None  # more overrides when a size r is written back
    hooks: Callable[[Any, Config, int], StepHooks] | None = None  # (model, cfg, total steps) -> its step work
    mergeable: bool = True  # the adapter folds into the base weights (export --merged)
    alpha_field: str | None = None  # its scale's numerator, for reports
    input_scaled: Callable[[Config], Sequence] = _no_inputs  # targets whose input, not output, it adapts
    frozen_keys: tuple[str, ...] = ()  # tensors its adapter file holds that never train
    no_decay: tuple[str, ...] = ()  # name parts of trained matrices weight decay must leave alone
    on_build: Callable[[Any, Config], None] | None = None  # work on the freshly built model
    variant: Callable[[Config], str] | None = None  # display name of the config's variant; default `display`
    settings: Callable[[Config], str] | None = None  # the card's settings text; default every section field
    label: Callable[[Config], str] | None = None  # the leaderboard's name of the config; default `name`
    size_word: str | None = None  # how messages name the setting; default rank_field
    headline_size: str | None = None  # how the plan's first line names it ('LoRA r'); default '<name> <rank_field>'
    conv1d: bool = True  # its peft layers also wrap transformers' Conv1D (GPT-2), weights stored (in, out)

    def rank(self, cfg: Config) -> int:
        if self.rank_field is None:
            return 0
        section, leaf = self.rank_field.split(".")
        return int(getattr(getattr(cfg, section), leaf))

    def with_rank(self, cfg: Config, r: int) -> Config:
        if self.rank_field is None:
            return cfg
        return cfg.replace(**{self.rank_field: r, **(self.resized(cfg, r) if self.resized else {})})

    def alpha(self, cfg: Config) -> float | None:
        if self.alpha_field is None:
            return None
        section, leaf = self.alpha_field.split(".")
        return getattr(getattr(cfg, section), leaf)

    def title(self, cfg: Config) -> str:
        return self.variant(cfg) if self.variant else self.display

    def describe(self, cfg: Config) -> str:
        """Its settings as the card writes them, e.g. 'r=8, alpha=16'."""
        if self.settings:
            return self.settings(cfg)
        fields = dataclasses.asdict(getattr(cfg, self.name))
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())

    def named(self, cfg: Config) -> str:
        return self.label(cfg) if self.label else self.name

    @property
    def size_name(self) -> str | None:
        return self.size_word or self.rank_field

    def headline(self, r: int) -> str:
        """The method at setting r as the plan's first line writes it: 'LoRA r=8', 'vera vera.r=256', 'ia3'."""
        if self.rank_field is None:
            return self.name
        return f"{self.headline_size or f'{self.name} {self.rank_field}'}={r}"


# -- LoRA and its variants ---------------------------------------------------------------------------------------------
def _lora_config(cfg: Config, common: dict, _scaled: str):
    import peft

    lc = cfg.lora
    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[lc.init]
    return peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
                           use_rslora=lc.rslora, use_dora=lc.dora, init_lora_weights=init, **common)


def _lora_settings(cfg: Config) -> str:
    lc = cfg.lora
    return ", ".join([f"r={lc.r}", f"alpha={lc.alpha:g}"] + (["rslora"] if lc.rslora else []))


def _lora_label(cfg: Config) -> str:
    """lora, dora, rslora, lora+, pissa, olora (joined by '+')."""
    lc = cfg.lora
    parts = [p for p, on in (("dora", lc.dora), ("rslora", lc.rslora), (lc.init, lc.init != "default"),
                             (f"lora+ (B lr x{lc.b_lr_ratio:g})", lc.b_lr_ratio != 1.0)) if on]
    return " + ".join(parts) or "lora"


# -- AdaLoRA -----------------------------------------------------------------------------------------------------------
def _adalora_config(cfg: Config, common: dict, _scaled: str):
    import peft

    ad, lc = cfg.adalora, cfg.lora
    # total_step is a placeholder until the loop knows its length (adalora_hooks); it never shapes a tensor
    return peft.AdaLoraConfig(init_r=ad.init_r, target_r=ad.target_r, beta1=ad.beta1, beta2=ad.beta2,
                              orth_reg_weight=ad.orth_reg_weight, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                              **adalora_schedule(cfg, 10_000), **common)


def _adalora_target(cfg: Config, r: int) -> dict:
    """Keep the configured final/initial ratio (2/3 by default, as in the paper)."""
    ad = cfg.adalora
    return {"adalora.target_r": max(1, min(r, round(r * ad.target_r / ad.init_r)))}


# -- VeRA --------------------------------------------------------------------------------------------------------------
def _vera_config(cfg: Config, common: dict, _scaled: str):
    import peft

    v = cfg.vera
    # save_projection: the frozen matrices go into the adapter file, so a reload never depends on regenerating
    # them from the seed with another torch version
    return peft.VeraConfig(r=v.r, projection_prng_key=v.prng_key, save_projection=True,
                           vera_dropout=cfg.lora.dropout, d_initial=v.d_initial, **common)


def _vera_cap(_cfg: Config, _shapes: Shapes) -> int:
    """Each rank adds just one trained value per module, so nearly any budget allows ranks whose frozen r x in and
    out x r matrices and r(in + out) multiply-adds per token cost far more memory and time than the budget counts;
    the cap is the largest rank of the VeRA paper's RoBERTa experiments."""
    return VERA_MAX_R


# -- LoHa, LoKr, (IA)3 -------------------------------------------------------------------------------------------------
def _loha_config(cfg: Config, common: dict, _scaled: str):
    import peft

    h = cfg.loha
    return peft.LoHaConfig(r=h.r, alpha=h.alpha, rank_dropout=h.rank_dropout, module_dropout=h.module_dropout,
                           **common)


def _lokr_config(cfg: Config, common: dict, _scaled: str):
    import peft

    k = cfg.lokr
    return peft.LoKrConfig(r=k.r, alpha=k.alpha, rank_dropout=k.rank_dropout, module_dropout=k.module_dropout,
                           decompose_both=k.decompose_both, decompose_factor=k.factor, **common)


def _factor(dim: int, factor: int) -> tuple[int, int]:
    from peft.tuners.lokr.layer import factorization  # pure arithmetic: the very split peft's LoKr layers use

    return factorization(dim, factor)


def _lokr_params(cfg: Config, n_in: int, n_out: int, r: int, _scaled: bool) -> int:
    lk = cfg.lokr
    out_l, out_k = _factor(n_out, lk.factor)
    in_m, in_n = _factor(n_in, lk.factor)
    full_w1 = not (lk.decompose_both and r < max(out_l, in_m) / 2)
    full_w2 = not (r < max(out_k, in_n) / 2)
    w1 = out_l * in_m if full_w1 else r * (out_l + in_m)
    w2 = out_k * in_n if full_w2 else r * (out_k + in_n)
    return w1 + w2


def _lokr_cap(cfg: Config, shapes: Shapes) -> int:
    """Past max(b, d)/2 (and max(a, c)/2 with decompose_both) every factor is full, so a larger r trains the same
    parameters."""
    need = 1
    for n_in, n_out in shapes.values():
        out_l, out_k = _factor(n_out, cfg.lokr.factor)
        in_m, in_n = _factor(n_in, cfg.lokr.factor)
        need = max(need, math.ceil(max(out_k, in_n) / 2))
        if cfg.lokr.decompose_both:
            need = max(need, math.ceil(max(out_l, in_m) / 2))
    return need


def _ia3_config(cfg: Config, common: dict, scaled: str):
    import peft

    return peft.IA3Config(feedforward_modules=scaled or None, **common)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LoRA", METHOD_SECTIONS["lora"], _lora_config, lambda cfg, i, o, r, ff: r * (i + o),
           rank_field="lora.r", linear=True, alpha_field="lora.alpha", size_word="rank", headline_size="LoRA r",
           fixed_params=lambda cfg, i, o: o if cfg.lora.dora else 0,  # DoRA's magnitude vector
           on_build=keep_initial,  # PiSSA/OLoRA: saving converts against the initial adapter
           variant=lambda cfg: "DoRA" if cfg.lora.dora else "LoRA", settings=_lora_settings, label=_lora_label),
    Method("adalora", "AdaLoRA", METHOD_SECTIONS["adalora"], _adalora_config,
           lambda cfg, i, o, r, ff: r * (i + o) + r,  # A, B and the r values E
           rank_field="adalora.init_r", linear=True, resized=_adalora_target, hooks=adalora_hooks,
           alpha_field="lora.alpha", no_decay=("lora_E",)),  # E: singular values, stored as (n, 1) matrices
    Method("vera", "VeRA", METHOD_SECTIONS["vera"], _vera_config,
           lambda cfg, i, o, r, ff: o + r,  # lambda_b (out) and lambda_d (r)
           rank_field="vera.r", cap=_vera_cap, frozen_keys=("base_model.vera_A", "base_model.vera_B")),
    Method("loha", "LoHa", METHOD_SECTIONS["loha"], _loha_config, lambda cfg, i, o, r, ff: 2 * r * (i + o),
           rank_field="loha.r", linear=True, alpha_field="loha.alpha", conv1d=False),
    Method("lokr", "LoKr", METHOD_SECTIONS["lokr"], _lokr_config, _lokr_params,
           rank_field="lokr.r", cap=_lokr_cap, alpha_field="lokr.alpha", conv1d=False),
    Method("ia3", "(IA)3", METHOD_SECTIONS["ia3"], _ia3_config, lambda cfg, i, o, r, ff: i if ff else o,
           input_scaled=lambda cfg: cfg.ia3.feedforward, no_decay=("ia3_l",)),  # scaling vectors initialised at 1
)}
if set(METHODS) != set(CONFIG_METHODS) or any(m.section is not METHOD_SECTIONS[m.name] for m in METHODS.values()):
    raise ImportError(f"adapter method records ({', '.join(METHODS)}) and config sections "
                      f"({', '.join(CONFIG_METHODS)}) disagree")


def get(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def conv1d_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.conv1d]


def peft_config(cfg: Config, target_regex: str, head_names: list[str], feedforward_regex: str = "",
                fan_in_fan_out: bool = False):
    """The peft config of `cfg.method`, adapting exactly the modules `target_regex` matches; the head is trained in
    full (modules_to_save) for every method. fan_in_fan_out: the targets are Conv1D (the planner refuses a method
    that cannot wrap them); said up front, peft neither warns nor rewrites the config while building."""
    import peft

    common = {"task_type": peft.TaskType.SEQ_CLS, "target_modules": target_regex, "modules_to_save": head_names}
    if fan_in_fan_out:
        common["fan_in_fan_out"] = True
    return get(cfg.method).build(cfg, common, feedforward_regex)


# -- what the loop needs -----------------------------------------------------------------------------------------------
def _decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay pulls towards zero: right for matrices (LoRA A/B, head weights), wrong for biases, norms and the
    trained tensors a method keeps out of it (its `no_decay`: (IA)3's scaling vectors, AdaLoRA's E)."""
    return p.ndim >= 2 and not any(part in name for m in METHODS.values() for part in m.no_decay)


def param_groups(model, weight_decay: float, lr: float, b_lr_ratio: float = 1.0) -> list[dict]:
    """Optimizer groups: decay or not, and LoRA+'s learning rate lr x b_lr_ratio for every LoRA B matrix."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((_decays(name, p), b_lr_ratio != 1.0 and "lora_B" in name), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * b_lr_ratio if is_b else lr}
            for (decay, is_b), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]  # decay first


def step_hooks(model, cfg: Config, total_steps: int) -> StepHooks:
    """Called once the loop knows its length: the method's step hooks (AdaLoRA sets its schedule from it)."""
    method = get(cfg.method)
    return method.hooks(model, cfg, total_steps) if method.hooks else StepHooks()


def frozen_in_file(key: str) -> bool:
    """Tensors an adapter file holds that never train (VeRA's shared random projections, saved so a reload does
    not depend on regenerating them)."""
    return any(key in m.frozen_keys for m in METHODS.values())


def prepare(model, cfg: Config) -> None:
    """What the method does to a freshly built model before training (PiSSA/OLoRA keep their initial adapter)."""
    method = get(cfg.method)
    if method.on_build:
        method.on_build(model, cfg)


# -- export and reports ------------------------------------------------------------------------------------------------
def check_mergeable(cfg: Config) -> None:
    if not get(cfg.method).mergeable:
        raise ConfigError(f"method {cfg.method} cannot be merged into the base weights; serve or predict the "
                          "run with its adapter instead")


def label(cfg: Config) -> str:
    """The method with its variant: lora, dora, rslora, lora+, pissa, olora (joined by '+'), adalora, vera, ..."""
    return get(cfg.method).named(cfg)


def size(cfg: Config) -> tuple[int | None, float | None]:
    """(setting, alpha) of the method: its rank-like size and its scale numerator, None where it has none."""
    m = get(cfg.method)
    return (m.rank(cfg) if m.rank_field else None), m.alpha(cfg)
