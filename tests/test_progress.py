"""Progress bars: a tqdm bar on a terminal, a few plain lines in a log."""
from __future__ import annotations

import io

from budgetlora.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_a_line_every_few_percent_and_no_carriage_returns():
    out = io.StringIO()
    bar = progress(total=1000, desc="train", file=out)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(loss="0.1234")
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 20 <= len(lines) <= 21
    assert lines[0].startswith("train: 50/1000 (5%), ")
    assert lines[-1].startswith("train: 1000/1000 (100%), ")
    assert all("it/s" in line or "s/it" in line for line in lines)
    assert all("elapsed" in line for line in lines)


def test_log_line_names_rate_elapsed_and_postfix():
    out = io.StringIO()
    bar = LineProgress(total=4, desc="eval", file=out)
    bar.update(3)
    bar.set_postfix(loss="1.5000")
    bar.close()
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("eval: 3/4 (75%), ")
    assert last.endswith(" elapsed, loss=1.5000")


def test_close_writes_the_final_count_once():
    out = io.StringIO()
    bar = progress(total=10, desc="x", file=out)
    bar.update(10)
    bar.close()
    bar.close()
    assert out.getvalue().count("10/10") == 1

    out = io.StringIO()
    with progress(total=1000, desc="x", file=out) as bar:
        bar.update(7)  # an early stop before the first 5%
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("x: 7/1000 (1%), ")


def test_resumed_bar_counts_from_initial():
    out = io.StringIO()
    bar = progress(total=100, initial=50, desc="train", file=out)
    bar.update(4)
    assert out.getvalue() == ""  # 54% has not passed the next mark after 50%
    bar.update(1)
    bar.close()
    assert out.getvalue().splitlines()[0].startswith("train: 55/100 (55%)")


def test_wrapping_an_iterable_yields_everything_and_closes():
    out = io.StringIO()
    assert list(progress(range(200), desc="eval", file=out)) == list(range(200))
    lines = out.getvalue().splitlines()
    assert len(lines) == 20
    assert lines[-1].startswith("eval: 200/200 (100%)")


def test_terminal_gets_the_tqdm_bar():
    from tqdm.auto import tqdm

    out = Terminal()
    bar = progress(total=10, desc="train", file=out)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "\r" in out.getvalue()


def test_disable_writes_nothing():
    for out in (io.StringIO(), Terminal()):
        bar = progress(total=10, desc="train", file=out, disable=True)
        bar.update(10)
        bar.close()
        assert out.getvalue() == ""
