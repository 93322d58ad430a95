"""`budgetlora tune`: sizing the search to the time, choosing between finalists on the same validation rows, the
clock, resuming after a kill, and one refused line for an impossible budget or time. A stand-in runner (on a clock
that moves only when it trains) checks the orchestration exactly; one tiny real tune checks it end to end."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from budgetlora import runs
from budgetlora.cli import main
from budgetlora.config import Config, ConfigError
from budgetlora.experiments import timebudget, tune as tune_mod
from budgetlora.experiments.space import candidate_space
from budgetlora.experiments.tune import (ETA, FINALISTS, Speed, first_steps, ordered, paired_choice, rung_sizes,
                                         size_search, tune)
from tests.conftest import tiny_config


# -- sizing ---------------------------------------------------------------------------------------------------------
def test_rungs_narrow_by_a_third_down_to_the_finalists():
    assert rung_sizes(27) == [27, 9, 3, 2]
    assert rung_sizes(6) == [6, 2]
    assert rung_sizes(2) == [2]


@pytest.mark.parametrize("seconds", [60, 300, 1800, 7200])
def test_the_search_fits_its_time_and_more_time_buys_more(seconds):
    speed = Speed(step_s=0.3, trial_s=8.0)
    sizes, steps = size_search(54, seconds, speed, min_steps=30, max_steps=10_000)
    if not sizes:
        assert seconds == 60  # not even two candidates at 30 steps: 2 x 8 s + 2 x 30 x 0.3 s = 34 s... plus rungs
        return
    cost = sum(n * (speed.trial_s + steps * ETA ** i * speed.step_s) for i, n in enumerate(sizes))
    assert cost <= seconds and steps >= 30 and sizes[-1] <= FINALISTS
    if sizes[0] < 54:  # one more candidate would not have fit at 30 steps
        assert first_steps(rung_sizes(sizes[0] + 1), seconds, speed) < 30
    if seconds == 7200:
        small, _ = size_search(54, 1800, speed, 30, 10_000)
        assert sizes[0] > small[0]


def test_the_top_rung_never_trains_past_its_cap():
    sizes, steps = size_search(4, 10_000, Speed(0.01, 1.0), min_steps=5, max_steps=90)
    assert steps * ETA ** (len(sizes) - 1) <= 90


def test_a_prefix_of_the_space_spreads_over_methods_at_their_favoured_rates():
    space = ordered(candidate_space(Config()))
    first = space[:4]
    assert {c.name.split("-")[0] for c in first} == {"lora", "ia3", "dora", "vera"}
    assert all(c.cfg.train.lr == tune_mod.FAVOURITE_LR[c.name.split("-")[0]] for c in first)
    assert sorted(c.name for c in space) == sorted(c.name for c in candidate_space(Config()))


# -- choosing between finalists ----------------------------------------------------------------------------------
def _answers(folder: Path, gold: np.ndarray, pred: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    with open(folder / runs.VAL_PREDICTIONS, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "label", "predicted"])
        w.writerows(zip(range(len(gold)), gold.tolist(), pred.tolist()))
    return folder


def _finalist(tmp_path, name, gold, correct_share, samples_s, seed=0):
    rng = np.random.default_rng(seed)
    pred = gold.copy()
    wrong = rng.random(len(gold)) > correct_share
    pred[wrong] = (gold[wrong] + 1) % 4
    run = _answers(tmp_path / name, gold, pred)
    return {"name": name, "runs": [run], "values": [float(np.mean(pred == gold))], "samples_s": samples_s}


def test_a_clear_lead_wins_even_when_slower(tmp_path):
    gold = np.arange(2000) % 4
    a = _finalist(tmp_path, "a", gold, 0.95, samples_s=10.0, seed=1)
    b = _finalist(tmp_path, "b", gold, 0.80, samples_s=50.0, seed=2)
    choice = paired_choice([a, b], "val_accuracy", 4)
    assert choice["winner"] == "a" and choice["comparisons"]["b"]["significant"]


def test_noise_is_not_called_a_difference_and_the_cheaper_wins(tmp_path):
    gold = np.arange(2000) % 4
    a = _finalist(tmp_path, "a", gold, 0.90, samples_s=10.0, seed=1)
    b_pred = np.loadtxt(a["runs"][0] / runs.VAL_PREDICTIONS, delimiter=",", skiprows=1, dtype=int)[:, 2].copy()
    b_pred[:3] = (gold[:3] + 1) % 4  # three rows worse of 2,000: noise
    b = {"name": "b", "runs": [_answers(tmp_path / "b", gold, b_pred)], "values": [float(np.mean(b_pred == gold))],
         "samples_s": 40.0}
    choice = paired_choice([a, b], "val_accuracy", 4)
    assert choice["best"] == "a" and choice["winner"] == "b"
    assert not choice["comparisons"]["b"]["significant"] and "trains faster" in choice["why"]
    choice = paired_choice([a, b], "val_macro_f1", 4)  # the same rule on macro-F1, by a paired bootstrap
    assert choice["winner"] == "b"


def test_finalists_validated_on_other_rows_are_refused(tmp_path):
    gold = np.arange(100) % 4
    a = _finalist(tmp_path, "a", gold, 0.9, 10.0)
    b = _finalist(tmp_path, "b", gold, 0.9, 10.0)
    table = np.loadtxt(b["runs"][0] / runs.VAL_PREDICTIONS, delimiter=",", skiprows=1, dtype=int)
    table[:, 0] += 1000
    np.savetxt(b["runs"][0] / runs.VAL_PREDICTIONS, table, fmt="%d", delimiter=",", header="row,label,predicted",
               comments="")
    with pytest.raises(ConfigError, match="other rows"):
        paired_choice([a, b], "val_accuracy", 4)


# -- an ensemble of the finalists at half the budget ------------------------------------------------------------
def _member(folder: Path, gold: np.ndarray, right: np.ndarray, sure: float) -> Path:
    """A run whose calibrated validation probabilities put `sure` on gold where `right`, else on the next class."""
    pred = np.where(right, gold, (gold + 1) % 4)
    _answers(folder, gold, pred)
    sure = np.broadcast_to(np.asarray(sure, dtype=float), gold.shape)
    probs = np.repeat(((1 - sure) / 3)[:, None], 4, axis=1)
    probs[np.arange(len(gold)), pred] = sure
    with open(folder / runs.VAL_PROBABILITIES, "w") as f:
        f.write("row,p_0,p_1,p_2,p_3\n" + "".join(f"{r},{','.join(map(str, p))}\n" for r, p in enumerate(probs)))
    return folder


def test_an_ensemble_is_kept_only_when_better_than_the_winner_at_95(tmp_path):
    from budgetlora.experiments.tune_ensemble import judge

    gold = np.arange(2000) % 4
    rng = np.random.default_rng(0)
    single_right = rng.random(2000) < 0.85
    single = {"name": "w", "run": _answers(tmp_path / "w", gold, np.where(single_right, gold, (gold + 1) % 4)),
              "value": float(single_right.mean()), "samples_s": 50.0}
    # members that err on different rows, and are unsure where they err: averaged, they are right almost everywhere
    a_right, b_right = rng.random(2000) < 0.85, rng.random(2000) < 0.85
    a = _member(tmp_path / "a", gold, a_right, np.where(a_right, 0.9, 0.4))
    b = _member(tmp_path / "b", gold, b_right, np.where(b_right, 0.9, 0.4))
    kept = judge(single, [a, b], tmp_path / "o1", "val_accuracy", 4)
    assert kept["kept"] and kept["value"] > 0.95 and kept["comparisons"]["w"]["significant"]
    # members that are the single run again: no better, and costlier to answer with: the single run stays
    same = judge(single, [_member(tmp_path / "c", gold, single_right, np.full(2000, 0.8)),
                          _member(tmp_path / "d", gold, single_right, np.full(2000, 0.7))],
                 tmp_path / "o2", "val_accuracy", 4)
    assert not same["kept"] and same["value"] == pytest.approx(single["value"])
    # members validated on other rows are refused
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / runs.VAL_PROBABILITIES).write_text("row,p_0,p_1,p_2,p_3\n5000,0.25,0.25,0.25,0.25\n")
    with pytest.raises(ConfigError, match="other rows"):
        judge(single, [a, tmp_path / "e"], tmp_path / "o3", "val_accuracy", 4)


@pytest.mark.parametrize("text", ["", "row,p_0\n1,abc\n", "row,p_0,p_1\n1,nan,0.5\n", "\x00\xff", "row\n1\n"])
def test_a_malformed_probabilities_file_is_one_error(tmp_path, text):
    from budgetlora.errors import RunFolderError
    from budgetlora.experiments.tune_ensemble import read_probabilities

    (tmp_path / runs.VAL_PROBABILITIES).write_text(text)
    with pytest.raises(RunFolderError, match="missing or corrupt"):
        read_probabilities(tmp_path)


def test_half_the_budget_is_filled_for_each_member_and_their_sum_fits(small_csvs):
    from budgetlora.adapters.budget import plan
    from budgetlora.experiments.tune_ensemble import half_variants

    cfg = tiny_config(small_csvs)
    names = [c.name for c in ordered(candidate_space(cfg))[:2]]
    halves = half_variants(cfg, names, tune_mod.overrides)
    members = [cfg.replace(**v) for v in halves.values()]
    total = sum(plan(m).total for m in members)
    assert total <= cfg.budget.max_params and all(m.budget.max_params == cfg.budget.max_params for m in members)
    sized = [plan(m).total for m in members if m.method == "lora"]  # (IA)3 is as large as its targets make it
    assert sized and all(n > 0.45 * cfg.budget.max_params for n in sized)  # filled to its half, not left small
    assert half_variants(cfg, names[:1], tune_mod.overrides) is None  # one finalist: nothing to pair
    assert half_variants(cfg.replace(**{"budget.max_params": 3_000}), names, tune_mod.overrides) is None


# -- the whole command on a stand-in runner ------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTrainer:
    """Trains nothing: advances the clock by what the run would take (STEP_S a step, FIXED_S the rest, or
    train.max_time), and writes a finished run folder whose validation answers get better with the steps and
    depend on the method and rate. `kill_at`: the n-th call raises KeyboardInterrupt before writing (a kill)."""

    STEP_S, FIXED_S = 0.2, 4.0

    def __init__(self, clock: FakeClock, kill_at: int | None = None):
        self.clock, self.kill_at, self.calls, self.trained = clock, kill_at, 0, []

    def __call__(self, cfg: Config, root, on_record=None) -> Path:
        self.calls += 1
        if self.kill_at == self.calls:
            self.clock.now += 1.0
            raise KeyboardInterrupt
        out = Path(root) / cfg.run_id
        if runs.is_finished(out):
            return out
        from budgetlora.data.readers import load_data

        steps = cfg.train.max_steps
        train_s = steps * self.STEP_S
        if cfg.train.max_time and train_s > cfg.train.max_time:
            steps, train_s = int(cfg.train.max_time / self.STEP_S), cfg.train.max_time
        self.clock.now += self.FIXED_S + train_s
        self.trained.append(cfg.run_id)
        val = load_data(cfg)["val"]
        gold = np.asarray(val.labels)
        skill = {"lora": 0.8, "ia3": 0.75, "dora": 0.78, "vera": 0.7}[
            "dora" if cfg.lora.dora else cfg.method] * (1 - math.exp(-steps / 40)) + 0.01 * (cfg.train.seed % 3)
        rng = np.random.default_rng(int(cfg.run_id, 16))  # the same answers for the same config in any process
        pred = np.where(rng.random(len(gold)) < skill, gold, (gold + 1) % 4)
        out.mkdir(parents=True, exist_ok=True)
        for name in runs.ADAPTER_FILES:
            (out / name).write_bytes(b"")
        runs.write_text(out / runs.CONFIG, cfg.to_yaml())
        runs.write_text(out / runs.VAL_PREDICTIONS, "row,label,predicted\n" + "".join(
            f"{r},{g},{p}\n" for r, g, p in zip(val.source_rows().tolist(), gold.tolist(), pred.tolist())))
        probs = np.full((len(gold), 4), 0.1)
        probs[np.arange(len(gold)), pred] = 0.7
        runs.write_text(out / runs.VAL_PROBABILITIES, "row,p_0,p_1,p_2,p_3\n" + "".join(
            f"{r},{','.join(map(str, p))}\n" for r, p in zip(val.source_rows().tolist(), probs.tolist())))
        runs.write_text(out / runs.HISTORY, "step,train_loss,train_s\n" + "".join(
            f"{s},1.0,{s * self.STEP_S:.3f}\n" for s in range(2, steps + 1, 2)))
        runs.write_json(out / runs.METRICS, {"val_accuracy": float(np.mean(pred == gold)), "val_macro_f1": 0.5,
                                             "steps": steps, "train_time_s": train_s + 0.5, "val_time_s": 0.5,
                                             "wall_time_s": self.FIXED_S + train_s,
                                             "train_samples_per_s": 100.0 if cfg.method == "ia3" else 50.0})
        return out


@pytest.fixture
def fake_clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(timebudget, "clock", c)
    return c


def test_a_tune_fits_its_time_and_trains_the_winner_on_all_the_data(tmp_path, small_csvs, fake_clock):
    trainer = FakeTrainer(fake_clock)
    cfg = tiny_config(small_csvs, **{"train.max_steps": 0, "train.eval_every": 200})
    r = tune(cfg, 600, tmp_path / "t", runner=trainer)
    took = fake_clock.now - 1000.0
    assert took <= 600, took
    assert took >= 0.8 * 600 or r["final"]["steps"] == r["final"]["planned_steps"]  # time left over is only
    # what the winner had no use for: it trained as long as it would without a clock
    state = json.loads((tmp_path / "t" / "tune.json").read_text())
    plan = state["search"]
    assert plan["sizes"][0] >= 6 and plan["sizes"][-1] <= FINALISTS
    assert all(b >= a for a, b in zip(plan["steps"], plan["steps"][1:]))  # each rung trains longer
    assert state["seeds"] >= 2
    # the final run needs less than its share on this small set: what it does not need buys seeds
    assert state["final_s"] < tune_mod.SHARES["final"] * 600 and state["seeds"] == tune_mod.MAX_SEEDS
    winner = Path(r["winner_run"])
    final = Config.from_yaml(winner / runs.CONFIG)
    assert final.data.test_limit == 0 and final.data.train_limit == 0  # the whole test split, all training rows
    assert final.train.max_steps >= plan["steps"][-1] and final.train.max_time > 0
    report = (tmp_path / "t" / "report.md").read_text()
    assert r["winner"] in report and "Why the winner won" in report and "What the time bought" in report
    for c in candidate_space(cfg):  # nothing over the budget was ever tried
        assert c.trainable <= cfg.budget.max_params
    ens = state["ensemble"]  # 600 s holds the finalists' seeds and the ensemble beside them
    assert ens["trainable_params"] <= cfg.budget.max_params and len(ens["members"]) == 2
    # kept only when better at 95% on the validation rows: either way the runs served are the ones it decided on
    assert r["winner_runs"][0] == r["winner_run"] and len(r["winner_runs"]) == (2 if ens["kept"] else 1)


def test_a_kept_ensemble_trains_both_members_on_all_the_data(tmp_path, small_csvs, fake_clock, monkeypatch):
    from budgetlora.inference.ensemble import check_members

    real = tune_mod.judge

    def always(*a, **k):
        return {**real(*a, **k), "kept": True}

    monkeypatch.setattr(tune_mod, "judge", always)
    cfg = tiny_config(small_csvs, **{"train.max_steps": 0})
    r = tune(cfg, 600, tmp_path / "t", runner=FakeTrainer(fake_clock))
    assert fake_clock.now - 1000.0 <= 600 and len(r["winner_runs"]) == 2 and "@half" in r["winner"]
    members = [Config.from_yaml(Path(p) / runs.CONFIG) for p in r["winner_runs"]]
    assert all(m.data.test_limit == 0 and m.train.init_from for m in members)
    check_members(r["winner_runs"])  # together within the budget: predict, evaluate and load take them as one
    assert "The winner is an ensemble" in (tmp_path / "t" / "report.md").read_text()


def test_a_killed_tune_resumes_with_the_same_decisions(tmp_path, small_csvs, fake_clock):
    cfg = tiny_config(small_csvs, **{"train.max_steps": 0})
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, 600, tmp_path / "t", runner=FakeTrainer(fake_clock, kill_at=6))
    before = json.loads((tmp_path / "t" / "tune.json").read_text())
    fake_clock.now += 1000  # the rerun comes later: --time counts again from its start
    rerun = FakeTrainer(fake_clock)
    r = tune(cfg, 600, tmp_path / "t", runner=rerun)
    after = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert after["probe"] == before["probe"] and after["search"]["sizes"] == before["search"]["sizes"]
    assert after["search"]["steps"][0] == before["search"]["steps"][0]
    finished_before = {p.name for p in (tmp_path / "t" / "runs").iterdir() if runs.is_finished(p)} - set(rerun.trained)
    assert len(finished_before) >= 4 and not set(rerun.trained) & finished_before  # nothing trained twice
    # it ends as an uninterrupted tune does: a winner among the last rung's candidates, trained on all the data
    # (or a kept ensemble of two of them, named "A@half + B@half")
    assert all(m.split("@")[0] in after["rungs"][-1]["tried"] for m in r["winner"].split(" + "))
    assert runs.is_finished(Path(r["winner_run"]))
    assert after["final"]["trained"] and Config.from_yaml(Path(r["winner_run"]) / runs.CONFIG).data.test_limit == 0


def test_another_config_in_the_same_folder_is_refused(tmp_path, small_csvs, fake_clock):
    cfg = tiny_config(small_csvs, **{"train.max_steps": 0})
    tune(cfg, 300, tmp_path / "t", runner=FakeTrainer(fake_clock))
    with pytest.raises(ConfigError, match="another config"):
        tune(cfg.replace(**{"budget.max_params": 500_000}), 300, tmp_path / "t", runner=FakeTrainer(fake_clock))


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main(["tune", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_an_impossible_budget_or_time_is_one_line(tmp_path, small_csvs, capsys):
    train, test = small_csvs
    rc, _, err = _cli(capsys, "--data", str(train), "--data.test", str(test), "--budget", "2k", "--time", "5m",
                      "--out", str(tmp_path / "a"))
    assert rc == 2 and err.count("\n") == 1 and "no candidate fits the budget of 2,000" in err
    assert not (tmp_path / "a").exists()  # refused before anything was written
    rc, _, err = _cli(capsys, "--data", str(train), "--time", "10s", "--out", str(tmp_path / "b"))
    assert rc == 2 and err.count("\n") == 1 and "too short" in err
    rc, _, err = _cli(capsys, "--data", str(train), "--time", "soon", "--out", str(tmp_path / "c"))
    assert rc == 2 and "--time must be a duration" in err
    rc, _, err = _cli(capsys, "--data", str(train), "--time", "5m", "--budget", "lots", "--out", str(tmp_path / "d"))
    assert rc == 2 and "--budget must be a count" in err


def test_a_time_too_short_for_one_trial_here_is_one_line(tmp_path, small_csvs, fake_clock):
    class Slow(FakeTrainer):
        STEP_S, FIXED_S = 2.0, 20.0

    with pytest.raises(ConfigError, match="too short on this machine: one trial of .* takes about"):
        tune(tiny_config(small_csvs, **{"train.max_steps": 0}), 60, tmp_path / "t", runner=Slow(fake_clock))


# -- one real tune ---------------------------------------------------------------------------------------------------
def test_a_real_tiny_tune_within_its_time(tmp_path, small_csvs):
    """Two minutes on the embedded model: within the time plus 10%, a report, and a winner's run that loads and
    predicts like any run."""
    import budgetlora

    cfg = tiny_config(small_csvs, **{"train.max_steps": 0, "train.eval_every": 0})
    started = timebudget.clock()
    r = tune(cfg, 120, tmp_path / "t")
    took = timebudget.clock() - started
    assert took <= 120 * 1.10, took
    assert (tmp_path / "t" / "report.md").is_file()
    metrics = runs.read_json(Path(r["winner_run"]) / runs.METRICS)
    assert metrics["val_accuracy"] > 0.5  # four classes: a quarter is chance
    model = budgetlora.load(r["winner_run"])
    labels = model.predict(["Stocks fell as oil prices rose", "The striker scored twice in the final"])
    assert len(labels) == 2


def test_a_rung_cut_short_has_run_its_first_candidates(tmp_path, small_csvs, fake_clock):
    """Candidates run in the rung's order (the space's, then best first): when a rung's time runs out, the ones
    left out are the last ones, not a random draw."""
    class Uneven(FakeTrainer):  # VeRA trains ten times slower than the probe's LoRA said
        def __call__(self, cfg, root, on_record=None):
            if cfg.method == "vera" and not runs.is_finished(Path(root) / cfg.run_id):
                self.clock.now += 10 * cfg.train.max_steps * self.STEP_S
            return super().__call__(cfg, root, on_record)

    trainer = Uneven(fake_clock)
    tune(tiny_config(small_csvs, **{"train.max_steps": 0}), 600, tmp_path / "t", runner=trainer)
    state = json.loads((tmp_path / "t" / "tune.json").read_text())
    first = state["rungs"][0]
    ran = [name in first["results"] for name in first["tried"]]
    assert ran == sorted(ran, reverse=True), ran  # every candidate that ran comes before every one that did not
    assert len(state["rungs"][-1]["results"]) >= 2 or len(state["rungs"][-1]["tried"]) < 2  # finalists: two
