"""`budgetlora train` in two CPU processes (torchrun, gloo) equals a one-process run.

Each process takes a disjoint half of every global batch of 16 and DDP averages the gradients, so with dropout off
the two-process run must end where the one-process run ends (up to float summation order), and only rank 0 may
write the run folder.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from budgetlora import runs
from budgetlora.adapters.architectures import resolve_name
from budgetlora.config import Config
from budgetlora.training.train import train

from .distributed_entry import trace_rows

WORDS = [["election", "minister", "war", "president", "troops", "talks"],
         ["match", "goal", "team", "season", "coach", "cup"],
         ["stocks", "market", "profit", "shares", "bank", "oil"],
         ["software", "internet", "computer", "space", "research", "chip"]]
FILLER = ["the", "a", "on", "after", "report", "says", "new", "week"]

# the command as each launched process runs it: with recorders of its writes and of its training rows
ENTRY = Path(__file__).with_name("distributed_entry.py")


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    texts = [" ".join(rng.permutation(list(rng.choice(WORDS[y], 4)) + list(rng.choice(FILLER, 4 + i % 5))))
             for i, y in enumerate(labels)]
    return pd.DataFrame({"text": texts, "label": labels})


def _minilm_without_dropout(folder):
    """The embedded MiniLM with its own dropout off (links to its files, a rewritten config.json): dropout masks
    are drawn per process, so they would differ between a one- and a two-process run of the same batch."""
    src = Path(resolve_name("minilm"))
    folder.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path) -> list[list[int]]:
    return [[int(x) for x in line.split()] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    _table(168, 0).to_csv(tmp_path / "train.csv", index=False)  # 160 train + 8 validation rows
    _table(40, 1).to_csv(tmp_path / "test.csv", index=False)
    overrides = {"model.name": str(_minilm_without_dropout(tmp_path / "minilm")), "model.max_length": 32, "data.train": str(tmp_path / "train.csv"),
                 "data.test": str(tmp_path / "test.csv"), "lora.dropout": 0.0, "train.batch_size": 16,
                 "train.max_steps": 6, "train.eval_every": 3, "train.lr": 2e-3, "train.warmup": 0.0,
                 # fp32: the two half-batch gradients are summed in another order, which bf16 rounding would
                 # magnify past the tolerance; one thread, as each launched process runs
                 "train.precision": "fp32", "train.threads": 1}
    cfg = Config().replace(**overrides)

    single_trace = tmp_path / "trace1"
    single_trace.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs; spinning OpenMP threads crawl on a busy machine
    try:
        single = train(cfg, root=tmp_path / "single", on_step=trace_rows(single_trace))
    finally:
        torch.set_num_threads(threads)

    dist_trace, writes = tmp_path / "trace2", tmp_path / "writes"
    dist_trace.mkdir()
    writes.mkdir()
    env = {**os.environ, "TRACE_DIR": str(dist_trace), "WRITES_DIR": str(writes),
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    flags = [f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
    # torchrun, not `accelerate launch --cpu`: the latter starts a single process unless MPI is set up
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ENTRY), "train", *flags, "--runs", str(tmp_path / "dist")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = tmp_path / "dist" / cfg.run_id
    assert runs.is_finished(dist), f"no finished run folder in {tmp_path / 'dist'}"

    # disjoint halves of the same global batches, step by step
    one = _rows(single_trace / "rows.0.txt")
    r0, r1 = _rows(dist_trace / "rows.0.txt"), _rows(dist_trace / "rows.1.txt")
    assert len(one) == len(r0) == len(r1) == 6
    for g, a, b in zip(one, r0, r1):
        assert len(a) == len(b) == 8 and not set(a) & set(b)
        assert sorted(a + b) == sorted(g)

    # only rank 0 wrote: the other process recorded no write at all
    assert not (writes / "writes.1.txt").exists(), (writes / "writes.1.txt").read_text()
    written = (writes / "writes.0.txt").read_text()
    assert "metrics.json" in written and str(dist) in written

    # same weights and metrics: float summation order differs (two half-batch gradients summed), nothing else
    w1, w2 = load_file(single / runs.ADAPTER_FILES[1]), load_file(dist / runs.ADAPTER_FILES[1])
    assert w1.keys() == w2.keys() and len(w1) > 0
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    moved = max(float(w1[k].abs().max()) for k in w1 if "lora_B" in k)
    assert moved > 1e-3  # lora_B starts at zero: the runs did train
    # relative to how far training moved the weights: AdamW divides by the root of tiny second moments, so a
    # summation-order difference in a near-zero gradient can move a weight by a visible fraction of one step
    assert diff < 0.05 * moved, f"adapter weights differ by {diff} (the largest lora_B weight is {moved})"
    m1, m2 = runs.read_json(single / "metrics.json"), runs.read_json(dist / "metrics.json")
    assert m1["val_accuracy"] == m2["val_accuracy"] and m1["test_accuracy"] == m2["test_accuracy"]
    assert m1["best_step"] == m2["best_step"] and m1["steps"] == m2["steps"] == 6
    assert abs(m1["val_loss"] - m2["val_loss"]) < 1e-4
    # history: the same validation curve
    h1 = [r for r in (single / runs.HISTORY).read_text().splitlines()[1:] if r.split(",")[5]]
    h2 = [r for r in (dist / runs.HISTORY).read_text().splitlines()[1:] if r.split(",")[5]]
    assert [r.split(",")[5] for r in h1] == [r.split(",")[5] for r in h2]
