"""Multi-task learning building blocks: per-task gradients, gradient aggregators, loss weightings, task-based SAM,
single-gradient-step meta MTL and the task-dominance tracker."""

from dgr_fast.mtl import aggregators, weightings
from dgr_fast.mtl.aggregators import *  # noqa: F403  (their __all__)
from dgr_fast.mtl.dominance import TaskDominance
from dgr_fast.mtl.grads import per_task_grads
from dgr_fast.mtl.meta import MetaMTL
from dgr_fast.mtl.methods import METHODS, make_method
from dgr_fast.mtl.sam import TaskSAM
from dgr_fast.mtl.step import MTLStep
from dgr_fast.mtl.weightings import *  # noqa: F403  (their __all__)

__all__ = [
    "per_task_grads", *aggregators.__all__, *weightings.__all__, "TaskSAM", "MetaMTL", "MTLStep", "METHODS", "make_method",
    "TaskDominance",
]
