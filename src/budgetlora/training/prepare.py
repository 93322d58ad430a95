"""The rows a run trains on, made ready before the loop starts: sources and splits, pseudo-labelled rows, row
filters, and the noisy-label pass. The training loop receives the result and only trains.
"""
from __future__ import annotations

import logging
import numpy as np

from budgetlora.config import Config
from budgetlora.data.readers import Split, load_data, load_split
from budgetlora.data.tokens import encode

logger = logging.getLogger(__name__)


def with_pseudo_labels(train: Split, cfg: Config) -> Split:
    """The labelled training split followed by the rows of cfg.data.pseudo_labels."""
    extra = load_split(cfg.data.pseudo_labels, "train", cfg.data, cfg.model.num_labels)
    return Split(train.texts + extra.texts, np.concatenate([train.labels, extra.labels]))


def filter_train_split(cfg: Config, train: Split, tokenizer, acc=None) -> tuple[Split, dict]:
    """Apply the configured row filters to the training split only; returns the kept rows and the report."""
    f = cfg.filter
    active = (f.min_words or f.max_words or f.min_tokens or f.max_tokens or f.max_non_alnum < 1.0
              or f.dedup_exact or f.dedup_near)
    if not active:
        return _noisy_filter(cfg, train, {}, tokenizer, acc)
    from budgetlora.data.filters import apply_filters

    def count_tokens(texts):
        return [len(x) for x in encode(tokenizer, texts, 10_000)]

    kept, report = apply_filters(train.texts, train.labels.tolist(), f, cfg.model.num_labels,
                                 count_tokens=count_tokens if (f.min_tokens or f.max_tokens) else None)
    logger.info(f"filters kept {len(kept):,} of {len(train):,} training rows: "
        + ", ".join(f"{k} -{v['removed']}" for k, v in report.items() if isinstance(v, dict)))
    return _noisy_filter(cfg, train.subset(kept), report, tokenizer, acc)


def _noisy_filter(cfg: Config, train: Split, report: dict, tokenizer, acc) -> tuple[Split, dict]:
    """Last filter: a first training pass on the rows the other filters kept drops the least learnable share."""
    if not cfg.filter.noisy_fraction:
        return train, report
    from budgetlora.training.noisy import noisy_filter

    kept, noisy = noisy_filter(cfg, train, tokenizer, acc=acc)
    return kept, {**report, "noisy_fraction": noisy, "kept": len(kept)}


def prepare(cfg: Config, tokenizer, data: dict[str, Split] | None = None,
            acc=None) -> tuple[dict[str, Split], dict]:
    """train / val / test splits ready for the loop (`data` given: its splits, else the config's sources), and the
    filter report. Only the training split is ever changed; val and test stay as loaded. acc: the run's
    Accelerator, which the noisy-label pass borrows."""
    data = dict(data or load_data(cfg))
    if cfg.data.pseudo_labels:
        data["train"] = with_pseudo_labels(data["train"], cfg)
    data["train"], report = filter_train_split(cfg, data["train"], tokenizer, acc)
    return data, report
