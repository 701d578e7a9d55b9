"""Task losses and evaluation metrics, read off each task's ``TaskSpec``.

Outputs and targets are channel-first: ``out [n, C, *]``; targets ``[n, *]`` (class indices) or ``[n, C, *]``; every
position after the channel is one row (a sample, or a pixel), so row and dense tasks share one code path.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dgr_fast.data import TaskSpec


def valid_mask(task: TaskSpec, y: Tensor) -> Tensor | None:
    """Rows that count for a ``mask_zero`` task, else None (all count): the target's channel sum is not 0, the DGR
    authors' rule (their NYUv2 losses and metrics), which differs from "some channel non-zero" only on targets
    whose channels cancel."""
    return y.sum(dim=1) != 0 if task.mask_zero else None


def task_loss(task: TaskSpec, out: Tensor, y: Tensor) -> Tensor:
    """The training loss of one task: what ``DummyTask(task.loss, reduction=task.reduction)`` differentiates too."""
    if task.loss == "ce":
        return F.cross_entropy(out, y, ignore_index=task.ignore_index)
    err = (out - y).abs() if task.loss == "l1" else (out - y) ** 2
    if not task.mask_zero:
        return err.mean()
    valid = valid_mask(task, y)
    # summed over channels, averaged over valid rows; nothing valid gives 0 with a zero gradient
    return err.sum(dim=1)[valid].sum() / valid.sum().clamp(min=1)


class Metric:
    """Accumulates one task's metric over batches: ``update(out, y)``, then ``compute()``."""

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self.total = 0.0
        self.count = 0
        self.confusion = torch.zeros(task.out_features, task.out_features, dtype=torch.int64) if task.metric == "miou" else None

    def update(self, out: Tensor, y: Tensor) -> None:
        task, out, y = self.task, out.detach().float().cpu(), y.detach().cpu()
        if task.loss == "ce":
            keep = y != task.ignore_index
            pred, y = out.argmax(dim=1)[keep], y[keep]
            if self.confusion is not None:
                C = task.out_features
                self.confusion += torch.bincount(y * C + pred, minlength=C * C).view(C, C)
            else:
                self.total += (pred == y).sum().item()
                self.count += y.numel()
            return
        valid = valid_mask(task, y)
        if task.metric == "angle_err":
            cos = F.cosine_similarity(out, y, dim=1).clamp(-1.0, 1.0)
            err = torch.rad2deg(torch.acos(cos))
        else:
            err = (out - y).abs().mean(dim=1) if task.metric == "abs_err" else (out - y).abs()
        if valid is not None:
            err = err[valid]
        self.total += err.double().sum().item()
        self.count += err.numel()

    def compute(self) -> float:
        if self.confusion is not None:
            hits = self.confusion.diag().double()
            union = self.confusion.sum(0) + self.confusion.sum(1) - self.confusion.diag()
            present = union > 0  # classes neither in the targets nor predicted do not count
            return 100.0 * (hits[present] / union[present]).mean().item() if present.any() else math.nan
        scale = 100.0 if self.task.higher_is_better else 1.0  # shares in percent, errors in the targets' unit
        return scale * self.total / self.count if self.count else math.nan


def delta_m(metrics: dict[str, float], baseline: dict[str, float], tasks: Sequence[TaskSpec]) -> float:
    """Average relative improvement over ``baseline``, in percent (Maninis et al. 2019; the MTL literature's
    Delta-m): ``100/K sum_k s_k (M_k - B_k) / B_k``, ``s_k = +1`` if higher is better, else -1. NaN if a baseline
    metric is 0 or NaN (no relative change exists)."""
    terms = []
    for task in tasks:
        m, b = metrics[task.name], baseline[task.name]
        if b == 0 or math.isnan(b) or math.isnan(m):
            return math.nan
        terms.append((1.0 if task.higher_is_better else -1.0) * (m - b) / abs(b))
    return 100.0 * sum(terms) / len(terms)
