"""What every built-in data set gives the trainer: its tasks, and batches by index."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

LOSSES = ("ce", "mse", "l1")
METRICS = {  # metric name -> higher is better
    "accuracy": True,  # ce, row targets: share of correct predictions
    "mae": False,  # mse/l1, row targets: mean absolute error over elements
    "miou": True,  # ce, dense targets: mean intersection-over-union over classes present (ignore_index left out)
    "pixel_accuracy": True,
    "abs_err": False,  # l1, dense targets: mean |pred - y| over valid pixels (depth)
    "angle_err": False,  # l1, dense 3-channel targets: mean angle in degrees between pred and y over valid pixels
}


class DataError(ValueError):
    """A data folder that is missing or malformed; the message says what was expected and where."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of a data set, as the trainer and the dummy heads need it.

    ``loss`` is a ``DummyTask`` loss; ``out_features`` the head's width C (1 for a scalar regression).
    Targets: ``"ce"``: int64 class indices ``[N]`` / ``[N, H, W]``; otherwise float ``[N, C]`` / ``[N, C, H, W]``.
    ``mask_zero``: dense regression pixels whose target channels sum to 0 do not count (the official NYUv2 code);
    the loss is then summed over channels and averaged over valid pixels (``reduction="row_mean"``).
    """

    name: str
    loss: str
    out_features: int
    metric: str
    ignore_index: int = -100
    mask_zero: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {tuple(METRICS)}, got {self.metric!r}")

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    @property
    def reduction(self) -> str:
        return "row_mean" if self.mask_zero else "mean"


class MTLDataset:
    """A split of a multi-task data set: ``len(ds)`` samples, ``ds.batch(indices)`` -> ``(x, [y_1, ..., y_K])``.

    ``x`` is float32 ``[n, *input_shape]``; ``y_k`` follows ``tasks[k]`` (see ``TaskSpec``). ``dense``: per-pixel
    targets ``[n, (C,) H, W]`` matching the input's ``H, W`` (the model then keeps the spatial layout of its features).
    Loaders that read files subclass this and implement ``__len__`` and ``batch``; in-memory sets use
    ``TensorMTLDataset``.
    """

    def __init__(self, tasks: Sequence[TaskSpec], input_shape: Sequence[int], dense: bool) -> None:
        self.tasks, self.input_shape, self.dense = list(tasks), tuple(input_shape), bool(dense)

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The samples at ``indices`` (int64 ``[n]``), in that order."""
        raise NotImplementedError


class TensorMTLDataset(MTLDataset):
    """A split held in memory: ``x [N, *input_shape]`` and one target tensor per task."""

    def __init__(self, tasks: Sequence[TaskSpec], x: Tensor, targets: Sequence[Tensor], dense: bool = False) -> None:
        if len(targets) != len(tasks):
            raise ValueError(f"{len(tasks)} tasks but {len(targets)} targets")
        if any(len(y) != len(x) for y in targets):
            raise ValueError("every target must have one entry per sample")
        super().__init__(tasks, x.shape[1:], dense)
        self.x, self.targets = x, list(targets)

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, indices: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.x[indices], [y[indices] for y in self.targets]


@dataclass
class MTLData:
    """A data set: its name, tasks, and train/test splits (both with the same ``tasks``)."""

    name: str
    train: MTLDataset
    test: MTLDataset

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.train.tasks


def existing_dir(path: str | Path, expected: str) -> Path:
    """``path`` as a ``Path`` if it is a folder; else a ``DataError`` naming it and saying what it should hold."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; expected {expected}")
    return path


def split_size(requested: int | None, available: int, where: str) -> int:
    """How many samples to take from a split that has ``available``: all of them for ``None``."""
    if requested is None:
        return available
    if requested > available:
        raise DataError(f"asked for {requested} samples but {where} has only {available}")
    return requested
