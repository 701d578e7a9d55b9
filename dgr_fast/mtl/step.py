"""`MTLStep`: one multi-task training step composing a loss weighting or a gradient aggregator with DGR.

The DGR authors' code adds the penalty's gradient to the encoder gradient *after* each method's own gradient; this
object does that in one call, for any optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from dgr_fast.distributed import Sync, check_process_group, same_random_draws, sync_for
from dgr_fast.dummy_heads import DummyHeads
from dgr_fast.mtl.aggregators import Aggregator
from dgr_fast.mtl.grads import MODES, _check_losses, _per_task_grads
from dgr_fast.mtl.scales import aggregator_scale, check_scale
from dgr_fast.mtl.weightings import EqualWeighting, Weighting
from dgr_fast.optim.adatask import AdaTask


class MTLStep:
    """One training step of hard parameter sharing: :meth:`backward` fills every ``.grad``, :meth:`step` steps the
    optimizer (``step(losses, ...)`` does both, zeroing the gradients first).

    Three kinds of method:

    - a loss ``weighting`` (equal, DWA, uncertainty, RLW): one backward of ``weighting(losses) + lambda R``;
    - a gradient ``aggregator`` (PCGrad, CAGrad, IMTL-G, MGDA, GradDrop, Nash-MTL): per-task gradients ``G [K, P]``
      of the shared parameters, shared ``.grad = s * aggregator(G) + lambda dR/dtheta`` with ``s`` the factor of
      ``aggregator_scale`` (``"authors"``: the DGR code's, e.g. K for CAGrad, whose update has the scale of the mean
      loss), and each head's ``.grad`` the gradient of ``sum_k L_k``. The penalty's gradient rides along as one more
      row of the same per-task computation (one more backward in ``grad_mode="loop"``, one more row of the batched
      VJP in ``"batched"``);
    - an ``AdaTask`` optimizer: per-task gradients go to its per-task moments; DGR's penalty splits over tasks
      (``R = sum_k R_k``), so task k's loss becomes ``w_k L_k + lambda R_k``.

    Args:
        shared_params: the encoder's parameters (for ``AdaTask``, the optimizer's shared parameters are used).
        task_params: the task heads' parameters.
        optimizer: any ``torch.optim.Optimizer`` over both (plus a learnable weighting's parameters), or ``AdaTask``.
        weighting / aggregator: at most one; neither means equal weighting.
        dummy_heads: ``DummyHeads`` for DGR (``None``: no penalty); ``dgr_lambda``: its weight lambda.
        grad_mode, chunk_size: how per-task gradients are taken (see ``dgr_fast.mtl.per_task_grads``).
        aggregator_scale: ``"authors"`` (default), ``"sum"``, ``"none"`` or a number: what the aggregator's update
            is multiplied by before DGR's gradient is added (``dgr_fast.mtl.scales``).
        process_group: under ``torch.distributed``, ``None`` (the default group) or a group: every gradient is
            averaged over the ranks (the per-task gradients before the aggregator, as one flat buffer with the
            heads'), random methods draw rank 0's numbers, so the ranks stay equal and equal one process on the
            global batch; ``"local"``: no synchronisation. ``AdaTask`` and ``DummyHeads`` synchronise by their own
            ``process_group``.
        observer: with an aggregator, called in every backward as ``observer(grads, losses)`` with the per-task
            gradients ``[K, P]`` of the shared parameters that require grad (P their elements, flat, in order; DGR's
            row left out) and the detached losses ``[K]``, before the aggregator combines them, inside its random
            draws' scope (an observer that puts the random state back sees the draws the aggregator then makes).
            For a task-dominance tracker, which would otherwise take the gradients again (``TaskDominance.step``
            sets it for its call). It must not change them. Weightings and ``AdaTask`` never call it.
    """

    def __init__(
        self,
        shared_params: Sequence[Tensor],
        task_params: Sequence[Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        weighting: Weighting | None = None,
        aggregator: Aggregator | None = None,
        dummy_heads: DummyHeads | None = None,
        dgr_lambda: float = 0.0,
        grad_mode: str = "loop",
        chunk_size: int | None = None,
        aggregator_scale: str | float = "authors",
        process_group: object = None,
        observer: Callable[[Tensor, Tensor], None] | None = None,
    ) -> None:
        if weighting is not None and aggregator is not None:
            raise ValueError("give a weighting or an aggregator, not both")
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be a dgr_fast.mtl.aggregators.Aggregator, got {type(aggregator).__name__}")
        if weighting is not None and not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a dgr_fast.mtl.weightings.Weighting, got {type(weighting).__name__}")
        if isinstance(optimizer, AdaTask) and aggregator is not None:
            raise ValueError("AdaTask balances tasks through its per-task moments; it takes no aggregator")
        if dummy_heads is not None and not isinstance(dummy_heads, DummyHeads):
            raise TypeError(f"dummy_heads must be a DummyHeads, got {type(dummy_heads).__name__}")
        if isinstance(optimizer, AdaTask) and dummy_heads is not None and len(dummy_heads.tasks) != optimizer.num_tasks:
            raise ValueError(f"dummy_heads has {len(dummy_heads.tasks)} tasks but the AdaTask optimizer "
                             f"{optimizer.num_tasks}: each task's penalty goes to that task's moments")
        if not (isinstance(dgr_lambda, (int, float)) and dgr_lambda >= 0):
            raise ValueError(f"dgr_lambda must be a number >= 0, got {dgr_lambda!r}")
        if grad_mode not in MODES:
            raise ValueError(f"grad_mode must be one of {MODES}, got {grad_mode!r}")
        check_scale(aggregator_scale)
        check_process_group(process_group)
        self.shared_params = [p for p in shared_params]
        self.task_params = [p for p in task_params]
        if not self.shared_params:
            raise ValueError("shared_params is empty")
        self.optimizer, self.aggregator = optimizer, aggregator
        self.weighting = weighting if weighting is not None or aggregator is not None else EqualWeighting()
        self.dummy_heads, self.dgr_lambda = dummy_heads, float(dgr_lambda)
        self.grad_mode, self.chunk_size = grad_mode, chunk_size
        self.aggregator_scale, self.process_group = aggregator_scale, process_group
        self.observer = observer

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        features: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None = None,
        dgr_targets: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
        dgr_masks: Sequence[Tensor | None] | Mapping[str, Tensor] | None = None,
        dgr_task_weights: Sequence[float] | Tensor | None = None,
    ) -> dict[str, Tensor | None]:
        """Fill every gradient of one (micro-)batch, accumulating into ``.grad`` as ``Tensor.backward`` does (and,
        with ``AdaTask``, into its per-task gradients); nothing is zeroed and the optimizer is not stepped, so
        clipping, accumulation over micro-batches, GradScaler's unscaling and logging fit between this and
        :meth:`step`. Under ``torch.distributed`` the gradients are the global batch's, the same on every rank.

        Args:
            losses: the K task losses (scalars sharing one graph).
            features: the shared features every head reads: needed for DGR and for ``grad_mode="batched"``; for
                heads that read their own task's features (MTAN), one per task (a sequence, or a mapping by task
                name, as ``DummyHeads`` takes them), with ``grad_mode="loop"``.
            dgr_targets / dgr_masks: the dummy heads' targets and masks (as ``DummyHeads`` takes them).
            dgr_task_weights: weights of the task losses inside the penalty (default 1; the official UTKFace run
                with DWA weights them).
        Returns:
            ``{"losses": [K], "weights": [K] (AdaTask) or None, "penalty": 0-dim or None}``, detached, for logging
            (this rank's losses; the penalty is the global batch's).
        """
        losses = _check_losses(losses)
        use_dgr = self.dummy_heads is not None and self.dgr_lambda > 0
        if use_dgr and (features is None or dgr_targets is None):
            raise ValueError("DGR needs features= and dgr_targets=")
        if self.dummy_heads is not None and len(losses) != len(self.dummy_heads.tasks):
            raise ValueError(f"losses: {len(losses)} task losses but dummy_heads has {len(self.dummy_heads.tasks)} "
                             "tasks")
        sync = sync_for(self.process_group)
        vec = torch.stack(losses)
        weights = None
        if isinstance(self.optimizer, AdaTask):
            with _rank0_draws(sync, self.weighting, vec.device):
                weights = self.weighting.weights(vec)  # once per step: RLW draws and DWA records on each call
            penalty = self._adatask(vec * weights, features, dgr_targets, dgr_masks, dgr_task_weights, use_dgr)
        else:
            penalty = self._penalty(features, dgr_targets, dgr_masks, dgr_task_weights) if use_dgr else None
            if self.aggregator is None:
                with _rank0_draws(sync, self.weighting, vec.device):
                    total = self.weighting(vec)
                total = total if penalty is None else total + self.dgr_lambda * penalty
                if sync is None:
                    total.backward()
                else:
                    self._synced_backward(total, sync)
            else:
                self._aggregate(losses, penalty, features, sync)
        return {"losses": vec.detach(), "weights": None if weights is None else weights.detach(),
                "penalty": None if penalty is None else penalty.detach()}

    def step(
        self,
        losses: Sequence[Tensor] | Tensor | None = None,
        **kwargs,
    ) -> dict[str, Tensor | None] | None:
        """With ``losses``, the one-call form: zero the gradients, :meth:`backward` (same keyword arguments), step
        the optimizer, and return ``backward``'s info. Without: step the optimizer on the gradients that
        :meth:`backward` calls have filled (returns None)."""
        if losses is None:
            if kwargs:
                raise TypeError(f"step() without losses steps the optimizer only; got {sorted(kwargs)}")
            self.optimizer.step()
            return None
        self.zero_grad()
        info = self.backward(losses, **kwargs)
        self.optimizer.step()
        return info

    def zero_grad(self) -> None:
        """Clear every gradient the optimizer steps (and AdaTask's per-task gradients)."""
        self.optimizer.zero_grad()

    def _penalty(self, features, targets, masks, task_weights) -> Tensor:
        return self.dummy_heads(features, targets, masks=masks, task_weights=task_weights)

    def _adatask(self, task_losses, features, targets, masks, task_weights, use_dgr) -> Tensor | None:
        penalty = None
        if use_dgr:
            per_task = self.dummy_heads.per_task(features, targets, masks=masks)
            if task_weights is not None:
                per_task = per_task * torch.as_tensor(task_weights, dtype=per_task.dtype, device=per_task.device) ** 2
            task_losses = task_losses + self.dgr_lambda * per_task
            penalty = per_task.sum()
        # accumulate: backward() adds to the gradients of earlier micro-batches, as documented
        self.optimizer.backward(task_losses, features=features, mode=self.grad_mode, chunk_size=self.chunk_size,
                                accumulate=True)
        return penalty

    def _synced_backward(self, total: Tensor, sync: Sync) -> None:
        """``total.backward()`` for every parameter the optimizer steps, averaged over the ranks in one buffer.
        ``torch.autograd.grad`` rather than ``backward``: a DDP-wrapped model's own all-reduce never runs, so the
        gradients are not reduced twice. A parameter no rank's loss reaches keeps ``.grad`` None, as in one process."""
        params = list({id(p): p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad}.values())
        grads = torch.autograd.grad(total, params, allow_unused=True)
        fresh = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        reached = torch.tensor([g is not None for g in grads], dtype=fresh[0].dtype, device=fresh[0].device)
        sync.all_reduce_mean_([*fresh, reached])
        for p, g, hit in zip(params, fresh, reached.tolist()):
            if hit > 0:
                _accumulate(p, g)

    def _aggregate(self, losses: list[Tensor], penalty: Tensor | None, features: Tensor | None,
                   sync: Sync | None) -> None:
        rows = losses if penalty is None else losses + [self.dgr_lambda * penalty]
        shared = [p for p in self.shared_params if p.requires_grad]
        heads = [p for p in self.task_params if p.requires_grad]
        grads, head_grads = _per_task_grads(rows, shared, features, self.grad_mode, False, self.chunk_size, heads, sync)
        k = len(losses)
        values = torch.stack([loss.detach() for loss in losses])
        with _rank0_draws(sync, self.aggregator, grads.device):
            if self.observer is not None:
                self.observer(grads[:k], values)
            update = self.aggregator(grads[:k], values)
        factor = aggregator_scale(self.aggregator, k, self.aggregator_scale, "dgr")
        if factor != 1.0:
            update = update * factor
        if penalty is not None:
            update = update + grads[k]  # after the method's own gradient, as the DGR authors' code
        for p, g in zip(shared, update.split([p.numel() for p in shared])):
            _accumulate(p, g.view_as(p))
        for p, g in zip(heads, head_grads):
            _accumulate(p, g, copy=True)

    def __repr__(self) -> str:
        method = self.aggregator if self.aggregator is not None else self.weighting
        return (f"MTLStep(method={method!r}, optimizer={type(self.optimizer).__name__}, "
                f"dummy_heads={'None' if self.dummy_heads is None else 'DummyHeads'}, dgr_lambda={self.dgr_lambda}, "
                f"grad_mode={self.grad_mode!r}, chunk_size={self.chunk_size}, "
                f"aggregator_scale={self.aggregator_scale!r}, process_group={self.process_group!r})")


def _accumulate(p: Tensor, g: Tensor, copy: bool = False) -> None:
    """``p.grad += g``; ``copy``: ``g`` is a view into a buffer that ``.grad`` must not keep alive (the per-task
    gradients' ``[K, P]``)."""
    if p.grad is None:
        p.grad = g.to(p.dtype, copy=copy)
    else:
        p.grad.add_(g)


def _rank0_draws(sync: Sync | None, method: object, device: torch.device):
    """Random methods (PCGrad's order, GradDrop's mask, RLW's weights: those with a ``generator``) draw rank 0's
    numbers on every rank, so the ranks take the same step."""
    if sync is None or not hasattr(method, "generator"):
        return contextlib.nullcontext()
    return same_random_draws(sync, method.generator, device)
