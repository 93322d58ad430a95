"""Training: a killed run resumes to the same result, over-budget configs never start, and learning happens."""
import numpy as np
import pytest
from safetensors.torch import load_file

from budgetlora import runs
from budgetlora.adapters.budget import BudgetError
from budgetlora.config import Config
from budgetlora.training.train import train
from tests.conftest import tiny_config


class Killed(Exception):
    """Stands in for a kill: raised from the loop's step callback."""


def kill_after(step: int):
    def on_step(state, rows):
        if state.step >= step:
            raise Killed(f"killed after step {state.step}")

    return on_step


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path, small_csvs):
    cfg = tiny_config(small_csvs, **{"train.max_steps": 8, "train.eval_every": 3, "lora.dropout": 0.1})
    whole = train(cfg, root=tmp_path / "a")
    with pytest.raises(Killed, match="after step 5"):
        train(cfg, root=tmp_path / "b", on_step=kill_after(5))
    killed = tmp_path / "b" / cfg.run_id
    assert (killed / runs.CHECKPOINT / "state.pt").is_file() and not runs.is_finished(killed)
    resumed = train(cfg, root=tmp_path / "b")
    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (whole, resumed))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k].numpy(), wb[k].numpy()), k
    ma, mb = runs.read_json(whole / runs.METRICS), runs.read_json(resumed / runs.METRICS)
    assert ma["val_loss"] == mb["val_loss"] and ma["best_step"] == mb["best_step"]


@pytest.mark.slow
def test_finished_run_is_not_retrained_and_failures_keep_old_runs(tmp_path, small_csvs):
    cfg = tiny_config(small_csvs, **{"train.max_steps": 2, "train.eval_every": 2})
    out = train(cfg, root=tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert train(cfg, root=tmp_path) == out
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with pytest.raises(BudgetError):
        train(cfg.replace(**{"lora.r": 400}), root=tmp_path)
    assert not (tmp_path / cfg.replace(**{"lora.r": 400}).run_id).exists()  # refused before anything is written
    # a forced retrain of the same run id that dies part way leaves the finished run exactly as it was
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(Killed):
        train(cfg, root=tmp_path, force=True, on_step=kill_after(1))
    assert {rel: (out / rel).read_bytes() for rel in files} == files
    assert runs.is_finished(out) and train(cfg, root=tmp_path) == out


@pytest.mark.slow
def test_short_training_clearly_beats_chance(tmp_path):
    """The embedded model on 1,200 shipped training rows, one epoch: far above the 25% of chance."""
    cfg = Config().replace(**{"data.train_limit": 1200, "data.test_limit": 400, "model.max_length": 48,
                              "train.epochs": 1, "train.lr": 3e-3, "train.eval_every": 20})
    m = runs.read_json(train(cfg, root=tmp_path) / runs.METRICS)
    assert m["test_accuracy"] > 0.6, m["test_accuracy"]
    assert m["val_accuracy"] > 0.6
