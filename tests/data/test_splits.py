"""Sources, splits and every bad-input case: one clear DataError each."""
import gzip
import pickle

import numpy as np
import pandas as pd
import pytest

from budgetlora.config import Config
from budgetlora.data.readers import DataError, load_data, load_split, stratified_indices
from budgetlora.data.tokens import length_grouped_batches

CFG = Config()


def _split(path, num_labels=4, labelled=True):
    return load_split(str(path), "train", CFG.data, num_labels, labelled)


def test_original_agnews_layout(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text('"3","Wall St. Bears Claw Back","Short-sellers are seeing green again."\n'
                 '"1","Talks resume","Diplomats met on Monday."\n')
    s = _split(p)
    assert s.texts[0] == "Wall St. Bears Claw Back Short-sellers are seeing green again."
    assert s.labels.tolist() == [2, 0]


def test_csv_gz_parquet_and_pickled_dataset(tmp_path):
    df = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": [0, 3, 1]})
    with gzip.open(tmp_path / "x.csv.gz", "wt") as f:
        df.to_csv(f, index=False)
    df.to_parquet(tmp_path / "x.parquet")
    import datasets

    with open(tmp_path / "x.pkl", "wb") as f:
        pickle.dump(datasets.Dataset.from_pandas(df[["text"]]), f)
    assert _split(tmp_path / "x.csv.gz").labels.tolist() == [0, 3, 1]
    assert _split(tmp_path / "x.parquet").texts == ["a b", "c d", "e f"]
    unl = _split(tmp_path / "x.pkl", labelled=False)
    assert unl.labels is None and unl.texts == ["a b", "c d", "e f"]


@pytest.mark.parametrize("content,message", [
    ("text,label\nhello,0\nworld,4\n", "outside 0..3"),
    ("text,label\nhello,0\nworld,-1\n", "outside 0..3"),
    ("text,label\nhello,0\nworld,x\n", "not an integer"),
    ("text,label\nhello,0\nworld,1.5\n", "integers"),
    ("text,label\nhello,0\n  ,1\n", "empty text"),
    ("text,label\nhello,0\nworld,\n", "not an integer"),
    ("body,label\nhello,0\n", "no 'text' column"),
    ("text,target\nhello,0\n", "no 'label' column"),
    ('text,label\n"unterminated,0\nx,1\n', "cannot be read|no 'label'|not an integer|empty"),
])
def test_bad_csv(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        _split(p)


def test_wrong_num_labels_and_missing_file(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text,label\na,0\nb,3\n")
    with pytest.raises(DataError, match="model.num_labels"):
        _split(p, num_labels=2)
    with pytest.raises(DataError, match="not found"):
        _split(tmp_path / "missing.csv")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot be read"):
        _split(tmp_path / "junk.pkl")


def test_default_source_and_splits(agnews_dir):
    cfg = Config().replace(**{"data.train_limit": 1000, "data.test_limit": 200})
    d = load_data(cfg)
    assert len(d["train"]) + len(d["val"]) == 1000 and len(d["val"]) == 50
    per_class = np.bincount(d["val"].labels)
    assert per_class.max() - per_class.min() <= 1  # stratified
    assert np.bincount(d["test"].labels).tolist() == [50, 50, 50, 50]
    again = load_data(cfg)
    assert again["val"].texts == d["val"].texts  # seeded
    other = load_data(cfg.replace(**{"train.seed": 7}))
    assert other["val"].texts != d["val"].texts
    # every seed is scored on the same test rows, and the run can say which rows of the source they are
    assert other["test"].texts == d["test"].texts
    rows = d["test"].source_rows()
    assert len(set(rows.tolist())) == 200 and rows.max() >= 200
    full = load_data(Config().replace(**{"data.train_limit": 1000}))["test"]
    assert [full.texts[i] for i in rows[:5]] == d["test"].texts[:5]


def test_stratified_and_length_grouping():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_indices(labels, 20, seed=0)
    assert np.bincount(labels[idx]).tolist() == [12, 6, 2]
    lengths = np.random.default_rng(0).integers(5, 100, size=1000)
    batches = length_grouped_batches(lengths, 32, seed=1, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    rand = length_grouped_batches(lengths, 32, seed=1, epoch=0, group=False)
    assert padded < 0.7 * sum(len(b) * lengths[b].max() for b in rand)
    assert [b.tolist() for b in length_grouped_batches(lengths, 32, 1, 1)] != [b.tolist() for b in batches]


def test_eval_batches_cover_every_row_once_and_bound_their_tokens():
    from budgetlora.data.tokens import sorted_batches

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 128, 500), rng.integers(129, 512, 60)])
    batches = sorted_batches(lengths, 64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    widths = [lengths[b].max() for b in batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    assert all(len(b) * lengths[b].max() <= 64 * 128 or len(b) == 1 for b in batches)
    # rows up to 128 tokens fill whole batches, as before; a 256-token batch holds half as many rows
    short = sorted_batches(rng.integers(1, 129, 640), 64)
    assert [len(b) for b in short] == [64] * 10
    assert [len(b) for b in sorted_batches(np.full(100, 256), 64)] == [32, 32, 32, 4]
    assert [len(b) for b in sorted_batches(np.full(3, 100_000), 64)] == [1, 1, 1]
