"""Files written through runs.py (write to a temporary name, then rename) get the permissions the umask gives any
other new file, not the private 0600 of the temporary file."""
from __future__ import annotations

import os
import stat

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
    with pytest.raises(RuntimeError):
        with runs.atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
