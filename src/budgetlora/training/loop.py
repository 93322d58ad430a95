"""The training loop, and only that: optimizer, schedule, steps, periodic validation, early stopping, best state,
checkpoints. It receives token ids that are ready (data preparation happens in `prepare`) and a built model.

Built on accelerate, so the same code runs on one CPU, one GPU (bf16/fp16 autocast) or under
`torchrun --nproc_per_node N`: each process takes a disjoint share of every global batch, gradients are averaged,
and only the main process writes checkpoints.

GPU hygiene, all of which is free on a CPU: the loss is summed on the device and read only at logging points (no
host sync per step), batches are sliced from one padded matrix into pinned memory and copied without blocking,
widths come from a short ladder of sizes (few distinct shapes, so kernels and an optional torch.compile are reused),
and AdamW is fused.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from budgetlora import runs
from budgetlora.adapters import methods
from budgetlora.data.tokens import Tokens, length_grouped_batches
from budgetlora.errors import BudgetloraError
from budgetlora.hardware import resolve_precision
from budgetlora.progress import progress
from budgetlora.training import losses

logger = logging.getLogger(__name__)


class CheckpointError(BudgetloraError, RuntimeError):
    """A resume checkpoint that cannot be loaded safely."""


# -- the pieces of one step ---------------------------------------------------------------------------------------
def make_optimizer(model, tc, b_lr_ratio: float = 1.0) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # decay matrices (LoRA A/B, head weights), never biases, norms or scaling vectors; LoRA+ gives B its own lr
    groups = methods.param_groups(model, tc.weight_decay, tc.lr, b_lr_ratio)
    if tc.optimizer == "adamw":
        fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=tc.lr, fused=fused or None)
    if tc.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=tc.lr)
    if tc.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=tc.lr)
    return torch.optim.SGD(groups, lr=tc.lr, momentum=0.9)


def make_accelerator(tc):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision; runs in one
    # process (tests, sweeps, benchmarks) each choose their own, so drop the previous run's (the process group stays)
    AcceleratorState._reset_state(reset_partial_state=False)
    if torch.cuda.is_available():  # TF32 for what autocast leaves in fp32 (loss, head): same speed class as bf16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if tc.compile:  # one graph per (batch, width) shape: bucketed widths keep that a handful, under this limit
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    return Accelerator(mixed_precision=resolve_precision(tc.precision).replace("fp32", "no"),
                       cpu=not torch.cuda.is_available(),
                       dynamo_backend="inductor" if tc.compile else "no")


@dataclass(frozen=True)
class Steps:
    total: int  # optimizer steps of the whole run
    per_epoch: int
    eval_every: int  # validation (and checkpoint) interval


def count_steps(tc, n_rows: int) -> Steps:
    """The length of a run over `n_rows` training rows: train.epochs, cut at train.max_steps when that comes first;
    validation every train.eval_every steps, or once per epoch."""
    per_epoch = math.ceil(n_rows / tc.batch_size)
    total = math.ceil(tc.epochs * per_epoch)
    if tc.max_steps:
        total = min(total, tc.max_steps)
    return Steps(total, per_epoch, tc.eval_every or per_epoch)


@dataclass
class Fit:
    """What one training pass works with, set up together by `setup_training`: the accelerator, the model it
    placed, the optimizer and schedule, the loss, and the adapter method's step hooks."""

    acc: object  # accelerate.Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: torch.nn.Module
    hooks: methods.StepHooks = field(default_factory=methods.StepHooks)

    @property
    def module(self) -> torch.nn.Module:
        """The model without accelerate's wrappers: what is evaluated, checkpointed and saved."""
        return self.acc.unwrap_model(self.model)


def setup_training(acc, model, cfg, total_steps: int, labels) -> Fit:
    """`setup_optimizer` with what the config's adapter method adds: LoRA+'s learning rate for B, and the
    method's step hooks (AdaLoRA's schedule is set from `total_steps`), and the loss's class weights
    (train.class_weights; auto counts the training rows' `labels`). Every pass that trains a model of `cfg`
    comes through here, so they all optimise alike."""
    hooks = methods.step_hooks(model, cfg, total_steps)
    model, optimizer, scheduler, loss_fn = setup_optimizer(acc, model, cfg.train, total_steps, cfg.lora.b_lr_ratio,
                                                           losses.training_loss(cfg, labels))
    return Fit(acc, model, optimizer, scheduler, loss_fn, hooks)


