"""The linear probe (LP-FT): only the head moves during it, the adapters are trainable again after it, and a run
records it; the field leaves existing run ids alone."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from budgetlora import runs
from budgetlora.adapters.model import build, load_tokenizer
from budgetlora.config import Config, ConfigError
from budgetlora.data.tokens import Tokens, encode
from budgetlora.training import loop
from budgetlora.training.probe import head_parameters, only_head_trains, probe
from tests.conftest import tiny_config


@pytest.fixture
def probe_setup(small_csvs):
    cfg = tiny_config(small_csvs, **{"train.lr": 1e-2})
    model, _ = build(cfg)
    tokenizer = load_tokenizer(cfg)
    df = pd.read_csv(small_csvs[0]).head(64)
    tokens = Tokens(encode(tokenizer, df.text.tolist(), 32), tokenizer.pad_token_id)
    inputs = loop.LoopInputs(lambda epoch: tokens, torch.as_tensor(df.label.to_numpy().copy()), None, 10, 4, 5)
    return cfg, model, inputs


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_only_the_head_moves_and_the_adapters_train_again_after(probe_setup):
    cfg, model, inputs = probe_setup
    before = _trainable(model)
    head = {n for n, _ in head_parameters(model)}
    assert head and len(head) < len(before)
    acc = loop.make_accelerator(cfg.train)
    fit = loop.Fit(acc, model, None, None, torch.nn.CrossEntropyLoss())
    info = probe(fit, cfg.train, 32, inputs, steps=6)
    after = _trainable(model)
    assert after.keys() == before.keys()  # every adapter parameter is trainable again
    for n in before:
        moved = not torch.equal(before[n], after[n])
        assert moved == (n in head), n
    assert info["probe_steps"] == 6 and info["probe_time_s"] >= 0
    assert info["probe_last_loss"] < info["probe_first_loss"]  # six steps at lr 1e-2 on a 4-class head


def test_adapters_are_restored_when_the_probe_fails(probe_setup):
    _, model, _ = probe_setup
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError):
        with only_head_trains(model):
            assert {n for n, p in model.named_parameters() if p.requires_grad} < before
            raise ValueError("boom")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before


def test_probe_steps_is_part_of_the_run_id_only_when_used():
    cfg = Config()
    assert cfg.replace(**{"train.probe_steps": 0}).run_id == cfg.run_id
    assert cfg.replace(**{"train.probe_steps": 50}).run_id != cfg.run_id
    with pytest.raises(ConfigError, match="probe_steps"):
        cfg.replace(**{"train.probe_steps": -1})


def test_a_run_records_its_probe(small_csvs, tmp_path):
    from budgetlora.training.train import train

    out = train(tiny_config(small_csvs, **{"train.probe_steps": 3, "train.max_steps": 2}), root=tmp_path)
    m = runs.read_json(out / runs.METRICS)
    assert m["probe_steps"] == 3 and m["steps"] == 2
