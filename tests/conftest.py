"""Shared fixtures: small slices of the shipped AG News copy, and one tiny trained run reused across tests."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from budgetlora.config import Config
from budgetlora.data.readers import default_data_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _budgetlora_logging(monkeypatch):
    """What a CLI call in a test sets up for budgetlora's logging (`budgetlora.log.setup`) ends with the test."""
    logger = logging.getLogger("budgetlora")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    monkeypatch.delenv("BUDGETLORA_LOG_LEVEL", raising=False)
    yield
    logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


@contextmanager
def log_lines(lines: list[str] | None = None):
    """The messages budgetlora logs (at info and above) while the block runs, as a list of lines (`lines`, when
    given, is the list they are added to)."""
    lines = [] if lines is None else lines
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("budgetlora")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# the main job's preset as it was when its run id a18e192f1c was published: fields added since must keep that id
PUBLISHED = {"data.train_limit": 22000, "train.probe_steps": 0}


@pytest.fixture(scope="session")
def agnews_dir() -> Path:
    folder = default_data_dir()
    assert folder is not None and (folder / "train.csv.gz").is_file(), \
        "the AG News copy was not found: set BUDGETLORA_DATA to a folder holding train.csv.gz and test.csv.gz"
    return folder


@pytest.fixture(scope="session")
def small_csvs(tmp_path_factory, agnews_dir) -> tuple[Path, Path]:
    """A balanced 400-row train CSV and 120-row test CSV cut from the shipped data."""
    root = tmp_path_factory.mktemp("data")
    train = pd.read_csv(agnews_dir / "train.csv.gz").groupby("label").head(100).sample(frac=1, random_state=0)
    test = pd.read_csv(agnews_dir / "test.csv.gz").groupby("label").head(30)
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    return root / "train.csv", root / "test.csv"


def tiny_config(small_csvs, **overrides) -> Config:
    train, test = small_csvs
    base = {"data.train": str(train), "data.test": str(test), "data.val_fraction": 0.1, "model.max_length": 32,
            "train.max_steps": 10, "train.lr": 5e-3, "train.batch_size": 16, "train.eval_every": 5}
    base.update(overrides)
    return Config().replace(**base)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_csvs) -> Path:
    """One small trained run of the embedded model (seconds on a CPU), shared by the tests that only read it."""
    from budgetlora.training.train import train

    return train(tiny_config(small_csvs), root=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def noisy_run(tmp_path_factory, small_csvs):
    """A tiny run trained with the noisy-label filter: 222 rows -> 22 validation + 200 training rows."""
    from budgetlora.training.train import train

    cfg = tiny_config(small_csvs, **{"data.train_limit": 222, "data.test_limit": 40, "train.max_steps": 6,
                                     "filter.noisy_fraction": 0.05})
    return train(cfg, root=tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def unlabelled(tmp_path_factory, small_csvs):
    """100 test texts without their label column: nothing downstream can read a gold label."""
    path = tmp_path_factory.mktemp("unl") / "unlabelled.csv"
    pd.read_csv(small_csvs[1])[["text"]].head(100).to_csv(path, index=False)
    return path
