"""Multi-task learning with a single gradient step update (Lee and Son, "Multitask Learning with Single Gradient
Step Update for Task Balancing", Neurocomputing 467, 2022; arXiv 2005.09910)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dgr_fast.distributed import Sync, check_process_group, sync_for
from dgr_fast.mtl.sam import _loss_list, frozen_batchnorm_stats

__all__ = ["MetaMTL"]

Batch = tuple[Tensor | tuple[Any, ...], Any]


def _as_args(inputs: Tensor | tuple[Any, ...]) -> tuple[Any, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


class MetaMTL:
    """One training step of single-gradient-step meta multi-task learning.

    Reconstructed from the paper's abstract (no code was published): the tasks are balanced at the gradient level
    with gradient-based meta-learning; shared and task-specific layers are trained separately; the shared layers
    are trained with a single gradient step update and inner/outer loops. Here, with shared parameters theta and
    task parameters phi:

    - inner: one forward on the inner batch; for each task ``theta_k' = theta - alpha grad_theta L_k(theta)``;
    - outer: for each task, ``L_k(theta_k')`` on the outer batch, evaluated with ``torch.func.functional_call``
      (no module copies); shared ``.grad = sum_k grad_theta L_k(theta_k')``. First order by default (the inner
      gradient is a constant, so this is ``sum_k (grad L_k)(theta_k')``); ``second_order=True`` differentiates
      through the inner step (``create_graph``), adding the ``-alpha H_k`` terms;
    - task layers get their ordinary gradient, ``grad_phi sum_k L_k(theta, phi)`` on the inner batch (from the
      inner forward, no extra pass);
    - then ``optimizer.step()``. BatchNorm running statistics are updated by the inner forward only.

    With ``alpha = 0`` and the same batch for both loops this is the gradient of the summed loss. Cost: K + 1
    forwards and 2K backwards per step.

    Args:
        model: the whole network; ``model(*inputs)`` returns what ``criterion`` takes.
        shared_params: the parameters of ``model`` that are shared (theta); every other parameter of ``model`` that
            requires grad is a task parameter.
        criterion: ``criterion(outputs, targets)`` -> the K task losses (a sequence of scalars or a ``[K]`` tensor).
        optimizer: over all of ``model``'s trainable parameters.
        alpha: the inner step size (the paper's value is not in its abstract: it must be given).
        second_order: differentiate through the inner step.
        process_group: under ``torch.distributed``, ``None`` (the default group) or a group: the inner gradients
            are averaged over the ranks before the inner step (one buffer), the outer and task gradients after the
            outer loop (one more); ``"local"``: no synchronisation.
    """

    def __init__(
        self,
        model: nn.Module,
        shared_params: Sequence[Tensor],
        criterion: Callable[[Any, Any], Sequence[Tensor] | Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        alpha: float,
        second_order: bool = False,
        process_group: object = None,
    ) -> None:
        check_process_group(process_group)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        names = {id(p): n for n, p in model.named_parameters()}
        self.shared = list(shared_params)
        if not self.shared:
            raise ValueError("shared_params is empty")
        missing = [i for i, p in enumerate(self.shared) if id(p) not in names]
        if missing:
            raise ValueError(f"shared_params{missing} are not parameters of model")
        self.shared_names = [names[id(p)] for p in self.shared]
        shared_ids = {id(p) for p in self.shared}
        self.task = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.alpha, self.second_order = float(alpha), bool(second_order)
        self.process_group = process_group

    def step(self, inner: Batch, outer: Batch) -> dict[str, Tensor]:
        """Zero the gradients, fill them, step the optimizer.

        Args:
            inner, outer: ``(inputs, targets)``; ``inputs`` a tensor or a tuple of ``model``'s arguments.
        Returns:
            ``{"inner_losses": [K], "outer_losses": [K]}`` (outer: each task's loss at its adapted parameters),
            detached.
        """
        self.optimizer.zero_grad()
        sync = sync_for(self.process_group)
        losses = _loss_list(self.criterion(self.model(*_as_args(inner[0])), inner[1]), "criterion")
        K = len(losses)
        params = self.shared + self.task
        inner_grads = []
        task_grads = [torch.zeros_like(p) for p in self.task]
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=self.second_order or k < K - 1,
                                        create_graph=self.second_order, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            inner_grads.append(grads[: len(self.shared)] if self.second_order
                               else [g.detach() for g in grads[: len(self.shared)]])
            torch._foreach_add_(task_grads, [g.detach() for g in grads[len(self.shared):]])
        if sync is not None:
            # Every rank adapts with the global batch's inner gradients. Second order differentiates through the
            # average: torch.distributed.nn's all-reduce carries the outer gradient back to every rank's own
            # Hessian term, so the averaged outer gradient is the global one's exactly.
            inner_grads = _global_inner_grads(inner_grads, sync, self.second_order)

        shared_grads = [torch.zeros_like(p) for p in self.shared]
        outer_losses = []
        with frozen_batchnorm_stats(self.model):
            for k in range(K):
                adapted = torch._foreach_sub(self.shared, inner_grads[k], alpha=self.alpha)
                outputs = functional_call(self.model, dict(zip(self.shared_names, adapted)), _as_args(outer[0]))
                outer_k = _loss_list(self.criterion(outputs, outer[1]), "criterion")
                if len(outer_k) != K:
                    raise ValueError(f"criterion returned {len(outer_k)} losses on the outer batch, {K} on the inner")
                grads = torch.autograd.grad(outer_k[k], self.shared, retain_graph=self.second_order and k < K - 1,
                                            allow_unused=True)
                torch._foreach_add_(shared_grads, [torch.zeros_like(p) if g is None else g
                                                   for p, g in zip(self.shared, grads)])
                outer_losses.append(outer_k[k].detach())

        if sync is not None:
            sync.all_reduce_mean_(shared_grads + task_grads)
        for p, g in zip(params, shared_grads + task_grads):
            p.grad = g.to(p.dtype)
        self.optimizer.step()
        return {"inner_losses": torch.stack([x.detach() for x in losses]), "outer_losses": torch.stack(outer_losses)}


def _global_inner_grads(inner_grads: list[list[Tensor]], sync: Sync, second_order: bool) -> list[list[Tensor]]:
    """Per task, the inner gradients averaged over the ranks: in place (first order), or through the
    differentiable all-reduce of ``torch.distributed.nn`` (second order), as one flat buffer either way."""
    pieces = [g for task in inner_grads for g in task]
    if not second_order:
        sync.all_reduce_mean_(pieces)
        return inner_grads
    from torch.distributed.nn.functional import all_reduce

    flat = all_reduce(torch.cat([g.reshape(-1) for g in pieces]), group=sync.group) / sync.world_size
    out, offset = [], 0
    for task in inner_grads:
        row = []
        for g in task:
            row.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        out.append(row)
    return out
