"""The split-zip model assembler, on small fake parts: the right hash is accepted; a wrong hash, a missing part, a
truncated part, an unsafe archive and an interrupted assembly are refused with one line, and nothing is left under
the model's name that a later run would take as good."""
import hashlib
import io
import os
import zipfile
from dataclasses import replace

import pytest

from budgetlora import cli
from budgetlora.adapters import packaged
from budgetlora.adapters.packaged import STAMP, ModelNotFound, SplitModel

WEIGHTS = os.urandom(50_000)  # incompressible, so the pieces cut through the stored data


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


GOOD = {"fake-model/config.json": b'{"model_type": "bert"}', "fake-model/model.safetensors": WEIGHTS,
        "fake-model/tokenizer.json": b"{}", "fake-model/desktop.ini": b"[.ShellClassInfo]",
        "fake-model/1_Pooling/config.json": b"{}"}
FAKE = SplitModel(name="fake-model", dists=("fake-part-1", "fake-part-2", "fake-part-3"), piece="fake.zip.{i:03d}",
                  weights="model.safetensors", size=len(WEIGHTS), sha256=hashlib.sha256(WEIGHTS).hexdigest(),
                  extra="fake")


def _pieces(tmp_path, blob: bytes, n: int = 3):
    cut = [len(blob) * i // n for i in range(n + 1)]
    paths = []
    for i in range(n):
        p = tmp_path / f"fake.zip.{i + 1:03d}"
        p.write_bytes(blob[cut[i]:cut[i + 1]])
        paths.append(p)
    return paths


def test_right_hash_is_assembled_once(tmp_path):
    root = tmp_path / "cache"
    folder = packaged.model_path(FAKE, _pieces(tmp_path, _zip(GOOD)), root=root)
    assert folder == root / "fake-model"
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "1_Pooling" / "config.json").is_file() and not (folder / "desktop.ini").exists()
    assert (folder / STAMP).read_text().strip() == FAKE.sha256
    assert [p.name for p in root.iterdir()] == ["fake-model"]  # no temporary folder left beside it
    # a second call finds the verified folder and never reads the pieces
    assert packaged.model_path(FAKE, [tmp_path / "gone"], root=root) == folder


@pytest.mark.parametrize("case", ["wrong hash", "truncated part", "pieces out of order", "two weight files",
                                  "unsafe path"])
def test_bad_parts_are_refused_and_leave_nothing(case, tmp_path):
    model, blob = FAKE, _zip(GOOD)
    if case == "wrong hash":
        model = replace(FAKE, sha256="0" * 64)
    if case == "two weight files":
        blob = _zip({**GOOD, "other/model.safetensors": WEIGHTS})
    if case == "unsafe path":
        blob = _zip({**GOOD, "fake-model/../../escape.txt": b"x"})
    pieces = _pieces(tmp_path, blob)
    if case == "truncated part":
        pieces[1].write_bytes(pieces[1].read_bytes()[:-1000])
    if case == "pieces out of order":
        pieces = [pieces[1], pieces[0], pieces[2]]
    root = tmp_path / "cache"
    with pytest.raises(ModelNotFound) as e:
        packaged.model_path(model, pieces, root=root)
    message = str(e.value)
    assert "\n" not in message and message.startswith("fake-model: ")
    if case != "unsafe path":
        assert "pip install --force-reinstall 'budgetlora[fake]'" in message
    assert list(root.iterdir()) == []  # no folder under the model's name, no temporary one
    assert not (tmp_path / "escape.txt").exists()


def test_missing_part_names_it_and_the_install(tmp_path):
    with pytest.raises(ModelNotFound, match=r"part 1 of 3 \(fake-part-1\) is not installed; install all parts "
                                            r"with `pip install 'budgetlora\[fake\]'`"):
        packaged.model_path(FAKE, root=tmp_path)


def test_interrupted_assembly_is_never_taken_as_good(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    pieces = _pieces(tmp_path, _zip(GOOD))

    def killed(path):  # the process dies while hashing: after unzipping, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "_sha256", killed)
    with pytest.raises(KeyboardInterrupt):
        packaged.model_path(FAKE, pieces, root=root)
    assert list(root.iterdir()) == []
    # a process killed outright leaves its temporary folder: it is never used, and the next assembly removes it
    monkeypatch.undo()
    stale = root / ".fake-model.assembling-999999999"
    (stale / "fake-model").mkdir(parents=True)
    folder = packaged.model_path(FAKE, pieces, root=root)
    assert not stale.exists() and [p.name for p in root.iterdir()] == ["fake-model"]
    # a folder under the final name without the stamp (copied in by hand, half-deleted) is refused, not used
    (folder / STAMP).unlink()
    with pytest.raises(ModelNotFound, match="exists but is not a verified fake-model folder; delete it"):
        packaged.model_path(FAKE, pieces, root=root)


def test_unwritable_cache_is_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ModelNotFound, match=r"cannot assemble into .*set \$BUDGETLORA_CACHE"):
        packaged.model_path(FAKE, _pieces(tmp_path, _zip(GOOD)), root=blocked / "models")


def test_cli_answers_a_bad_cache_with_exit_2(tmp_path, monkeypatch, capsys):
    """The CLI's one line for the packaged MPNet when the cache holds an unverified folder under its name; the
    planner needs neither the parts nor the folder (its config is built in)."""
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path))
    (tmp_path / "models" / "all-mpnet-base-v2").mkdir(parents=True)
    assert cli.main(["plan", "--model.name", "mpnet", "--lora.targets", "q,v", "--lora.r", "10"]) == 0
    assert "total trainable: 962,308 of 1,000,000 (fits)" in capsys.readouterr().out
    assert cli.main(["train", "--model.name", "mpnet", "--lora.targets", "q,v", "--runs", str(tmp_path / "runs"),
                     "--data.train_limit", "40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("budgetlora: error: ") and "is not a verified all-mpnet-base-v2 folder" in err[-1]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "c"))
    assert packaged.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(packaged.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert packaged.cache_dir() == tmp_path / "x" / "budgetlora"
