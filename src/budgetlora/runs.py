"""The run folder: `runs/<run id>/` holding everything needed to trust a run later.

Every file is written to a temporary name in the same folder and renamed into place, so a run killed mid-write
never leaves a half-written file where a complete one stood.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import yaml

from budgetlora.config import Config, ConfigError
from budgetlora.errors import RunFolderError

DEFAULT_ROOT = "runs"
CONFIG = "config.yaml"
METRICS = "metrics.json"
HISTORY = "history.csv"
VERIFY = "verify.json"
PREDICTIONS = "test_predictions.csv"  # per-row test answers, for paired comparisons
VAL_PREDICTIONS = "val_predictions.csv"  # the same for validation rows: what a choice between runs may read
VAL_PROBABILITIES = "val_probabilities.csv"  # validation rows' calibrated probabilities: what an ensemble is judged on
VERSIONS = "versions.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECKPOINT = "checkpoint"
LOCKS = ".locks"


class MissingRunFile(RunFolderError, FileNotFoundError):
    """A file a run folder should hold is not there (still a FileNotFoundError for callers that catch that)."""


def run_dir(cfg: Config, root: str | Path = DEFAULT_ROOT) -> Path:
    return Path(root) / cfg.run_id


def is_finished(path: Path) -> bool:
    return (Path(path) / METRICS).is_file() and all((Path(path) / f).is_file() for f in ADAPTER_FILES)


_held = threading.local()  # lock files this thread holds: taking one again (a sweep around `train`) must not wait


@contextmanager
def run_lock(root: str | Path, run_id: str):
    """Hold an exclusive lock on one run id under `root` (root/.locks/<run id>.lock), so two processes never train
    the same config at once: the second waits, then finds the run finished. flock is released by the kernel when
    its process dies, so a killed run leaves no stale lock behind. Re-entrant within a thread."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run-id reuse still avoids most repeats
        yield
        return
    lock = Path(root) / LOCKS / f"{run_id}{_rank_suffix()}.lock"
    held = _held.__dict__.setdefault("paths", set())
    key = os.path.abspath(lock)
    if key in held:
        yield
        return
    fh = _open_lock(lock)
    if fh is None:  # a read-only runs folder: nothing can be trained there, and a finished run needs no lock
        yield
        return
    with fh:
        with writing(lock):  # ENOLCK: a file system without flock
            fcntl.flock(fh, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_lock(lock: Path):
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return open(lock, "w")
    except OSError:
        return None


def _rank_suffix() -> str:
    """The ranks of one distributed launch all train the same run id together: each takes its own lock (waiting on
    the same rank of another launch), or rank 1 would wait forever on rank 0, which waits for rank 1."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("RANK", "0") not in ("", "0"):
        return f".rank{os.environ['RANK']}"
    return ""


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename. A write that fails for
    want of space or permission is a RunFolderError naming `path`, and leaves what stood there before."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
    try:
        with writing(path):
            yield Path(tmp)
            # mkstemp makes the file 0600; a file written in place would be 0666 less the umask, and so is this one
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def writing(path: Path):
    """Turn a failed write under `path` (a full disk, no permission, the safetensors writer's own error) into one
    RunFolderError naming it; one already raised for a file inside passes as it is."""
    from safetensors import SafetensorError

    try:
        yield
    except RunFolderError:
        raise
    except (OSError, SafetensorError) as e:
        raise RunFolderError(f"cannot write {path}: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()  # the CLI prints one line: a multi-line message keeps its first
    return lines[0][:300] if lines else type(e).__name__


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (setting it to read it back
    would leave other threads a moment of umask 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object in a run's file. Missing, unreadable, not JSON, not an object, or without one of `keys`: a
    RunFolderError naming the file, so that a damaged run folder is reported, not a traceback."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingRunFile(f"{path} is missing") from None
    except OSError as e:
        raise RunFolderError(f"{path} cannot be read: {_reason(e)}") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both derive from it
        raise RunFolderError(f"{path} is corrupt: {'empty' if not path.stat().st_size else 'not valid JSON'}") \
            from None
    if not isinstance(obj, dict):
        raise RunFolderError(f"{path} is corrupt: a JSON {type(obj).__name__}, not an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise RunFolderError(f"{path} is corrupt: no {', '.join(missing)}")
    return obj


def save_adapter(model, path: Path, convert=None) -> None:
    """peft's save_pretrained into a temporary folder, then each file renamed into the run folder.

    convert: called with the temporary folder before anything is renamed (methods.save_adapter rewrites a
    PiSSA/OLoRA adapter there into a plain LoRA on the original base)."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=path))
    try:
        with writing(path):
            model.save_pretrained(tmp)
            if convert is not None:
                convert(tmp)
            for name in ADAPTER_FILES:
                os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_config(path: Path) -> Config:
    """The config a run folder was trained with. Missing, unreadable, not YAML, or not a config: a RunFolderError
    naming config.yaml."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise MissingRunFile(f"not a run folder (no {CONFIG}): {path}")
    try:
        d = yaml.safe_load(file.read_text())
    except OSError as e:
        raise RunFolderError(f"{file} cannot be read: {_reason(e)}") from None
    except (yaml.YAMLError, ValueError):
        raise RunFolderError(f"{file} is corrupt: not valid YAML") from None
    # every run writes the whole tree; without its model section a folder would load as some other model
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise RunFolderError(f"{file} is corrupt: {'empty' if d is None else 'no model section'}")
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        raise RunFolderError(f"{file} is corrupt: {e}") from None


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("budgetlora", "torch", "transformers", "peft", "accelerate", "datasets", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return out


def list_runs(root: Path) -> list[Path]:
    # a hidden folder is a run's staging area or a lock, never a run
    return sorted(p.parent for p in Path(root).glob(f"**/{METRICS}")
                  if is_finished(p.parent) and not any(part.startswith(".") for part in p.relative_to(root).parts))


# -- outputs, checked before the work that ends in them --------------------------------------------------------------
OUTPUT_KINDS = ("file", "folder", "into")


def check_output(path: str | Path, kind: str = "file", parents: bool = False) -> Path:
    """Refuse now, in one line, an output the command could not write at its end, before minutes of loading or
    training are spent on it. kind: `file` (written beside itself and renamed over `path`), `folder` (a folder
    made beside `path` and renamed into place), `into` (files written inside `path`, made if absent). The folder
    it goes in must exist, unless `parents` (the caller makes missing folders: then the nearest that exists must
    be writable). Nothing is created or changed here. Returns `path`."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise RunFolderError(f"cannot write {path}: it is a folder, and a file is written there")
    if kind != "file" and path.exists() and not path.is_dir():
        raise RunFolderError(f"cannot write {path}: it is a file, and a folder is written there")
    if kind == "into" and path.is_dir():
        _check_writable(path, path)
        return path
    parent = Path(os.path.abspath(path)).parent  # `out` alone means the working directory, not ''
    while parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise RunFolderError(f"cannot write {path}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise RunFolderError(f"cannot write {path}: {parent} is not a folder")
    _check_writable(path, parent)
    if kind == "folder" and path.is_dir():  # replacing it moves it aside: that needs it writable too
        _check_writable(path, path)
    return path


def _check_writable(path: Path, folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write {path}: no permission to write in {folder}")


# -- whole folders --------------------------------------------------------------------------------------------------
@contextmanager
def staged_folder(out: Path, force: bool = False):
    """Yield a new temporary folder beside `out`; when the block completes it becomes `out` in one rename, and when
    the block fails it is removed and `out` is left as it was. A non-empty `out` is replaced only with `force`, and
    only at that final rename, so a failed or refused write never loses the folder that stood there."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the published folder should look like any other
    try:
        yield tmp
        _publish_folder(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_folder(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise RunFolderError(f"{out} is not empty; pass --force to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)  # a rename cannot replace a non-empty folder: move it aside first
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)


@contextmanager
def staged_files(out: Path):
    """Yield a hidden folder inside `out` to write a run's files into; when the block completes, each file is renamed
    into `out` (metrics.json last, since it marks the run finished), and when it fails the folder is removed. A
    retrain over a finished run so either replaces it whole or leaves it as it was: the writes that can fail for want
    of space all happen in the staging folder, and renames need none."""
    out = Path(out)
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".staging.", dir=out))
    try:
        yield tmp
        files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name == METRICS, str(p)))
        with writing(out):
            for f in files:
                dest = out / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
