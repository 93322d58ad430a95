"""`budgetlora export RUN --merged OUT`: fold the adapter into the base weights and save a plain transformers model.

The result loads with `AutoModelForSequenceClassification.from_pretrained(OUT)` and no peft installed. Before it is
published, the saved folder is loaded back and its logits are compared with the unmerged adapter's on the run's
verification texts; a folder that does not reproduce them is never renamed into place.

`budgetlora export RUN --onnx OUT` writes the same merged model as ONNX (`model.onnx` + tokenizer + export.json)
for `budgetlora serve --backend onnx OUT`, which runs it on onnxruntime without torch; it is checked the same way.
"""
from __future__ import annotations

import logging
import json
from pathlib import Path

import numpy as np
import torch

from budgetlora import runs
from budgetlora.adapters import methods
from budgetlora.config import ConfigError
from budgetlora.errors import BudgetloraError
from budgetlora.inference.load import LoadedRun, load_run
from budgetlora.tasks import class_names, task_of
from budgetlora.training.evaluate import predict_logits

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # max |logit difference|, fp32: merging only reorders the same additions
# onnxruntime runs other fp32 kernels (fused attention, other summation orders): observed differences are ~1e-6
ONNX_TOLERANCE = 1e-4
QUANTIZE = ("int8",)
# an int8 export is checked by its answers, not its logits (8-bit weights move every logit): at least this share of
# the verification texts must get the adapter's own answer
INT8_AGREEMENT = 0.97
EXPORT_INFO = "export.json"


class ExportError(BudgetloraError, RuntimeError):
    """The merged model cannot be written, or does not reproduce the adapter's logits."""


