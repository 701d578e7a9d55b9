"""Optimizers: AdaTask (Adam, RMSProp and AdaGrad variants with per-task moments)."""

from dgr_fast.optim.adatask import AdaTask

__all__ = ["AdaTask"]
