"""dgr_fast: fused kernels for multi-task learning (DGR penalty, AdaTask, and the MTL methods they combine with)."""

from dgr_fast.backends import BACKENDS, BackendStatus, available_backends

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendStatus", "available_backends"]
