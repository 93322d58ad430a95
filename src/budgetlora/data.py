"""Data: sources → validated (texts, labels) → seeded stratified splits → token ids → length-grouped batches.

Sources: a hub dataset name (needs internet), a local .csv/.csv.gz/.parquet with text,label columns, the original
AG News CSV layout (no header; class 1-4, title, description), a pickled `datasets.Dataset` or DataFrame, or a
folder holding train/test files. With no source given, the shipped AG News copy is used when it can be found.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ENV = "BUDGETLORA_DATA"
HUB_DEFAULT = "ag_news"


class DataError(ValueError):
    """Input data that cannot be used as given."""


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray | None  # None for unlabelled data

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        return Split([self.texts[i] for i in idx], None if self.labels is None else self.labels[idx])


# -- locating and reading sources ---------------------------------------------------------------------------------
def default_data_dir() -> Path | None:
    """$BUDGETLORA_DATA, else ../shared/data/ag_news beside the working directory or this checkout."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for root in [Path.cwd(), *here.parents]:
        cand = root.parent / "shared" / "data" / "ag_news"
        if cand.is_dir():
            return cand
    return None


def _find_in_dir(folder: Path, split: str) -> Path:
    for ext in (".csv.gz", ".csv", ".parquet", ".pkl"):
        p = folder / f"{split}{ext}"
        if p.is_file():
            return p
    raise DataError(f"no {split}.csv(.gz)/.parquet/.pkl in {folder}")


def resolve_source(source: str, split: str) -> str:
    if source:
        p = Path(source)
        return str(_find_in_dir(p, split)) if p.is_dir() else source
    folder = default_data_dir()
    if folder is not None:
        return str(_find_in_dir(folder, split))
    return HUB_DEFAULT


def _looks_like_file(source: str) -> bool:
    """A known file extension or an existing path; anything else (e.g. 'ag_news', 'org/name') is a hub dataset."""
    return source.endswith((".csv", ".csv.gz", ".parquet", ".pkl", ".pickle")) or Path(source).exists()


def read_table(source: str, split: str = "train"):
    """Read a source into a pandas DataFrame (no validation yet)."""
    import pandas as pd

    if not _looks_like_file(source):
        return _read_hub(source, split)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if source.endswith((".pkl", ".pickle")):
            with open(path, "rb") as f:
                obj = pickle.load(f)
            return obj.to_pandas() if hasattr(obj, "to_pandas") else pd.DataFrame(obj)
        if source.endswith(".parquet"):
            return pd.read_parquet(path)
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot be read ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
    return _maybe_original_agnews(df, path)


def _maybe_original_agnews(df, path):
    """The original AG News CSVs have no header: class index 1-4, title, description."""
    import pandas as pd

    cols = list(df.columns)
    if len(cols) == 3 and str(cols[0]).strip() in ("1", "2", "3", "4"):
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
        if raw[0].str.strip().isin(["1", "2", "3", "4"]).all():
            text = (raw[1].str.strip() + " " + raw[2].str.strip()).str.strip()
            return pd.DataFrame({"text": text, "label": raw[0].astype(int) - 1})
    return df


def _read_hub(name: str, split: str):
    try:
        import datasets

        return datasets.load_dataset(name, split=split).to_pandas()
    except Exception as e:
        raise DataError(f"cannot load hub dataset {name!r} split {split!r}: {str(e).splitlines()[0][:200]} "
                        "(offline? pass a local file with --data.train / --data.test)") from None


def to_split(df, source: str, text_column: str, label_column: str, num_labels: int | None,
             labelled: bool = True) -> Split:
    """Validate a table: text column present, texts non-empty, labels integers in [0, num_labels)."""
    if text_column not in df.columns:
        raise DataError(f"{source}: no {text_column!r} column (columns: {', '.join(map(str, df.columns))})")
    texts = df[text_column].astype(str).tolist()
    empty = [i for i, t in enumerate(texts) if not t.strip() or t == "nan"]
    if empty:
        raise DataError(f"{source}: {len(empty)} empty text(s), first at row {empty[0]}")
    if not labelled:
        return Split(texts, None)
    if label_column not in df.columns:
        raise DataError(f"{source}: no {label_column!r} column (columns: {', '.join(map(str, df.columns))})")
    raw = df[label_column]
    try:
        as_float = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in raw if not str(v).strip().lstrip("-").isdigit())
        raise DataError(f"{source}: label {bad!r} is not an integer") from None
    if np.isnan(as_float).any() or (as_float != np.round(as_float)).any():
        raise DataError(f"{source}: labels must be integers")
    labels = as_float.astype(np.int64)
    if num_labels is not None:
        out = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if len(out):
            raise DataError(f"{source}: label {labels[out[0]]} at row {out[0]} is outside 0..{num_labels - 1} "
                            f"({len(out)} such rows; is model.num_labels right?)")
    return Split(texts, labels)


def load_split(source: str, split: str, data_cfg, num_labels: int | None, labelled: bool = True) -> Split:
    resolved = resolve_source(source, split)
    df = read_table(resolved, split)
    return to_split(df, resolved, data_cfg.text_column, data_cfg.label_column, num_labels, labelled)


# -- splits ---------------------------------------------------------------------------------------------------------
def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of n rows keeping class shares (sorted, so row order is kept)."""
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.floor(counts / counts.sum() * n).astype(int)
    for i in np.argsort(-(counts / counts.sum() * n - take))[: n - take.sum()]:  # largest remainders
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def train_val_split(data: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    val_idx = stratified_indices(data.labels, max(1, round(len(data) * val_fraction)), seed)
    mask = np.ones(len(data), dtype=bool)
    mask[val_idx] = False
    return data.subset(np.flatnonzero(mask)), data.subset(val_idx)


def load_data(cfg) -> dict[str, Split]:
    """train / val / test splits for a config. Val is held out from train; test is only ever reported."""
    d, seed = cfg.data, cfg.train.seed
    full = load_split(d.train, "train", d, cfg.model.num_labels)
    if d.train_limit:  # limit first so that a small run also gets a small validation set
        full = full.subset(stratified_indices(full.labels, d.train_limit, seed))
    if len(full) < 2 * cfg.model.num_labels:
        raise DataError(f"too few training rows ({len(full)}) for {cfg.model.num_labels} classes")
    train, val = train_val_split(full, d.val_fraction, seed)
    test = load_split(d.test, "test", d, cfg.model.num_labels)
    if d.test_limit:
        test = test.subset(stratified_indices(test.labels, d.test_limit, seed))
    return {"train": train, "val": val, "test": test}


# -- tokens and batches ---------------------------------------------------------------------------------------------
def encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids without padding: padding happens per batch, to the batch's own longest row."""
    return tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]


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


def sorted_batches(lengths, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches: longest first, so the padding is minimal and memory peaks early."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(ids: list[list[int]], rows, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, i in enumerate(rows):
        n = len(ids[i])
        input_ids[j, :n] = torch.tensor(ids[i])
        mask[j, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
