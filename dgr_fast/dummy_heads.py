"""`DummyHeads`: the fixed random linear heads of DGR, as a module for a training loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from dgr_fast.distributed import check_process_group, same_random_draws, sync_for
from dgr_fast.ops.dgr_penalty import LOSS_CODES, NORMS, apply_norm, dgr_penalty_per_task, weighted_sum
from dgr_fast.reference.dgr import REDUCTIONS

RESAMPLE = ("never", "step", "epoch")


@dataclass(frozen=True)
class DummyTask:
    """One task's dummy head: its loss, its output width, and how the loss is reduced.

    ``loss``: ``"ce"``, ``"bce"``, ``"mse"`` or ``"l1"``; ``out_features``: ``C_k`` (classes or channels);
    ``reduction``: ``"mean"`` or ``"row_mean"`` (see ``dgr_penalty``); ``ignore_index``: for ``"ce"``.
    """

    loss: str
    out_features: int
    reduction: str = "mean"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.loss not in LOSS_CODES:
            raise ValueError(f"DummyTask.loss must be one of {tuple(LOSS_CODES)}, got {self.loss!r}")
        if isinstance(self.out_features, bool) or not isinstance(self.out_features, int) or self.out_features < 1:
            raise ValueError(f"DummyTask.out_features must be a positive int, got {self.out_features!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"DummyTask.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")


class DummyHeads(nn.Module):
    """Fixed random linear (1x1-convolution) dummy heads, one per task, and their DGR penalty.

    The heads are buffers, not parameters: an optimizer never sees them and they are saved in ``state_dict``
    (with the generator state, so a resumed run resamples identically). They are drawn as PyTorch initialises
    ``nn.Linear``/``nn.Conv2d(kernel_size=1)``: weight and bias uniform in ``[-1/sqrt(D), 1/sqrt(D)]``.

    Args:
        in_features: ``D``, the feature width (channels of a feature map).
        tasks: one ``DummyTask`` per task (a sequence, or a mapping from task name).
        num_sets: independent dummy sets; the penalty is their mean.
        resample: ``"never"`` (fixed for the run, the paper's default), ``"step"`` (redrawn before every forward in
            training mode, the Auto-Lambda variant), or ``"epoch"`` (redrawn by ``new_epoch()``).
        bias: whether the heads have a bias (its gradient is part of the penalty).
        seed / generator: where the draws come from (default: a generator seeded from torch's global RNG).
        norm: ``"squared"`` or ``"l2"`` (see ``dgr_penalty``); backend: as ``dgr_penalty``.
        process_group: under ``torch.distributed``, ``None`` (the default group) or a group: the penalty is the
            global batch's (see ``dgr_penalty``), every draw of the heads is rank 0's (its generator state is
            broadcast before each draw, and the heads themselves before the first forward, in case they were drawn
            before the group existed); ``"local"``: each rank's own penalty and draws.
    Buffers: ``weight [num_sets, C, D]``, ``bias [num_sets, C]`` with ``C = sum_k C_k`` (fp32 unless ``dtype``).
    """

    def __init__(
        self,
        in_features: int,
        tasks: Sequence[DummyTask] | Mapping[str, DummyTask],
        *,
        num_sets: int = 1,
        resample: str = "never",
        bias: bool = True,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        norm: str = "squared",
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        process_group: object = None,
    ) -> None:
        super().__init__()
        check_process_group(process_group)
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.task_names = list(tasks) if isinstance(tasks, Mapping) else None
        self.tasks = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
        if not self.tasks or not all(isinstance(t, DummyTask) for t in self.tasks):
            raise TypeError("tasks must be a non-empty sequence (or mapping) of DummyTask")
        if not isinstance(num_sets, int) or num_sets < 1:
            raise ValueError(f"num_sets must be a positive int, got {num_sets!r}")
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {RESAMPLE}, got {resample!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if generator is None:
            seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
            generator = torch.Generator().manual_seed(seed)
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator (draws are made on the CPU and copied), got {generator.device}")
        self.in_features, self.num_sets, self.resample_mode = in_features, num_sets, resample
        self.has_bias, self.norm, self.backend, self.generator = bias, norm, backend, generator
        self.process_group = process_group
        self._drawn_in_sync = False  # whether the heads now held are rank 0's on every rank
        self.offsets = [0]
        for t in self.tasks:
            self.offsets.append(self.offsets[-1] + t.out_features)
        width = self.offsets[-1]
        self.register_buffer("weight", torch.empty(num_sets, width, in_features, device=device, dtype=dtype))
        self.register_buffer("bias", torch.empty(num_sets, width, device=device, dtype=dtype) if bias else None)
        self.resample()

    @torch.no_grad()
    def resample(self) -> None:
        """Draw every head afresh (PyTorch's default Linear initialisation); under ``torch.distributed``, rank 0's
        draw on every rank (a collective: every rank must call it)."""
        bound = 1.0 / math.sqrt(self.in_features)
        sync = sync_for(self.process_group)
        with same_random_draws(sync, self.generator):
            for buf in (self.weight, self.bias):
                if buf is not None:
                    draw = torch.rand(buf.shape, generator=self.generator, dtype=torch.float32)
                    buf.copy_(draw.mul_(2 * bound).sub_(bound))
        self._drawn_in_sync = sync is not None

    @torch.no_grad()
    def _sync_heads(self) -> None:
        """Before a distributed forward: heads drawn before the group existed (or loaded per rank) become rank 0's."""
        sync = sync_for(self.process_group)
        if sync is not None and not self._drawn_in_sync:
            sync.broadcast_([b for b in (self.weight, self.bias) if b is not None])
            self._drawn_in_sync = True

    def new_epoch(self) -> None:
        """Call at the end of each epoch: redraws the heads when ``resample="epoch"``."""
        if self.resample_mode == "epoch":
            self.resample()

    def _per_task(self, values: Sequence[Any] | Mapping[str, Any] | None, name: str) -> list:
        if values is None:
            return [None] * len(self.tasks)
        if isinstance(values, Mapping):
            if self.task_names is None:
                raise TypeError(f"{name} is a mapping but the tasks were given as a sequence")
            unknown = [n for n in values if n not in self.task_names]
            if unknown:
                raise ValueError(f"{name} names tasks {unknown} that are not among {self.task_names}")
            missing = [n for n in self.task_names if n not in values]
            if missing and name == "targets":  # a task without a mask entry simply has no mask
                raise ValueError(f"targets has no entry for tasks {missing}")
            return [values.get(n) for n in self.task_names]
        values = list(values)
        if len(values) != len(self.tasks):
            raise ValueError(f"{name} has {len(values)} entries but there are {len(self.tasks)} tasks")
        return values

    def forward(
        self,
        features: Tensor,
        targets: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        masks: Sequence[Tensor | None] | Mapping[str, Tensor] | None = None,
        task_weights: Sequence[float] | Tensor | None = None,
    ) -> Tensor:
        """The DGR penalty of the features, averaged over the dummy sets.

        Args:
            features: ``[N, D]`` or ``[B, D, *spatial]``.
            targets: per task (a sequence in task order, or a mapping by task name), as ``dgr_penalty`` takes them.
            masks: per task ``None`` or a bool row/pixel mask.
            task_weights: ``[K]`` weights of the task losses (the penalty scales with their squares).
        Returns:
            0-dim, differentiable w.r.t. ``features``.
        """
        per_set_task = self._penalties(features, targets, masks)
        return apply_norm(weighted_sum(per_set_task, task_weights), self.norm).mean()

    def per_task(
        self,
        features: Tensor,
        targets: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        masks: Sequence[Tensor | None] | Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Unweighted per-task penalties ``[K]`` (mean over the sets). Their sum is ``forward``'s value when
        ``norm="squared"``: the penalty splits over tasks, so a method that keeps per-task gradients (AdaTask) can
        give task k its own share ``R_k``."""
        if self.norm != "squared":
            raise ValueError("per_task needs norm='squared': sqrt(sum_k R_k) does not split over tasks")
        return self._penalties(features, targets, masks).mean(0)

    def _penalties(self, features, targets, masks) -> Tensor:
        """``[num_sets, K]`` unweighted penalties (redrawing the heads first when ``resample="step"``)."""
        if self.training and self.resample_mode == "step":
            self.resample()
        self._sync_heads()
        targets, masks = self._per_task(targets, "targets"), self._per_task(masks, "masks")
        sets, k = self.num_sets, len(self.tasks)
        bounds = list(zip(self.offsets[:-1], self.offsets[1:]))
        weights = [self.weight[s, c0:c1] for s in range(sets) for c0, c1 in bounds]
        biases = [None if self.bias is None else self.bias[s, c0:c1] for s in range(sets) for c0, c1 in bounds]
        per_task = dgr_penalty_per_task(
            features, weights, biases, targets * sets, [t.loss for t in self.tasks] * sets,
            masks=masks * sets, ignore_index=[t.ignore_index for t in self.tasks] * sets,
            reductions=[t.reduction for t in self.tasks] * sets, backend=self.backend,
            process_group=self.process_group,
        )
        return per_task.view(sets, k)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # torch loads the buffers and then the generator state, collecting shape errors to raise at the end: a
        # checkpoint of other head sizes would replace the generator before failing. Check the shapes first and
        # load nothing of this module when one differs.
        wrong = [f"{prefix}{name}: {tuple(state_dict[prefix + name].shape)} in the checkpoint, {tuple(buf.shape)} here"
                 for name, buf in (("weight", self.weight), ("bias", self.bias))
                 if buf is not None and prefix + name in state_dict and state_dict[prefix + name].shape != buf.shape]
        if wrong:
            error_msgs.append("DummyHeads: the checkpoint's heads have other sizes (" + "; ".join(wrong) + "); "
                              "nothing of this module was loaded")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        self._drawn_in_sync = False  # loaded heads: rank 0's are broadcast before the next distributed forward

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, tasks={self.tasks}, num_sets={self.num_sets}, "
            f"resample={self.resample_mode!r}, bias={self.has_bias}, norm={self.norm!r}"
        )
