"""The study storage of a sweep: the URL a user types turned into one whose driver is installed, the Optuna RDB
storage opened on it (heartbeats on; SQLite in write-ahead mode), and every way that can fail (no driver, no
server, a refused login, no such database) told in one line that names the storage with its password masked.

Once open, a database server that goes away (a restart, a failover, a dropped connection) is waited for: every
storage call is retried with a bounded back-off, so a running trial finishes instead of failing. Dead workers are
found by their stopped heartbeat, and also when they died before their trial's first heartbeat."""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from budgetlora.config import ConfigError
from budgetlora.experiments.spec import GRACE_S, HEARTBEAT_S

POSTGRES_DRIVERS = ("psycopg", "psycopg2")  # preferred first: psycopg 3 is the maintained one
INSTALL_POSTGRES = "pip install 'budgetlora[postgres]'"
CONNECT_TIMEOUT_S = 10  # a server that drops packets would otherwise hold the sweep for minutes before failing
RETRY_S = 120  # how long a worker waits for a database server that went away before it gives up
BACKOFF_S = (0.5, 8.0)  # first wait between tries, doubled up to the second
_log = logging.getLogger(__name__)


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


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S, retry_s: float = RETRY_S):
    """An Optuna RDB storage (SQLite, PostgreSQL, MySQL...) with heartbeats, so that dead workers' trials are
    failed and retried, and, for SQLite, a write-ahead log plus a long busy timeout so that several local
    processes can share the file. Connects once, so that a storage that cannot be used fails here; after that, a
    server that goes away is waited for up to `retry_s` seconds on every call."""
    try:
        return _open(url, heartbeat_s, grace_s, retry_s)
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"cannot open the study storage {masked(url)}: {_advice(e, url)}") from None


def _open(url: str, heartbeat_s: int, grace_s: int, retry_s: float):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

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
        return _storage_class()(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                grace_period=grace_s,
                                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                                retry_s=0 if url.startswith("sqlite") else retry_s)  # a file does not go away


# -- a storage that outlives a server restart ------------------------------------------------------------------
_calling = threading.local()  # set while a storage call (and the calls it makes itself) is being tried


def _lost_connection(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) says the connection to the server is gone or cannot be made: the errors
    worth waiting out. Optuna wraps SQLAlchemy's errors in StorageInternalError."""
    from sqlalchemy import exc

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)) or \
                (isinstance(e, exc.DBAPIError) and e.connection_invalidated):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _retried(name: str, call):
    """`call`, a storage method, tried again with a growing wait while the server is unreachable, for up to
    `self.retry_s` seconds; then one line naming the storage. Only the outermost call retries: a method that
    calls others waits once, not once per level."""
    @functools.wraps(call)
    def method(self, *args, **kwargs):
        if getattr(_calling, "active", False) or not self.retry_s:
            return call(self, *args, **kwargs)
        _calling.active = True
        try:
            lost_at, wait = None, BACKOFF_S[0]
            while True:
                try:
                    out = call(self, *args, **kwargs)
                except Exception as e:
                    if lost_at is not None and name == "set_trial_state_values" and _already_set(self, e, args,
                                                                                                 kwargs):
                        return True  # the try that lost the connection had committed it
                    if not _lost_connection(e):
                        raise
                    now = time.monotonic()
                    if lost_at is None:
                        lost_at = now
                        _log.warning("study storage %s unreachable (%s); retrying for up to %.0f s",
                                     masked(self.url), _first_line(getattr(e.__cause__, "orig", None) or e),
                                     self.retry_s)
                    if now - lost_at + wait > self.retry_s:
                        raise StorageError(f"lost the study storage {masked(self.url)} for {now - lost_at:.0f} s "
                                           f"({_first_line(e.__cause__ or e)}); once it is back, run the same "
                                           "command again to continue") from None
                    time.sleep(wait)
                    wait = min(2 * wait, BACKOFF_S[1])
                    continue
                if lost_at is not None:
                    self.reconnected_at = time.monotonic()
                    _log.warning("study storage %s is back after %.1f s", masked(self.url),
                                 self.reconnected_at - lost_at)
                return out
        finally:
            _calling.active = False

    return method


def _already_set(storage, e: Exception, args, kwargs) -> bool:
    """After a lost connection, set_trial_state_values may meet the state its own earlier try committed."""
    import optuna

    if not isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
        return False
    trial_id = kwargs.get("trial_id", args[0] if args else None)
    state = kwargs.get("state", args[1] if len(args) > 1 else None)
    values = kwargs.get("values", args[2] if len(args) > 2 else None)
    t = storage.get_trial(trial_id)
    return t.state == state and (values is None or list(t.values or []) == list(values))


@functools.cache
def _storage_class():
    """Optuna's RDBStorage, with each call retried while the server is away (`_retried`) and dead workers also
    found when they died before their trial's first heartbeat (`_get_stale_trial_ids`)."""
    from optuna.storages import BaseStorage, RDBStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    class ResilientRDBStorage(RDBStorage):
        def __init__(self, url: str, *args, retry_s: float = RETRY_S, **kwargs):
            self.retry_s = retry_s
            self.reconnected_at: float | None = None  # when this process last saw the server come back
            self._silent_since: dict[int, float] = {}  # RUNNING trials never heard from: when first seen so
            super().__init__(url, *args, **kwargs)

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            grace = self.grace_period or 2 * self.heartbeat_interval
            if self.reconnected_at is not None and time.monotonic() - self.reconnected_at < grace:
                # every worker's heartbeats were held up by the same outage: give them a grace period to resume
                # before calling anyone dead
                return []
            stale = super()._get_stale_trial_ids(study_id)
            return stale + [i for i in self._never_beating(study_id, grace) if i not in stale]

        def _never_beating(self, study_id: int, grace: float) -> list[int]:
            """RUNNING trials without any heartbeat that this process has seen so for longer than the grace
            period: their worker died between taking the trial and its first heartbeat (Optuna's own check
            skips them, and they would hold the sweep forever). Timed on this process's clock: machines'
            clocks may disagree, and a trial's start time is its own worker's."""
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session
            from optuna.trial import TrialState

            with _create_scoped_session(self.scoped_session) as session:
                ids = {row[0] for row in session.query(models.TrialModel.trial_id)
                       .filter(models.TrialModel.study_id == study_id)
                       .filter(models.TrialModel.state == TrialState.RUNNING)
                       .filter(~models.TrialModel.heartbeats.any())}
            now = time.monotonic()
            self._silent_since = {i: self._silent_since.get(i, now) for i in ids}
            return sorted(i for i, since in self._silent_since.items() if now - since > grace)

    for name in {*vars(BaseStorage), *vars(BaseHeartbeat)}:
        if not name.startswith("__") and callable(getattr(ResilientRDBStorage, name, None)):
            setattr(ResilientRDBStorage, name, _retried(name, getattr(ResilientRDBStorage, name)))
    return ResilientRDBStorage


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
