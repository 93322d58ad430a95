"""`budgetlora sweep` as a separate process, with training replaced by the fake runner of test_sweep.py: how
test_sweep_postgres.py starts independent sweeps on one study. Arguments are those of `budgetlora sweep`.

With $SWEEP_GO set, the process says it is ready ($SWEEP_GO.<pid>.ready) once it has opened the study, and waits
for the file $SWEEP_GO before it goes on: sweeps released together race for the same trials from the first one."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def wait_for_go() -> None:
    go = os.environ.get("SWEEP_GO")
    if not go:
        return
    Path(f"{go}.{os.getpid()}.ready").touch()
    deadline = time.monotonic() + 120
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def main() -> int:
    import budgetlora.experiments.sweep as sweep
    import budgetlora.training.train
    from budgetlora.cli import main as cli
    from tests.experiments.test_sweep import fake_runner

    def train(cfg, root, on_record=None, **kwargs):
        return fake_runner(cfg, root)

    budgetlora.training.train.train = train
    opened, gates = sweep.open_study, []

    def open_study(*args, **kwargs):
        study = opened(*args, **kwargs)
        if not gates:
            gates.append(wait_for_go())
        return study

    sweep.open_study = open_study
    return cli(["sweep", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
