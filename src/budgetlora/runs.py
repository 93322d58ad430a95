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
from contextlib import contextmanager
from pathlib import Path

from budgetlora.config import Config

DEFAULT_ROOT = "runs"
CONFIG = "config.yaml"
METRICS = "metrics.json"
HISTORY = "history.csv"
VERIFY = "verify.json"
VERSIONS = "versions.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHECKPOINT = "checkpoint"


def run_dir(cfg: Config, root: str | Path = DEFAULT_ROOT) -> Path:
    return Path(root) / cfg.run_id


def is_finished(path: Path) -> bool:
    return (Path(path) / METRICS).is_file() and all((Path(path) / f).is_file() for f in ADAPTER_FILES)


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600; a file written in place would be 0666 less the umask, and so is this one
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def save_adapter(model, path: Path, convert=None) -> None:
    """peft's save_pretrained into a temporary folder, then each file renamed into the run folder.

    convert: called with the temporary folder before anything is renamed (methods.save_adapter rewrites a
    PiSSA/OLoRA adapter there into a plain LoRA on the original base)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=path))
    try:
        model.save_pretrained(tmp)
        if convert is not None:
            convert(tmp)
        for name in ADAPTER_FILES:
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_config(path: Path) -> Config:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"not a run folder (no {CONFIG}): {path}")
    return Config.from_yaml(path / CONFIG)


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
    return sorted(p.parent for p in Path(root).glob(f"**/{METRICS}") if is_finished(p.parent))
