"""The factor a trainer multiplies an aggregator's update by before it becomes the shared parameters' gradient.

The aggregators return the direction their papers define: a convex combination of the task gradients (``Mean``,
``CAGrad``, ``IMTLG``, ``MGDA``, and ``PCGrad``/``GradDrop`` with ``reduction="mean"``: weights summing to one, the
scale of the *mean* loss's gradient) or a sum-scaled one (``Sum``, ``PCGrad``/``GradDrop`` with the default
``reduction="sum"``; ``NashMTL``, whose scale is its own). The published trainers multiply some of them by the
number of tasks K to match a summed loss, and the DGR penalty's gradient is added *after* that factor, so it sets
how strong DGR is relative to the method. ``scale`` names the rule:

=============  =====================================================================================================
``"authors"``  what the authors' trainer does (the default). ``MTLStep`` follows the DGR code (Sinseokwon/
               LearningUnivforMTL, ``overwrite_grad``: the mean-scaled PCGrad, GradDrop and CAGrad updates times K;
               IMTL and Nash-MTL set the gradient as computed) and takes the MTL-SAM code's K for MGDA, which the DGR
               code does not run. ``TaskSAM`` follows the MTL-SAM code (VietHoang1512/FS-MTL): MGDA times K, PCGrad
               summed, CAGrad and IMTL as computed.
``"sum"``      the scale of the summed loss: K for every convex combination, 1 otherwise.
``"none"``     the aggregator's update as it is (the papers' directions).
a number       that factor.
=============  =====================================================================================================

``Mean`` and ``Sum`` under ``"authors"`` follow ``"sum"`` (the DGR code's plain method backpropagates the sum of the
losses), and so does an aggregator this module does not know.
"""

from __future__ import annotations

import math

from dgr_fast.mtl.aggregators import IMTLG, MGDA, Aggregator, CAGrad, GradDrop, Mean, PCGrad

SCALES = ("authors", "sum", "none")
TRAINERS = ("dgr", "sam")


def check_scale(scale: str | float, name: str = "aggregator_scale") -> None:
    """Refuse anything but a name of ``SCALES`` or a finite number > 0, naming the argument."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"{name} must be one of {SCALES} or a number > 0, got {scale!r}")
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be one of {SCALES} or a finite number > 0, got {scale!r}")


def is_mean_scaled(aggregator: Aggregator) -> bool:
    """Whether the update is a convex combination of the task gradients (weights summing to one)."""
    if isinstance(aggregator, (PCGrad, GradDrop)):
        return aggregator.reduction == "mean"
    return isinstance(aggregator, (Mean, CAGrad, IMTLG, MGDA))


def aggregator_scale(aggregator: Aggregator, num_tasks: int, scale: str | float, trainer: str) -> float:
    """The factor for ``aggregator``'s update with ``num_tasks`` tasks under ``scale`` (see the module docstring);
    ``trainer`` is ``"dgr"`` (``MTLStep``) or ``"sam"`` (``TaskSAM``), whose authors' code differ."""
    check_scale(scale)
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    if not isinstance(scale, str):
        return float(scale)
    if scale == "none":
        return 1.0
    to_sum = float(num_tasks) if is_mean_scaled(aggregator) else 1.0
    if scale == "sum":
        return to_sum
    as_computed = (IMTLG,) if trainer == "dgr" else (IMTLG, CAGrad)
    return 1.0 if isinstance(aggregator, as_computed) else to_sum