def merge(loaded: LoadedRun) -> torch.nn.Module:
    """The base model with LoRA folded into its weights and the trained head in place of the original.

    peft keeps the trained head in a ModulesToSaveWrapper next to the untouched original; `merge_and_unload`
    must put the trained copy back. That is checked here rather than trusted, since losing it leaves a model
    with a random head that still loads without complaint.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    peft_model = loaded.model
    trained_heads = {name: {k: v.detach().clone() for k, v in m.modules_to_save["default"].state_dict().items()}
                     for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    merged = peft_model.merge_and_unload()
    leftovers = [n for n, m in merged.named_modules()  # any method's layer (LoRA, VeRA, LoHa, LoKr, (IA)3, ...)
                 if isinstance(m, (ModulesToSaveWrapper, BaseTunerLayer)) or "lora_" in n or "modules_to_save" in n]
    if leftovers:
        raise ExportError(f"merged model still holds adapter modules: {leftovers[:3]}")
    state = merged.state_dict()
    for wrapper_name, params in trained_heads.items():
        # wrapper names carry peft's "base_model.model." prefix; the merged model is that inner model
        head = wrapper_name.split("base_model.model.", 1)[-1]
        for key, want in params.items():
            got = state.get(f"{head}.{key}")
            if got is None or not torch.equal(got, want):
                raise ExportError(f"merged model lost the trained head: {head}.{key} differs from the adapter's")
    if not trained_heads:
        raise ExportError("the adapter has no trained head (modules_to_save); nothing sensible to export")
    return merged.eval()


def _merged_run(run, out: Path, force: bool, base: str | None = None, plain: bool = False):
    """The verified run, its verification texts with the unmerged logits, and the merged model with label names.
    plain: the result must load as a plain transformers class, which has no model.head other than its own."""
    runs.check_output(out, "folder")  # fail before minutes of loading, not after
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; pass --force to replace it")
    if Path(run, runs.CONFIG).is_file():  # a method that cannot fold into the weights is refused before loading
        try:
            saved = runs.load_config(Path(run))
            methods.check_mergeable(saved)
        except ConfigError as e:
            raise ExportError(str(e)) from None
        if plain and saved.model.head != "auto":
            raise ExportError(f"model.head {saved.model.head}: a plain transformers folder has only the "
                              "architecture's own head; use `export --onnx`, or predict and serve the run itself")
    loaded = load_run(run, verify=True, base=base)
    cfg = loaded.cfg
    texts = runs.read_json(loaded.path / runs.VERIFY)["texts"]
    unmerged = loaded.logits(texts, exact=True)  # fp32, before merging: merge_and_unload changes the base weights in place

    merged = merge(loaded)
    names = class_names(cfg, loaded.metrics.get("class_names"))
    merged.config.id2label = dict(enumerate(names))
    merged.config.label2id = {n: i for i, n in enumerate(names)}
    # the run truncated to max_length; saving it as the tokenizer's limit makes plain `truncation=True` agree
    loaded.tokenizer.model_max_length = cfg.model.max_length
    return loaded, texts, unmerged, merged, names


def _compare(got: np.ndarray, want: np.ndarray, tolerance: float, what: str, out: Path) -> float:
    diff = float(np.abs(got - want).max()) if len(want) else 0.0
    changed = int((got.argmax(1) != want.argmax(1)).sum())
    logger.info(f"{what} vs unmerged logits on {len(want)} verification texts: max abs diff {diff:.2e} "
        f"(tolerance {tolerance:.0e}), {changed} labels changed")
    if not diff <= tolerance or changed:
        raise ExportError(f"{what} model disagrees with the adapter: max logit difference {diff:.2e} > "
                          f"{tolerance:.0e} or {changed} changed labels; nothing written to {out}")
    return diff


def _quantize_int8(model: Path) -> None:
    """The ONNX model at `model`, rewritten with 8-bit weights: onnxruntime's dynamic quantization (weights QInt8 per
    tensor, activations quantized at run time from their observed range), which needs no calibration data."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = model.with_name("model.fp32.onnx")
    model.rename(fp32)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs advice (pre-process the graph first) that a user cannot act on here
    try:
        quantize_dynamic(str(fp32), str(model), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    fp32.unlink()


def _check_int8(got: np.ndarray, want: np.ndarray, task, settings: dict, out: Path) -> dict:
    """The int8 model's answers against the adapter's on the verification texts: the share that agree, at least
    INT8_AGREEMENT; returns what export.json records."""
    same = task.decide(got, settings) == task.decide(want, settings)
    agree = float(same.reshape(len(want), -1).all(axis=1).mean()) if len(want) else 1.0
    diff = float(np.abs(got - want).max()) if len(want) else 0.0
    logger.info(f"int8 onnxruntime vs unmerged adapter on {len(want)} verification texts: {agree:.2%} of the "
                f"answers agree (at least {INT8_AGREEMENT:.0%}), max abs logit diff {diff:.3f}")
    if agree < INT8_AGREEMENT:
        raise ExportError(f"the int8 model answers {agree:.2%} of the verification texts as the adapter does (at "
                          f"least {INT8_AGREEMENT:.0%} needed); nothing written to {out}")
    return {"type": "int8", "method": "onnxruntime quantize_dynamic: QInt8 weights per tensor, dynamic activations",
            "verify_texts": len(want), "label_agreement": round(agree, 6), "max_abs_logit_diff": round(diff, 6)}


def export_merged(run: str | Path, out: str | Path, force: bool = False, tolerance: float = TOLERANCE,
                  base: str | None = None) -> dict:
    """Write the merged model + tokenizer to `out` and return what export.json records (incl. the max diff)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out).resolve()
    loaded, texts, unmerged, merged, names = _merged_run(run, out, force, base, plain=True)
    cfg = loaded.cfg
    with runs.staged_folder(out, force) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        peft_keys = [k for k in config if "peft" in k.lower() or "adapter" in k.lower()]
        if peft_keys or (tmp / "adapter_config.json").exists():
            raise ExportError(f"exported config still refers to the adapter: {peft_keys or 'adapter_config.json'}")

        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp).eval()
        got = predict_logits(reloaded, AutoTokenizer.from_pretrained(tmp), texts, cfg.model.max_length,
                             cfg.train.eval_batch_size)
        diff = _compare(got, unmerged, tolerance, "merged", out)
        info = {
            "run": str(loaded.path), "run_id": cfg.run_id, "base_model": cfg.model.name,
            "max_length": cfg.model.max_length, "class_names": names, "dtype": str(next(reloaded.parameters()).dtype),
            "verify_texts": len(texts), "max_abs_logit_diff": diff, "tolerance": tolerance,
        }
        runs.write_json(tmp / EXPORT_INFO, info)
    logger.debug(f"wrote merged model to {out}")
    return info


class _LogitsOnly(torch.nn.Module):
    """input_ids, attention_mask -> logits: the plain tensor signature an ONNX graph and its callers want."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def export_onnx(run: str | Path, out: str | Path, force: bool = False, tolerance: float = ONNX_TOLERANCE,
                base: str | None = None, quantize: str | None = None) -> dict:
    """Write the merged model as ONNX (dynamic batch and sequence axes) with its tokenizer to `out`; `quantize`
    "int8": with 8-bit weights (onnxruntime's dynamic quantization), about 4x smaller and faster on a CPU.

    Before publishing, the folder is loaded the way `serve --backend onnx` loads it (onnxruntime and the
    `tokenizers` library, no torch) and its logits on the run's verification texts, in length-sorted padded
    batches and one text alone, are compared with the unmerged adapter's; an int8 model's answers are (at least
    INT8_AGREEMENT of them the same).
    """
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch's ONNX exporter is built on it)
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx extra: pip install 'budgetlora[onnx]' ({e.name} missing)") \
            from None
    from torch.export import Dim

    from budgetlora.inference.onnx_serve import INFO_FILE, MODEL_FILE, OnnxClassifier

    out = Path(out).resolve()
    loaded, texts, unmerged, merged, names = _merged_run(run, out, force, base)
    cfg = loaded.cfg
    pad = loaded.tokenizer.pad_token_id
    # a padded example, so that nothing in the traced graph can assume a mask of all ones
    example = loaded.tokenizer(["An example headline for tracing the graph, long enough to pad the other.", "Hi"],
                               truncation=True, max_length=cfg.model.max_length, padding=True, return_tensors="pt")
    args = (example["input_ids"], example["attention_mask"])
    seq = Dim("sequence", min=1, max=max(cfg.model.max_length, args[0].shape[1]))
    shapes = {"input_ids": {0: Dim("batch", min=1, max=65536), 1: seq}}
    shapes["attention_mask"] = shapes["input_ids"]
    with runs.staged_folder(out, force) as tmp:
        program = torch.onnx.export(_LogitsOnly(merged).eval(), args, input_names=["input_ids", "attention_mask"],
                                    output_names=["logits"], dynamic_shapes=shapes, dynamo=True, verbose=False)
        program.save(str(tmp / MODEL_FILE))
        if quantize:
            _quantize_int8(tmp / MODEL_FILE)
        loaded.tokenizer.save_pretrained(tmp)
        merged.config.save_pretrained(tmp)  # id2label and the architecture, for tools that read config.json
        metrics = runs.read_json(loaded.path / runs.METRICS) if (loaded.path / runs.METRICS).is_file() else {}
        info = {
            "format": "onnx", "run": str(loaded.path), "run_id": metrics.get("run_id", cfg.run_id), "name": cfg.name,
            "base_model": cfg.model.name, "max_length": cfg.model.max_length, "class_names": names,
            "pad_token_id": pad, "opset": program.model.opset_imports.get("", None),
            "inputs": ["input_ids", "attention_mask"], "outputs": ["logits"],
            "metrics": {k: metrics[k] for k in ("val_accuracy", "test_accuracy", "test_macro_f1", "trainable_params",
                                                "budget") if k in metrics},
            "verify_texts": len(texts), "tolerance": tolerance,
            # a multi-label export is served with label sets, at the thresholds its test metrics were taken at
            **task_of(cfg).settings(metrics, cfg.model.num_labels, loaded.path),
        }
        runs.write_json(tmp / INFO_FILE, info)
        onnx_model = OnnxClassifier(tmp)
        if quantize:
            info["quantization"] = _check_int8(onnx_model.logits(texts), unmerged, task_of(cfg),
                                               task_of(cfg).settings(metrics, cfg.model.num_labels, loaded.path),
                                               out)
        else:
            diff = _compare(onnx_model.logits(texts), unmerged, tolerance, "onnxruntime", out)
            if texts:
                diff = max(diff, _compare(onnx_model.logits(texts[:1]), unmerged[:1], tolerance,
                                          "onnxruntime (one text)", out))
            info["max_abs_logit_diff"] = diff
        runs.write_json(tmp / INFO_FILE, info)
    logger.debug(f"wrote ONNX model to {out}")
    return info
