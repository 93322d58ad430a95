"""The study storage of a sweep: the URL a user types turned into one whose driver is installed, the Optuna RDB
storage opened on it (heartbeats on; SQLite in write-ahead mode), and every way that can fail (no driver, no
server, a refused login, no such database) told in one line that names the storage with its password masked."""
from __future__ import annotations

import contextlib
import importlib
import re
import sqlite3
import warnings
from pathlib import Path
from typing import Any

from budgetlora.config import ConfigError
from budgetlora.experiments.spec import GRACE_S, HEARTBEAT_S

POSTGRES_DRIVERS = ("psycopg", "psycopg2")  # preferred first: psycopg 3 is the maintained one
INSTALL_POSTGRES = "pip install 'budgetlora[postgres]'"
CONNECT_TIMEOUT_S = 10  # a server that drops packets would otherwise hold the sweep for minutes before failing


class StorageError(ConfigError):
    """A study storage that cannot be opened: the CLI's one line, raised before any trial starts."""


def masked(url: str) -> str:
    """The URL as it may be printed: its password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable as a URL: hide whatever sits between user: and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:  # psycopg without a libpq it can load also lands here
        return False
    return True


def driver_url(url: str) -> str:
    """`url` naming a PostgreSQL driver that imports here. A plain postgresql:// (as Optuna's docs write it) gets
    psycopg, else psycopg2; a URL that names one of the two gets the other when only that one is installed;
    postgres:// (as hosting services print it) is read as postgresql://. Other URLs are returned as they are."""
    scheme, sep, rest = url.partition("://")
    backend, _, driver = scheme.partition("+")
    if not sep or backend not in ("postgresql", "postgres") or (driver and driver not in POSTGRES_DRIVERS):
        return url
    wanted = (driver,) + tuple(d for d in POSTGRES_DRIVERS if d != driver) if driver else POSTGRES_DRIVERS
    for name in wanted:
        if _importable(name):
            return f"postgresql+{name}://{rest}"
    raise StorageError(f"study storage {masked(url)} needs a PostgreSQL driver, and neither psycopg nor psycopg2 "
                       f"is installed: {INSTALL_POSTGRES}")


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """An Optuna RDB storage (SQLite, PostgreSQL, MySQL...) with heartbeats, so that dead workers' trials are
    failed and retried, and, for SQLite, a write-ahead log plus a long busy timeout so that several local
    processes can share the file. Connects once, so that a storage that cannot be used fails here."""
    try:
        return _open(url, heartbeat_s, grace_s)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot open the study storage {masked(url)}: {_advice(e, url)}") from None


def _open(url: str, heartbeat_s: int, grace_s: int):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = driver_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:  # WAL persists in the file
            con.execute("PRAGMA journal_mode=WAL")
        engine_kwargs = {"connect_args": {"timeout": 120}}
    elif url.startswith(tuple(f"postgresql+{d}://" for d in POSTGRES_DRIVERS)) and "connect_timeout=" not in url:
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # heartbeats are marked experimental; they are the documented way to do this
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))


# what the driver's message says -> what to do about it
_ADVICE = (
    (r"connection refused|could not connect|timeout expired|timed out|no route to host|network is unreachable",
     "no server answers there; is it running, and is that host and port reachable from here?"),
    (r"could not translate host name|name or service not known|nodename nor servname",
     "no such host; check the host name in the URL"),
    (r"password authentication failed|authentication failed|role \S+ does not exist|no pg_hba\.conf entry"
     r"|access denied",
     "the server refused the login; check the user name and password in the URL"),
    (r"database \S+ does not exist|unknown database",
     "no such database on that server; create it first (e.g. createdb NAME)"),
    (r"unable to open database file|readonly database|permission denied",
     "the database file cannot be opened for writing; check the folder and its permissions"),
)


def _advice(e: Exception, url: str) -> str:
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if isinstance(e, NoSuchModuleError):
        return "SQLAlchemy knows no such database or driver (expected e.g. postgresql://user:pass@host:5432/db or " \
               "sqlite:///path/study.db)"
    if isinstance(e, ArgumentError):
        return "not a database URL (expected e.g. postgresql://user:pass@host:5432/db or sqlite:///path/study.db)"
    if isinstance(e, ImportError):  # optuna wraps the missing module; the module's own name is in the cause
        missing = getattr(e.__cause__, "name", None) or getattr(e, "name", None) or "its module"
        if url.startswith("postgres"):
            return f"its driver ({missing}) is not installed: {INSTALL_POSTGRES}"
        return f"its driver ({missing}) is not installed; install the package that provides it"
    text = _first_line(getattr(e, "orig", None) or e)
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    for pattern, advice in _ADVICE:
        if re.search(pattern, text, re.IGNORECASE):
            return f"{advice} ({text})"
    return text


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = lines[0] if lines else type(e).__name__
    return re.sub(r"^connection failed:\s*", "", line)[:300]


def _password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password or None
    except Exception:
        return None
