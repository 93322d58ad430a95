"""`budgetlora train`: one config into one run folder. The pipeline in order: build the model (the budget is checked
before any weight loads) → prepare the rows (`prepare`) → tokenise once → the loop (`loop`) → evaluate the best
state and write every artifact (`artifacts`). A finished run id is not trained twice; a killed one resumes from its
last checkpoint when the same command runs again.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import torch

from budgetlora import runs
from budgetlora.adapters import methods
from budgetlora.adapters.architectures import is_missing_folder
from budgetlora.adapters.model import build, count_trainable, load_tokenizer
from budgetlora.config import Config, ConfigError
from budgetlora.data.readers import Split
from budgetlora.data.tokens import Tokens, encode
from budgetlora.hardware import PeakMemory, inference_dtype, resolve_precision, set_threads, trim_memory
from budgetlora.tasks import task_of
from budgetlora.training import loop
from budgetlora.training.evaluate import eval_batch_size, logits_for_ids
from budgetlora.training.prepare import prepare

logger = logging.getLogger(__name__)


def init_from_run(model, cfg: Config) -> None:
    """Load the adapter + head weights of the run named by train.init_from into a freshly built model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    parent = Path(cfg.train.init_from)
    weights = parent / runs.ADAPTER_FILES[1]
    if not weights.is_file():
        raise ConfigError(f"train.init_from: no finished run with an adapter at {parent}")
    pcfg = runs.load_config(parent)
    if is_missing_folder(pcfg.model.name):  # the parent's base folder moved: what must match is everything else
        pcfg = pcfg.replace(**{"model.name": cfg.model.name, "model.tokenizer": cfg.model.tokenizer})
    same = pcfg.model == cfg.model and pcfg.lora == cfg.lora and pcfg.method == cfg.method and \
        getattr(pcfg, cfg.method) == getattr(cfg, cfg.method)
    if not same:  # same plan, or the weights cannot mean the same thing
        raise ConfigError(f"train.init_from: {parent} was trained with a different model or LoRA setup")
    state = load_file(weights)
    result = set_peft_model_state_dict(model, state)
    loaded = sum(t.numel() for k, t in state.items() if not methods.frozen_in_file(k))
    if result.unexpected_keys or loaded != count_trainable(model):
        raise ConfigError(f"train.init_from: {parent} holds {loaded:,} adapter values, the model trains "
                          f"{count_trainable(model):,}")


def throughput(state: loop.TrainState, steps, tokens: Tokens, batch_size: int) -> dict:
    """Training rows and real (unpadded) tokens per second of training time. Rows seen are counted from the steps
    taken: whole epochs, then full batches (exact but for a partial last batch inside an unfinished epoch)."""
    n, done = len(tokens), state.step
    rows = done // steps.per_epoch * n + min(done % steps.per_epoch * batch_size, n)
    seconds = max(state.train_time, 1e-9)
    return {"train_samples_per_s": round(rows / seconds, 2),
            "train_tokens_per_s": round(rows * float(tokens.lengths.mean()) / seconds, 1)}


def train(cfg: Config, root: str | Path = runs.DEFAULT_ROOT, data: dict[str, Split] | None = None,
          force: bool = False, on_record=None, on_step: loop.StepCallback | None = None) -> Path:
    """Train one config into `root/<run id>/` and return that folder. A finished run is not trained again.

    data: train/val/test splits to use instead of the config's sources (pseudo labels and filters still apply).
    on_record: called with each history record (train loss and lr, or validation metrics) as it is made.
    on_step: called after every training step with the loop's state and the rows trained on (loop.run)."""
    out = runs.run_dir(cfg, root)
    # the finished check is made under the lock: a second process on the same run id waits, then reuses the run
    with runs.run_lock(root, cfg.run_id):
        if runs.is_finished(out) and not force:
            logger.info(f"run {cfg.run_id} already finished: {out}")
            return out
        threads = torch.get_num_threads()
        try:
            with PeakMemory() as memory:  # the run's own peak, even when several runs share a process
                return _train(cfg, out, memory, data, force, on_record, on_step)
        finally:
            torch.set_num_threads(threads)  # train.threads holds for the run, not for the caller's process after it


