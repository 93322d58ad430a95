"""What the wheel ships: every module, every preset, the entry point; presets are found by name. (Installing the
wheel into a fresh environment and running it is .ci/wheel-check.sh, run by scripts/test.sh.)"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from budgetlora.cli import main
from budgetlora.config import Config, preset_path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_modules_presets_and_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("budgetlora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"budgetlora/{p.name}" for p in (ROOT / "src" / "budgetlora").glob("*.py")}
    assert modules <= names, sorted(modules - names)
    presets = {f"budgetlora/presets/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").glob("*.yaml")}
    sweeps = {f"budgetlora/presets/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").glob("sweeps/*.yaml")}
    assert presets and sweeps and presets | sweeps <= names, sorted((presets | sweeps) - names)
    assert not [n for n in names if "/invalid/" in n]  # the deliberately broken presets stay in the checkout
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "budgetlora = budgetlora.cli:main" in entry


def test_presets_resolve_by_name(capsys):
    assert preset_path("minilm-quick") == ROOT / "configs" / "minilm-quick.yaml"
    assert preset_path("sweeps/minilm-mini") == ROOT / "configs" / "sweeps" / "minilm-mini.yaml"
    assert preset_path("no-such-preset") is None and preset_path("../pyproject.toml") is None
    assert Config.from_yaml("minilm-quick") == Config.from_yaml(ROOT / "configs" / "minilm-quick.yaml")
    assert main(["plan", "--config", "minilm-quick", "--json"]) == 0
    assert '"fits": true' in capsys.readouterr().out
