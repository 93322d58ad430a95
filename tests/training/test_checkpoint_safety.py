"""Resume checkpoints load with `torch.load(weights_only=True)`: they restore every RNG stream exactly, and a
checkpoint file whose pickle would run code is refused without running it."""
from __future__ import annotations

import math
import os
import pickle
import random

import numpy as np
import pytest
import torch

from budgetlora.training.loop import TrainState, load_checkpoint, save_checkpoint


def _parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def test_checkpoint_round_trip_under_weights_only(tmp_path):
    model, optimizer, scheduler = _parts()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the python state
    state = TrainState(step=7, history=[{"val_loss": np.float64(0.5), "step": np.int64(7)}],
                       best={"weight": model.weight.detach().clone()}, elapsed=1.5, probe={"probe_steps": 3})
    path = tmp_path / "state.pt"
    save_checkpoint(path, model, optimizer, scheduler, state)
    torch.load(path, weights_only=True)  # the contract itself: no exception
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    model2, optimizer2, scheduler2 = _parts()
    with torch.no_grad():
        model2.weight.zero_()
    restored = load_checkpoint(path, model2, optimizer2, scheduler2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected  # every stream, exactly
    assert torch.equal(model2.weight, model.weight)
    assert scheduler2.last_epoch == scheduler.last_epoch == 1
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert restored.step == 7 and restored.history == [{"val_loss": 0.5, "step": 7}]
    assert restored.best_loss == math.inf and torch.equal(restored.best["weight"], model.weight)
    assert restored == TrainState(**{**state.to_dict(), "history": restored.history, "best": restored.best})


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    torch.save({"trainable": {}, "x": Payload(target)}, path)
    with pytest.raises(RuntimeError, match="not a checkpoint this version can load safely"):
        load_checkpoint(path, *_parts())
    assert not target.exists()
    path.write_bytes(pickle.dumps(Payload(target)))  # a bare pickle, not even a torch archive
    with pytest.raises(RuntimeError, match="load safely"):
        load_checkpoint(path, *_parts())
    assert not target.exists()
