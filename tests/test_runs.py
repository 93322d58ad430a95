"""Files written through runs.py (write to a temporary name, then rename) get the permissions the umask gives any
other new file, not the private 0600 of the temporary file; a write that fails (a full disk) is one line naming the
run folder with nothing marked finished; and two processes on one run id train it once."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import stat
from pathlib import Path

import pytest

from budgetlora import runs


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        assert runs.current_umask() == umask
        runs.write_text(tmp_path / "a.txt", "x")
        runs.write_json(tmp_path / "sub" / "m.json", {"a": 1})
        with runs.atomic_path(tmp_path / "blob.bin") as tmp:
            tmp.write_bytes(b"\0")
        (tmp_path / "plain.txt").write_text("x")  # what an ordinary open() makes under this umask
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a.txt", tmp_path / "sub" / "m.json",
                                                              tmp_path / "blob.bin", tmp_path / "plain.txt")}
    assert modes == dict.fromkeys(modes, expected), {k: oct(v) for k, v in modes.items()}
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left behind"


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError), runs.atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


# -- a run that cannot be written ------------------------------------------------------------------------------------
def _flags(small_csvs, seed: int) -> list[str]:
    train_csv, test_csv = small_csvs
    return ["--data.train", str(train_csv), "--data.test", str(test_csv), "--data.val_fraction", "0.1",
            "--model.max_length", "32", "--train.max_steps", "2", "--train.batch_size", "16",
            "--train.eval_every", "2", "--train.seed", str(seed)]


def _full_disk_on_verify(monkeypatch):
    """The disk fills while verify.json is written: after the adapter is saved, before metrics.json."""
    write_text = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(f".{runs.VERIFY}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)


def _full_disk_in_safetensors(monkeypatch):
    """safetensors reports a full disk in its own error type, from inside peft's save_pretrained."""
    from peft import PeftModel
    from safetensors import SafetensorError

    def full(self, *a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(PeftModel, "save_pretrained", full)


@pytest.mark.slow
@pytest.mark.parametrize("fill", [_full_disk_on_verify, _full_disk_in_safetensors])
def test_a_full_disk_is_one_line_and_marks_nothing_finished(tmp_path, small_csvs, tiny_run, capsys, monkeypatch,
                                                           fill):
    from budgetlora.cli import main

    root = tmp_path / "runs"
    earlier = shutil.copytree(tiny_run, root / tiny_run.name)
    kept = {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    fill(monkeypatch)
    assert main(["train", "--runs", str(root), *_flags(small_csvs, seed=1)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("budgetlora: error:")]
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    (failed,) = [p for p in root.iterdir() if p.is_dir() and p != earlier and p.name != runs.LOCKS]
    assert str(failed) in errors[0] and "No space left on device" in errors[0], errors[0]
    assert not (failed / runs.METRICS).exists() and not runs.is_finished(failed)
    assert not [p for p in failed.glob(".*")], "a temporary file or folder was left behind"
    assert {p: p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == kept


@pytest.mark.slow
def test_a_forced_retrain_that_cannot_be_written_leaves_the_finished_run_whole(tmp_path, small_csvs, capsys,
                                                                              monkeypatch):
    from budgetlora.cli import main

    root = tmp_path / "runs"
    assert main(["train", "--runs", str(root), *_flags(small_csvs, seed=3)]) == 0
    (run,) = [p for p in root.iterdir() if p.is_dir() and p.name != runs.LOCKS]
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _full_disk_on_verify(monkeypatch)  # the new adapter is written, then the disk fills before metrics.json
    assert main(["train", "--force", "--runs", str(root), *_flags(small_csvs, seed=3)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in kept} == kept  # every file of the finished run, byte for byte
    assert runs.is_finished(run) and not [p for p in run.glob(".staging*")]


# -- one run id, two processes ----------------------------------------------------------------------------------------
def _train_in_child(cfg, root: str, report: str, barrier) -> None:
    from budgetlora.training.train import train
    from tests.conftest import log_lines

    barrier.wait()  # both start together: without the lock both would find the run unfinished and train it
    with log_lines() as lines:
        out = train(cfg, root=root)
    Path(report).write_text(json.dumps({"out": str(out), "log": lines}))


@pytest.mark.slow
def test_two_processes_on_one_run_train_it_once(tmp_path, small_csvs):
    from tests.conftest import tiny_config

    cfg = tiny_config(small_csvs, **{"train.max_steps": 2, "train.eval_every": 2})
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    reports = [tmp_path / f"child{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_train_in_child, args=(cfg, str(tmp_path / "runs"), str(r), barrier))
             for r in reports]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]
    done = [json.loads(r.read_text()) for r in reports]
    assert done[0]["out"] == done[1]["out"] == str(tmp_path / "runs" / cfg.run_id)
    trained = [any("trainable params" in line for line in d["log"]) for d in done]
    reused = [any("already finished" in line for line in d["log"]) for d in done]
    assert sorted(trained) == [False, True] and reused == [not t for t in trained], done
    assert runs.is_finished(tmp_path / "runs" / cfg.run_id)
