"""Loss weightings: per-task weights for the task losses ``L [K]``.

The interface, common to all of them (each is an ``nn.Module``, so it moves with ``.to()`` and checkpoints with
``state_dict()``):

- ``weights(losses) -> [K]``: this step's weights, on the losses' device and dtype (``UncertaintyWeighting``: on
  its parameters'). Call it once per training step:
  ``RLW`` draws new weights on each call and ``DWA`` records the losses for its epoch average.
- ``weighting(losses) -> scalar``: the weighted total loss to back-propagate (it calls ``weights`` once). For every
  method but uncertainty weighting that is ``sum_k w_k L_k``.
- ``end_epoch()``: call at the end of every training epoch (only ``DWA`` uses it).

``losses`` is a ``[K]`` floating tensor or a sequence of K scalar tensors (stacked, keeping autograd). The losses are
not checked for NaN here (that would cost a device synchronisation per step); a NaN loss makes a NaN total.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dgr_fast.distributed import check_process_group, sync_for

__all__ = ["Weighting", "EqualWeighting", "DWA", "UncertaintyWeighting", "RLW"]

LossesLike = Tensor | Sequence[Tensor]


def _loss_vector(losses: LossesLike) -> Tensor:
    if isinstance(losses, Tensor):
        vec = losses
    elif isinstance(losses, Sequence) and len(losses) > 0 and all(isinstance(x, Tensor) for x in losses):
        if any(x.numel() != 1 for x in losses):
            raise ValueError(f"losses must be scalars, got shapes {[tuple(x.shape) for x in losses]}")
        vec = torch.stack([x.reshape(()) for x in losses])
    else:
        raise TypeError(f"losses must be a [K] tensor or a non-empty sequence of scalar tensors, "
                        f"got {type(losses).__name__}")
    if not vec.is_floating_point():
        raise TypeError(f"losses must have a floating dtype, got {vec.dtype}")
    if vec.ndim != 1 or vec.numel() < 1:
        raise ValueError(f"losses must be 1-D [K] with K >= 1, got shape {tuple(vec.shape)}")
    return vec


class Weighting(nn.Module, metaclass=ABCMeta):
    """Base class: ``weights(losses) -> [K]``, ``forward(losses) -> sum_k w_k L_k``, ``end_epoch()``."""

    def weights(self, losses: LossesLike) -> Tensor:
        """This step's weights ``[K]`` on ``losses``' device and dtype (call once per step)."""
        return self._weights(_loss_vector(losses))

    @abstractmethod
    def _weights(self, losses: Tensor) -> Tensor: ...

    def forward(self, losses: LossesLike) -> Tensor:
        """The weighted total loss, a 0-dim tensor that back-propagates into the losses (and learnable weights)."""
        vec = _loss_vector(losses)
        return (self._weights(vec) * vec).sum()

    def end_epoch(self) -> None:
        """Marks the end of a training epoch; a no-op unless the method keeps epoch statistics."""


class EqualWeighting(Weighting):
    """Every task weighs 1: the total is ``sum_k L_k`` (as the DGR and Auto-Lambda code's "equal")."""

    def _weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)


