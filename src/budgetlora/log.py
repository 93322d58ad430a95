"""What long work says as it goes: each module logs to its own logger (`logging.getLogger(__name__)`), all under
`budgetlora`. The CLI shows them on stdout as plain lines (`setup`): info by default, warnings and errors only with
`--quiet`, debug lines too with `--verbose`. Used as a library, budgetlora prints nothing of its own until the caller
configures `logging` (Python then shows warnings only), or calls `setup()`."""
from __future__ import annotations

import logging
import os
import sys

ROOT = "budgetlora"
LEVEL_VAR = "BUDGETLORA_LOG_LEVEL"  # the level, for worker processes (sweep workers) to take up


class _CurrentStdout(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is when a record comes (a test's capture, a redirected
    stream), not to the one there was when it was made."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _main_process(record: logging.LogRecord) -> bool:
    # one process of a data-parallel run (torchrun) speaks for all of them
    return os.environ.get("RANK", "0") in ("", "0")


def setup(level: int | str | None = None) -> None:
    """Show budgetlora's messages on stdout at `level` (default: the level a parent process set, else INFO);
    calling it again replaces the handler it made, never adds a second."""
    level = level or os.environ.get(LEVEL_VAR) or logging.INFO
    level = logging.getLevelName(level) if isinstance(level, str) else level
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, _CurrentStdout)]:
        logger.removeHandler(h)
    handler = _CurrentStdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_main_process)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # not twice when the application has a root handler as well
    os.environ[LEVEL_VAR] = logging.getLevelName(level)
