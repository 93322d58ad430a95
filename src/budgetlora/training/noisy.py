"""Noisy-label filter: a short first training pass records how each training row is learned, then the least
learnable share is dropped before the real training (dataset cartography, Swayamdipta et al., 2020).

The first pass trains a fresh model with the run's own config (same rows, batches, optimizer and schedule, no
augmentation) and scores every training row at several points; `augment.cartography_select` turns those
probabilities into the kept rows. The pass is seeded, so a resumed run drops exactly the same rows again.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from budgetlora.config import Config
from budgetlora.data.filters import cartography_select
from budgetlora.data.readers import Split
from budgetlora.data.tokens import Tokens, encode, length_grouped_batches
from budgetlora.training.evaluate import logits_for_ids, softmax

MIN_RECORDS = 3  # a mean and a spread over fewer points say little; a 1-epoch pass is sampled 3 times


def record_points(cfg: Config, n_rows: int) -> tuple[int, list[int]]:
    """Total steps of the pass, and the steps after which every training row is scored.

    Scores are taken at the run's own evaluation points (train.eval_every, else each epoch end); when that gives
    fewer than MIN_RECORDS points they are spread evenly over the pass instead.
    """
    tc = cfg.train
    steps_per_epoch = math.ceil(n_rows / tc.batch_size)
    total = math.ceil(tc.epochs * steps_per_epoch)
    if tc.max_steps:
        total = min(total, tc.max_steps)
    every = tc.eval_every or steps_per_epoch
    points = sorted({*range(every, total + 1, every), total})
    if len(points) < MIN_RECORDS:
        points = sorted({max(1, round(total * (i + 1) / MIN_RECORDS)) for i in range(MIN_RECORDS)})
    return total, points


def training_probabilities(cfg: Config, train: Split, tokenizer=None, log=print) -> np.ndarray:
    """(E, N, C) class probabilities of every training row, recorded at E points of a first training pass."""
    from budgetlora.adapters.model import build, load_tokenizer
    from budgetlora.training.loop import make_accelerator, prepare_training, resolve_padding, train_step

    tc = cfg.train
    tokenizer = tokenizer or load_tokenizer(cfg)
    model, _ = build(cfg)
    ids = Tokens(encode(tokenizer, train.texts, cfg.model.max_length), tokenizer.pad_token_id)
    labels = torch.as_tensor(train.labels)
    pad = tokenizer.pad_token_id
    total, points = record_points(cfg, len(train))
    acc = make_accelerator(tc)
    device = acc.device
    padding = resolve_padding(tc.padding, device)
    model, optimizer, scheduler, loss_fn = prepare_training(acc, model, tc, total)
    steps_per_epoch = math.ceil(len(train) / tc.batch_size)
    torch.manual_seed(tc.seed)
    records, step = [], 0
    log(f"noisy filter: first pass of {total} steps over {len(train):,} rows, scored at steps {points}")
    model.train()
    while step < total:
        epoch = step // steps_per_epoch
        for rows in length_grouped_batches(ids.lengths, tc.batch_size, tc.seed, epoch, tc.group_by_length):
            batch = {k: v.to(device) for k, v in ids.batch(rows, padding, cfg.model.max_length).items()}
            train_step(acc, model, batch, labels[rows].to(device), loss_fn, optimizer, scheduler, tc.grad_clip)
            step += 1
            if step in points:  # logits_for_ids switches to eval mode (no dropout) and back
                records.append(softmax(logits_for_ids(model, ids, tc.eval_batch_size, pad, device)))
            if step >= total:
                break
    return np.stack(records)


def noisy_filter(cfg: Config, train: Split, tokenizer=None, mode: str = "hard", log=print) -> tuple[Split, dict]:
    """Drop the `filter.noisy_fraction` least learnable training rows; returns the kept rows and a report
    {"removed", "per_class", "kept", "mode", "records", ...} in the shape of the other filters' reports."""
    probs = training_probabilities(cfg, train, tokenizer, log)
    kept, report = cartography_select(probs, train.labels, cfg.filter.noisy_fraction, mode)
    report["records"] = int(probs.shape[0])
    log(f"noisy filter dropped {report['removed']:,} of {len(train):,} training rows "
        f"(per class {report['per_class']})")
    return train.subset(kept), report
