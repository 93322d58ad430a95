"""ONNX export and serving: onnxruntime reproduces the torch logits of a real run, and the ONNX service (Python
API and CLI) runs in a process where torch cannot be imported at all."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

import budgetlora
from budgetlora import runs
from budgetlora.cli import main
from budgetlora.inference.export import ONNX_TOLERANCE, ExportError, export_onnx
from budgetlora.inference.onnx_serve import INFO_FILE, MODEL_FILE, OnnxClassifier

# `sys.modules[name] = None` makes every `import name` raise ImportError: the code below can only pass if nothing
# on the ONNX path imports torch or transformers
NO_TORCH = 'import sys\nsys.modules["torch"] = None\nsys.modules["transformers"] = None\n'

APP_WITHOUT_TORCH = NO_TORCH + r"""
import json
from fastapi.testclient import TestClient
from budgetlora.inference.onnx_serve import load_onnx
from budgetlora.inference.serve import create_app
texts = json.loads(sys.stdin.read())
with TestClient(create_app(load_onnx(sys.argv[1]))) as client:
    r = client.post("/predict", json={"texts": texts})
    info = client.get("/info").json()
    health = client.get("/health").status_code
print(json.dumps({"status": r.status_code, "body": r.json(), "info": info, "health": health,
                  "torch_loaded": any(m.split(".")[0] == "torch" and sys.modules[m] is not None for m in sys.modules)}))
