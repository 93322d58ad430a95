"""Seeds grouped per config, intervals and paired marks in the report, on run folders with known per-row answers."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.errors import RunFolderError
from budgetlora.experiments.compare import read_predictions
from budgetlora.experiments.leaderboard import write_report

ROWS = 1500


def _run(root, cfg: Config, correct: np.ndarray, val: float):
    out = root / cfg.run_id
    out.mkdir(parents=True)
    runs.write_text(out / runs.CONFIG, cfg.to_yaml())
    for name in runs.ADAPTER_FILES:
        (out / name).write_bytes(b"x")
    labels = np.arange(ROWS) % 4
    predicted = np.where(correct, labels, (labels + 1) % 4)
    lines = ["row,label,predicted"] + [f"{r},{y},{p}" for r, y, p in zip(np.arange(ROWS) * 5, labels, predicted)]
    runs.write_text(out / runs.PREDICTIONS, "\n".join(lines) + "\n")
    runs.write_json(out / runs.METRICS, {"val_accuracy": val, "test_accuracy": float(correct.mean()),
                                         "trainable_params": 1000, "wall_time_s": 1.0, "peak_rss_mb": 900.0,
                                         "adapter_bytes": 4000, "train_samples_per_s": 50.0})


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    base = Config().replace(**{"lora.r": 4})
    strong = rng.random((3, ROWS)) < 0.90
    for seed in range(3):
        good = base.replace(**{"train.seed": seed, "name": "r8"}).replace(**{"lora.r": 8})
        _run(tmp_path, good, strong[seed], val=0.90 + seed / 1000)
        twin = base.replace(**{"train.seed": seed, "name": "r8-twin", "lora.alpha": 32}).replace(**{"lora.r": 8})
        _run(tmp_path, twin, strong[seed].copy(), val=0.89)  # the same answers on every row, lower validation
        weak = strong[seed] & (rng.random(ROWS) > 0.06)  # loses about 6% of the strong config's right answers
        _run(tmp_path, base.replace(**{"train.seed": seed, "name": "r4"}), weak, val=0.85)
    return tmp_path


def test_the_report_groups_seeds_and_marks_what_differs(folder):
    written = write_report(folder, title="constructed")
    table = {r["config"]: r for r in csv.DictReader(written["comparison"].open())}
    assert set(table) == {"r8", "r8-twin", "r4"} and all(r["seeds"] == "3" for r in table.values())
    assert table["r8"]["verdict"] == "best (val)" and table["r8"]["test_rows"] == str(ROWS)
    assert table["r8-twin"]["verdict"] == "same at 95%"  # identical answers are never marked different
    assert table["r8-twin"]["diff_vs_best"].startswith("+0.0000")
    assert table["r4"]["verdict"] == "worse at 95%" and float(table["r4"]["mcnemar_p"]) < 1e-6
    mean, half = (float(x) for x in table["r8"]["test_accuracy"].split(" ± "))
    assert 0.88 < mean < 0.92 and 0 < half < 0.02
    assert float(table["r8"]["peak_rss_mb"]) == 900.0 and float(table["r8"]["adapter_bytes"]) == 4000
    md = written["report"].read_text()
    assert "## Each method at its best setting" not in md  # one method: nothing to choose between
    assert "## Configs compared" in md and "worse at 95%" in md and "![intervals](plots/intervals.png)" in md
    assert (folder / "plots" / "intervals.png").read_bytes()[:4] == b"\x89PNG"


def test_malformed_predictions_are_one_error_naming_the_file(folder):
    run = next(p for p in folder.iterdir() if (p / runs.PREDICTIONS).is_file())
    assert len(read_predictions(run)[0]) == ROWS
    (run / runs.PREDICTIONS).write_text("row,label,predicted\n1,2\n")
    with pytest.raises(RunFolderError, match=runs.PREDICTIONS):
        read_predictions(run)
    (run / runs.PREDICTIONS).write_text("row,label,predicted\nx,y,z\n")
    with pytest.raises(RunFolderError, match="corrupt"):
        write_report(folder)


def test_each_method_is_shown_at_its_own_best_rate(tmp_path):
    rng = np.random.default_rng(4)
    right = rng.random((1, ROWS)) < 0.9
    for method, lr, val in (("lora", 1e-3, 0.86), ("lora", 4e-3, 0.90), ("vera", 1e-3, 0.80), ("vera", 1e-2, 0.88)):
        cfg = Config().replace(**{"method": method, "train.lr": lr, "name": f"{method}-{lr:g}"})
        _run(tmp_path, cfg, right[0], val=val)
    md = write_report(tmp_path)["report"].read_text()
    table = md.split("## Each method at its best setting")[1].split("##")[0]
    lora = next(line for line in table.splitlines() if line.startswith("| lora") or line.startswith("| LoRA"))
    vera = next(line for line in table.splitlines() if line.lower().startswith("| vera"))
    assert "| 0.004 | 2 configs |" in lora and "| 0.01 | 2 configs |" in vera  # each at its own best rate
    assert table.index(lora) < table.index(vera)  # best validation first
