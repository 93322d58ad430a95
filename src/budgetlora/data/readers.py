"""Data: sources → validated (texts, labels) → seeded stratified splits → token ids → length-grouped batches.

Sources: a hub dataset name (needs internet), a local .csv/.csv.gz/.parquet with text,label columns, the original
AG News CSV layout (no header; class 1-4, title, description), a pickled `datasets.Dataset` or DataFrame, or a
folder holding train/test files. With no source given, the shipped AG News copy is used when it can be found.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlora.data import safepickle
from budgetlora.errors import DataError  # noqa: F401 (raised here; importable from here)
from budgetlora.tasks import task_of

DATA_ENV = "BUDGETLORA_DATA"
HUB_DEFAULT = "ag_news"
TEST_SAMPLE_SEED = 0  # data.test_limit draws the same test rows whatever train.seed is


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray | None  # None for unlabelled data
    rows: np.ndarray | None = None  # each text's row in its source file, once a subset was taken (None: all, in order)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        rows = idx if self.rows is None else self.rows[idx]
        return Split([self.texts[i] for i in idx], None if self.labels is None else self.labels[idx], rows)

    def source_rows(self) -> np.ndarray:
        return np.arange(len(self)) if self.rows is None else self.rows


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
    """Read a source into a pandas DataFrame (no validation yet). A file that cannot be read, for whatever reason
    its bytes give, is one DataError naming it: these files come from outside and are never trusted."""
    import pandas as pd

    if not _looks_like_file(source):
        return _read_hub(source, split)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if source.endswith((".pkl", ".pickle")):
            return _read_pickle(path)
        if source.endswith(".parquet"):
            return pd.read_parquet(path)
        return _maybe_original_agnews(_read_csv(path), path)
    except DataError:
        raise
    except safepickle.RefusedGlobal as e:
        raise DataError(f"{path}: not loaded: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (it holds the byte 0x{e.object[e.start]:02x}); "
                        "save it as UTF-8") from None
    except RecursionError:
        raise DataError(f"{path}: cannot be read (nested too deeply)") from None
    except Exception as e:  # parsers of untrusted bytes raise many kinds (ArrowInvalid, zlib.error, ParserError...)
        raise DataError(f"{path}: cannot be read ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0][:200]}" if text else e.__class__.__name__


def _read_pickle(path: Path):
    """A pickled datasets.Dataset, DataFrame, dict of columns or list of rows; loaded through the allow-list."""
    import pandas as pd

    with open(path, "rb") as f:
        obj = safepickle.restricted_load(f)
    if hasattr(obj, "to_pandas"):
        obj = obj.to_pandas()
    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, (dict, list)):
        with warnings.catch_warnings():  # ragged rows: pandas pads them now and will refuse them later; both fine
            warnings.simplefilter("ignore")
            return pd.DataFrame(obj)
    raise DataError(f"{path}: holds a {type(obj).__name__}, not a table (a datasets.Dataset, DataFrame, dict of "
                    "columns or list of rows)")


def _read_csv(path: Path):
    import pandas as pd

    with open(path, "rb") as f:
        head = f.read(4)
    # a UTF-16 file (what some spreadsheet programs save) says so in its first bytes; UTF-8 is read as such
    encoding = "utf-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8"
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file (no header, no rows)") from None
    except pd.errors.ParserError as e:
        m = re.search(r"EOF inside string starting at row (\d+)", str(e))
        if m:
            raise DataError(f"{path}: cannot be read: a quote (\") opened in row {m.group(1)} is never closed, so "
                            f"the rest of its {_count_lines(path, encoding):,} lines would be one field; 0 rows "
                            "read") from None
        raise
    _check_swallowed(df, path, encoding)
    return df


def _count_lines(path: Path, encoding: str) -> int:
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding=encoding, errors="replace", newline="") as f:
        return sum(1 for _ in f)


def _check_swallowed(df, path: Path, encoding: str) -> None:
    """A stray quote that is closed far below makes one field of many lines and the file 'reads' fine with a
    handful of rows. Legitimate texts can span lines, so only a field that swallowed at least half of the file,
    most of its lines looking like CSV rows themselves, is treated as the symptom of an unbalanced quote."""
    worst, where = 0, (0, 0)
    for j in range(df.shape[1]):
        counts = df.iloc[:, j].astype(str).str.count("\n").to_numpy()
        if len(counts) and counts.max() > worst:
            worst, where = int(counts.max()), (int(counts.argmax()), j)
    if worst < 2:
        return
    lines = _count_lines(path, encoding)
    inner = str(df.iat[where]).split("\n")[1:]
    rowlike = sum("," in line for line in inner)
    if (worst + 1) * 2 >= lines - 1 and rowlike * 2 >= len(inner):
        column = str(df.columns[where[1]])
        raise DataError(f"{path}: {len(df):,} row(s) read from {lines:,} lines: the field in row {where[0]}, column "
                        f"{column!r}, runs over {worst + 1:,} lines, most of them rows of their own; an unbalanced "
                        "quote (\") there has swallowed them")


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


def _column(df, name: str, source: str):
    if name not in df.columns:
        cols = [repr(str(c))[:60] for c in df.columns[:20]]  # repr: a name holding a newline stays on one line
        more = f" and {len(df.columns) - 20} more" if len(df.columns) > 20 else ""
        raise DataError(f"{source}: no {name!r} column (columns: {', '.join(cols)}{more})")
    col = df[name]
    if getattr(col, "ndim", 1) != 1:
        raise DataError(f"{source}: more than one column named {name!r}")
    return col


def _as_text(v) -> str:
    """A cell as text; a missing cell (None, NaN, NA) becomes "" and is then reported as an empty text."""
    import pandas as pd

    if isinstance(v, str):
        return v
    if pd.api.types.is_scalar(v) and pd.isna(v):
        return ""
    return str(v)


def _as_int_labels(raw, source: str) -> np.ndarray:
    """Integer labels from numbers or digit strings; anything else names the first offending value."""
    try:
        as_float = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        as_float = None
    if as_float is None or as_float.ndim != 1:
        for v in raw:
            try:
                float(str(v))
            except ValueError:
                raise DataError(f"{source}: label {str(v)[:50]!r} is not an integer") from None
        raise DataError(f"{source}: labels must be integers")
    if not np.isfinite(as_float).all() or (as_float != np.round(as_float)).any() or (np.abs(as_float) > 2**53).any():
        raise DataError(f"{source}: labels must be integers")
    return as_float.astype(np.int64)


_LABEL_ID = re.compile(r"[+-]?\d+(\.0*)?")  # '2', and '2.0' as a float column writes it


def _as_label_sets(raw, source: str, num_labels: int, delimiter: str) -> np.ndarray:
    """Label sets ('1;2', or one id) as an (n, num_labels) 0/1 matrix; the first malformed, out-of-range or empty
    cell is named by its row."""
    out = np.zeros((len(raw), num_labels), dtype=np.int64)
    for i, v in enumerate(raw):
        cell = _as_text(v).strip()
        parts = [p.strip() for p in cell.split(delimiter)] if cell else []
        if not any(parts):
            raise DataError(f"{source}: row {i}: no labels (an empty label set)")
        for p in parts:
            if not _LABEL_ID.fullmatch(p):
                raise DataError(f"{source}: row {i}: label {cell[:50]!r} is not a {delimiter!r}-separated list of "
                                "integer label ids")
            k = int(float(p))
            if not 0 <= k < num_labels:
                raise DataError(f"{source}: row {i}: label id {k} is outside 0..{num_labels - 1} (is "
                                "model.num_labels right?)")
            out[i, k] = 1
    return out


# a 0/1 cell as a CSV (read as text), a parquet column (bool, int or float) or a pickle may hold it
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def _as_label_columns(df, columns, source: str) -> np.ndarray:
    """One 0/1 column per label (data.label_columns, in label-id order) as an (n, len(columns)) matrix; the first
    cell that is not 0 or 1, or the first row with no label, is named by its row and column."""
    df = df.rename(columns=str)  # a pickled table may name its columns by numbers; the config's names are text
    out = np.zeros((len(df), len(columns)), dtype=np.int64)
    for j, name in enumerate(map(str, columns)):
        col = _column(df, name, source)
        values = col.astype(str).str.strip().str.lower().map(_BINARY)
        bad = np.flatnonzero(values.isna().to_numpy())
        if len(bad):
            cell = _as_text(col.iloc[bad[0]])
            raise DataError(f"{source}: row {bad[0]}, column {name!r}: {cell[:50]!r} is not 0 or 1 "
                            f"({len(bad)} such cell(s) in this column; data.label_columns holds one 0/1 column "
                            "per label)")
        out[:, j] = values.to_numpy(dtype=np.int64)
    empty = np.flatnonzero(out.sum(axis=1) == 0)
    if len(empty):
        raise DataError(f"{source}: row {empty[0]}: no labels (every one of the columns "
                        f"{', '.join(map(repr, map(str, columns)))} is 0; {len(empty)} such row(s))")
    return out


def to_split(df, source: str, text_column: str, label_column: str, num_labels: int | None,
             labelled: bool = True, delimiter: str | None = None, label_columns=()) -> Split:
    """Validate a table: at least one row, text column present, texts non-empty, labels integers in
    [0, num_labels). A table with no rows is an error, for training and prediction alike: an empty submission or
    an empty split is never what was meant. With a `delimiter` (multi-label) the labels are label sets, read into
    an (n, num_labels) 0/1 matrix; with `label_columns` (multi-label) that matrix is read from one 0/1 column per
    label instead."""
    texts = [_as_text(v) for v in _column(df, text_column, source).tolist()]
    if not texts:
        raise DataError(f"{source}: no rows (a header only?)")
    empty = [i for i, t in enumerate(texts) if not t.strip() or t == "nan"]
    if empty:
        raise DataError(f"{source}: {len(empty)} empty text(s), first at row {empty[0]}")
    if not labelled:
        return Split(texts, None)
    if label_columns:
        return Split(texts, _as_label_columns(df, label_columns, source))
    if delimiter is not None:
        return Split(texts, _as_label_sets(_column(df, label_column, source).tolist(), source, num_labels, delimiter))
    labels = _as_int_labels(_column(df, label_column, source), source)
    if num_labels is not None:
        out = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if len(out):
            raise DataError(f"{source}: label {labels[out[0]]} at row {out[0]} is outside 0..{num_labels - 1} "
                            f"({len(out)} such rows; is model.num_labels right?)")
    return Split(texts, labels)


def load_split(source: str, split: str, data_cfg, num_labels: int | None, labelled: bool = True,
               multi: bool = False) -> Split:
    """One source as a validated split; `multi`: label sets separated by data_cfg.label_delimiter, or one 0/1
    column per label when data_cfg.label_columns names them."""
    resolved = resolve_source(source, split)
    df = read_table(resolved, split)
    return to_split(df, resolved, data_cfg.text_column, data_cfg.label_column, num_labels, labelled,
                    data_cfg.label_delimiter if multi else None, data_cfg.label_columns if multi else ())


# -- splits ---------------------------------------------------------------------------------------------------------
def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of n rows keeping class shares (sorted, so row order is kept)."""
    if n >= len(labels):
        return np.arange(len(labels))
    if np.ndim(labels) == 2:  # label sets (the multi-label task's): stratified on each row's first label id
        labels = np.asarray(labels).argmax(axis=1)
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
    multi = task_of(cfg).sets
    full = load_split(d.train, "train", d, cfg.model.num_labels, multi=multi)
    if d.train_limit:  # limit first so that a small run also gets a small validation set
        full = full.subset(stratified_indices(full.labels, d.train_limit, seed))
    if len(full) < 2 * cfg.model.num_labels:
        raise DataError(f"{resolve_source(d.train, 'train')}: too few training rows ({len(full)}) for "
                        f"{cfg.model.num_labels} classes")
    train, val = train_val_split(full, d.val_fraction, seed)
    test = load_split(d.test, "test", d, cfg.model.num_labels, multi=multi)
    if d.test_limit:  # one sample for every seed and config, so that any two runs are scored on the same rows
        test = test.subset(stratified_indices(test.labels, d.test_limit, TEST_SAMPLE_SEED))
    return {"train": train, "val": val, "test": test}
