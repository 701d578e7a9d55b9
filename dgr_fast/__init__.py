"""dgr_fast: fused kernels for multi-task learning (DGR penalty, AdaTask, and the MTL methods they combine with)."""

from dgr_fast.backends import BACKENDS, BackendStatus, available_backends
from dgr_fast.dummy_heads import DummyHeads, DummyTask
from dgr_fast.ops.dgr_penalty import dgr_penalty, dgr_penalty_per_task
from dgr_fast.optim import AdaTask

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendStatus", "available_backends", "DummyHeads", "DummyTask", "dgr_penalty", "dgr_penalty_per_task", "AdaTask"]
