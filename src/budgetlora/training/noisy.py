"""Noisy-label filter: a short first training pass records how each training row is learned, then the least
learnable share is dropped before the real training (dataset cartography, Swayamdipta et al., 2020).

The first pass trains a fresh model with the run's own config (same rows, batches, optimizer and schedule, no
augmentation) and scores every training row at several points; `filters.cartography_select` turns those
probabilities into the kept rows. The pass is seeded, so a resumed run drops exactly the same rows again.
"""
from __future__ import annotations

import logging
import numpy as np
import torch

from budgetlora.config import Config
from budgetlora.data.filters import cartography_select
from budgetlora.data.readers import Split
from budgetlora.data.tokens import Tokens, encode
from budgetlora.training import loop
from budgetlora.tasks import softmax
from budgetlora.training.evaluate import logits_for_ids

logger = logging.getLogger(__name__)

MIN_RECORDS = 3  # a mean and a spread over fewer points say little; a 1-epoch pass is sampled 3 times


def record_points(cfg: Config, n_rows: int) -> tuple[int, list[int]]:
    """Total steps of the pass, and the steps after which every training row is scored.

    Scores are taken at the run's own evaluation points (train.eval_every, else each epoch end); when that gives
    fewer than MIN_RECORDS points they are spread evenly over the pass instead.
    """
    steps = loop.count_steps(cfg.train, n_rows)
    total, every = steps.total, steps.eval_every
    points = sorted({*range(every, total + 1, every), total})
    if len(points) < MIN_RECORDS:
        points = sorted({max(1, round(total * (i + 1) / MIN_RECORDS)) for i in range(MIN_RECORDS)})
    return total, points


def training_probabilities(cfg: Config, train: Split, tokenizer=None, acc=None) -> np.ndarray:
    """(E, N, C) class probabilities of every training row, recorded at E points of a first training pass.

    The pass is the training loop itself (`loop.run`, set up by `loop.setup_training`), run without
    validation: whatever the method changes in a step (LoRA+'s learning rate for B, AdaLoRA's penalty and rank
    allocation) and the loss (train.loss, class weights counted on these same rows) change the first pass alike.
    acc: the Accelerator of the run this pass prepares rows for (its references to this pass's model are freed at
    the end); None makes one, for a pass on its own."""
    from budgetlora.adapters.model import build, load_tokenizer

    tc = cfg.train
    tokenizer = tokenizer or load_tokenizer(cfg)
    model, _ = build(cfg)
    pad = tokenizer.pad_token_id
    ids = Tokens(encode(tokenizer, train.texts, cfg.model.max_length), pad)
    steps = loop.count_steps(tc, len(train))
    _, points = record_points(cfg, len(train))
    # a run's pass borrows the run's Accelerator: making another would reset accelerate's process-wide state under
    # the live run (loop.make_accelerator)
    acc = acc or loop.make_accelerator(tc)
    fit = loop.setup_training(acc, model, cfg, steps.total, train.labels)
    records = []

    def score(state: loop.TrainState, _rows) -> None:
        if state.step in points:  # logits_for_ids switches to eval mode (no dropout) and back
            logits = logits_for_ids(fit.module, ids, tc.eval_batch_size, pad, acc.device)
            records.append(softmax(logits))

    logger.info(f"noisy filter: first pass of {steps.total} steps over {len(train):,} rows, scored at steps {points}")
    inputs = loop.LoopInputs(lambda epoch: ids, torch.as_tensor(train.labels), None, steps.total, steps.per_epoch,
                             steps.eval_every)  # the base rows every epoch: no augmentation in this pass
    loop.run(fit, tc, cfg.model.max_length, inputs, loop.TrainState(), on_step=score, desc="noisy filter")
    acc.free_memory()  # drop the pass's model and optimizer before the run prepares its own
    return np.stack(records)


def noisy_filter(cfg: Config, train: Split, tokenizer=None, mode: str = "hard",
                 acc=None) -> tuple[Split, dict]:
    """Drop the `filter.noisy_fraction` least learnable training rows; returns the kept rows and a report
    {"removed", "per_class", "kept", "mode", "records", ...} in the shape of the other filters' reports."""
    probs = training_probabilities(cfg, train, tokenizer, acc)
    kept, report = cartography_select(probs, train.labels, cfg.filter.noisy_fraction, mode)
    report["records"] = int(probs.shape[0])
    logger.info(f"noisy filter dropped {report['removed']:,} of {len(train):,} training rows "
        f"(per class {report['per_class']})")
    return train.subset(kept), report