def _train(cfg: Config, out: Path, memory: PeakMemory, data, force, on_record, on_step) -> Path:
    tc = cfg.train
    threads = set_threads(tc.threads)
    acc = loop.make_accelerator(tc)
    main = acc.is_main_process
    t_start = time.time()

    model, plan = build(cfg)  # refuses an over-budget config before loading weights
    if tc.init_from:
        init_from_run(model, cfg)
    tokenizer = load_tokenizer(cfg)
    data, filter_report = prepare(cfg, tokenizer, data, acc)
    train_split, val, test = data["train"], data["val"], data["test"]
    logger.info(f"run {cfg.run_id}: {plan.total:,} trainable params (budget {plan.max_params:,}); "
        f"train {len(train_split):,} / val {len(val):,} / test {len(test):,} rows; device {acc.device}, "
        f"{resolve_precision(tc.precision)}, {threads} thread(s)")
    if main:
        runs.write_text(out / runs.CONFIG, cfg.to_yaml())

    pad, ml = tokenizer.pad_token_id, cfg.model.max_length
    base_tokens = Tokens(encode(tokenizer, train_split.texts, ml), pad)  # tokenised once, reused every epoch
    val_tokens = Tokens(encode(tokenizer, val.texts, ml), pad)

    def epoch_tokens(epoch: int) -> Tokens:
        if not cfg.augment.enabled:
            return base_tokens
        from budgetlora.data.augment import augment_texts  # fresh edits every epoch, reproducible from (seed, epoch)
        return Tokens(encode(tokenizer, augment_texts(train_split.texts, cfg.augment, tc.seed, epoch), ml), pad)

    steps = loop.count_steps(tc, len(train_split))
    fit = loop.setup_training(acc, model, cfg, steps.total, train_split.labels)
    eval_batch = eval_batch_size(tc.eval_batch_size, acc.device)
    infer_dtype = inference_dtype(tc.precision, acc.device)  # validation under the training precision
    task = task_of(cfg)

    def evaluate_val() -> dict:
        shard = list(range(acc.process_index, math.ceil(len(val_tokens) / eval_batch), acc.num_processes))
        logits = logits_for_ids(fit.module, val_tokens, eval_batch, pad, acc.device, rows=shard,
                                dtype=infer_dtype, padding=loop.resolve_padding(tc.padding, acc.device))
        if acc.num_processes > 1:  # every process computed its share of rows; sum the zero-padded arrays
            logits = acc.reduce(torch.as_tensor(logits, device=acc.device), "sum").cpu().numpy()
        return task.metrics(logits, val.labels, cfg.model.num_labels)

    state = loop.TrainState()
    ckpt = out / runs.CHECKPOINT / "state.pt"
    if ckpt.is_file() and not force:
        state = loop.load_checkpoint(ckpt, fit.module, fit.optimizer, fit.scheduler)
        logger.info(f"resuming run {cfg.run_id} from step {state.step}")
    inputs = loop.LoopInputs(epoch_tokens, torch.as_tensor(train_split.labels), evaluate_val, steps.total,
                             steps.per_epoch, steps.eval_every)
    if tc.probe_steps and state.step == 0:  # a resumed run's checkpoint already holds the probed head
        from budgetlora.training.probe import probe
        state.probe = probe(fit, tc, ml, inputs, tc.probe_steps)
    state = loop.run(fit, tc, ml, inputs, state, ckpt=ckpt, on_record=on_record, on_step=on_step,
                     desc=f"train {cfg.run_id}")

    trim_memory()  # the loop's freed activations back to the OS before evaluation and saving
    # the plain module: accelerate's autocast wrapper removed, so what is evaluated and saved is the fp32 model
    # that a reload anywhere rebuilds
    model = acc.unwrap_model(fit.model, keep_fp32_wrapper=False)
    if state.best is not None:
        loop.load_trainable(model, state.best)
    fit.hooks.finish(model)
    acc.wait_for_everyone()
    if not main:
        acc.wait_for_everyone()  # return only once the main process has completed the run folder (callers read it)
        return out
    from budgetlora.training.artifacts import write_run_artifacts

    record = {"wall_time_s": round(time.time() - t_start, 2), "filters": filter_report,
              "train_class_counts": task.label_counts(train_split.labels, cfg.model.num_labels),
              "precision": resolve_precision(tc.precision), "threads": threads,
              "val_time_s": round(state.eval_time, 2), **state.probe,
              **throughput(state, steps, base_tokens, tc.batch_size)}
    write_run_artifacts(out, cfg, model, tokenizer, val, test, state, plan, record, memory)
    shutil.rmtree(out / runs.CHECKPOINT, ignore_errors=True)
    acc.wait_for_everyone()
    return out

