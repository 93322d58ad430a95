"""The loop's GPU hygiene, checked on a CPU: bucketed widths change no logit, batches are slices of one matrix, and
the loss is read from the device only at logging points."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from budgetlora.data.tokens import WIDTH_LADDER, Tokens, padded_width
from budgetlora.inference.load import load_run
from budgetlora.training.evaluate import logits_for_ids
from budgetlora.training.train import train
from tests.conftest import tiny_config


def test_bucketed_widths_are_few_and_bounded():
    widths = {padded_width(n, "buckets", 128) for n in range(1, 129)}
    assert widths <= set(WIDTH_LADDER) | {128} and len(widths) <= 7
    for n in range(1, 129):
        w = padded_width(n, "buckets", 128)
        assert n <= w <= max(16, 1.5 * n) and w <= 128
        assert padded_width(n, "longest", 128) == n


def test_tokens_batch_pads_and_masks():
    ids = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    tokens = Tokens(ids, pad_id=0)
    b = tokens.batch([2, 0], "longest")
    assert b["input_ids"].tolist() == [[9, 10, 11, 12, 13], [5, 6, 7, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    b = tokens.batch([1], "buckets", max_length=64)
    assert b["input_ids"].shape == (1, 16) and b["attention_mask"].sum() == 1


def test_bucketed_padding_changes_no_prediction(tiny_run):
    loaded = load_run(tiny_run, verify=False)
    texts = ["Stocks fell.", "The striker scored twice in the final minutes of a tense derby.", "New chip."] * 5
    ids = loaded.tokenizer(texts, truncation=True, max_length=32)["input_ids"]
    pad = loaded.tokenizer.pad_token_id
    longest = logits_for_ids(loaded.model, ids, 4, pad, padding="longest")
    buckets = logits_for_ids(loaded.model, ids, 4, pad, padding="buckets")
    np.testing.assert_allclose(buckets, longest, atol=1e-5)


@pytest.mark.slow
def test_loop_reads_the_loss_only_at_logging_points(small_csvs, tmp_path, monkeypatch):
    """20 steps logged every 2: the loop itself moves a value from the device to the host once per logging point
    (the optimizer's own reads are the library's business and differ between CPU and GPU kernels)."""
    import budgetlora.training.loop as loop_module

    reads = {"n": 0}
    original = torch.Tensor.__float__

    def counted(self):
        if sys._getframe(1).f_code.co_filename == loop_module.__file__:
            reads["n"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counted)
    records, steps = [], []
    cfg = tiny_config(small_csvs, **{"train.max_steps": 20, "train.eval_every": 20, "train.padding": "buckets"})
    train(cfg, root=tmp_path, on_record=records.append, on_step=lambda state, rows: steps.append(
        (state.step, list(rows))))
    logged = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in logged] == list(range(2, 21, 2))
    assert reads["n"] == len(logged)
    # on_step: once after every step, with that step's batch; 20 steps stay inside one epoch (23 batches of 360
    # rows), which never repeats a row
    assert [s for s, _ in steps] == list(range(1, 21))
    rows = [r for _, batch in steps for r in batch]
    assert all(0 < len(batch) <= 16 for _, batch in steps) and len(set(rows)) == len(rows) >= 300


def test_max_time_ends_training_on_time_validated_where_it_stops(small_csvs, tmp_path, monkeypatch):
    """train.max_time: the step that reaches it is the last; validation runs there, and the run finishes as usual
    (its answers on validation kept for choosing between runs)."""
    from budgetlora import runs
    from budgetlora.training import loop as loop_module

    now = {"t": 1000.0}

    def fake_time():  # every call a tenth of a second later: 6 s of training reached within the first steps
        now["t"] += 0.1
        return now["t"]

    monkeypatch.setattr(loop_module.time, "time", fake_time)
    cfg = tiny_config(small_csvs, **{"train.max_steps": 200, "train.eval_every": 100, "train.max_time": 6.0})
    records = []
    out = train(cfg, root=tmp_path, on_record=records.append)
    m = runs.read_json(out / runs.METRICS)
    assert 0 < m["steps"] < 200, m["steps"]
    assert [r["step"] for r in records if "val_loss" in r] == [m["steps"]]  # validated once, where it stopped
    table = np.loadtxt(out / runs.VAL_PREDICTIONS, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    assert table.shape == (40, 3) and set(table[:, 1]) <= {0, 1, 2, 3}
    # and their calibrated probabilities, what an ensemble of runs is judged on: the same rows, the same answers
    from budgetlora.experiments.tune_ensemble import read_probabilities

    rows, probs = read_probabilities(out)
    table = table[np.argsort(table[:, 0])]
    assert np.array_equal(rows, table[:, 0]) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert np.array_equal(probs.argmax(1), table[:, 2])


@pytest.mark.parametrize("loss", [{}, {"train.class_weights": "auto"}, {"train.class_weights": "auto", "train.loss": "focal"},
                                  {"train.label_smoothing": 0.1}])
def test_micro_batches_make_the_whole_batchs_step(loss):
    """train.micro_batch: the same update as the whole batch at once, weighted losses included, and the same run id
    (it changes only how much memory a step holds)."""
    from types import SimpleNamespace

    from budgetlora.config import Config
    from budgetlora.training import loop

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(8, 4)

        def forward(self, x):
            return SimpleNamespace(logits=self.lin(x))

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 8, generator=gen), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 3, 3])
    steps = {}
    for micro in (0, 3):
        cfg = Config().replace(**{"train.precision": "fp32", "train.micro_batch": micro, **loss})
        fit = loop.setup_training(loop.make_accelerator(cfg.train), Toy(), cfg, 10, y.numpy())
        reported = loop.train_step(fit, {"x": x}, y, grad_clip=0.5, micro_batch=micro)
        steps[micro] = (float(reported), fit.module.lin.weight.detach().clone(), cfg.run_id)
    assert steps[3][0] == pytest.approx(steps[0][0], rel=1e-6)
    torch.testing.assert_close(steps[3][1], steps[0][1], rtol=1e-5, atol=1e-7)
    assert steps[3][2] == steps[0][2]
    assert not torch.equal(steps[0][1], Toy().lin.weight)  # a step was taken
