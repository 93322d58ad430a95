"""The merged export: same logits as the adapter, trained head kept, and loadable with peft unavailable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from budgetlora import runs
from budgetlora.errors import RunFolderError
from budgetlora.inference.export import EXPORT_INFO, TOLERANCE, ExportError, export_merged, merge
from budgetlora.inference.load import load_run

# Runs with peft made unimportable: `sys.modules[name] = None` makes both `import peft` and
# importlib.util.find_spec("peft") (what transformers uses to detect it) behave as if it were not installed.
NO_PEFT_LOADER = r"""
import json, sys
sys.modules["peft"] = None
try:
    import peft
    raise SystemExit("peft is still importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.stdin.read())
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
logits = []
with torch.inference_mode():
    for t in texts:  # one at a time: no padding, so nothing depends on batching
        logits.append(model(**tok([t], truncation=True, return_tensors="pt")).logits[0].tolist())
print(json.dumps({"logits": logits, "peft_loaded": any(m.startswith("peft") and sys.modules[m] is not None
                                                        for m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "merged"
    return out, export_merged(tiny_run, out)


@pytest.mark.slow
def test_merged_logits_match_unmerged(exported, tiny_run):
    out, info = exported
    assert 0 <= info["max_abs_logit_diff"] <= TOLERANCE
    assert runs.read_json(out / EXPORT_INFO) == info
    assert info["verify_texts"] == len(runs.read_json(tiny_run / runs.VERIFY)["texts"]) > 0
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if "peft" in k.lower() or "adapter" in k.lower()]
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2", "3": "3"}  # a CSV of its own: ids name the classes
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


@pytest.mark.slow
def test_export_loads_without_peft(exported, tiny_run):
    out, _ = exported
    texts = runs.read_json(tiny_run / runs.VERIFY)["texts"][:12]
    unmerged = load_run(tiny_run, verify=False).logits(texts, exact=True)  # fp32, as exported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", NO_PEFT_LOADER, str(out)], input=json.dumps(texts),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["peft_loaded"] is False
    got = np.asarray(result["logits"], dtype=np.float32)
    assert got.shape == unmerged.shape
    assert np.abs(got - unmerged).max() <= TOLERANCE
    assert (got.argmax(1) == unmerged.argmax(1)).all()


def test_refuses_to_overwrite(exported, tiny_run):
    out, _ = exported
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ExportError, match="--force"):
        export_merged(tiny_run, out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_staged_folder_replaces_only_with_force(tmp_path):
    """Export writes through runs.staged_folder: a refused or failed write leaves the old folder and no temporary
    folder; with force the new folder replaces the old one whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RunFolderError, match="--force"), runs.staged_folder(out) as tmp:
        (tmp / "model.txt").write_text("new")
    with pytest.raises(KeyError), runs.staged_folder(out, force=True) as tmp:
        (tmp / "model.txt").write_text("new")
        raise KeyError("failed half-way")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with runs.staged_folder(out, force=True) as tmp:
        (tmp / "model.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["model.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~runs.current_umask()  # not mkdtemp's private 0700
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="not a folder"), runs.staged_folder(tmp_path / "file", force=True):
        pass
    fresh = tmp_path / "new" / "deeper"
    with runs.staged_folder(fresh) as tmp:
        (tmp / "a.txt").write_text("a")
    assert [p.name for p in fresh.iterdir()] == ["a.txt"]


def test_merge_notices_a_lost_head(tiny_run):
    """The peft pitfall: a merge that leaves the original (untrained) head in place must not pass silently."""
    loaded = load_run(tiny_run, verify=False)
    real = loaded.model.merge_and_unload

    def merge_dropping_head(*args, **kwargs):
        model = real(*args, **kwargs)
        model.classifier.reset_parameters()
        return model

    loaded.model.merge_and_unload = merge_dropping_head
    with pytest.raises(ExportError, match="lost the trained head"):
        merge(loaded)
