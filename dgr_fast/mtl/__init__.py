"""Multi-task learning building blocks: per-task gradients, gradient aggregators, loss weightings, task-based SAM
and single-gradient-step meta MTL."""

from dgr_fast.mtl.aggregators import (
    CAGrad,
    GradDrop,
    IMTLG,
    MGDA,
    Aggregator,
    LinearAggregator,
    Mean,
    NashMTL,
    PCGrad,
    Sum,
)
from dgr_fast.mtl.grads import per_task_grads
from dgr_fast.mtl.meta import MetaMTL
from dgr_fast.mtl.methods import METHODS, make_method
from dgr_fast.mtl.sam import TaskSAM
from dgr_fast.mtl.step import MTLStep
from dgr_fast.mtl.weightings import DWA, RLW, EqualWeighting, UncertaintyWeighting, Weighting

__all__ = [
    "per_task_grads",
    "Aggregator",
    "LinearAggregator",
    "Mean",
    "Sum",
    "PCGrad",
    "CAGrad",
    "IMTLG",
    "MGDA",
    "GradDrop",
    "NashMTL",
    "Weighting",
    "EqualWeighting",
    "DWA",
    "UncertaintyWeighting",
    "RLW",
    "TaskSAM",
    "MetaMTL",
    "MTLStep",
    "METHODS",
    "make_method",
]
