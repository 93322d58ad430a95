"""The training loop: length-grouped batches, optimizer and schedule, periodic validation, early stopping,
best-state keeping, and resume after a kill that ends where an uninterrupted run would.

Built on accelerate, so the same code runs on one CPU, one GPU (bf16/fp16 autocast) or under
`accelerate launch --num_processes N`: each process takes a disjoint share of every global batch, gradients are
averaged, and only the main process writes the run folder.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import runs
from .config import Config
from .data import Split, collate, encode, length_grouped_batches, load_data
from .evaluate import logits_for_ids, metrics
from .model import build, load_tokenizer


class Interrupted(Exception):
    """Raised by the `stop_after` hook, to test that a killed run resumes exactly."""


def make_optimizer(model, tc) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # decay matrices (LoRA A/B, head weights), never biases or norms
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if tc.optimizer == "adamw":
        fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
        return torch.optim.AdamW(groups, lr=tc.lr, fused=fused or None)
    if tc.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=tc.lr)
    if tc.optimizer == "adagrad":
        return torch.optim.Adagrad(groups, lr=tc.lr)
    return torch.optim.SGD(groups, lr=tc.lr, momentum=0.9)


def _precision(tc) -> str:
    if tc.precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no"}.get(tc.precision, tc.precision)


def make_accelerator(tc):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=_precision(tc), cpu=not torch.cuda.is_available())


def prepare_training(acc, model, tc, total_steps: int):
    """Optimizer, warmup + decay schedule and loss for `total_steps` steps; model and optimizer placed by `acc`."""
    from transformers import get_scheduler

    optimizer = make_optimizer(model, tc)
    scheduler = get_scheduler(tc.schedule, optimizer, num_warmup_steps=int(tc.warmup * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    return model, optimizer, scheduler, torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)


def train_step(acc, model, batch, targets, loss_fn, optimizer, scheduler, grad_clip: float) -> torch.Tensor:
    """One optimizer step on one (process-local) batch; returns its loss."""
    with acc.autocast():
        logits = model(**batch).logits
    loss = loss_fn(logits.float(), targets)
    acc.backward(loss)
    if grad_clip:
        acc.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device))


def prepare_train_split(cfg: Config, train: Split, tokenizer, log=print) -> tuple[Split, dict]:
    """Apply the configured row filters to the training split only; returns the kept rows and the report."""
    f = cfg.filter
    active = (f.min_words or f.max_words or f.min_tokens or f.max_tokens or f.max_non_alnum < 1.0
              or f.dedup_exact or f.dedup_near)
    if not active:
        return _noisy_filter(cfg, train, {}, log)
    from .augment import apply_filters

    def count_tokens(texts):
        return [len(x) for x in encode(tokenizer, texts, 10_000)]

    kept, report = apply_filters(train.texts, train.labels.tolist(), f, cfg.model.num_labels,
                                 count_tokens=count_tokens if (f.min_tokens or f.max_tokens) else None)
    log(f"filters kept {len(kept):,} of {len(train):,} training rows: "
        + ", ".join(f"{k} -{v['removed']}" for k, v in report.items() if isinstance(v, dict)))
    return _noisy_filter(cfg, train.subset(kept), report, log)


def _noisy_filter(cfg: Config, train: Split, report: dict, log) -> tuple[Split, dict]:
    """Last filter: a first training pass on the rows the other filters kept drops the least learnable share."""
    if not cfg.filter.noisy_fraction:
        return train, report
    from .cartography import noisy_filter

    kept, noisy = noisy_filter(cfg, train, log=log)
    return kept, {**report, "noisy_fraction": noisy, "kept": len(kept)}


def init_from_run(model, cfg: Config) -> None:
    """Load the adapter + head weights of the run named by train.init_from into a freshly built model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .config import ConfigError
    from .model import count_trainable

    parent = Path(cfg.train.init_from)
    weights = parent / runs.ADAPTER_FILES[1]
    if not weights.is_file():
        raise ConfigError(f"train.init_from: no finished run with an adapter at {parent}")
    pcfg = runs.load_config(parent)
    if pcfg.model != cfg.model or pcfg.lora != cfg.lora:  # same plan, or the weights cannot mean the same thing
        raise ConfigError(f"train.init_from: {parent} was trained with a different model or LoRA setup")
    state = load_file(weights)
    result = set_peft_model_state_dict(model, state)
    loaded = sum(t.numel() for t in state.values())
    if result.unexpected_keys or loaded != count_trainable(model):
        raise ConfigError(f"train.init_from: {parent} holds {loaded:,} adapter values, the model trains "
                          f"{count_trainable(model):,}")


