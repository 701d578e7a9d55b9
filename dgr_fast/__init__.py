"""dgr_fast: fused kernels for multi-task learning (DGR penalty, AdaTask, and the MTL methods they combine with).

The public names are imported on first use (module ``__getattr__``), not when the package is: ``import dgr_fast``
then costs no ``import torch``, so that the ``dgr-fast`` command can set up its Ctrl-C handler before the slow
import starts (an interrupt during it used to print a traceback).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names as type checkers and IDEs see them
    from dgr_fast.backends import BACKENDS, BackendStatus, available_backends
    from dgr_fast.dummy_heads import DummyHeads, DummyTask
    from dgr_fast.ops.dgr_penalty import dgr_penalty, dgr_penalty_per_task
    from dgr_fast.optim import AdaTask

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "BACKENDS": "dgr_fast.backends",
    "BackendStatus": "dgr_fast.backends",
    "available_backends": "dgr_fast.backends",
    "DummyHeads": "dgr_fast.dummy_heads",
    "DummyTask": "dgr_fast.dummy_heads",
    "dgr_penalty": "dgr_fast.ops.dgr_penalty",
    "dgr_penalty_per_task": "dgr_fast.ops.dgr_penalty",
    "AdaTask": "dgr_fast.optim",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
