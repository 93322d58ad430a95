"""Saving a trained adapter in PEFT format. A PiSSA/OLoRA adapter only fits its own mutated base, so it is saved
converted into a plain LoRA of rank 2r on the untouched base: it then reloads, predicts, serves and merges like any
other."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from budgetlora import runs
from budgetlora.config import Config

INITIAL = "budgetlora_initial_adapter"  # attribute holding a PiSSA/OLoRA model's initial A and B (for saving)


def keep_initial(model, cfg: Config) -> None:
    """PiSSA/OLoRA: keep the initial A and B beside the model; saving needs them to convert the trained adapter."""
    if cfg.lora.init in ("pissa", "olora"):
        setattr(model, INITIAL, {n: p.detach().clone().cpu() for n, p in model.named_parameters()
                                 if "lora_A" in n or "lora_B" in n})


def save_adapter(model, out: Path) -> None:
    """Save into the run folder in PEFT format; a PiSSA/OLoRA adapter converted to plain LoRA on the original base."""
    initial = getattr(model, INITIAL, None)
    runs.save_adapter(model, out, convert=None if initial is None else lambda folder: _to_plain_lora(folder, initial))


def _to_plain_lora(folder: Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a saved PiSSA/OLoRA adapter as a plain LoRA on the unchanged base, in place.

    PiSSA/OLoRA train W_res + s·BA with W_res = W - s·B0A0, so the update on the original W is
    s(BA - B0A0) = s·[B | -B0][A ; A0]: a rank-2r LoRA with the same scale (alpha doubles, or grows by sqrt(2) with
    rsLoRA). peft's own conversion (save_pretrained with path_initial_model_for_weight_conversion) keeps only the
    LoRA tensors and so drops the trained head; this keeps every other tensor as it was saved."""
    from safetensors.torch import load_file, save_file

    weights_path, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    state = load_file(str(weights_path))
    init = {n.replace(".default.", "."): t for n, t in initial.items()}  # saved keys carry no adapter name
    for key in list(state):
        if "lora_A" in key:
            state[key] = torch.cat([state[key], init[key].to(state[key].dtype)], dim=0)
        elif "lora_B" in key:
            state[key] = torch.cat([state[key], -init[key].to(state[key].dtype)], dim=1)
    converted = json.loads(config_path.read_text())
    alpha = math.sqrt(2) if converted.get("use_rslora") else 2
    converted["r"] *= 2
    converted["lora_alpha"] *= alpha
    converted["init_lora_weights"] = True
    # empty for budgetlora's configs; scaled like r and alpha if ever set
    converted["rank_pattern"] = {k: v * 2 for k, v in (converted.get("rank_pattern") or {}).items()}
    converted["alpha_pattern"] = {k: v * alpha for k, v in (converted.get("alpha_pattern") or {}).items()}
    save_file(state, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(converted, indent=2))