class DWA(Weighting):
    """Dynamic Weight Average (Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

    In epoch e (counting from 0), with ``Lbar_k(e)`` the average of task k's loss over the batches of epoch e:
    ``w_k = K softmax_k(r / T)`` with ``r_k = Lbar_k(e - 1) / Lbar_k(e - 2)``; ``w = 1`` in epochs 0 and 1. The
    average is the plain mean of the per-batch loss values passed to ``weights`` (or ``forward``) during the epoch,
    as the authors' MTAN code (``avg_cost += cost / train_batch``); the DGR/Auto-Lambda code weighs a short last batch
    by its relative size instead. Averages are kept in float64 on the losses' device (no synchronisation per step);
    ``end_epoch()`` moves them to the CPU once per epoch and refuses non-positive or non-finite averages, for which
    the ratio is meaningless. The epoch statistics are part of ``state_dict()``.

    ``process_group``: under ``torch.distributed``, ``None`` (the default group) or a group: ``end_epoch()`` averages
    the epoch's loss sums over the ranks (one all-reduce of K numbers; every rank takes the same number of steps),
    so every rank weighs the tasks alike by the global batch's averages; ``"local"``: each rank's own averages.
    """

    def __init__(self, temperature: float = 2.0, process_group: object = None) -> None:
        super().__init__()
        check_process_group(process_group)
        self.process_group = process_group
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self._epoch_sum: Tensor | None = None  # float64, on the losses' device
        self._epoch_batches = 0
        self._averages: list[Tensor] = []  # the last two completed epochs' averages, float64 CPU
        self._epochs_done = 0

    @property
    def epoch(self) -> int:
        """The number of completed epochs (``end_epoch`` calls)."""
        return self._epochs_done

    def _num_tasks(self) -> int | None:
        if self._epoch_sum is not None:
            return self._epoch_sum.numel()
        return self._averages[-1].numel() if self._averages else None

    def _weights(self, losses: Tensor) -> Tensor:
        known = self._num_tasks()
        if known is not None and losses.numel() != known:
            raise ValueError(f"losses must hold {known} values (the number of tasks seen so far), "
                             f"got {losses.numel()}")
        detached = losses.detach().to(torch.float64)
        if self._epoch_sum is None:
            self._epoch_sum = detached.clone()
        else:  # .to(): a state loaded from a checkpoint lives on the CPU
            self._epoch_sum = self._epoch_sum.to(detached.device) + detached
        self._epoch_batches += 1
        if len(self._averages) < 2:
            return torch.ones_like(losses)
        ratio = self._averages[-1] / self._averages[-2]
        w = losses.numel() * torch.softmax(ratio / self.temperature, dim=0)
        return w.to(device=losses.device, dtype=losses.dtype)

    def end_epoch(self) -> None:
        """Closes the epoch: its average losses become the newest of the two that set the next epoch's weights."""
        if self._epoch_sum is None:
            raise RuntimeError("DWA.end_epoch() was called with no losses recorded since the last call")
        sync = sync_for(self.process_group)
        if sync is not None:
            sync.all_reduce_mean_([self._epoch_sum])
        average = (self._epoch_sum / self._epoch_batches).cpu()
        if not bool(torch.isfinite(average).all() and (average > 0).all()):
            raise ValueError(f"DWA needs positive, finite average losses; epoch {self._epochs_done} averaged to "
                             f"{average.tolist()}")
        self._averages = (self._averages + [average])[-2:]
        self._epoch_sum = None
        self._epoch_batches = 0
        self._epochs_done += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "epoch_sum": None if self._epoch_sum is None else self._epoch_sum.cpu(),
            "epoch_batches": self._epoch_batches,
            "averages": list(self._averages),
            "epochs_done": self._epochs_done,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._epoch_sum = state["epoch_sum"]
        self._epoch_batches = state["epoch_batches"]
        self._averages = list(state["averages"])
        self._epochs_done = state["epochs_done"]


class UncertaintyWeighting(Weighting):
    """Uncertainty weighting (Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics", CVPR 2018), with learnable log-variances ``s_k = log sigma_k^2``:

        total = sum_k 0.5 exp(-s_k) L_k + 0.5 s_k

    the paper's regression form, used for every task, as the MTAN, Auto-Lambda and DGR code do (the paper's
    classification form ``exp(-s_k) L_k + s_k / 2`` is not used by them). ``weights`` returns ``0.5 exp(-s)``,
    differentiable w.r.t. ``log_vars``, in their dtype and on their device (move the module with ``.to()``); for
    fixed losses the total is minimal at ``s_k = log L_k``.
    ``init`` is the initial ``s``: 0 here; the MTAN code starts from -0.5, the Auto-Lambda/DGR code from -0.7.
    Add ``log_vars`` (``.parameters()``) to the optimizer.
    """

    def __init__(self, num_tasks: int, init: float = 0.0) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if not (isinstance(init, (int, float)) and math.isfinite(init)):
            raise ValueError(f"init must be a finite number, got {init!r}")
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init)))

    def _weights(self, losses: Tensor) -> Tensor:
        if losses.numel() != self.log_vars.numel():
            raise ValueError(f"losses must hold num_tasks = {self.log_vars.numel()} values, got {losses.numel()}")
        return 0.5 * torch.exp(-self.log_vars)

    def forward(self, losses: LossesLike) -> Tensor:
        vec = _loss_vector(losses)
        return (self._weights(vec) * vec).sum() + 0.5 * self.log_vars.sum()


class RLW(Weighting):
    """Random loss weighting (Lin, Ye, Xu, Shi and Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", TMLR 2022), with the paper's normal distribution:
    ``w = softmax(z)``, ``z ~ N(0, I_K)`` drawn afresh at every call of ``weights``. The weights are positive and sum
    to 1 (as in the paper and the authors' LibMTL), so the total is a random convex combination of the losses, 1/K the
    scale of ``EqualWeighting``'s sum on average.

    ``z = torch.randn(K, generator=generator, device=generator's device)`` in float32 (None: the global CPU RNG).
    The generator's state is not part of ``state_dict()``.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def _weights(self, losses: Tensor) -> Tensor:
        device = "cpu" if self.generator is None else self.generator.device
        z = torch.randn(losses.numel(), generator=self.generator, device=device)
        return torch.softmax(z, dim=0).to(device=losses.device, dtype=losses.dtype)
