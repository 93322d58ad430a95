"""The `budgetlora` command as tests/test_distributed.py launches it under torchrun, with two recorders installed in
each process: the paths it writes (runs.atomic_path, runs.save_adapter) into $WRITES_DIR/writes.<rank>.txt, and the
training rows of every step (train's on_step callback) into $TRACE_DIR/rows.<rank>.txt."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def trace_rows(folder: str | Path, rank: int | str = 0):
    """An on_step callback for `train`: appends the rows each step trained on to folder/rows.<rank>.txt."""
    path = Path(folder) / f"rows.{rank}.txt"

    def on_step(state: dict, rows) -> None:
        with open(path, "a") as f:
            f.write(" ".join(map(str, rows)) + "\n")

    return on_step


def record_writes(folder: str | Path, rank: int | str) -> None:
    from budgetlora import runs

    log = Path(folder) / f"writes.{rank}.txt"
    atomic, save = runs.atomic_path, runs.save_adapter

    def record(path) -> None:
        with open(log, "a") as f:
            f.write(f"{path}\n")

    @contextlib.contextmanager
    def traced_atomic(path, *a, **k):
        record(path)
        with atomic(path, *a, **k) as tmp:
            yield tmp

    def traced_save(model, path, *a, **k):
        record(path)
        return save(model, path, *a, **k)

    runs.atomic_path, runs.save_adapter = traced_atomic, traced_save


def trace_training_rows(folder: str | Path, rank: int | str) -> None:
    """Every `train` call of this process (the CLI's included) gets the row tracer as its on_step callback."""
    import budgetlora.training.train as train_module

    real = train_module.train

    def traced_train(*args, **kwargs):
        return real(*args, on_step=trace_rows(folder, rank), **kwargs)

    train_module.train = traced_train


if __name__ == "__main__":
    rank = os.environ.get("RANK", "0")
    record_writes(os.environ["WRITES_DIR"], rank)
    trace_training_rows(os.environ["TRACE_DIR"], rank)
    from budgetlora.cli import main

    sys.exit(main())
