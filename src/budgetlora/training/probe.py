"""A linear probe before fine-tuning (LP-FT, Kumar et al. 2022): the head alone is trained first, on the frozen
encoder's features, and only then do the adapters train with it.

Why: a fresh head sends large, random gradients into the adapters in the first steps, and the features they learn
then fit the training texts at the cost of what the pretrained encoder knew (its robustness on moved texts). A head
that already fits the features lets fine-tuning move them less. The probe is cheap: with every adapter frozen, no
gradient enters the encoder, so a probe step costs about a forward pass.

The probe runs once, before the run's first step (a resumed run has it in its checkpoint already), on seeded
batches of its own, with its own optimizer; the run's batches, optimizer and schedule then start as they would.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

from budgetlora.data.tokens import length_grouped_batches
from budgetlora.progress import progress
from budgetlora.training.loop import Fit, LoopInputs, device_batches, resolve_padding

logger = logging.getLogger(__name__)


def _is_head(name: str) -> bool:
    return ".modules_to_save." in name  # every method trains the head in full as peft's modules_to_save copy


def head_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The head's trainable parameters."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and _is_head(n)]


@contextmanager
def only_head_trains(model):
    """Adapters frozen for the duration; restored on the way out, whatever happens."""
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and not _is_head(n)]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def probe(fit: Fit, tc, max_length: int, inputs: LoopInputs, steps: int) -> dict:
    """Train the head of the run's model alone for `steps` steps at train.lr (constant: the probe is short and its
    optimizer is thrown away), with the run's loss. Every process runs the same batches, unsharded, so their heads
    stay equal without a gradient sync. Returns what the run records: steps, first and last loss, seconds."""
    acc, module, loss_fn = fit.acc, fit.module, fit.loss_fn
    head = [p for _, p in head_parameters(module)]
    if not head:
        raise RuntimeError("train.probe_steps: the model has no head parameters to probe")
    optimizer = torch.optim.AdamW(head, lr=tc.lr, weight_decay=tc.weight_decay)
    padding, t0, losses, step = resolve_padding(tc.padding, acc.device), time.time(), [], 0
    module.train()
    bar = progress(total=steps, desc="linear probe", disable=not acc.is_main_process)
    with only_head_trains(module):
        while step < steps:
            tokens = inputs.epoch_tokens(0)
            # a seed of its own: the run's first epoch then draws exactly the batches it would without a probe
            batches = length_grouped_batches(tokens.lengths, tc.batch_size, tc.seed + 7919, step, tc.group_by_length)
            for _, batch, targets in device_batches(tokens, inputs.labels, batches[: steps - step], acc.device,
                                                    padding, max_length):
                with acc.autocast():
                    logits = module(**batch).logits
                loss = loss_fn(logits.float(), targets)
                loss.backward()
                if tc.grad_clip:
                    torch.nn.utils.clip_grad_norm_(head, tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach().item())
                step += 1
                bar.update(1)
    bar.close()
    result = {"probe_steps": steps, "probe_first_loss": round(losses[0], 4),
              "probe_last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
              "probe_time_s": round(time.time() - t0, 2)}
    logger.info(f"linear probe: {steps} steps of the head alone, loss {result['probe_first_loss']:.4f} -> "
        f"{result['probe_last_loss']:.4f} ({result['probe_time_s']:.0f}s)")
    return result
