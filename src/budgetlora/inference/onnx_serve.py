"""A run exported to ONNX (`budgetlora export RUN --onnx DIR`), served on onnxruntime: no torch in the process.

The folder holds `model.onnx` (the merged model: input_ids, attention_mask -> logits, with dynamic batch and
sequence axes), the tokenizer (`tokenizer.json`, read with the `tokenizers` library alone) and `export.json`
(class names, max length, run id, metrics; a multi-label run's thresholds). This module imports neither torch nor
transformers, so a serving process stays small and starts fast; `OnnxClassifier` has the same predict /
predict_proba / predict_sets / logits surface as `budgetlora.api.Classifier`, which is what the HTTP service needs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from budgetlora.errors import BudgetloraError, ConfigError
from budgetlora.tasks import set_ids, softmax

MODEL_FILE = "model.onnx"
INFO_FILE = "export.json"
ONNX_SUBFOLDER = "onnx"  # where `serve --backend onnx RUN` looks inside a run folder
BATCH = 64  # texts per onnxruntime call: sorted by length first, so each batch pads little


class OnnxModelError(BudgetloraError, FileNotFoundError):
    """The folder holds no usable ONNX export."""


def find_export(path: str | Path) -> Path:
    """An export folder itself, or a run folder holding one in `onnx/`."""
    path = Path(path)
    for folder in (path, path / ONNX_SUBFOLDER):
        if (folder / MODEL_FILE).is_file() and (folder / INFO_FILE).is_file():
            return folder
    if not path.exists():
        raise OnnxModelError(f"ONNX model folder not found: {path}")
    hint = f"budgetlora export {path} --onnx {path / ONNX_SUBFOLDER}" if (path / "config.yaml").is_file() \
        else "budgetlora export RUN --onnx DIR"
    raise OnnxModelError(f"no ONNX export in {path} ({MODEL_FILE} and {INFO_FILE}); write one with `{hint}`")


class OnnxClassifier:
    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.path = find_export(folder)
        self.export = json.loads((self.path / INFO_FILE).read_text())
        if self.export.get("format") != "onnx":
            raise OnnxModelError(f"{self.path / INFO_FILE} does not describe an ONNX export")
        self.class_names: list[str] = list(self.export["class_names"])
        # a multi-label run's per-label thresholds, as its metrics.json holds them; None for a single-label run
        self.thresholds: list[float] | None = self.export.get("thresholds")
        self.max_length = int(self.export["max_length"])
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        # the same truncation the run trained with, and no padding: batches are padded to their own longest row
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.pad_id = int(self.export["pad_token_id"])
        opts = ort.SessionOptions()
        # onnxruntime ignores OMP_NUM_THREADS; honour it anyway, so one setting limits either backend on a shared CPU
        threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS") or 0)
        opts.intra_op_num_threads = max(0, threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path / MODEL_FILE), opts, providers=["CPUExecutionProvider"])

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def logits(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):  # a bare string would otherwise be classified character by character
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        out = np.zeros((len(texts), self.num_labels), dtype=np.float32)
        if not texts:
            return out
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), BATCH):
            rows = order[start:start + BATCH]
            width = max(len(ids[i]) for i in rows)
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for j, i in enumerate(rows):
                input_ids[j, :len(ids[i])] = ids[i]
                mask[j, :len(ids[i])] = 1
            out[rows] = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
        return out

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts))

    def predict(self, texts: list[str]) -> list[int]:
        return [int(i) for i in self.logits(texts).argmax(axis=1)]

    def predict_sets(self, texts: list[str]) -> list[list[int]]:
        if self.thresholds is None:
            raise ConfigError("predict_sets applies to exports of multi-label runs (model.problem_type multi) only")
        return set_ids(self.logits(texts), self.thresholds)

    def info(self, show_paths: bool = False) -> dict:
        """What /info reports: the run the model came from, its metrics, and that it runs on onnxruntime."""
        e = self.export
        return {
            "run": str(self.path.resolve()) if show_paths else self.path.resolve().name,
            "run_id": e.get("run_id"), "name": e.get("name", ""), "backend": "onnxruntime",
            "base_model": {"name": e.get("base_model"), "path": None, "max_length": self.max_length},
            "class_names": self.class_names, "trainable_params": e.get("metrics", {}).get("trainable_params"),
            "metrics": e.get("metrics", {}),
            "export": {k: e[k] for k in ("opset", "max_abs_logit_diff", "tolerance", "verify_texts") if k in e},
        }

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, classes={self.class_names})"


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxClassifier:
    return OnnxClassifier(path, threads=threads)
