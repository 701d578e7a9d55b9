"""Built-in multi-task data sets, by name: ``load_dataset(name, data_dir, seed=..., **options)``.

``multi-digits`` and ``synthetic`` are generated here (no files); ``nyuv2`` and ``utkface`` read your copy of the data
from ``data_dir``. Each module's docstring says what it holds, and which files it expects.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable

from dgr_fast.data.base import LOSSES, METRICS, DataError, MTLData, MTLDataset, TaskSpec, TensorMTLDataset
from dgr_fast.data.digits import MultiDigitsData, load_multi_digits
from dgr_fast.data.nyuv2 import load_nyuv2
from dgr_fast.data.synthetic import SyntheticData, load_synthetic
from dgr_fast.data.utkface import load_utkface

_LOADERS: dict[str, Callable[..., MTLData]] = {
    "multi-digits": load_multi_digits,
    "synthetic": load_synthetic,
    "nyuv2": load_nyuv2,
    "utkface": load_utkface,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)
_COMMON = ("data_dir", "seed", "train_size", "test_size")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    **options,
) -> MTLData:
    """The data set ``name`` (one of ``DATASETS``), with its train and test splits.

    ``data_dir``: the folder of your copy, for ``nyuv2`` and ``utkface`` only. ``seed`` fixes everything random: the
    generated samples, and UTKFace's split (NYUv2 has an official split and a fixed order, so it ignores the seed).
    ``train_size`` / ``test_size``: for generated sets, how many samples to make (None: the set's default); for read
    sets, the first that many samples of each split (None: all). ``options``: the set's own keyword arguments, listed
    by the ``load_*`` function of its module; an unknown one is a ``TypeError``.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    loader = _LOADERS[name]
    params = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = [p for p in params if p not in _COMMON]
        raise TypeError(f"{name} has no option {', '.join(unknown)}; its options are: {', '.join(valid)}")
    for option, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{option} must be a positive integer, got {size!r}")
    if "data_dir" in params:
        if data_dir is None:
            raise DataError(f"{name} is read from your copy of it: pass data_dir "
                            f"(the expected layout is in the docstring of {loader.__module__})")
        options["data_dir"] = data_dir
    elif data_dir is not None:
        raise ValueError(f"{name} is generated, not read from files: do not pass data_dir")
    if "seed" in params:
        options["seed"] = seed
    sizes = {"train_size": train_size, "test_size": test_size}
    return loader(**options, **{k: v for k, v in sizes.items() if v is not None})


__all__ = [
    "DATASETS", "load_dataset", "DataError", "LOSSES", "METRICS", "MTLData", "MTLDataset", "TaskSpec",
    "TensorMTLDataset", "MultiDigitsData", "SyntheticData",
    "load_multi_digits", "load_synthetic", "load_nyuv2", "load_utkface",
]
