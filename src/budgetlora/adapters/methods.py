"""The adapter methods one budget can buy, each known exactly: what one adapted Linear(in, out) trains at a given
setting (from its shape alone, so the planner needs no weights), the peft config that builds it, whether it folds
into the base weights, and what it needs from the training loop.

    lora     r(in + out), + out with DoRA                                  --fill solves lora.r
    adalora  r(in + out) + r at init_r: the peak, before pruning            adalora.init_r
    vera     out + r (its r x in and out x r matrices are frozen, shared)  vera.r
    loha     2r(in + out)                                                  loha.r
    lokr     with in = c*d and out = a*b (peft's factorisation): a*c, plus  lokr.r
             b*d once r >= max(b, d)/2, else r(b + d)
    ia3      out, or in for the feed-forward targets (their input is scaled)  nothing: no size

LoRA's training-only variants live in the lora section: LoRA+ (`lora.b_lr_ratio`, a larger learning rate for B)
and PiSSA / OLoRA (`lora.init`, which move the principal part of W into A and B and leave the residual in the
base). A PiSSA/OLoRA adapter only fits its own mutated base, so it is saved converted into a plain LoRA of rank 2r
on the untouched base: it then reloads, predicts, serves and merges like any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from budgetlora.config import Config, ConfigError

VERA_MAX_R = 1024  # see fill_cap
INITIAL = "budgetlora_initial_adapter"  # attribute holding a PiSSA/OLoRA model's initial A and B (for saving)


@dataclass(frozen=True)
class Method:
    name: str
    rank_field: str | None  # dotted config field that --fill solves; None when the method has no size to choose
    mergeable: bool  # the adapter folds into the base weights (export --merged)
    module_params: Callable[[Config, int, int, int, bool], int]  # (cfg, in, out, r, feedforward) -> trained params

    def rank(self, cfg: Config) -> int:
        if self.rank_field is None:
            return 0
        section, leaf = self.rank_field.split(".")
        return int(getattr(getattr(cfg, section), leaf))

    def with_rank(self, cfg: Config, r: int) -> Config:
        if self.rank_field is None:
            return cfg
        overrides = {self.rank_field: r}
        if self.name == "adalora":  # keep the configured final/initial ratio (2/3 by default, as in the paper)
            ad = cfg.adalora
            overrides["adalora.target_r"] = max(1, min(r, round(r * ad.target_r / ad.init_r)))
        return cfg.replace(**overrides)


def _factor(dim: int, factor: int) -> tuple[int, int]:
    from peft.tuners.lokr.layer import factorization  # pure arithmetic: the very split peft's LoKr layers use

    return factorization(dim, factor)


def _lokr_params(cfg: Config, n_in: int, n_out: int, r: int, _ff: bool) -> int:
    lk = cfg.lokr
    out_l, out_k = _factor(n_out, lk.factor)
    in_m, in_n = _factor(n_in, lk.factor)
    full_w1 = not (lk.decompose_both and r < max(out_l, in_m) / 2)
    full_w2 = not (r < max(out_k, in_n) / 2)
    w1 = out_l * in_m if full_w1 else r * (out_l + in_m)
    w2 = out_k * in_n if full_w2 else r * (out_k + in_n)
    return w1 + w2


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", "lora.r", True,
           lambda cfg, i, o, r, ff: r * (i + o) + (o if cfg.lora.dora else 0)),
    Method("adalora", "adalora.init_r", True, lambda cfg, i, o, r, ff: r * (i + o) + r),  # A, B and the r values E
    Method("vera", "vera.r", True, lambda cfg, i, o, r, ff: o + r),  # lambda_b (out) and lambda_d (r)
    Method("loha", "loha.r", True, lambda cfg, i, o, r, ff: 2 * r * (i + o)),
    Method("lokr", "lokr.r", True, _lokr_params),
    Method("ia3", None, True, lambda cfg, i, o, r, ff: i if ff else o),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def fill_cap(cfg: Config, shapes: dict[str, tuple[int, int]]) -> int | None:
    """The largest setting worth solving for, where the budget alone does not bound it.

    LoKr: past max(b, d)/2 (and max(a, c)/2 with decompose_both) every factor is full, so a larger r trains the
    same parameters. VeRA: each rank adds just one trained value per module, so nearly any budget allows ranks
    whose frozen r x in and out x r matrices and r(in + out) multiply-adds per token cost far more memory and
    time than the budget counts; the cap is the largest rank of the VeRA paper's RoBERTa experiments."""
    if cfg.method == "vera":
        return VERA_MAX_R
    if cfg.method == "lokr":
        need = 1
        for n_in, n_out in shapes.values():
            out_l, out_k = _factor(n_out, cfg.lokr.factor)
            in_m, in_n = _factor(n_in, cfg.lokr.factor)
            need = max(need, math.ceil(max(out_k, in_n) / 2))
            if cfg.lokr.decompose_both:
                need = max(need, math.ceil(max(out_l, in_m) / 2))
        return need
    return None


