"""The multi-label task's loss (model.problem_type multi): one sigmoid per label trained with binary cross-entropy over
an (n, num_labels) 0/1 matrix. Its metrics, thresholds and decision rule are the task's (`budgetlora.tasks`)."""
from __future__ import annotations

import torch


class MultiLabelLoss(torch.nn.BCEWithLogitsLoss):
    """BCE over every (row, label) pair; the loop hands over the label matrix as integers."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, targets.to(logits.dtype))
