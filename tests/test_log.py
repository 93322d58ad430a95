"""Messages go through `logging` under `budgetlora`: the CLI shows them as plain lines, --quiet hides them, the
result of a command stays; one process of a data-parallel run speaks for all."""
from __future__ import annotations

import logging
import os

from budgetlora.cli import main
from budgetlora.log import setup


def test_a_command_shows_its_messages_and_quiet_hides_them(tiny_run, capsys):
    main(["train", "--config", str(tiny_run / "config.yaml"), "--runs", str(tiny_run.parent)])
    out = capsys.readouterr().out
    assert f"run {tiny_run.name} already finished" in out  # a message, logged by training.train
    assert str(tiny_run) in out.splitlines()[-1]  # the command's result
    main(["train", "--config", str(tiny_run / "config.yaml"), "--runs", str(tiny_run.parent), "--quiet"])
    out = capsys.readouterr().out
    assert "already finished" not in out and str(tiny_run) in out  # the result stays
    main(["train", "--config", str(tiny_run / "config.yaml"), "--runs", str(tiny_run.parent), "-v"])
    assert logging.getLogger("budgetlora").getEffectiveLevel() == logging.DEBUG
    assert "already finished" in capsys.readouterr().out


def test_setup_twice_prints_each_line_once_and_other_ranks_stay_silent(capsys, monkeypatch):
    setup()
    setup("INFO")
    logging.getLogger("budgetlora.training.train").info("one line")
    assert capsys.readouterr().out == "one line\n"
    monkeypatch.setenv("RANK", "1")
    logging.getLogger("budgetlora.training.loop").info("from another process")
    logging.getLogger("budgetlora.training.loop").warning("nor this")
    assert capsys.readouterr().out == ""


def test_the_level_reaches_worker_processes():
    setup("WARNING")
    assert os.environ["BUDGETLORA_LOG_LEVEL"] == "WARNING"
    logging.getLogger("budgetlora").setLevel(logging.NOTSET)
    setup()  # what a sweep worker calls: the level its command was given
    assert logging.getLogger("budgetlora").level == logging.WARNING