# -- peft configs ---------------------------------------------------------------------------------------------------
def peft_config(cfg: Config, target_regex: str, head_names: list[str], feedforward_regex: str = ""):
    """The peft config of `cfg.method`, adapting exactly the modules `target_regex` matches; the head is trained in
    full (modules_to_save) for every method."""
    import peft

    common = {"task_type": peft.TaskType.SEQ_CLS, "target_modules": target_regex, "modules_to_save": head_names}
    lc = cfg.lora
    if cfg.method == "lora":
        init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[lc.init]
        return peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
                               use_rslora=lc.rslora, use_dora=lc.dora, init_lora_weights=init, **common)
    if cfg.method == "adalora":
        ad = cfg.adalora
        # total_step is a placeholder until the loop knows its length (step_hooks); it never shapes a tensor
        return peft.AdaLoraConfig(init_r=ad.init_r, target_r=ad.target_r, beta1=ad.beta1, beta2=ad.beta2,
                                  orth_reg_weight=ad.orth_reg_weight, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                  **_adalora_schedule(cfg, 10_000), **common)
    if cfg.method == "vera":
        v = cfg.vera
        # save_projection: the frozen matrices go into the adapter file, so a reload never depends on regenerating
        # them from the seed with another torch version
        return peft.VeraConfig(r=v.r, projection_prng_key=v.prng_key, save_projection=True,
                               vera_dropout=lc.dropout, d_initial=v.d_initial, **common)
    if cfg.method == "loha":
        h = cfg.loha
        return peft.LoHaConfig(r=h.r, alpha=h.alpha, rank_dropout=h.rank_dropout, module_dropout=h.module_dropout,
                               **common)
    if cfg.method == "lokr":
        k = cfg.lokr
        return peft.LoKrConfig(r=k.r, alpha=k.alpha, rank_dropout=k.rank_dropout, module_dropout=k.module_dropout,
                               decompose_both=k.decompose_both, decompose_factor=k.factor, **common)
    if cfg.method == "ia3":
        return peft.IA3Config(feedforward_modules=feedforward_regex or None, **common)
    raise ConfigError(f"unknown method {cfg.method!r}")


def _adalora_schedule(cfg: Config, total_steps: int) -> dict:
    """AdaLoRA's step counts from the config's shares of the run: warm-up at init_r, pruning, final ranks."""
    ad = cfg.adalora
    tinit, tfinal = int(ad.tinit * total_steps), int(ad.tfinal * total_steps)
    if tinit >= total_steps - tfinal:
        raise ConfigError(f"adalora: {total_steps} training steps leave no pruning phase after tinit={ad.tinit} "
                          f"and tfinal={ad.tfinal}; train longer or lower them")
    return {"total_step": total_steps, "tinit": tinit, "tfinal": tfinal, "deltaT": ad.delta_t}


# -- what the loop needs ----------------------------------------------------------------------------------------------
def _decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay pulls towards zero: right for matrices (LoRA A/B, head weights), wrong for biases, norms and the
    scaling vectors of (IA)3 (initialised at 1) and AdaLoRA's singular values E, stored as (n, 1) matrices."""
    return p.ndim >= 2 and "ia3_l" not in name and "lora_E" not in name


def param_groups(model, weight_decay: float, lr: float, b_lr_ratio: float = 1.0) -> list[dict]:
    """Optimizer groups: decay or not, and LoRA+'s learning rate lr x b_lr_ratio for every LoRA B matrix."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((_decays(name, p), b_lr_ratio != 1.0 and "lora_B" in name), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * b_lr_ratio if is_b else lr}
            for (decay, is_b), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]  # decay first


class StepHooks:
    """What a method adds to a training step: a penalty on the loss, and work after optimizer.step() while the
    gradients are still there. Plain LoRA and the others need neither."""

    def penalty(self, model) -> torch.Tensor | None:
        return None

    def after_step(self, model, step: int) -> None:
        """`step`: the 0-based index of the step just taken."""

    def finish(self, model) -> None:
        """After the best state is restored, before evaluation and saving."""


class AdaLoraHooks(StepHooks):
    """AdaLoRA: the orthogonality penalty on A and B, and the rank reallocation after every step.

    peft adds the penalty only to a loss the model computes from labels; this loop computes its own loss (label
    smoothing), so the same penalty is added here. Resuming a killed run restarts the importance averages, which
    the allocator rebuilds within a few steps."""

    def __init__(self, weight: float):
        self.weight = weight

    def penalty(self, model):
        if not self.weight:
            return None
        terms = []
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in n or "lora_B" in n):
                cov = p @ p.T if "lora_A" in n else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device)))
        return self.weight * torch.stack(terms).mean() if terms else None

    def after_step(self, model, step: int) -> None:
        _tuner(model).update_and_allocate(step)

    def finish(self, model) -> None:
        """The best state may predate the final allocation; peft saves only the ranks of the final pattern, so the
        model is masked to it here, and what is evaluated is exactly what reloads."""
        tuner = _tuner(model)
        pattern = tuner.peft_config["default"].rank_pattern
        if pattern:
            tuner.rankallocator.mask_using_rank_pattern(tuner.model, pattern)


def _tuner(model):
    """The peft tuner (AdaLoraModel, ...) inside a PeftModel, through accelerate's or DDP's wrappers."""
    while not hasattr(model, "base_model") or not hasattr(model, "peft_config"):
        model = model.module
    return model.base_model


def step_hooks(model, cfg: Config, total_steps: int) -> StepHooks:
    """Called once the loop knows its length: AdaLoRA's schedule is set from it, then its hooks are returned."""
    if cfg.method != "adalora":
        return StepHooks()
    tuner = _tuner(model)
    pc = tuner.peft_config["default"]
    for key, value in _adalora_schedule(cfg, total_steps).items():
        setattr(pc, key, value)  # the allocator reads the same config object at every step
    return AdaLoraHooks(cfg.adalora.orth_reg_weight)


