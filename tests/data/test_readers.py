"""Files from outside: a pickle never runs code, the competition pickle still loads, and every reader ends in a
valid Split or one DataError naming the file, whatever bytes it is handed (property-based, with hypothesis)."""
from __future__ import annotations

import csv
import gzip
import io
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from budgetlora.cli import main
from budgetlora.config import Config
from budgetlora.data.readers import DataError, load_data, load_split

CFG = Config()
KAGGLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "agnews_kaggle" / "test_unlabelled.pkl"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Touch:
    """A pickle whose loading would create a file (what `os.system` or any callable could do instead)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


class Shell:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload", [Touch, Shell])
def test_a_pickle_that_runs_code_is_refused(tmp_path, payload):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"text": ["a"], "x": payload(str(target))}))
    with pytest.raises(DataError) as e:
        load_split(str(evil), "test", CFG.data, 4, labelled=False)
    assert not target.exists(), "the pickle's code ran"
    msg = str(e.value)
    assert str(evil) in msg and "refused to load" in msg
    assert ("pathlib" in msg and "touch" in msg) or "system" in msg  # names the refused global


def test_predict_refuses_an_evil_pickle_on_the_command_line(tmp_path, tiny_run, capsys):
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Shell(str(target))))
    assert main(["predict", str(tiny_run), "--input", str(evil), "--output", str(tmp_path / "out.csv")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("budgetlora: error: ")]  # the rest: progress bars
    assert len(errors) == 1 and "refused to load" in errors[0] and str(evil) in errors[0] and "Traceback" not in err
    assert not target.exists() and not (tmp_path / "out.csv").exists()


def test_the_competition_pickle_still_loads():
    assert KAGGLE.is_file(), f"shipped competition file missing: {KAGGLE}"
    s = load_split(str(KAGGLE), "test", CFG.data, 4, labelled=False)
    assert len(s) == 8000 and s.labels is None and all(t.strip() for t in s.texts)
    with open(KAGGLE, "rb") as f:  # the same texts plain pickle gives (read here only because we ship the file)
        assert s.texts == pickle.load(f)["text"]


def test_pickled_dataframe_and_dataset_of_every_protocol_load(tmp_path):
    import datasets

    df = pd.DataFrame({"text": ["a b", "c d"], "label": [0, 3]})
    for proto in (2, 3, 4, 5):
        for name, obj in (("df", df), ("ds", datasets.Dataset.from_pandas(df))):
            p = tmp_path / f"{name}{proto}.pkl"
            p.write_bytes(pickle.dumps(obj, protocol=proto))
            s = load_split(str(p), "train", CFG.data, 4)
            assert s.texts == ["a b", "c d"] and s.labels.tolist() == [0, 3], (name, proto)


def test_zero_rows_is_a_clear_error(tmp_path, tiny_run, capsys):
    """A header-only file is refused for training and for prediction alike (no empty submission is written)."""
    p = tmp_path / "empty.csv"
    p.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_split(str(p), "train", CFG.data, 4)
    out = tmp_path / "sub.csv"
    assert main(["predict", str(tiny_run), "--input", str(p), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"budgetlora: error: {p}: no rows" in err and "Traceback" not in err and not out.exists()
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_split(str(tmp_path / "blank.csv"), "train", CFG.data, 4)


def test_unbalanced_quote_says_rows_read_and_lines(tmp_path):
    rows = [f"headline number {i},{i % 4}" for i in range(40)]
    rows[3] = '"' + rows[3]  # opened here ...
    rows[36] = rows[36].replace("number", 'num"ber')  # ... and closed far below
    p = tmp_path / "train.csv"
    p.write_text("text,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as e:
        load_split(str(p), "train", CFG.data, 4)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "7 row(s) read from 41 lines" in msg and "unbalanced quote" in msg
    cfg = CFG.replace(**{"data.train": str(p), "data.test": str(p)})
    with pytest.raises(DataError, match="unbalanced quote"):
        load_data(cfg)
    never_closed = tmp_path / "open.csv"
    never_closed.write_text("text,label\nfine,1\n\"open,2\nmore,3\n")
    with pytest.raises(DataError, match=r"opened in row 2 is never closed.*4 lines"):
        load_split(str(never_closed), "train", CFG.data, 4)


def test_legitimate_multiline_text_still_reads(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text('text,label\n"first line\nsecond line\nthird line",1\nother,2\n')
    assert load_split(str(p), "train", CFG.data, 4).texts == ["first line\nsecond line\nthird line", "other"]


def test_not_utf8_names_the_byte(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\ncafé,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text.*0xe9"):
        load_split(str(p), "train", CFG.data, 4)


# -- property-based: any bytes, any CSV shape ---------------------------------------------------------------------
def _check(path: Path, labelled: bool) -> None:
    """The contract: a valid Split, or a DataError whose message names the file. Anything else fails the test."""
    try:
        s = load_split(str(path), "train", CFG.data, 4, labelled=labelled)
    except DataError as e:
        event(f"DataError: {str(e)[len(str(path)):][:24]}")
        shutil.rmtree(path.parent)
        assert str(path) in str(e), f"error does not name the file: {e}"
        assert "\n" not in str(e).strip() or "runs over" in str(e), f"not one line: {e!r}"
        return
    event("valid split")
    shutil.rmtree(path.parent)
    assert len(s) >= 1 and all(isinstance(t, str) and t.strip() for t in s.texts)
    if labelled:
        assert s.labels is not None and len(s.labels) == len(s) and s.labels.dtype == np.int64
        assert ((s.labels >= 0) & (s.labels < 4)).all()


def _write(data: bytes, suffix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    path = folder / f"input{suffix}"
    path.write_bytes(data)
    return path


HEADER_NAMES = st.sampled_from(["text", "label", "Text", "id", "", "text", "label", "a,b", 'q"t', "0"])
CELL = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["0", "1", "3", "4", "-1", "1.0", "1.5", "nan", "", " ", "1e400", "²", '"', '""', "\n", "\r\n",
                     "a,b", "x" * 200_000]),  # the last: one huge field
    st.integers(-5, 10).map(str),
)


@st.composite
def csv_bytes(draw) -> bytes:
    cols = draw(st.one_of(st.just(["text", "label"]), st.lists(HEADER_NAMES, min_size=1, max_size=4)))
    good_row = st.tuples(st.text(min_size=1, max_size=30), st.integers(0, 3).map(str)).map(list)
    rows = draw(st.lists(st.one_of(good_row, st.lists(CELL, min_size=0, max_size=5)),  # ragged rows too
                         max_size=12))  # zero rows too
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC, csv.QUOTE_NONE]))
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=quoting, escapechar="\\", lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    try:
        writer.writerow(cols)
        writer.writerows(rows)
        text = buf.getvalue()
    except csv.Error:  # QUOTE_NONE with an empty field: csv refuses it, so build the lines by hand
        text = "\n".join(",".join(r) for r in [cols, *rows]) + "\n"
    if draw(st.integers(0, 3)) == 0:  # damage: add a quote somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + '"' + text[at:]
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    return text.encode(encoding, errors="replace")


@FUZZ
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".csv", ".csv.gz", ".parquet", ".pkl"]),
       labelled=st.booleans())
def test_random_bytes_never_crash_a_reader(data, suffix, labelled):
    _check(_write(data, suffix), labelled)


@FUZZ
@given(data=st.binary(max_size=2000), labelled=st.booleans())
def test_random_bytes_inside_gzip_never_crash(data, labelled):
    _check(_write(gzip.compress(data), ".csv.gz"), labelled)


@FUZZ
@given(data=csv_bytes(), gz=st.booleans(), labelled=st.booleans())
def test_random_csv_shapes_encodings_and_quoting(data, gz, labelled):
    _check(_write(gzip.compress(data) if gz else data, ".csv.gz" if gz else ".csv"), labelled)


SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40) \
    .filter(lambda t: t.strip() and t != "nan")


@FUZZ
@given(rows=st.lists(st.tuples(SAFE_TEXT, st.integers(0, 3)), min_size=1, max_size=15),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
def test_well_formed_csv_round_trips(rows, quoting):
    """Any single-line texts (commas, quotes, any script) written by a CSV writer come back exactly."""
    buf = io.StringIO()
    w = csv.writer(buf, quoting=quoting, lineterminator="\n")
    w.writerow(["text", "label"])
    w.writerows(rows)
    path = _write(buf.getvalue().encode("utf-8"), ".csv")
    s = load_split(str(path), "train", CFG.data, 4)
    shutil.rmtree(path.parent)
    assert s.texts == [t for t, _ in rows] and s.labels.tolist() == [y for _, y in rows]


COLUMN = st.one_of(
    st.lists(st.one_of(st.text(max_size=20), st.none()), min_size=0, max_size=8),
    st.lists(st.one_of(st.integers(-3, 10), st.none()), min_size=0, max_size=8),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=8),
    st.lists(st.binary(max_size=10), min_size=0, max_size=8),
)


@FUZZ
@given(text=COLUMN, label=COLUMN, names=st.tuples(HEADER_NAMES, HEADER_NAMES), labelled=st.booleans(),
       kind=st.sampled_from([".parquet", ".pkl-df", ".pkl-ds", ".pkl-dict"]))
def test_random_tables_in_parquet_and_pickles(text, label, names, labelled, kind):
    n = min(len(text), len(label))
    table = {names[0]: text[:n]}
    if names[1] != names[0]:
        table[names[1]] = label[:n]
    df = pd.DataFrame(table)
    buf = io.BytesIO()
    if kind == ".parquet":
        try:
            df.to_parquet(buf)
        except Exception:  # a column pyarrow cannot type (mixed objects) is not a file anyone could hand us
            return
    elif kind == ".pkl-ds":
        import datasets

        try:
            obj = datasets.Dataset.from_pandas(df, preserve_index=False)
        except Exception:
            return
        pickle.dump(obj, buf)
    else:
        pickle.dump(df if kind == ".pkl-df" else table, buf)
    _check(_write(buf.getvalue(), ".parquet" if kind == ".parquet" else ".pkl"), labelled)


@FUZZ
@given(obj=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
                                  st.binary(max_size=10)),
                        lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                                                st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                        max_leaves=12),
       labelled=st.booleans())
def test_random_plain_pickles(obj, labelled):
    _check(_write(pickle.dumps(obj), ".pkl"), labelled)


MULTI = Config().replace(**{"model.problem_type": "multi", "model.num_labels": 3, "data.label_columns": "a,b,c"})
LABEL_CELL = st.one_of(CELL, st.sampled_from(["0", "1", "0.0", "1.0", "true", "False", " 1 ", "2", "yes"]),
                       st.booleans().map(str))


@FUZZ
@given(rows=st.lists(st.tuples(st.text(min_size=1, max_size=20), LABEL_CELL, LABEL_CELL, LABEL_CELL), max_size=8),
       columns=st.sampled_from([["text", "a", "b", "c"], ["text", "a", "b"], ["text", "c", "b", "a"],
                                ["text", "a", "a", "c"]]),
       delimited=st.booleans())
def test_label_columns_and_label_sets_give_a_matrix_or_one_line(rows, columns, delimited):
    """One 0/1 column per label, or label ids joined by ';' in one column: a 0/1 matrix with a label in every row,
    or one DataError line naming the file."""
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    path = folder / "input.csv"
    if delimited:  # the same cells joined as one label-set column
        pd.DataFrame([(t, ";".join(c)) for t, *c in rows], columns=["text", "label"]).to_csv(path, index=False)
        data_cfg = Config().replace(**{"model.problem_type": "multi", "model.num_labels": 3}).data
    else:
        pd.DataFrame([r[:len(columns)] for r in rows], columns=columns).to_csv(path, index=False)
        data_cfg = MULTI.data
    try:
        s = load_split(str(path), "train", data_cfg, 3, multi=True)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e).strip(), repr(e)
        return
    finally:
        shutil.rmtree(folder)
    assert s.labels.shape == (len(s), 3) and set(np.unique(s.labels)) <= {0, 1}
    assert (s.labels.sum(axis=1) >= 1).all()
