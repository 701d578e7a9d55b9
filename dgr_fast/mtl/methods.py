"""The MTL methods by their short names (as the command line and the benchmarks name them)."""

from __future__ import annotations

from typing import Callable

from dgr_fast.mtl.aggregators import CAGrad, GradDrop, IMTLG, MGDA, Aggregator, NashMTL, PCGrad
from dgr_fast.mtl.weightings import DWA, RLW, EqualWeighting, UncertaintyWeighting, Weighting

METHODS: dict[str, Callable[[int], Weighting | Aggregator]] = {
    "ew": lambda k: EqualWeighting(),
    "dwa": lambda k: DWA(temperature=2.0),
    "uw": lambda k: UncertaintyWeighting(k),
    "rlw": lambda k: RLW(),
    "pcgrad": lambda k: PCGrad(),
    "cagrad": lambda k: CAGrad(c=0.4),
    "imtl": lambda k: IMTLG(),
    "mgda": lambda k: MGDA(),
    "graddrop": lambda k: GradDrop(),
    "nashmtl": lambda k: NashMTL(),
}


def make_method(name: str, num_tasks: int) -> Weighting | Aggregator:
    """A fresh weighting or aggregator for ``num_tasks`` tasks, with the defaults of its paper."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name](num_tasks)