def frozen_in_file(key: str) -> bool:
    """Tensors an adapter file holds that never train: VeRA's shared random projections (saved so a reload does not
    depend on regenerating them)."""
    return key in ("base_model.vera_A", "base_model.vera_B")


# -- PiSSA / OLoRA: keep the initial adapter, save converted --------------------------------------------------------
def remember_initial(model, cfg: Config) -> None:
    """PiSSA/OLoRA: keep the initial A and B beside the model; saving needs them to convert the trained adapter."""
    if cfg.method == "lora" and cfg.lora.init in ("pissa", "olora"):
        setattr(model, INITIAL, {n: p.detach().clone().cpu() for n, p in model.named_parameters()
                                 if "lora_A" in n or "lora_B" in n})


def save_adapter(model, out: Path) -> None:
    """Save into the run folder in PEFT format; a PiSSA/OLoRA adapter converted to plain LoRA on the original base."""
    from budgetlora import runs

    initial = getattr(model, INITIAL, None)
    runs.save_adapter(model, out, convert=None if initial is None else lambda folder: _to_plain_lora(folder, initial))


def _to_plain_lora(folder: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a saved PiSSA/OLoRA adapter as a plain LoRA on the unchanged base, in place.

    PiSSA/OLoRA train W_res + s·BA with W_res = W - s·B0A0, so the update on the original W is
    s(BA - B0A0) = s·[B | -B0][A ; A0]: a rank-2r LoRA with the same scale (alpha doubles, or grows by sqrt(2) with
    rsLoRA). peft's own conversion (save_pretrained with path_initial_model_for_weight_conversion) keeps only the
    LoRA tensors and so drops the trained head; this keeps every other tensor as it was saved."""
    import json

    from safetensors.torch import load_file, save_file

    weights_path, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    state = load_file(str(weights_path))
    init = {n.replace(".default.", "."): t for n, t in initial.items()}  # saved keys carry no adapter name
    for key in list(state):
        if "lora_A" in key:
            state[key] = torch.cat([state[key], init[key].to(state[key].dtype)], dim=0)
        elif "lora_B" in key:
            state[key] = torch.cat([state[key], -init[key].to(state[key].dtype)], dim=1)
    converted = json.loads(config_path.read_text())
    alpha = math.sqrt(2) if converted.get("use_rslora") else 2
    converted["r"] *= 2
    converted["lora_alpha"] *= alpha
    converted["init_lora_weights"] = True
    # empty for budgetlora's configs; scaled like r and alpha if ever set
    converted["rank_pattern"] = {k: v * 2 for k, v in (converted.get("rank_pattern") or {}).items()}
    converted["alpha_pattern"] = {k: v * alpha for k, v in (converted.get("alpha_pattern") or {}).items()}
    save_file(state, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(converted, indent=2))


# -- export ---------------------------------------------------------------------------------------------------------
def check_mergeable(cfg: Config) -> None:
    m = get(cfg.method)
    if not m.mergeable:
        raise ConfigError(f"method {cfg.method} cannot be merged into the base weights; serve or predict the "
                          "run with its adapter instead")


# -- how a run is named on a leaderboard ------------------------------------------------------------------------------
def label(cfg: Config) -> str:
    """The method with its LoRA variant: lora, dora, rslora, lora+, pissa, olora (joined by '+'), adalora, vera, ..."""
    if cfg.method != "lora":
        return cfg.method
    lc = cfg.lora
    parts = [p for p, on in (("dora", lc.dora), ("rslora", lc.rslora), (lc.init, lc.init != "default"),
                             (f"lora+ (B lr x{lc.b_lr_ratio:g})", lc.b_lr_ratio != 1.0)) if on]
    return " + ".join(parts) or "lora"


def size(cfg: Config) -> tuple[int | None, float | None]:
    """(setting, alpha) of the method: its rank-like size and its scale numerator, None where it has none."""
    m = get(cfg.method)
    alpha = {"lora": cfg.lora.alpha, "adalora": cfg.lora.alpha, "loha": cfg.loha.alpha, "lokr": cfg.lokr.alpha}
    return (m.rank(cfg) if m.rank_field else None), alpha.get(cfg.method)
