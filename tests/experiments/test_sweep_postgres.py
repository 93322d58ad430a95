"""Sweeps on a real database server (PostgreSQL): two workers share one study without losing or repeating a
trial, and a worker killed with SIGKILL mid-trial is found by its stopped heartbeat, its trial failed and run
again by the surviving worker, and the sweep completes; `budgetlora report` then reads what the study produced.
The kill is also tried on the default SQLite storage. The URL opens however its driver is written (or not), a
missing database or user is one line, and two sweeps started separately on one study never take the same point.

The server comes from `.ci/setup-postgres.sh` (scripts/test.sh exports its URL as BUDGETLORA_TEST_PG). Without a
URL these tests fail, unless BUDGETLORA_TEST_NO_PG=1 says on purpose that there is no database server here.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest

from budgetlora.cli import main
from budgetlora.experiments.spec import load_spec
from budgetlora.experiments.sweep import default_storage, run_sweep, summary
from tests.experiments.test_sweep import GRID, calls, fake_runner, write_spec
from tests.conftest import log_lines

SLOW_POINT = {"lora.r": 4, "lora.alpha": 8}


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get("BUDGETLORA_TEST_PG", "")
    if not url:
        if os.environ.get("BUDGETLORA_TEST_NO_PG") == "1":
            pytest.skip("BUDGETLORA_TEST_NO_PG=1: no PostgreSQL server for the sweep database tests")
        pytest.fail("BUDGETLORA_TEST_PG is not set: start a server with `bash .ci/setup-postgres.sh` and export the "
                    "URL it prints (scripts/test.sh does both), or set BUDGETLORA_TEST_NO_PG=1 to leave these out")
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(url).connect() as con:
            con.execute(sqlalchemy.text("SELECT 1"))
    except Exception as e:
        pytest.fail(f"cannot reach the PostgreSQL server at {url}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return url


def slow_once_runner(cfg, root):
    """The fake runner, except that the first run of SLOW_POINT sleeps for two minutes (long enough to be killed
    in), after writing its worker's pid for the test to find."""
    root = Path(root)
    if cfg.lora.r == SLOW_POINT["lora.r"] and cfg.lora.alpha == SLOW_POINT["lora.alpha"]:
        try:
            fd = os.open(root.parent / "slow.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass  # the retry: run normally
        else:
            (root.parent / "calls").mkdir(parents=True, exist_ok=True)
            (root.parent / "calls" / f"{cfg.run_id}.{os.getpid()}.killed").touch()
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(120)
    return fake_runner(cfg, root)


def _spec(tmp_path, **body):
    # a fresh study name per test: the database outlives the test run
    return load_spec(write_spec(tmp_path, name=f"pg-{uuid.uuid4().hex[:10]}", grid=GRID, **body),
                     root=tmp_path / "sweeps")


def _trials(spec, url):
    return optuna.load_study(study_name=spec.name, storage=url).get_trials()


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tmp_path, monkeypatch, pg_url):
    monkeypatch.setenv("FAKE_RUN_S", "0.5")  # inherited by the spawned workers: trials overlap
    spec = _spec(tmp_path)
    s = run_sweep(spec, storage=pg_url, workers=2, runner=fake_runner)
    assert s["storage"] == pg_url and s["states"] == {"COMPLETE": 8}, s
    done = [t for t in _trials(spec, pg_url) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(tuple(sorted(t.params.items())) for t in done) == \
        sorted({tuple(sorted(t.params.items())) for t in done}) and len(done) == 8  # every point, once
    c = calls(spec)
    assert len(c) == len(set(c)) == 8, c  # no config trained twice, none lost
    pids = {p.name.split(".")[1] for p in (spec.runs.parent / "calls").iterdir()}
    assert len(pids) == 2, "both workers should have taken trials"
    assert s["best"]["params"] == {"lora.r": 8, "lora.alpha": 16}
    again = run_sweep(spec, storage=pg_url, workers=1, runner=fake_runner)
    assert again["trials"] == 8 and calls(spec) == c  # resumed: nothing left, nothing rerun
    optuna.delete_study(study_name=spec.name, storage=pg_url)


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_failed_retried_and_the_sweep_completes(tmp_path, monkeypatch, pg_url):
    _kill_one_worker(tmp_path, monkeypatch, pg_url)


@pytest.mark.slow
def test_the_same_on_sqlite(tmp_path, monkeypatch):
    """Heartbeats work on any RDB storage: the default SQLite file behaves the same."""
    _kill_one_worker(tmp_path, monkeypatch, None)


def _kill_one_worker(tmp_path, monkeypatch, url):
    monkeypatch.setenv("FAKE_RUN_S", "0.3")
    spec = _spec(tmp_path, heartbeat_s=1, grace_s=3)
    url = url or default_storage(spec)
    logs: list[str] = []
    result: dict = {}

    def sweep():
        with log_lines(logs):
            result["summary"] = run_sweep(spec, storage=url, workers=2, runner=slow_once_runner)

    thread = threading.Thread(target=sweep)
    thread.start()
    marker = spec.runs.parent / "slow.pid"
    deadline = time.monotonic() + 120
    while not (marker.is_file() and marker.read_text()):
        assert thread.is_alive() and time.monotonic() < deadline, f"the slow trial never started: {logs}"
        time.sleep(0.1)
    pid = int(marker.read_text())
    time.sleep(1.5)  # mid-trial: its heartbeat has been recorded
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the sweep did not complete after a worker was killed"

    s = result["summary"]
    assert s["states"] == {"COMPLETE": 8, "FAIL": 1}, s
    assert s["failed"] == {}, "the killed trial's point was retried and finished, so no failure stands"
    trials = _trials(spec, url)
    (dead,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert dead.params == SLOW_POINT
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == SLOW_POINT
    assert retry.datetime_start.timestamp() >= killed_at + 3 - 1, "retried before the grace period ran out"
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done) == 8  # none lost, none twice
    per_config = collections.Counter(calls(spec))
    slow_id = retry.user_attrs["run_id"]
    assert per_config.pop(slow_id) == 2  # the killed run and its retry
    assert len(per_config) == 7 and set(per_config.values()) == {1}  # every other config trained once
    after_kill = [p for p in (spec.runs.parent / "calls").iterdir() if p.name.split(".")[1] == str(pid)
                  and not p.name.endswith(".killed") and p.stat().st_mtime > killed_at]
    assert after_kill == [], "the killed worker took trials after its death"
    assert any(f"killed (signal {signal.SIGKILL.value})" in line for line in logs), logs

    # `budgetlora report` reads what the study produced: one row per grid point, the retried one included
    assert main(["report", str(spec.folder)]) == 0
    rows = (spec.folder / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 8
    assert summary(spec, url)["states"] == s["states"]  # a fresh reader of the database sees the same study
    optuna.delete_study(study_name=spec.name, storage=url)


def test_heartbeat_settings_are_checked(tmp_path):
    from budgetlora.config import ConfigError

    with pytest.raises(ConfigError, match="heartbeat_s"):
        load_spec(write_spec(tmp_path, grid=GRID, heartbeat_s=5, grace_s=5))
    spec = load_spec(write_spec(tmp_path, grid=GRID, heartbeat_s=2, grace_s=7))
    assert (spec.heartbeat_s, spec.grace_s) == (2, 7)
    default = load_spec(write_spec(tmp_path, grid=GRID))
    assert (default.heartbeat_s, default.grace_s) == (10, 60)


# -- the URL as users write it, on the live server ------------------------------------------------------------------
def _as(url: str, **parts) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(**parts).render_as_string(hide_password=False)


@pytest.fixture
def fake_training(monkeypatch):
    import budgetlora.training.train

    monkeypatch.setattr(budgetlora.training.train, "train",
                        lambda cfg, root, on_record=None, **k: fake_runner(cfg, root))


@pytest.mark.parametrize("driver", ["postgresql", "postgresql+psycopg", "postgresql+psycopg2"])
def test_every_way_of_writing_the_url_runs_a_sweep(tmp_path, capsys, pg_url, fake_training, driver):
    url = _as(pg_url, drivername=driver)
    spec = load_spec(write_spec(tmp_path, name=f"pg-{uuid.uuid4().hex[:10]}", grid={"lora.r": [2, 4]}),
                     root=tmp_path / "sweeps")
    assert main(["sweep", str(tmp_path / f"{spec.name}.yaml"), "--root", str(tmp_path / "sweeps"),
                 "--storage", url]) == 0, capsys.readouterr()
    assert summary(spec, url)["states"] == {"COMPLETE": 2}
    optuna.delete_study(study_name=spec.name, storage=_as(pg_url, drivername="postgresql+psycopg"))


@pytest.mark.parametrize("parts, says", [({"database": "no_such_database"}, "no such database on that server"),
                                         ({"username": "no_such_user"}, "the server refused the login")])
def test_a_missing_database_or_user_is_one_line(tmp_path, capsys, pg_url, parts, says):
    url = _as(pg_url, password="secret", **parts)
    capsys.readouterr()
    assert main(["sweep", str(write_spec(tmp_path, grid=GRID)), "--root", str(tmp_path / "sweeps"),
                 "--storage", url]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and says in err and "***@" in err and "secret" not in out + err, err


def _fail_on_r2(cfg, root):
    if cfg.lora.r == 2:
        raise RuntimeError("boom")
    return fake_runner(cfg, root)


@pytest.mark.slow
@pytest.mark.parametrize("failed_before", [False, True])
def test_two_independent_sweeps_share_one_postgres_study(tmp_path, pg_url, failed_before):
    """Two `budgetlora sweep` processes, started apart and released at the same instant on one study (new, or one
    whose earlier sweep left failed points to retry): every grid point runs once, none is drawn twice (not even
    as a pruned duplicate), and both take trials."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    spec_path = write_spec(tmp_path, name=f"pg-{uuid.uuid4().hex[:10]}", grid=GRID)
    spec = load_spec(spec_path, root=tmp_path / "sweeps")
    if failed_before:
        before = run_sweep(spec, storage=pg_url, runner=_fail_on_r2)
        assert before["states"] == {"COMPLETE": 6, "FAIL": 2}, before
    go = tmp_path / "go"
    env = {**os.environ, "FAKE_RUN_S": "0.5", "SWEEP_GO": str(go), "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "tests.experiments.sweep_entry", str(spec_path), "--root", str(tmp_path / "sweeps"),
           "--storage", pg_url]
    procs = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("go.*.ready"))) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a sweep did not start"
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = _trials(spec, pg_url)
    want = {"COMPLETE": 8, "FAIL": 2} if failed_before else {"COMPLETE": 8}
    assert collections.Counter(t.state.name for t in trials) == want, [
        (t.number, t.state.name, t.params, t.user_attrs.get("pruned")) for t in trials]
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len({tuple(sorted(t.params.items())) for t in done}) == 8
    c = calls(spec)
    assert len(c) == len(set(c)) == 8, c
    if not failed_before:  # (with failures before, only the two retries are left: one sweep may take both)
        pids = {p.name.split(".")[1] for p in (spec.runs.parent / "calls").iterdir()}
        assert len(pids) == 2, "both sweeps should have taken trials"
    optuna.delete_study(study_name=spec.name, storage=pg_url)


# -- the server goes away mid-sweep ---------------------------------------------------------------------------------
def _ours(pg_url: str) -> bool:
    """Whether `pg_url` is the server `.ci/setup-postgres.sh` started (the one a test may stop and start)."""
    from sqlalchemy.engine import make_url

    folder = Path(os.environ.get("BUDGETLORA_PG_DIR") or f"/tmp/budgetlora-pg-{os.getuid()}")
    url = make_url(pg_url)
    port = (folder / "port").read_text().strip() if (folder / "port").is_file() else None
    return url.host == "127.0.0.1" and str(url.port) == port


def _restart_server(pg_url: str, down_s: float) -> float:
    """Stop the test server, leave it down for `down_s` seconds, start it again on its port (with
    `.ci/setup-postgres.sh`); returns how long it was away."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / ".ci" / "setup-postgres.sh"
    started = time.monotonic()
    stop = subprocess.run(["bash", str(script), "--stop"], capture_output=True, text=True, timeout=120)
    time.sleep(down_s)
    start = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    if stop.returncode or start.returncode or start.stdout.strip() != pg_url:
        pytest.fail(f"could not stop and start the server at {pg_url} with .ci/setup-postgres.sh (is it the "
                    f"server that script started?): {stop.stderr.strip()[-300:]} {start.stderr.strip()[-300:]}")
    return time.monotonic() - started


@pytest.mark.slow
def test_a_postgres_restart_mid_sweep_is_survived(tmp_path, monkeypatch, pg_url):
    """Two workers, the server stopped for 3 s and started again, twice, while trials run (each trial's end falls in
    the outage): the workers wait for it (bounded back-off), the running trials finish, and the study ends with every grid point complete once: none failed, none lost, no
    config trained twice."""
    if not _ours(pg_url):
        pytest.skip(f"{pg_url} is not the server .ci/setup-postgres.sh started: only that one is stopped by a test")
    monkeypatch.setenv("FAKE_RUN_S", "2.0")  # every trial spans heartbeats, and so the restart
    spec = _spec(tmp_path, heartbeat_s=1, grace_s=20)
    logs: list[str] = []
    result: dict = {}

    def sweep():
        with log_lines(logs):
            result["summary"] = run_sweep(spec, storage=pg_url, workers=2, runner=fake_runner)

    started = time.monotonic()
    thread = threading.Thread(target=sweep)
    thread.start()
    restarts = []
    for _ in range(2):
        deadline = time.monotonic() + 120
        while True:  # wait until two trials run (each past its first heartbeat)
            running = [t for t in _trials(spec, pg_url) if t.state == optuna.trial.TrialState.RUNNING] \
                if spec.name in [s.study_name for s in optuna.get_all_study_summaries(pg_url)] else []
            if len(running) == 2 and not {t.number for t in running} & {n for *_, hit in restarts for n in hit}:
                break  # two trials that no earlier restart hit
            assert thread.is_alive() and time.monotonic() < deadline, f"no two trials ran: {logs}"
            time.sleep(0.1)
        time.sleep(0.5)
        restarts.append((round(time.monotonic() - started, 1), round(_restart_server(pg_url, down_s=3.0), 2),
                         [t.number for t in running]))
    thread.join(timeout=240)
    assert not thread.is_alive(), "the sweep did not complete after the server restarts"
    took = time.monotonic() - started

    s = result["summary"]
    trials = _trials(spec, pg_url)
    states = collections.Counter(t.state.name for t in trials)
    print(f"\nrestart test: restarts at (s since start, s away, trials running) {restarts}; "
          f"sweep took {took:.1f} s; trials {dict(states)}; configs trained {len(calls(spec))}")
    assert s["states"] == {"COMPLETE": 8} == dict(states), [(t.number, t.state.name, t.params) for t in trials]
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({tuple(sorted(t.params.items())) for t in done}) == 8  # every point, once
    c = calls(spec)
    assert len(c) == len(set(c)) == 8, c  # no config trained twice, none lost
    hit = {n for _, _, numbers in restarts for n in numbers}
    assert len(hit) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials if t.number in hit)
    optuna.delete_study(study_name=spec.name, storage=pg_url)


@pytest.mark.parametrize("server", [True, False], ids=["postgres", "sqlite"])
def test_a_worker_killed_before_its_first_heartbeat_is_found(tmp_path, request, server):
    """A worker that died after taking a trial and its grid point but before the trial's first heartbeat (Optuna's
    heartbeat check skips such trials, so the sweep waited for it forever): after the grace period the trial is
    failed, its point queued again and run, and the sweep completes."""
    spec = _spec(tmp_path, heartbeat_s=1, grace_s=3)
    url = request.getfixturevalue("pg_url") if server else default_storage(spec)
    spec.folder.mkdir(parents=True, exist_ok=True)
    # what the dead worker left: a RUNNING trial holding grid point 0, no parameters drawn, no heartbeat
    grid = optuna.samplers.GridSampler(spec.grid, seed=spec.seed)
    dead = optuna.create_study(study_name=spec.name, storage=url, sampler=grid).ask()
    assert "grid_id" in _trials(spec, url)[0].system_attrs and _trials(spec, url)[0].params == {}
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        s=run_sweep(spec, storage=url, workers=1, runner=fake_runner)))
    started = time.monotonic()
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive(), "the sweep waited forever for a trial that never had a heartbeat"
    assert time.monotonic() - started >= 3, "the silent trial was failed before its grace period"
    trials = _trials(spec, url)
    assert result["s"]["states"] == {"COMPLETE": 8, "FAIL": 1}, [(t.number, t.state.name, t.params) for t in trials]
    (failed,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.number == dead.number and failed.params == {}
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.state == optuna.trial.TrialState.COMPLETE
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({tuple(sorted(t.params.items())) for t in done}) == 8
    c = calls(spec)
    assert len(c) == len(set(c)) == 8, c
    optuna.delete_study(study_name=spec.name, storage=url)
