"""The training loss of a config: cross-entropy or focal loss, each optionally weighted per class.

Only training uses it; validation and test report the plain, unweighted cross-entropy (`tasks.class_metrics`), so runs
trained under different losses stay comparable on the same numbers.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from budgetlora.config import class_weight_list
from budgetlora.errors import DataError
from budgetlora.tasks import task_of
from budgetlora.training.multilabel import MultiLabelLoss


def auto_class_weights(labels, num_labels: int) -> list[float]:
    """Inverse class frequency of `labels`, scaled so that the weights' mean over classes is 1 (a balanced set gets
    all ones, and the loss keeps its usual size)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)[:num_labels]
    missing = np.flatnonzero(counts == 0).tolist()
    if missing:
        raise DataError(f"train.class_weights auto: class(es) {missing} have no training rows; give the weights as "
                        f"a list instead")
    inverse = 1.0 / counts
    return (inverse / inverse.mean()).tolist()


def class_weights(cfg, labels) -> torch.Tensor | None:
    """train.class_weights as a tensor for the loss: None (unweighted), computed from the training `labels`
    (auto), or the listed numbers."""
    spec, n = cfg.train.class_weights, cfg.model.num_labels
    if spec == "none":
        return None
    values = auto_class_weights(labels, n) if spec == "auto" else class_weight_list(spec, n)
    return torch.tensor(values, dtype=torch.float32)


class FocalLoss(torch.nn.Module):
    """Focal loss (Lin et al., 2017): each row's cross-entropy scaled by (1 - p_t)^gamma, so rows the model already
    gets right with confidence count less. With class weights (alpha) the mean is weighted the way
    CrossEntropyLoss(weight=) weights it, so gamma 0 is exactly the weighted cross-entropy."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        # -expm1: 1 - p without cancellation; the floor keeps the gradient of a power below 1 finite at p = 1
        loss = -(-torch.expm1(logp)).clamp(min=1e-12).pow(self.gamma) * logp
        if self.weight is None:
            return loss.mean()
        w = self.weight[targets]
        return (w * loss).sum() / w.sum()


def make_loss(tc, weight: torch.Tensor | None = None) -> torch.nn.Module:
    """The loss module train.loss names, with per-class `weight` (class_weights) when given."""
    if tc.loss == "focal":
        return FocalLoss(tc.focal_gamma, weight)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=tc.label_smoothing)


def training_loss(cfg, labels) -> torch.nn.Module:
    """The loss a run of `cfg` trains under: BCE over label sets (model.problem_type multi), else train.loss with
    the class weights counted from the training `labels`."""
    if task_of(cfg).sets:
        return MultiLabelLoss()
    return make_loss(cfg.train, class_weights(cfg, labels))


def batch_parts(loss_fn: torch.nn.Module, targets: torch.Tensor, micro_batch: int) -> list[tuple[slice, float]]:
    """The rows of each part of a batch trained `micro_batch` rows at a time (0 = the whole batch at once), with
    the share of the batch's loss each part's mean loss carries: its rows' share, or with class weights its share
    of the weights (weighted losses divide by the summed weights of the batch's targets), so the summed gradients
    are the whole batch's."""
    n = len(targets)
    size = micro_batch if 0 < micro_batch < n else n
    rows = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    weight = getattr(loss_fn, "weight", None)
    if weight is None or len(rows) == 1:
        return [(r, (r.stop - r.start) / n) for r in rows]
    w = weight[targets].float()
    return [(r, float(w[r].sum() / w.sum())) for r in rows]
