"""Progress bars that suit where the output goes.

On a terminal a normal tqdm bar redraws itself in place. Redirected to a file, those redraws become thousands of
carriage-return frames, so there a bar writes one plain line every few percent instead (and one at the end).
"""
from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator

EVERY = 0.05  # a redirected bar writes a line each time it passes another 5% of its total


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
             disable: bool = False, leave: bool = True, file: IO[str] | None = None, every: float = EVERY):
    """A progress bar over `iterable` (or updated by hand with update(n) when it is None): a tqdm bar when `file`
    (stderr by default) is a terminal, else a LineProgress. Both have update, set_postfix, close and iteration,
    and work as context managers. disable: no output at all; leave (keep the finished bar on screen) is for the
    terminal only, as a log keeps every line."""
    file = sys.stderr if file is None else file
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or _is_terminal(file):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, leave=leave, file=file)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, file=file, every=every)


def _is_terminal(file) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LineProgress:
    """A bar for logs: one line each time n passes another `every` share of total, and one at close unless the
    last line already showed the final count and postfix. With no total it writes only the closing line."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 initial: int = 0, file: IO[str] | None = None, every: float = EVERY):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.n = self.initial = initial
        self.file = sys.stderr if file is None else file
        self.every = every
        self.postfix = ""
        self.start = time.monotonic()
        self.written: tuple | None = None  # (n, postfix) of the last line written
        self.closed = False
        self.mark = self._mark(initial)

    def _mark(self, n: int) -> int:
        """How many `every` shares of total n has passed (0 without a total)."""
        if not self.total:
            return 0
        return int(n / self.total / self.every + 1e-9)  # 3/60 is not quite 1 x 0.05 in floating point

    def update(self, n: int = 1) -> None:
        self.n += n
        mark = self._mark(self.n)
        if mark > self.mark:
            self.mark = mark
            self._write()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        """As tqdm's; the values show on the next line written (refresh has no use here)."""
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.written != (self.n, self.postfix):  # the end, or a postfix set after the last line
            self._write()

    def line(self) -> str:
        """desc: n/total (pct), rate, elapsed[, postfix]."""
        elapsed = time.monotonic() - self.start
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        parts = [count, _rate(self.n - self.initial, elapsed), f"{_clock(elapsed)} elapsed"]
        if self.postfix:
            parts.append(self.postfix)
        text = ", ".join(parts)
        return f"{self.desc}: {text}" if self.desc else text

    def _write(self) -> None:
        self.written = (self.n, self.postfix)
        self.file.write(self.line() + "\n")
        self.file.flush()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rate(done: int, seconds: float) -> str:
    """Items per second, or seconds per item when that reads better (slow steps), as tqdm writes it."""
    if done <= 0 or seconds <= 0:
        return "? it/s"
    per_second = done / seconds
    return f"{per_second:.2f} it/s" if per_second >= 1 else f"{1 / per_second:.2f} s/it"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
