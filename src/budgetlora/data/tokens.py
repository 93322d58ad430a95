"""Token ids and batches: texts -> ids without padding -> one padded matrix per split -> length-grouped training
batches and length-sorted evaluation batches, padded to a short ladder of widths."""
from __future__ import annotations

import numpy as np
import torch


def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids without padding: padding happens per batch, to the batch's own longest row."""
    return tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]


def windows(tokenizer, texts: list[str], max_length: int, stride: int) -> tuple[list[list[int]], np.ndarray]:
    """Every text as windows of at most max_length tokens (special tokens included), each repeating the last
    `stride` tokens of the one before, so no sentence is only ever seen cut at a window's edge: the windows' ids,
    and the text each window belongs to. A text within max_length is one window, with the ids `encode` gives it."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("reading long texts in windows needs a fast (Rust) tokenizer")
    enc = tokenizer(texts, truncation=True, max_length=max_length, stride=stride, padding=False,
                    return_overflowing_tokens=True)
    return enc["input_ids"], np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)


def length_grouped_batches(lengths, batch_size: int, seed: int, epoch: int, group: bool = True) -> list[np.ndarray]:
    """Shuffle, sort by length inside mega-batches of 50 batches, shuffle the batches: random yet little padding."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group:
        lengths = np.asarray(lengths)
        mega = batch_size * 50
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                for c in np.array_split(order, max(1, -(-len(order) // mega)))])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# an evaluation batch holds at most batch_size x this many tokens: up to 128 tokens a row (AG News, the main job)
# batches are full; longer rows (a shifted target read at 256 or more) come in fewer per batch, which bounds the
# pass's activation memory instead of letting it grow with the reading length
EVAL_ROW_TOKENS = 128


def sorted_batches(lengths, batch_size: int, row_tokens: int = EVAL_ROW_TOKENS) -> list[np.ndarray]:
    """Evaluation batches: longest first, so the padding is minimal and memory peaks early; a batch of long rows
    holds fewer of them (at most batch_size x row_tokens tokens, at least one row)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    budget, batches, i = batch_size * row_tokens, [], 0
    while i < len(order):
        n = min(batch_size, max(1, budget // max(int(lengths[order[i]]), 1)))  # the batch's first row is its longest
        batches.append(order[i:i + n])
        i += n
    return batches


WIDTH_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def padded_width(longest: int, padding: str, max_length: int) -> int:
    """'longest': the batch's own longest row. 'buckets': the next size on a short ladder (at most 1.5x the longest),
    so a GPU sees a handful of shapes instead of one per width; never beyond max_length."""
    if padding != "buckets":
        return longest
    return min(next((w for w in WIDTH_LADDER if w >= longest), longest), max(max_length, longest))


class Tokens:
    """Token ids of a split as one padded matrix plus lengths: a batch is a slice, not a Python loop per row."""

    def __init__(self, ids: list[list[int]], pad_id: int):
        self.lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        self.pad_id = pad_id
        self.matrix = np.full((len(ids), int(self.lengths.max(initial=1))), pad_id, dtype=np.int64)
        for i, x in enumerate(ids):
            self.matrix[i, :len(x)] = x

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows, padding: str = "longest", max_length: int = 0) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        width = padded_width(int(self.lengths[rows].max()), padding, max_length)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        take = min(width, self.matrix.shape[1])
        ids[:, :take] = self.matrix[rows, :take]
        mask = (np.arange(width)[None, :] < self.lengths[rows, None]).astype(np.int64)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
