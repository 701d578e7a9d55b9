"""Task-based sharpness-aware minimisation for multi-task learning.

Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions" (arXiv 2211.13723).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dgr_fast.dummy_heads import DummyHeads, frozen_batchnorm_stats
from dgr_fast.mtl.aggregators import Aggregator, Sum
from dgr_fast.distributed import check_process_group, sync_for
from dgr_fast.mtl.grads import per_task_grads
from dgr_fast.mtl.step import _rank0_draws
from dgr_fast.mtl.scales import aggregator_scale, check_scale

__all__ = ["TaskSAM", "frozen_batchnorm_stats"]

Features = Tensor | Sequence[Tensor] | Mapping[str, Tensor]  # one tensor all heads read, or one per task
ClosureResult = Sequence[Tensor] | Tensor | tuple[Sequence[Tensor] | Tensor, Features]


def _loss_list(result: Sequence[Tensor] | Tensor, name: str) -> list[Tensor]:
    if isinstance(result, Tensor):
        if result.ndim != 1:
            raise ValueError(f"{name} must return K scalar losses or a [K] tensor, got shape {tuple(result.shape)}")
        return list(result.unbind())
    losses = list(result)
    if not losses or not all(isinstance(x, Tensor) and x.numel() == 1 for x in losses):
        raise ValueError(f"{name} must return K scalar losses or a [K] tensor")
    return [x.reshape(()) for x in losses]


class TaskSAM:
    """One training step of task-based flat-region seeking (Phan et al., arXiv 2211.13723).

    Stage 1: per-task gradients ``g_k`` of the shared parameters and of head k (one ``per_task_grads`` call).
    Stage 2, for each task k: move the shared parameters and head k to ``w + e_k``, forward, take the gradient of
    ``L_k`` (``g_k^SAM``), move back. The perturbation is ``e_k = rho w^2 g_k / |w g_k|`` (``adaptive=True``, the
    authors' default) or ``rho g_k / |g_k|``, the shared and head parts normalised separately; a zero gradient gives
    no perturbation. BatchNorm running statistics are left as stage 1 set them (``frozen_batchnorm_stats``).
    Update: shared ``.grad = s (Agg(g_1..g_K) + Agg(h_1..h_K))`` with the flat directions ``h_k = g_k^SAM - g_k``
    and ``s`` the factor of ``aggregator_scale`` (``"authors"``: the MTL-SAM code's, K for MGDA)
    (+ ``lambda dR/dtheta`` with DGR, the penalty taken at the unperturbed point, added after the aggregation as the
    DGR code does), head k's ``.grad = its g_k^SAM``; then ``optimizer.step()``. Cost: K + 1 forwards, 2K backwards
    (2K + 1 with DGR).

    Perturb and restore are foreach ops over flat views of the parameters; restoring copies the saved values back,
    so the parameters return bit for bit.

    Args:
        model: the module whose BatchNorm statistics stage 2 must not change.
        shared_params: the encoder's parameters. ``head_params``: one sequence of parameters per task, disjoint.
        optimizer: over the shared and head parameters (the authors use Adam).
        aggregator: for both the gradients and the flat directions (default ``Sum()``; the authors use PCGrad
            (summed), CAGrad (c = 0.4, rescaled), IMTL-G and MGDA).
        rho: the neighbourhood radius (the authors: 2 with the adaptive form on NYUv2, Cityscapes and CelebA).
        adaptive: the adaptive (ASAM) form of the perturbation.
        dummy_heads, dgr_lambda: DGR's dummy heads and weight (the closure must then return the features too: one
            tensor, or one per task for heads that read their own task's features, as ``DummyHeads`` takes them).
        aggregator_scale: ``"authors"`` (default), ``"sum"``, ``"none"`` or a number (``dgr_fast.mtl.scales``).
        process_group: under ``torch.distributed``, ``None`` (the default group) or a group: stage 1's per-task
            gradients are averaged before the perturbation (so every rank perturbs alike) and stage 2's after it,
            one buffer each; ``"local"``: no synchronisation (``DummyHeads`` follow their own ``process_group``).
        observer: called in every step as ``observer(grads, sam_grads, losses)`` with stage 1's and stage 2's
            per-task gradients of the shared parameters, ``[K, P_shared]`` each (DGR's row left out), and the
            detached losses ``[K]``, before the aggregator combines them, inside its random draws' scope (an
            observer that puts the random state back sees the draws the aggregator then makes). For a
            task-dominance tracker (``TaskDominance.step`` sets it for its call). It must not change them.

    Deviations: the authors' scripts differ in whether shared and head parts are normalised separately (one of
    them normalises jointly); this class normalises them separately, as the paper. Their MGDA variant (the min-norm
    point of the unit-normalised gradients, times K) is not among this library's aggregators: ``MGDA("l2")`` finds
    its weights on the unit gradients but combines the raw ones, as Sener and Koltun's code.
    """

    def __init__(
        self,
        model: nn.Module,
        shared_params: Sequence[Tensor],
        head_params: Sequence[Sequence[Tensor]],
        optimizer: torch.optim.Optimizer,
        *,
        aggregator: Aggregator | None = None,
        rho: float = 2.0,
        adaptive: bool = True,
        dummy_heads: DummyHeads | None = None,
        dgr_lambda: float = 0.0,
        aggregator_scale: str | float = "authors",
        process_group: object = None,
        observer: Callable[[Tensor, Tensor, Tensor], None] | None = None,
    ) -> None:
        check_scale(aggregator_scale)
        check_process_group(process_group)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be a dgr_fast.mtl Aggregator, got {type(aggregator).__name__}")
        if not (isinstance(rho, (int, float)) and rho >= 0):
            raise ValueError(f"rho must be a number >= 0, got {rho!r}")
        if dummy_heads is not None and not isinstance(dummy_heads, DummyHeads):
            raise TypeError(f"dummy_heads must be a DummyHeads, got {type(dummy_heads).__name__}")
        if not (isinstance(dgr_lambda, (int, float)) and dgr_lambda >= 0):
            raise ValueError(f"dgr_lambda must be a number >= 0, got {dgr_lambda!r}")
        self.shared = list(shared_params)
        self.heads = [list(h) for h in head_params]
        if not self.shared:
            raise ValueError("shared_params is empty")
        if not self.heads or not all(self.heads):
            raise ValueError("head_params must hold a non-empty sequence of parameters for every task")
        owners = [id(p) for p in self.shared] + [id(p) for h in self.heads for p in h]
        if len(set(owners)) != len(owners):
            raise ValueError("shared_params and head_params must be disjoint (and each parameter listed once)")
        self.model, self.optimizer = model, optimizer
        self.aggregator = Sum() if aggregator is None else aggregator
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self.dummy_heads, self.dgr_lambda = dummy_heads, float(dgr_lambda)
        self.aggregator_scale, self.process_group = aggregator_scale, process_group
        self.observer = observer

    def _perturbation(self, grad: Tensor, weights: Tensor) -> Tensor:
        """``e`` for one parameter group: flat ``grad`` and the group's flat parameter values ``weights``."""
        if self.adaptive:
            w = weights.to(grad.dtype)
            direction = w * grad
            norm = direction.norm()
            e = w * direction
        else:
            norm = grad.norm()
            e = grad
        return torch.where(norm > 0, e * (self.rho / norm.clamp(min=torch.finfo(grad.dtype).tiny)),
                           torch.zeros_like(e))

    def _evaluate(self, closure: Callable[[], ClosureResult]) -> tuple[list[Tensor], Features | None]:
        result = closure()
        if self.dummy_heads is None:
            return _loss_list(result, "closure"), None
        features = result[1] if isinstance(result, tuple) and len(result) == 2 else None
        per_task = isinstance(features, (list, tuple, Mapping)) and all(
            isinstance(f, Tensor) for f in (features.values() if isinstance(features, Mapping) else features))
        if not (isinstance(features, Tensor) or per_task):
            raise ValueError("with dummy_heads the closure must return (losses, features), features a tensor or "
                             "one per task (a sequence or a mapping by task name)")
        return _loss_list(result[0], "closure"), result[1]

    def step(
        self,
        closure: Callable[[], ClosureResult],
        *,
        dgr_targets: Sequence[Tensor] | Mapping[str, Tensor] | None = None,
        dgr_masks: Sequence[Tensor | None] | Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor | None]:
        """Zero the gradients, fill them, step the optimizer.

        Args:
            closure: runs a training-mode forward and returns the K task losses (a sequence of scalars or a ``[K]``
                tensor); with ``dummy_heads``, ``(losses, features)``. Called K + 1 times per step.
            dgr_targets / dgr_masks: the dummy heads' targets and masks (as ``DummyHeads`` takes them).
        Returns:
            ``{"losses": [K] at the unperturbed point, "penalty": 0-dim or None}``, detached.
        """
        losses, features = self._evaluate(closure)
        K = len(losses)
        if K != len(self.heads):
            raise ValueError(f"closure returned {K} losses but head_params has {len(self.heads)} tasks")
        use_dgr = self.dummy_heads is not None and self.dgr_lambda > 0
        if use_dgr and dgr_targets is None:
            raise ValueError("DGR needs dgr_targets=")
        self.optimizer.zero_grad()
        penalty = self.dummy_heads(features, dgr_targets, masks=dgr_masks) if use_dgr else None
        rows = losses if penalty is None else losses + [self.dgr_lambda * penalty]

        groups = [self.shared] + self.heads  # group 0: shared, group k + 1: head k
        sizes = [[p.numel() for p in group] for group in groups]
        bounds = [0]
        for group_sizes in sizes:
            bounds.append(bounds[-1] + sum(group_sizes))
        sync = sync_for(self.process_group)
        # [K (+1), P_shared + P_heads], the global batch's under distributed: every rank perturbs the same way.
        grads = per_task_grads(rows, [p for group in groups for p in group], process_group=self.process_group)
        g_shared = grads[:K, : bounds[1]]
        views = [[p.detach().view(-1) for p in group] for group in groups]
        saved = [torch.cat(group_views) for group_views in views]  # to restore, and w for the adaptive form
        # Stage 2's gradients in one buffer: K shared rows, then each head's own: one all-reduce for all of them.
        sam_flat = torch.empty(K * bounds[1] + bounds[-1] - bounds[1], dtype=g_shared.dtype, device=g_shared.device)
        sam_shared = sam_flat[: K * bounds[1]].view(K, bounds[1])
        sam_heads = [[piece.view_as(p) for piece, p in zip(block.split(sizes[k + 1]), self.heads[k])]
                     for k, block in enumerate(sam_flat[K * bounds[1] :].split([sum(h) for h in sizes[1:]]))]
        with frozen_batchnorm_stats(self.model):
            for k in range(K):
                e = torch.cat([self._perturbation(g_shared[k], saved[0]),
                               self._perturbation(grads[k, bounds[k + 1] : bounds[k + 2]], saved[k + 1])])
                moved = views[0] + views[k + 1]
                torch._foreach_add_(moved, list(e.split(sizes[0] + sizes[k + 1])))
                loss_k = self._evaluate(closure)[0][k]
                params_k = self.shared + self.heads[k]
                g = torch.autograd.grad(loss_k, params_k, allow_unused=True)
                torch._foreach_copy_(moved, list(saved[0].split(sizes[0])) + list(saved[k + 1].split(sizes[k + 1])))
                g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params_k, g)]
                torch.cat([gi.reshape(-1) for gi in g[: len(self.shared)]], out=sam_shared[k])
                torch._foreach_copy_(sam_heads[k], g[len(self.shared) :])
        if sync is not None:
            sync.all_reduce_mean_([sam_flat])

        loss_values = torch.stack([x.detach() for x in losses])
        with _rank0_draws(sync, self.aggregator, g_shared.device):
            if self.observer is not None:
                self.observer(g_shared, sam_shared, loss_values)
            update = self.aggregator(g_shared, loss_values) + self.aggregator(sam_shared - g_shared, loss_values)
        factor = aggregator_scale(self.aggregator, K, self.aggregator_scale, "sam")
        if factor != 1.0:
            update = update * factor
        if penalty is not None:
            update = update + grads[K, : bounds[1]]
        for p, g in zip(self.shared, update.split(sizes[0])):
            p.grad = g.view_as(p).to(p.dtype)
        for head, head_grads in zip(self.heads, sam_heads):
            for p, g in zip(head, head_grads):
                p.grad = g.to(p.dtype, copy=True)  # not a view: .grad must not keep stage 2's buffer alive
        self.optimizer.step()
        return {"losses": loss_values,
                "penalty": None if penalty is None else penalty.detach()}