"""

CLI_WITHOUT_TORCH = NO_TORCH + "from budgetlora.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "model"
    return out, export_onnx(tiny_run, out)


@pytest.fixture(scope="module")
def texts(small_csvs) -> list[str]:
    """Texts the export never saw (its check used the run's validation texts): the test split, plus edge cases."""
    test = pd.read_csv(small_csvs[1])["text"].astype(str).tolist()
    return test + ["x", "A very long headline " * 40]  # one token; far past max_length (truncated)


@pytest.mark.slow
def test_export_writes_a_checked_onnx_folder(onnx_export, tiny_run):
    out, info = onnx_export
    assert (out / MODEL_FILE).is_file() and (out / "tokenizer.json").is_file()
    assert runs.read_json(out / INFO_FILE) == info
    assert info["format"] == "onnx" and info["class_names"] == ["0", "1", "2", "3"]  # a CSV of its own: ids
    assert 0 <= info["max_abs_logit_diff"] <= ONNX_TOLERANCE
    assert info["verify_texts"] == len(runs.read_json(tiny_run / runs.VERIFY)["texts"]) > 0
    assert info["metrics"]["test_accuracy"] == runs.read_json(tiny_run / runs.METRICS)["test_accuracy"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    with pytest.raises(ExportError, match="--force"):
        export_onnx(tiny_run, out)


@pytest.mark.slow
def test_onnxruntime_logits_match_torch(onnx_export, tiny_run, texts):
    out, _ = onnx_export
    torch_logits = budgetlora.load(tiny_run, verify=False).logits(texts)
    model = OnnxClassifier(out)
    batched = model.logits(texts)  # length-sorted, padded batches of different widths
    assert batched.shape == torch_logits.shape == (len(texts), 4)
    diff = np.abs(batched - torch_logits).max()
    assert diff <= ONNX_TOLERANCE, f"onnxruntime vs torch max |logit diff| {diff:.2e}"
    assert (batched.argmax(1) == torch_logits.argmax(1)).all()
    # one text at a time (batch 1, no padding) gives the same logits as inside a padded batch
    alone = np.concatenate([model.logits([t]) for t in texts[:8] + texts[-2:]])
    assert np.abs(alone - np.concatenate([batched[:8], batched[-2:]])).max() <= ONNX_TOLERANCE
    assert model.logits([]).shape == (0, 4)
    with pytest.raises(TypeError):
        model.logits("one string")


@pytest.mark.slow
def test_onnx_service_runs_without_torch(onnx_export, tiny_run, texts):
    out, _ = onnx_export
    sample = texts[:5]
    want = budgetlora.load(tiny_run, verify=False).predict_proba(sample)
    proc = subprocess.run([sys.executable, "-c", APP_WITHOUT_TORCH, str(out)], input=json.dumps(sample),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == 200 and result["health"] == 200 and result["torch_loaded"] is False
    got = np.asarray(result["body"]["probabilities"])
    assert np.abs(got - want).max() <= ONNX_TOLERANCE
    assert result["body"]["labels"] == want.argmax(1).tolist()
    info = result["info"]
    assert info["backend"] == "onnxruntime" and info["run"] == out.name  # names only, no server paths
    assert info["metrics"]["test_accuracy"] == runs.read_json(tiny_run / runs.METRICS)["test_accuracy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serves_a_run_folder_holding_an_onnx_export(onnx_export, tmp_path):
    out, _ = onnx_export
    run = tmp_path / "run"  # a run folder with its export in onnx/, as the hint in the error message suggests
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "onnx").symlink_to(out, target_is_directory=True)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", CLI_WITHOUT_TORCH, "serve", str(run), "--backend", "onnx",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "service did not come up within 120 s"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"texts": ["Stocks fell as oil rose.", "Cup final"]},
                       timeout=30)
        assert r.status_code == 200 and len(r.json()["labels"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    assert main(["serve", str(run), "--backend", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no ONNX export" in err and f"--onnx {run / 'onnx'}" in err
    assert main(["export", str(run)]) == 2
    assert "--merged OUT, --onnx OUT" in capsys.readouterr().err


# -- int8 ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_int8_export_is_smaller_checked_by_its_answers_and_served_unchanged(onnx_export, tiny_run, texts,
                                                                              tmp_path):
    from fastapi.testclient import TestClient

    from budgetlora.inference.export import INT8_AGREEMENT
    from budgetlora.inference.serve import create_app

    out = tmp_path / "int8"
    info = export_onnx(tiny_run, out, quantize="int8")
    q = runs.read_json(out / INFO_FILE)["quantization"]
    assert q == info["quantization"] and q["type"] == "int8" and q["label_agreement"] >= INT8_AGREEMENT
    assert q["verify_texts"] == info["verify_texts"] > 0 and "max_abs_logit_diff" not in info
    fp32_bytes = (onnx_export[0] / MODEL_FILE).stat().st_size
    assert (out / MODEL_FILE).stat().st_size < fp32_bytes / 2.5  # 8-bit weights
    assert not (out / "model.fp32.onnx").exists()
    model = OnnxClassifier(out)
    agree = (model.logits(texts).argmax(1) == OnnxClassifier(onnx_export[0]).logits(texts).argmax(1)).mean()
    assert agree >= 0.9, agree  # texts the check never saw
    with TestClient(create_app(model)) as client:
        r = client.post("/predict", json={"texts": texts[:3]})
        assert r.status_code == 200 and len(r.json()["labels"]) == 3
    # both exports of the run in one server: the int8 one under its own name, each answering as it does alone
    from budgetlora.inference.served import ServedRuns

    fp32 = OnnxClassifier(onnx_export[0])
    served = ServedRuns([fp32, model])
    assert [r.name for r in served.runs] == [fp32.export["run_id"], f"{fp32.export['run_id']}-int8"]
    with TestClient(create_app(served)) as client:
        for run in served.runs:
            body = client.post("/predict", json={"texts": texts[:3], "model": run.name}).json()
            assert body["model"] == run.name
            np.testing.assert_allclose(body["probabilities"], run.classifier.predict_proba(texts[:3]), atol=1e-6)


def test_quantize_needs_an_onnx_export(tmp_path, capsys):
    from budgetlora.cli import main

    assert main(["export", str(tmp_path), "--merged", str(tmp_path / "m"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--quantize applies to --onnx exports" in err
