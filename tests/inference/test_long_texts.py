"""Texts longer than the model reads (`long_texts`): "truncate" reads a text's start, "chunk" reads all of it as
overlapping windows whose logits the task pools (single-label: their mean; multi-label: the largest per label).
A text within the window is read exactly as truncation reads it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import budgetlora
from budgetlora.cli import main
from budgetlora.data.tokens import encode, windows
from budgetlora.errors import ConfigError
from budgetlora.inference.load import STRIDE_SHARE, load_run
from budgetlora.tasks import TASKS
from budgetlora.training.evaluate import logits_for_ids


@pytest.fixture(scope="module")
def tokenizer():
    from budgetlora.adapters.model import load_tokenizer
    from budgetlora.config import Config

    return load_tokenizer(Config())


def test_windows_cover_a_long_text_with_overlap_and_leave_a_short_one_as_it_is(tokenizer):
    short, long = "Stocks rallied as oil fell.", " ".join(f"word{i}" for i in range(200))
    ids, owner = windows(tokenizer, [short, long, short], 32, 8)
    assert owner.tolist()[0] == 0 and owner.tolist()[-1] == 2 and set(owner.tolist()) == {0, 1, 2}
    assert ids[0] == encode(tokenizer, [short], 32)[0] == ids[-1]  # one window, the ids truncation gives
    parts = [w for w, o in zip(ids, owner) if o == 1]
    assert len(parts) > 5 and all(len(w) <= 32 for w in parts)
    inner = [w[1:-1] for w in parts]  # without [CLS] / [SEP]
    for a, b in zip(inner, inner[1:]):
        assert a[-8:] == b[:8]  # each window repeats the last `stride` tokens of the one before
    whole = encode(tokenizer, [long], 10_000)[0][1:-1]
    assert inner[0] + [t for w in inner[1:] for t in w[8:]] == whole  # together they read the whole text


def test_the_task_pools_the_windows():
    logits = np.array([[1.0, 0.0], [3.0, -2.0], [0.0, 5.0]], dtype=np.float32)
    owner = np.array([0, 0, 1])
    np.testing.assert_allclose(TASKS["single"].pool(logits, owner, 2), [[2.0, -1.0], [0.0, 5.0]])
    np.testing.assert_allclose(TASKS["multi"].pool(logits, owner, 2), [[3.0, 0.0], [0.0, 5.0]])


@pytest.mark.slow
def test_chunk_reads_a_long_text_whole_and_a_short_one_as_truncation_does(tiny_run):
    loaded = load_run(tiny_run)
    ml = loaded.cfg.model.max_length
    texts = pd.read_csv(loaded.cfg.data.test)["text"].head(12).tolist()
    long = [" ".join(texts[i:i + 4]) for i in range(0, 12, 4)]
    short = [t for t in texts if len(encode(loaded.tokenizer, [t], 10_000)[0]) <= ml][:3]
    assert short and all(len(encode(loaded.tokenizer, [t], 10_000)[0]) > 2 * ml for t in long)
    plain = loaded.logits(short + long, exact=True)
    loaded.long_texts = "chunk"
    chunked = loaded.logits(short + long, exact=True)
    np.testing.assert_allclose(chunked[: len(short)], plain[: len(short)], atol=1e-4)
    assert np.abs(chunked[len(short):] - plain[len(short):]).max() > 1e-3  # the rest of a long text counts
    ids, owner = windows(loaded.tokenizer, long, ml, ml // STRIDE_SHARE)
    each = logits_for_ids(loaded.model, ids, 1, loaded.tokenizer.pad_token_id)  # one window at a time
    expected = np.stack([each[owner == i].mean(axis=0) for i in range(len(long))])
    np.testing.assert_allclose(chunked[len(short):], expected, atol=1e-4)


@pytest.mark.slow
def test_predict_evaluate_and_load_take_chunk(tiny_run, tmp_path, capsys):
    texts = pd.read_csv(load_run(tiny_run, verify=False).cfg.data.test)["text"].head(8).tolist()
    source = tmp_path / "long.csv"
    pd.DataFrame({"text": [" ".join(texts[i:i + 4]) for i in range(0, 8, 2)], "label": [0, 1, 2, 3]}).to_csv(
        source, index=False)
    out = tmp_path / "out.csv"
    assert main(["predict", str(tiny_run), "--input", str(source), "--output", str(out), "--long-texts", "chunk"]) == 0
    clf = budgetlora.load(tiny_run, long_texts="chunk")
    written = pd.read_csv(out)["Label"].tolist()
    assert written == clf.predict(pd.read_csv(source)["text"].tolist())
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), "--input", str(source), "--long-texts", "chunk"]) == 0
    assert '"n": 4' in capsys.readouterr().out


def test_chunk_is_refused_where_it_cannot_apply(tiny_run_config_only, tmp_path, capsys):
    run = tiny_run_config_only
    out = tmp_path / "out.csv"
    assert main(["predict", str(run), "--input", "t.csv", "--output", str(out), "--long-texts", "chunk",
                 "--prior-correction", "on"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--long-texts chunk does not combine with --prior-correction" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="long_texts must be one of truncate, chunk"):
        budgetlora.load(run, long_texts="windows")


@pytest.fixture
def tiny_run_config_only(tmp_path):
    from budgetlora import runs
    from budgetlora.config import Config

    run = tmp_path / "run"
    run.mkdir()
    (run / runs.CONFIG).write_text(Config().to_yaml())
    return run
