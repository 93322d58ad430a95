"""A sweep's time budget (`--time-budget 30m`, `time_budget:` in the spec): a trial starts only while the time left
can hold it, judged by the longest trial finished so far in this invocation of the sweep."""
from __future__ import annotations

import re
import time

from budgetlora.config import ConfigError

clock = time.monotonic  # one clock for the deadline and for trial durations (system-wide, so workers agree)
ELAPSED = "elapsed_s"  # the trial user attribute holding how long its objective ran, by `clock`
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}
_FORM = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h)?\s*$", re.IGNORECASE)


def parse_duration(value, what: str = "time budget") -> float | None:
    """Seconds from 90, '90s', '30m' or '1.5h'; None for None or ''."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a duration like 90s, 30m or 1.5h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _FORM.match(str(value))
        if not m:
            raise ConfigError(f"{what} must be a duration like 90s, 30m or 1.5h, got {value!r}")
        seconds = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not seconds > 0:
        raise ConfigError(f"{what} must be more than zero, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def next_fits(deadline: float | None, durations: list[float]) -> bool:
    """Whether a trial may start now: always without a budget; with one, while time is left and, once trials
    have finished, while the time left holds the longest of them (an estimate no trial of this sweep has beaten)."""
    if deadline is None:
        return True
    left = deadline - clock()
    return left > 0 and (not durations or left >= max(durations))


_COUNT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kKmM]?)\s*$")


def parse_count(value: str, what: str = "count") -> int:
    """A whole count from 1000000, 1,000,000, 1M or 500k."""
    m = _COUNT.match(str(value).replace(",", "").replace("_", ""))
    if not m:
        raise ConfigError(f"{what} must be a count like 1000000, 1M or 500k, got {value!r}")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if n < 1 or n != int(n):
        raise ConfigError(f"{what} must be a whole count of at least 1, got {value!r}")
    return int(n)


class Deadline:
    """A command's time from its start (`tune --time`), a share of it (`margin`) kept back for what estimates
    miss: what each phase may still spend."""

    def __init__(self, seconds: float, margin: float = 0.0):
        self.seconds, self.started = seconds, clock()
        self.deadline = self.started + seconds * (1 - margin)

    def used(self) -> float:
        return clock() - self.started

    def left(self) -> float:
        return max(0.0, self.deadline - clock())

    def line(self) -> str:
        return f"{format_duration(self.left())} left of {format_duration(self.seconds)}"
