"""`budgetlora export RUN --merged OUT`: fold the adapter into the base weights and save a plain transformers model.

The result loads with `AutoModelForSequenceClassification.from_pretrained(OUT)` and no peft installed. Before it is
published, the saved folder is loaded back and its logits are compared with the unmerged adapter's on the run's
verification texts; a folder that does not reproduce them is never renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import runs
from .evaluate import predict_logits
from .predict import LoadedRun, load_run
from .report import class_names

TOLERANCE = 1e-4  # max |logit difference|, fp32: merging only reorders the same additions
EXPORT_INFO = "export.json"


class ExportError(RuntimeError):
    """The merged model cannot be written, or does not reproduce the adapter's logits."""


def merge(loaded: LoadedRun) -> torch.nn.Module:
    """The base model with LoRA folded into its weights and the trained head in place of the original.

    peft keeps the trained head in a ModulesToSaveWrapper next to the untouched original; `merge_and_unload`
    must put the trained copy back. That is checked here rather than trusted, since losing it leaves a model
    with a random head that still loads without complaint.
    """
    from peft.utils import ModulesToSaveWrapper

    peft_model = loaded.model
    trained_heads = {name: {k: v.detach().clone() for k, v in m.modules_to_save["default"].state_dict().items()}
                     for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    merged = peft_model.merge_and_unload()
    leftovers = [n for n, m in merged.named_modules()
                 if isinstance(m, ModulesToSaveWrapper) or "lora_" in n or "modules_to_save" in n]
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


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`; an existing non-empty `out` is replaced only with force, and only at the end."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} is not empty; pass --force to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)


def export_merged(run: str | Path, out: str | Path, force: bool = False, tolerance: float = TOLERANCE,
                  log=print) -> dict:
    """Write the merged model + tokenizer to `out` and return what export.json records (incl. the max diff)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out).resolve()
    if out.is_dir() and any(out.iterdir()) and not force:  # fail before minutes of loading, not after
        raise ExportError(f"{out} is not empty; pass --force to replace it")
    loaded = load_run(run, verify=True)
    cfg = loaded.cfg
    ref = runs.read_json(loaded.path / runs.VERIFY)
    texts = ref["texts"]
    unmerged = loaded.logits(texts)  # before merging: merge_and_unload changes the base weights in place

    merged = merge(loaded)
    names = class_names(cfg.model.num_labels)
    merged.config.id2label = dict(enumerate(names))
    merged.config.label2id = {n: i for i, n in enumerate(names)}
    # the run truncated to max_length; saving it as the tokenizer's limit makes plain `truncation=True` agree
    loaded.tokenizer.model_max_length = cfg.model.max_length

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder should look like any other
    try:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        peft_keys = [k for k in config if "peft" in k.lower() or "adapter" in k.lower()]
        if peft_keys or (tmp / "adapter_config.json").exists():
            raise ExportError(f"exported config still refers to the adapter: {peft_keys or 'adapter_config.json'}")

        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp).eval()
        got = predict_logits(reloaded, AutoTokenizer.from_pretrained(tmp), texts, cfg.model.max_length,
                             cfg.train.eval_batch_size)
        diff = float(np.abs(got - unmerged).max()) if len(texts) else 0.0
        changed = int((got.argmax(1) != unmerged.argmax(1)).sum())
        log(f"merged vs unmerged logits on {len(texts)} verification texts: max abs diff {diff:.2e} "
            f"(tolerance {tolerance:.0e}), {changed} labels changed")
        if not diff <= tolerance or changed:
            raise ExportError(f"merged model disagrees with the adapter: max logit difference {diff:.2e} > "
                              f"{tolerance:.0e} or {changed} changed labels; nothing written to {out}")
        info = {
            "run": str(loaded.path), "run_id": cfg.run_id, "base_model": cfg.model.name,
            "max_length": cfg.model.max_length, "class_names": names, "dtype": str(next(reloaded.parameters()).dtype),
            "verify_texts": len(texts), "max_abs_logit_diff": diff, "tolerance": tolerance,
        }
        runs.write_json(tmp / EXPORT_INFO, info)
        _publish(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote merged model to {out}")
    return info