def setup_optimizer(acc, model, tc, total_steps: int, b_lr_ratio: float = 1.0,
                    loss_fn: torch.nn.Module | None = None):
    """Optimizer, warmup + decay schedule and loss (`loss_fn`, by default train.loss unweighted) for
    `total_steps` steps; model, optimizer and loss placed by `acc`.
    b_lr_ratio: LoRA+ (lora.b_lr_ratio), the B matrices' learning rate over the others'."""
    from transformers import get_scheduler

    model.to(acc.device)  # first, so that the optimizer sees device tensors (fused AdamW needs them on the GPU)
    optimizer = make_optimizer(model, tc, b_lr_ratio)
    scheduler = get_scheduler(tc.schedule, optimizer, num_warmup_steps=int(tc.warmup * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    return model, optimizer, scheduler, (loss_fn or losses.make_loss(tc)).to(acc.device)


def train_step(fit: Fit, batch, targets, grad_clip: float, step: int = 0, micro_batch: int = 0) -> torch.Tensor:
    """One optimizer step on one (process-local) batch, `micro_batch` rows at a time (train.micro_batch); returns its
    loss, still on the device (no sync). The adapter method's hooks add their penalty and post-step work (AdaLoRA);
    `step` is the 0-based index of this step."""
    acc, model, hooks = fit.acc, fit.model, fit.hooks
    parts = losses.batch_parts(fit.loss_fn, targets, micro_batch)
    loss = torch.zeros((), device=targets.device)
    for i, (rows, share) in enumerate(parts, 1):  # each part's mean loss weighted by its share: the batch's gradient
        with acc.autocast():
            logits = model(**{k: v[rows] for k, v in batch.items()}).logits
        part = fit.loss_fn(logits.float(), targets[rows]) * share
        penalty = hooks.penalty(model) if i == len(parts) else None
        with acc.no_sync(model) if i < len(parts) else contextlib.nullcontext():  # processes sync once, at the end
            acc.backward(part if penalty is None else part + penalty)  # the reported loss stays the task loss
        loss += part.detach()
    if grad_clip:
        acc.clip_grad_norm_(model.parameters(), grad_clip)
    fit.optimizer.step()
    hooks.after_step(model, step)  # before zero_grad: AdaLoRA scores ranks by weight x gradient
    fit.scheduler.step()
    fit.optimizer.zero_grad(set_to_none=True)
    return loss


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device))


def device_batches(tokens: Tokens, labels: torch.Tensor, batches, device, padding: str, max_length: int):
    """Yield (rows, batch on device, targets on device) one ahead: the next copy is queued before the current step
    runs, from pinned memory so that it does not block."""
    pin = device.type == "cuda"

    def put(rows):
        b = {**tokens.batch(rows, padding, max_length), "targets": labels[rows]}
        b = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in b.items()}
        return rows, b, b.pop("targets")

    it = iter(batches)
    nxt = next(it, None)
    ahead = put(nxt) if nxt is not None else None
    while ahead is not None:
        current = ahead
        nxt = next(it, None)
        ahead = put(nxt) if nxt is not None else None
        yield current


def resolve_padding(padding: str, device) -> str:
    """'auto': a few bucketed widths everywhere. A GPU reuses its kernels and graphs; a CPU's oneDNN keeps
    primitives per shape, so one width per batch costs ~600 MB more memory over a run for no speed (measured:
    benchmarks/cpu_levers.py and the main job)."""
    return "buckets" if padding == "auto" else padding


# -- the loop -----------------------------------------------------------------------------------------------------
@dataclass
class LoopInputs:
    epoch_tokens: Callable[[int], Tokens]  # the training tokens of an epoch (augmentation redraws them)
    labels: torch.Tensor
    # validation metrics of the model as it is now; None: a pass without validation (no best state, no early stop)
    evaluate: Callable[[], dict] | None
    total_steps: int
    steps_per_epoch: int
    eval_every: int


