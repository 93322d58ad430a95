"""budgetlora: LoRA fine-tuning of text classifiers under a hard trainable-parameter budget.

Heavy imports (torch, transformers, peft) wait until first use, so `import budgetlora` and the CLI start fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from budgetlora.api import Classifier, load

__all__ = ["Classifier", "load"]


def __getattr__(name: str):
    if name in ("load", "Classifier"):
        from budgetlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'budgetlora' has no attribute {name!r}")
