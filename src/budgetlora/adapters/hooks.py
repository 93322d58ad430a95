"""What an adapter method adds to a training step. Plain LoRA and most others add nothing; AdaLoRA adds an
orthogonality penalty and its rank reallocation, on a schedule that needs the run's length."""
from __future__ import annotations

import torch

from budgetlora.config import Config, ConfigError


class StepHooks:
    """What a method adds to a training step: a penalty on the loss, and work after optimizer.step() while the
    gradients are still there. Plain LoRA and the others need neither."""

    def penalty(self, model) -> torch.Tensor | None:
        return None

    def after_step(self, model, step: int) -> None:
        """`step`: the 0-based index of the step just taken."""

    def finish(self, model) -> None:
        """After the best state is restored, before evaluation and saving."""


def adalora_schedule(cfg: Config, total_steps: int) -> dict:
    """AdaLoRA's step counts from the config's shares of the run: warm-up at init_r, pruning, final ranks."""
    ad = cfg.adalora
    tinit, tfinal = int(ad.tinit * total_steps), int(ad.tfinal * total_steps)
    if tinit >= total_steps - tfinal:
        raise ConfigError(f"adalora: {total_steps} training steps leave no pruning phase after tinit={ad.tinit} "
                          f"and tfinal={ad.tfinal}; train longer or lower them")
    return {"total_step": total_steps, "tinit": tinit, "tfinal": tfinal, "deltaT": ad.delta_t}


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
        tuner(model).update_and_allocate(step)

    def finish(self, model) -> None:
        """The best state may predate the final allocation; peft saves only the ranks of the final pattern, so the
        model is masked to it here, and what is evaluated is exactly what reloads."""
        t = tuner(model)
        pattern = t.peft_config["default"].rank_pattern
        if pattern:
            t.rankallocator.mask_using_rank_pattern(t.model, pattern)


def adalora_hooks(model, cfg: Config, total_steps: int) -> AdaLoraHooks:
    """Once the loop knows its length: the schedule is set from it, then the hooks are returned."""
    pc = tuner(model).peft_config["default"]
    for key, value in adalora_schedule(cfg, total_steps).items():
        setattr(pc, key, value)  # the allocator reads the same config object at every step
    return AdaLoraHooks(cfg.adalora.orth_reg_weight)


def tuner(model):
    """The peft tuner (AdaLoraModel, ...) inside a PeftModel, through accelerate's or DDP's wrappers."""
    while not hasattr(model, "base_model") or not hasattr(model, "peft_config"):
        model = model.module
    return model.base_model