@dataclass
class TrainState:
    """Where a run is: what a checkpoint saves and a resume restores, and what the run folder reports."""

    step: int = 0
    history: list[dict] = field(default_factory=list)  # train loss and lr at logging points, validation metrics
    best: dict[str, torch.Tensor] | None = None  # the trainable weights at the best validation point so far
    best_loss: float = math.inf  # the validation loss of `best`
    # `best`'s train.select metric; None in checkpoints from before train.select, all of which selected by loss
    best_score: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # validations since the last improvement (train.patience)
    elapsed: float = 0.0  # seconds of the run before this process took it over (a resume)
    eval_time: float = 0.0  # seconds of that spent validating
    train_time: float = 0.0  # the whole loop's seconds, set when it ends
    probe: dict = field(default_factory=dict)  # the linear probe's record (probe.probe), empty without one

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, saved: dict) -> TrainState:
        """A checkpoint's state; fields it predates keep their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


# on_step(state, rows): after every step, in every process, with the rows that process just trained on
StepCallback = Callable[[TrainState, np.ndarray], None]


def run(fit: Fit, tc, max_length: int, inputs: LoopInputs, state: TrainState, ckpt: Path | None = None,
        on_record: Callable[[dict], None] | None = None, on_step: StepCallback | None = None,
        desc: str = "train") -> TrainState:
    """Train until inputs.total_steps or early stop; returns the state (history, best trainable weights, ...).
    on_record: each history record, in the main process. on_step: called after each step's validation and
    checkpoint, if any; an exception it raises ends the run there, with the checkpoints written so far kept."""
    acc, model = fit.acc, fit.model
    main = acc.is_main_process
    padding = resolve_padding(tc.padding, acc.device)
    total, per_epoch, eval_every = inputs.total_steps, inputs.steps_per_epoch, inputs.eval_every
    log_every = max(1, eval_every // 10)
    if state.step == 0:  # dropout draws from here on; a resumed run restores the saved generator instead
        torch.manual_seed(tc.seed)
    t0 = time.time() - state.elapsed
    loss_sum, loss_n = torch.zeros((), device=acc.device), 0

    def record(entry: dict) -> None:
        elapsed = time.time() - t0  # train_s: the same clock without validation, the time training itself took
        entry = {"step": state.step, "epoch": round(state.step / per_epoch, 4), **entry,
                 "elapsed_s": round(elapsed, 2), "train_s": round(elapsed - state.eval_time, 2)}
        state.history.append(entry)
        if on_record is not None and main:
            on_record(entry)

    model.train()
    bar = progress(total=total, initial=state.step, desc=desc, disable=not main)
    stop = False
    while state.step < total and not stop:
        epoch, in_epoch = divmod(state.step, per_epoch)
        tokens = inputs.epoch_tokens(epoch)
        batches = length_grouped_batches(tokens.lengths, tc.batch_size, tc.seed, epoch, tc.group_by_length)
        local = [rows[acc.process_index::acc.num_processes] for rows in batches[in_epoch:]]  # disjoint shards
        for rows, batch, targets in device_batches(tokens, inputs.labels, local, acc.device, padding, max_length):
            loss_sum += train_step(fit, batch, targets, tc.grad_clip, state.step, tc.micro_batch)
            loss_n += 1
            state.step += 1
            if state.step % log_every == 0 or state.step % eval_every == 0 or state.step == total:
                mean = float(acc.reduce(loss_sum, "mean")) / loss_n  # the one sync, at logging points only
                record({"train_loss": mean, "lr": fit.scheduler.get_last_lr()[0]})
                bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
                loss_sum.zero_()
                loss_n = 0
            bar.update(1)  # after the postfix, so a line written to a log shows this step's loss
            # train.max_time: the step that reaches it is the last, validated like the last of the planned steps
            out_of_time = _out_of_time(acc, tc, t0)
            at_eval = state.step % eval_every == 0 or state.step == total or out_of_time
            if at_eval and inputs.evaluate is not None:
                stop = _validate(fit, tc, inputs.evaluate, total, state, record) or out_of_time
                state.elapsed = time.time() - t0
                # the partial loss of the steps since the last logging point is not kept: checkpoints fall on
                # evaluation points, which are logging points too
                if main and ckpt is not None and state.step < total and not stop:
                    save_checkpoint(ckpt, fit.module, fit.optimizer, fit.scheduler, state)
            if on_step is not None:
                on_step(state, rows)
            if stop or out_of_time or state.step >= total:
                if out_of_time and not stop:
                    logger.info(f"train.max_time {tc.max_time:g}s reached at step {state.step} of {total}")
                stop = stop or out_of_time
                break
    bar.close()
    state.train_time = time.time() - t0
    return state


def _out_of_time(acc, tc, t0: float) -> bool:
    """train.max_time reached, by any process (all stop at the same step, or the rest wait at a collective)."""
    late = bool(tc.max_time) and time.time() - t0 >= tc.max_time
    if tc.max_time and acc.num_processes > 1:
        late = bool(acc.reduce(torch.tensor(float(late), device=acc.device), "max"))
    return late


def improves(select: str, value: float, state: TrainState) -> bool:
    """Whether validation metric `select` at `value` beats the kept state's: lower loss, higher accuracy or macro-F1
    (strictly, so the earlier of two equal states is kept)."""
    best = state.best_score
    if best is None and select == "loss":
        best = state.best_loss  # a checkpoint from before train.select
    if best is None:
        return True
    return value < best if select == "loss" else value > best


def _validate(fit: Fit, tc, evaluate: Callable[[], dict], total: int, state: TrainState, record) -> bool:
    """One validation point: record it, keep the best state by train.select, count evaluations without improvement.
    Returns whether early stopping (train.patience) ends the run here."""
    t_eval = time.time()
    m = evaluate()
    state.eval_time += time.time() - t_eval
    record({"val_loss": m["loss"], "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"]})
    logger.info(f"step {state.step}/{total}: val loss {m['loss']:.4f}, acc {m['accuracy']:.4f}, "
        f"macro-F1 {m['macro_f1']:.4f}")
    return keep_best(tc, m, state, lambda: trainable_state(fit.module))


def keep_best(tc, m: dict, state: TrainState, snapshot: Callable[[], dict]) -> bool:
    """Keep `snapshot()` as the best state when validation metrics `m` improve on train.select, else count one
    more evaluation without improvement. Returns whether early stopping (train.patience) ends the run here."""
    if improves(tc.select, m[tc.select], state):
        state.best, state.best_loss, state.best_score = snapshot(), m["loss"], m[tc.select]
        state.best_step, state.bad_evals = state.step, 0
        return False
    state.bad_evals += 1
    if tc.patience and state.bad_evals >= tc.patience:
        logger.info(f"early stop: val {tc.select} did not improve for {tc.patience} evaluations")
        return True
    return False


# -- checkpoints ----------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState) -> None:
    """Everything a resume needs, in forms `torch.load(weights_only=True)` accepts (tensors, numbers, strings,
    lists, dicts): a checkpoint is loaded without letting its pickle call anything."""
    version, internal, gauss = random.getstate()  # 625 words of 32 bits: exact in int64
    name, keys, pos, has_gauss, cached = np.random.get_state()
    blob = {"trainable": trainable_state(model), "optimizer": _plain(optimizer.state_dict()),
            "scheduler": _plain(scheduler.state_dict()), "state": _plain(state.to_dict()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": [version, torch.tensor(internal, dtype=torch.int64), gauss],
            "numpy_rng": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    with runs.atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    import pickle

    try:
        blob = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a checkpoint this version can load safely ({str(e).splitlines()[0][:200]});"
                           " delete it to train from the start") from None
    load_trainable(model, blob["trainable"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    version, internal, gauss = blob["python_rng"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = blob["numpy_rng"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    return TrainState.from_dict(blob["state"])


def _plain(obj):
    """numpy scalars and arrays (metrics, history entries) as Python numbers and tensors; the rest unchanged."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
