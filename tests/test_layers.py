"""The package's layering, checked on its source: every module imports only from its own stage or those below it,
so a reader finds a stage by its folder and can read up from `data` without meeting a later stage."""
from __future__ import annotations

import ast
from pathlib import Path

import budgetlora

PKG = Path(budgetlora.__file__).resolve().parent
# lower number = lower stage; a module may import its own level and anything below it
LEVELS = {"errors": 0, "config": 0, "runs": 0, "hardware": 0, "progress": 0, "log": 0, "tasks": 0,
          "data": 1, "adapters": 2, "training": 3, "inference": 4, "shift": 5, "experiments": 5,
          "api": 6, "cli": 6, "__init__": 6}
MAX_LINES = 400


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "presets":
            continue
        yield rel, path


def _stage(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def _imports(path: Path, rel: Path):
    """(line, imported budgetlora stage) for every import of the package, function-level ones included."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
                target = [*base, *(node.module.split(".") if node.module else [])]
                names = [a.name for a in node.names] if not node.module else []
            elif node.module and node.module.split(".")[0] == "budgetlora":
                target, names = node.module.split(".")[1:], [a.name for a in node.names]
            else:
                continue
            for name in names or [None]:
                parts = target or [name]
                if parts and parts[0]:
                    yield node.lineno, parts[0]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "budgetlora" and len(parts) > 1:
                    yield node.lineno, parts[1]


def test_every_import_points_down_or_sideways():
    upward = []
    for rel, path in _modules():
        mine = LEVELS[_stage(rel.parts)]
        for line, stage in _imports(path, rel):
            if stage in LEVELS and LEVELS[stage] > mine:
                upward.append(f"{rel}:{line} imports {stage} (level {LEVELS[stage]} > {mine})")
    assert not upward, "\n".join(upward)


def test_every_stage_is_known_and_no_file_is_too_long():
    for rel, path in _modules():
        assert _stage(rel.parts) in LEVELS, f"{rel}: a module outside the known stages"
        n = len(path.read_text().splitlines())
        assert n <= MAX_LINES, f"{rel} has {n} lines (> {MAX_LINES}): split it by purpose"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "data" / "x.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from budgetlora.training.loop import run\n    from ..shift import analysis\n")
    stages = [s for _, s in _imports(bad, Path("data/x.py"))]
    assert stages == ["training", "shift"]