def train(cfg: Config, root: str | Path = runs.DEFAULT_ROOT, data: dict[str, Split] | None = None,
          force: bool = False, stop_after: int | None = None, log=print) -> Path:
    """Train one config into `root/<run id>/` and return that folder. A finished run is not trained again."""
    from tqdm.auto import tqdm

    out = runs.run_dir(cfg, root)
    if runs.is_finished(out) and not force:
        log(f"run {cfg.run_id} already finished: {out}")
        return out
    tc = cfg.train
    acc = make_accelerator(tc)
    main = acc.is_main_process
    log = log if main else (lambda *a, **k: None)
    t_start = time.time()

    model, plan = build(cfg)  # refuses an over-budget config before loading weights
    if tc.init_from:
        init_from_run(model, cfg)
    tokenizer = load_tokenizer(cfg)
    data = data or load_data(cfg)
    if cfg.data.pseudo_labels:
        from .adapt import with_pseudo_labels

        data = {**data, "train": with_pseudo_labels(data["train"], cfg)}
    train_split, filter_report = prepare_train_split(cfg, data["train"], tokenizer, log)
    val, test = data["val"], data["test"]
    log(f"run {cfg.run_id}: {plan.total:,} trainable params (budget {plan.max_params:,}); "
        f"train {len(train_split):,} / val {len(val):,} / test {len(test):,} rows; device {acc.device}")
    if main:
        runs.write_text(out / runs.CONFIG, cfg.to_yaml())

    pad = tokenizer.pad_token_id
    base_ids = encode(tokenizer, train_split.texts, cfg.model.max_length)  # tokenised once, reused every epoch
    val_ids = encode(tokenizer, val.texts, cfg.model.max_length)
    labels = torch.as_tensor(train_split.labels)

    def epoch_ids(epoch: int):
        if not cfg.augment.enabled:
            return base_ids
        from .augment import augment_texts  # fresh edits every epoch, reproducible from (seed, epoch)
        return encode(tokenizer, augment_texts(train_split.texts, cfg.augment, tc.seed, epoch), cfg.model.max_length)

    steps_per_epoch = math.ceil(len(train_split) / tc.batch_size)
    total_steps = math.ceil(tc.epochs * steps_per_epoch)
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    eval_every = tc.eval_every or steps_per_epoch

    model, optimizer, scheduler, loss_fn = prepare_training(acc, model, tc, total_steps)

    state = {"step": 0, "history": [], "best": None, "best_loss": math.inf, "bad_evals": 0,
             "loss_sum": 0.0, "loss_n": 0, "elapsed": 0.0}
    ckpt = out / runs.CHECKPOINT / "state.pt"
    if ckpt.is_file() and not force:
        state = _resume(ckpt, acc.unwrap_model(model), optimizer, scheduler)
        log(f"resuming run {cfg.run_id} from step {state['step']}")
    if state["step"] == 0:  # dropout draws from here on; a resumed run restores the saved generator instead
        torch.manual_seed(tc.seed)
    t0 = time.time() - state["elapsed"]

    def evaluate_val():
        shard = list(range(acc.process_index, math.ceil(len(val_ids) / tc.eval_batch_size), acc.num_processes))
        logits = logits_for_ids(acc.unwrap_model(model), val_ids, tc.eval_batch_size, pad, acc.device, rows=shard)
        if acc.num_processes > 1:  # every process computed its share of rows; sum the zero-padded arrays
            logits = acc.reduce(torch.as_tensor(logits, device=acc.device), "sum").cpu().numpy()
        return metrics(logits, val.labels, cfg.model.num_labels)

    # debugging aid: BUDGETLORA_TRACE_ROWS=<dir> makes each process log the training rows it used, one line a step
    trace = os.environ.get("BUDGETLORA_TRACE_ROWS")
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {cfg.run_id}", disable=not main)
    stop = False
    while state["step"] < total_steps and not stop:
        epoch, in_epoch = divmod(state["step"], steps_per_epoch)
        ids = epoch_ids(epoch)
        batches = length_grouped_batches([len(x) for x in ids], tc.batch_size, tc.seed, epoch, tc.group_by_length)
        for rows in batches[in_epoch:]:
            local = rows[acc.process_index::acc.num_processes]  # disjoint shard of the global batch
            if trace:
                with open(Path(trace) / f"rows.{acc.process_index}.txt", "a") as f:
                    f.write(" ".join(map(str, local)) + "\n")
            batch = {k: v.to(acc.device) for k, v in collate(ids, local, pad).items()}
            loss = train_step(acc, model, batch, labels[local].to(acc.device), loss_fn, optimizer, scheduler,
                              tc.grad_clip)
            state["step"] += 1
            state["loss_sum"] += float(acc.reduce(loss.detach(), "mean"))
            state["loss_n"] += 1
            bar.update(1)
            if state["step"] % max(1, eval_every // 10) == 0 or state["step"] == total_steps:
                state["history"].append({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
                                         "train_loss": state["loss_sum"] / state["loss_n"],
                                         "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 2)})
                bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_n']:.4f}")
                state["loss_sum"], state["loss_n"] = 0.0, 0
            if state["step"] % eval_every == 0 or state["step"] == total_steps:
                m = evaluate_val()
                state["history"].append({"step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
                                         "val_loss": m["loss"], "val_accuracy": m["accuracy"],
                                         "elapsed_s": round(time.time() - t0, 2)})
                log(f"step {state['step']}/{total_steps}: val loss {m['loss']:.4f}, acc {m['accuracy']:.4f}")
                if m["loss"] < state["best_loss"]:
                    state.update(best=_trainable_state(acc.unwrap_model(model)), best_loss=m["loss"],
                                 best_step=state["step"], bad_evals=0)
                else:
                    state["bad_evals"] += 1
                    if tc.patience and state["bad_evals"] >= tc.patience:
                        log(f"early stop: val loss did not improve for {tc.patience} evaluations")
                        stop = True
                state["elapsed"] = time.time() - t0
                if main and state["step"] < total_steps and not stop:
                    _checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler, state)
            if stop_after is not None and state["step"] >= stop_after:
                raise Interrupted(f"stopped after step {state['step']}")
            if stop or state["step"] >= total_steps:
                break
    bar.close()
    train_time = time.time() - t0

    model = acc.unwrap_model(model)
    if state["best"] is not None:
        _load_trainable(model, state["best"])
    acc.wait_for_everyone()
    if not main:
        acc.wait_for_everyone()  # return only once the main process has completed the run folder (callers read it)
        return out
    from .report import write_run_artifacts

    write_run_artifacts(out, cfg, model, tokenizer, val, test, state, plan, filter_report,
                        train_time=train_time, total_time=time.time() - t_start, log=log,
                        train_class_counts=np.bincount(train_split.labels, minlength=cfg.model.num_labels).tolist())
    shutil.rmtree(out / runs.CHECKPOINT, ignore_errors=True)
    acc.wait_for_everyone()
    return out


def _checkpoint(path: Path, model, optimizer, scheduler, state) -> None:
    blob = {"trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "state": state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(), "numpy_rng": np.random.get_state()}
    with runs.atomic_path(path) as tmp:
        torch.save(blob, tmp)


def _resume(path: Path, model, optimizer, scheduler) -> dict:
    blob = torch.load(path, weights_only=False)
    _load_trainable(model, blob["trainable"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    random.setstate(blob["python_rng"])
    np.random.set_state(blob["numpy_rng"])
    return blob["state"]
