"""The study storage URL as users type it: postgresql:// (Optuna's docs) and postgresql+psycopg2:// both open with
whichever PostgreSQL driver is installed, and every storage that cannot be opened is one line, its password
masked, with what to do, before any trial starts. The same URLs against a live server are in
test_sweep_postgres.py."""
from __future__ import annotations

import sys

import pytest

from budgetlora.cli import main
from budgetlora.experiments import storage
from budgetlora.experiments.storage import StorageError, driver_url, masked
from tests.experiments.test_sweep import write_spec

REST = "u:secret@db.example:5432/sweeps"


@pytest.mark.parametrize("url, installed, want", [
    (f"postgresql://{REST}", {"psycopg", "psycopg2"}, f"postgresql+psycopg://{REST}"),
    (f"postgresql://{REST}", {"psycopg2"}, f"postgresql+psycopg2://{REST}"),
    (f"postgresql+psycopg2://{REST}", {"psycopg", "psycopg2"}, f"postgresql+psycopg2://{REST}"),
    (f"postgresql+psycopg2://{REST}", {"psycopg"}, f"postgresql+psycopg://{REST}"),
    (f"postgresql+psycopg://{REST}", {"psycopg2"}, f"postgresql+psycopg2://{REST}"),
    (f"postgresql+psycopg://{REST}?sslmode=require", {"psycopg"}, f"postgresql+psycopg://{REST}?sslmode=require"),
    (f"postgres://{REST}", {"psycopg", "psycopg2"}, f"postgresql+psycopg://{REST}"),
    (f"postgresql+pg8000://{REST}", {"psycopg", "psycopg2"}, f"postgresql+pg8000://{REST}"),
    ("sqlite:////tmp/study.db", set(), "sqlite:////tmp/study.db"),
    (f"mysql+pymysql://{REST}", set(), f"mysql+pymysql://{REST}"),
])
def test_the_url_names_an_installed_driver(monkeypatch, url, installed, want):
    monkeypatch.setattr(storage, "_importable", lambda name: name in installed)
    assert driver_url(url) == want


def test_no_driver_says_what_to_install(monkeypatch):
    monkeypatch.setattr(storage, "_importable", lambda name: False)
    with pytest.raises(StorageError, match=r"pip install 'budgetlora\[postgres\]'") as e:
        driver_url(f"postgresql://{REST}")
    assert "secret" not in str(e.value) and "u:***@db.example" in str(e.value)


def test_masked():
    assert masked(f"postgresql+psycopg2://{REST}") == "postgresql+psycopg2://u:***@db.example:5432/sweeps"
    assert masked("sqlite:////tmp/s.db") == "sqlite:////tmp/s.db"


def sweep_fails(tmp_path, capsys, url: str) -> str:
    """`budgetlora sweep` on `url`: exit 2 and one line without the password, and no trial started."""
    spec = write_spec(tmp_path, grid={"lora.r": [2, 4]})
    capsys.readouterr()
    assert main(["sweep", str(spec), "--root", str(tmp_path / "sweeps"), "--storage", url]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budgetlora: error: "), err
    assert "secret" not in out + err and "u:***@" in lines[0], lines[0]
    assert not list((tmp_path / "sweeps").glob("*/runs/*")), "a trial started"
    return lines[0]


def test_a_closed_port_is_one_line_with_the_password_masked(tmp_path, capsys):
    line = sweep_fails(tmp_path, capsys, "postgresql://u:secret@127.0.0.1:1/db")
    assert "postgresql://u:***@127.0.0.1:1/db" in line and "no server answers there" in line


def test_the_same_with_the_driver_named(tmp_path, capsys):
    line = sweep_fails(tmp_path, capsys, "postgresql+psycopg2://u:secret@127.0.0.1:1/db")
    assert "no server answers there" in line


def test_no_driver_installed(tmp_path, capsys, monkeypatch):
    for name in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, name, None)  # what an import finds when the package is not installed
    line = sweep_fails(tmp_path, capsys, "postgresql://u:secret@127.0.0.1:1/db")
    assert "pip install 'budgetlora[postgres]'" in line


def test_other_storages_that_cannot_be_opened(tmp_path, capsys):
    line = sweep_fails(tmp_path, capsys, "mysql+nosuchdriver://u:secret@127.0.0.1:1/db")
    assert "mysql+nosuchdriver://u:***@127.0.0.1:1/db" in line
    assert "nosuch://" in sweep_fails(tmp_path, capsys, "nosuch://u:secret@host/db")


# -- a server that goes away: each call waits for it, within a bound ------------------------------------------------
class _Storage:
    url = "postgresql+psycopg://user:secret@db.example:5432/study"
    reconnected_at = None

    def __init__(self, retry_s):
        self.retry_s = retry_s


def _dropped():
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_a_storage_call_waits_for_the_server_with_a_growing_back_off():
    import time

    from budgetlora.experiments.storage import _retried

    tries: list[float] = []

    def flaky(self):
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise _dropped()
        return 7

    storage = _Storage(retry_s=30)
    assert _retried("get_all_studies", flaky)(storage) == 7
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert len(tries) == 3 and 0.45 < gaps[0] < 0.9 and 0.95 < gaps[1] < 1.5, gaps  # 0.5 s, then doubled
    assert storage.reconnected_at is not None


def test_a_server_away_past_the_bound_is_one_line_with_the_password_masked():
    import time

    from budgetlora.experiments.storage import StorageError, _retried

    tries = []

    def down(self):
        tries.append(1)
        raise _dropped()

    started = time.monotonic()
    with pytest.raises(StorageError) as e:
        _retried("get_all_studies", down)(_Storage(retry_s=2))
    message = str(e.value)
    assert time.monotonic() - started < 3 and len(tries) == 3  # tried at 0, 0.5, 1.5 s; the next wait passes 2 s
    assert "\n" not in message and "***@" in message and "secret" not in message and "again" in message, message


def test_errors_that_are_not_a_lost_connection_are_not_retried():
    from budgetlora.experiments.storage import _retried

    tries = []

    def wrong(self):
        tries.append(1)
        raise ValueError("Cannot tell a FAIL trial")

    with pytest.raises(ValueError):
        _retried("set_trial_state_values", wrong)(_Storage(retry_s=30))
    assert tries == [1]
