"""Python use of a finished run: `budgetlora.load(run).predict(texts)`."""
from __future__ import annotations

from budgetlora.inference.classifier import Classifier, load

__all__ = ["Classifier", "load"]
