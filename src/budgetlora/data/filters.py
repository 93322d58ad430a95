"""Training rows to drop: row filters (length, symbol share, token count, exact and near duplicates) and the
dataset-cartography selection that drops the least learnable rows given per-epoch predicted probabilities.

Pure Python + numpy, so it runs inside a data pipeline without touching the model.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from budgetlora.config import FilterConfig

# ----------------------------------------------------------------------------------------------------------------
# Row filters
# ----------------------------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _non_alnum_share(text: str) -> float:
    if not text:
        return 0.0
    return sum(not (c.isalnum() or c.isspace()) for c in text) / len(text)


def _shingles(text: str, vocab: dict[str, int]) -> frozenset[int]:
    """Word 3-gram shingles as integer ids; shorter texts are one shingle of all their words."""
    w = text.lower().split()
    grams = [" ".join(w[i:i + 3]) for i in range(len(w) - 2)] or [" ".join(w)]
    return frozenset(vocab.setdefault(g, len(vocab)) for g in grams)


def _lsh_rows(threshold: float, num_perm: int) -> int:
    """Rows per LSH band: the largest that still makes a pair at `threshold` a candidate with >= 99% probability.

    Candidates are verified with exact Jaccard, so erring towards more candidates only costs time.
    """
    best = 1
    for r in range(1, num_perm + 1):
        if 1.0 - (1.0 - threshold**r) ** (num_perm // r) >= 0.99:
            best = r
    return best


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 128, seed: int = 0) -> list[int]:
    """Indices of rows with word-3-gram Jaccard >= threshold to an earlier non-duplicate row.

    MinHash signatures + LSH banding find candidate pairs; each candidate is confirmed with exact Jaccard.
    """
    vocab: dict[str, int] = {}
    sets = [_shingles(t, vocab) for t in texts]
    rng = np.random.default_rng(seed)
    # multiply-shift hashing on uint64 (wrap-around is intended); the top 32 bits are the hash value
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    rows = _lsh_rows(threshold, num_perm)
    bands = num_perm // rows
    buckets: dict[tuple[int, bytes], list[int]] = {}
    dups = []
    with np.errstate(over="ignore"):
        for i, s in enumerate(sets):
            ids = np.fromiter(s, dtype=np.uint64, count=len(s))
            sig = ((a[:, None] * ids[None, :] + b[:, None]) >> np.uint64(32)).min(axis=1)
            keys = [(k, sig[k * rows:(k + 1) * rows].tobytes()) for k in range(bands)]
            seen = set()
            is_dup = False
            for key in keys:
                for j in buckets.get(key, ()):
                    if j in seen:
                        continue
                    seen.add(j)
                    if len(s & sets[j]) >= threshold * len(s | sets[j]):
                        is_dup = True
                        break
                if is_dup:
                    break
            if is_dup:
                dups.append(i)
            else:  # only kept rows enter the buckets, so a dropped row never causes another drop
                for key in keys:
                    buckets.setdefault(key, []).append(i)
    return dups


def apply_filters(
    texts: list[str],
    labels: list[int],
    cfg: FilterConfig,
    num_labels: int,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
) -> tuple[list[int], dict]:
    """Kept row indices (original order) and a report `{filter: {"removed": n, "per_class": [...]}, "kept": n}`.

    Only filters that are switched on run and appear in the report.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if (cfg.min_tokens or cfg.max_tokens) and count_tokens is None:
        raise ValueError("min_tokens/max_tokens need a count_tokens function")
    kept = list(range(len(texts)))
    report: dict = {}

    def run(name: str, drop: set[int]) -> None:
        nonlocal kept
        per_class = [0] * num_labels
        for i in drop:
            per_class[labels[i]] += 1
        report[name] = {"removed": len(drop), "per_class": per_class}
        kept = [i for i in kept if i not in drop]

    if cfg.min_words:
        run("min_words", {i for i in kept if len(texts[i].split()) < cfg.min_words})
    if cfg.max_words:
        run("max_words", {i for i in kept if len(texts[i].split()) > cfg.max_words})
    if cfg.max_non_alnum < 1.0:
        run("max_non_alnum", {i for i in kept if _non_alnum_share(texts[i]) > cfg.max_non_alnum})
    if cfg.min_tokens or cfg.max_tokens:
        counts = dict(zip(kept, count_tokens([texts[i] for i in kept])))
        if cfg.min_tokens:
            run("min_tokens", {i for i in kept if counts[i] < cfg.min_tokens})
        if cfg.max_tokens:
            run("max_tokens", {i for i in kept if counts[i] > cfg.max_tokens})
    if cfg.dedup_exact:
        seen, drop = set(), set()
        for i in kept:
            key = _normalise(texts[i])
            if key in seen:
                drop.add(i)
            seen.add(key)
        run("dedup_exact", drop)
    if cfg.dedup_near > 0:
        run("dedup_near", {kept[j] for j in near_duplicates([texts[i] for i in kept], cfg.dedup_near)})
    report["kept"] = len(kept)
    return kept, report


# ----------------------------------------------------------------------------------------------------------------
# Dataset cartography
# ----------------------------------------------------------------------------------------------------------------


def training_dynamics(probs_per_epoch: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (confidence, variability): mean and std over epochs of the gold-label probability."""
    probs = np.asarray(probs_per_epoch, dtype=np.float64)
    gold = probs[:, np.arange(probs.shape[1]), np.asarray(labels, dtype=np.int64)]  # (E, N)
    return gold.mean(axis=0), gold.std(axis=0)


def cartography_select(
    probs_per_epoch: np.ndarray, labels: np.ndarray, drop_fraction: float, mode: str = "hard"
) -> tuple[np.ndarray, dict]:
    """Drop the least learnable rows from their training dynamics (Swayamdipta et al., 2020).

    `probs_per_epoch` has shape (E, N, C): predicted class probabilities for every training row, recorded at E
    points of a first training pass. Confidence is the mean gold-label probability, variability its std.
    mode "hard" drops the `drop_fraction` of rows with the lowest confidence (consistently predicted wrong,
    often mislabelled); "ambiguous" drops those with the highest variability. Returns sorted kept indices and a
    report with the removed count per class and the confidence/variability cut-off of the dropped rows.
    """
    probs = np.asarray(probs_per_epoch, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 3 or probs.shape[1] != labels.shape[0]:
        raise ValueError(f"probs must be (E, N, C) with N = len(labels); got {probs.shape} and {labels.shape}")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError("drop_fraction must be in [0, 1)")
    num_classes = probs.shape[2]
    n = labels.shape[0]
    confidence, variability = training_dynamics(probs, labels)
    if mode == "hard":
        order = np.argsort(confidence, kind="stable")  # ties: earlier rows go first, deterministic
    elif mode == "ambiguous":
        order = np.argsort(-variability, kind="stable")
    else:
        raise ValueError(f"unknown cartography mode {mode!r}; use 'hard' or 'ambiguous'")
    n_drop = int(math.floor(drop_fraction * n))
    dropped = np.sort(order[:n_drop])
    kept = np.sort(order[n_drop:])
    report = {
        "mode": mode,
        "removed": n_drop,
        "per_class": np.bincount(labels[dropped], minlength=num_classes).tolist(),
        "kept": int(kept.size),
        # the least extreme dropped value, i.e. where the cut fell (None when nothing was dropped)
        "max_dropped_confidence": float(confidence[dropped].max()) if n_drop else None,
        "min_dropped_variability": float(variability[dropped].min()) if n_drop else None,
    }
    return kept, report
