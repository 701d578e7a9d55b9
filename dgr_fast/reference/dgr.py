"""Ground truth for the DGR penalty: autograd double backward through the dummy heads.

Shin, Do, Son, ECCV 2024 (arXiv 2409.16651). The penalty of task k is the squared norm of the gradient of its
(weighted) loss w.r.t. its dummy head's parameters; the heads are fixed, the gradient goes to the features.

- `task_loss` builds one task's loss exactly as the library defines it (DESIGN.md section 4).
- `head_penalties` is the exact per-task penalty for any dummy heads (linear or `nn.Module`), by
  `torch.autograd.grad(..., create_graph=True)`: differentiable w.r.t. the features to any order.
- `finite_difference_features_grad` is the estimate the authors' code uses for the encoder gradient.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

LOSSES = ("ce", "bce", "mse", "l1")
REDUCTIONS = ("mean", "row_mean")


def task_loss(
    logits: Tensor,
    target: Tensor,
    loss: str,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """One task's loss on its head's logits.

    Args:
        logits: ``[N, C]`` or ``[B, C, *spatial]``.
        target: ``"ce"``: class indices ``[N]`` / ``[B, *spatial]`` (integer); otherwise the logits' shape (float).
        loss: ``"ce"`` softmax cross-entropy, ``"bce"`` sigmoid cross-entropy, ``"mse"``, ``"l1"``.
        mask: optional bool ``[N]`` / ``[B, *spatial]``: rows/pixels that count.
        ignore_index: ``"ce"`` targets equal to it do not count.
        reduction: ``"mean"`` over valid elements (torch semantics), or ``"row_mean"``: summed over channels and
            averaged over valid rows/pixels (the official dense-prediction losses). Equal for ``"ce"``.
    Returns:
        0-dim; 0 (with a zero gradient) when nothing is valid.
    """
    row_shape = logits.shape[:1] + logits.shape[2:]
    valid = torch.ones(row_shape, dtype=torch.bool, device=logits.device) if mask is None else mask
    if loss == "ce":
        valid = valid & (target != ignore_index)
        # any integer dtype, as the fused backends take (cross_entropy itself wants int64)
        per_row = F.cross_entropy(logits, torch.where(valid, target, 0).long(), reduction="none")
        return (per_row * valid).sum() / valid.sum().clamp_min(1)
    fn = {"bce": F.binary_cross_entropy_with_logits, "mse": F.mse_loss, "l1": F.l1_loss}[loss]
    per_element = fn(logits, target.to(logits.dtype), reduction="none")
    channel_mask = valid.unsqueeze(1)
    count = channel_mask.sum() * (logits.shape[1] if reduction == "mean" else 1)
    return (per_element * channel_mask).sum() / count.clamp_min(1)


def linear_head(features: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A linear dummy head applied per row of ``[N, D]`` or per pixel of ``[B, D, *spatial]`` (a 1x1 convolution)."""
    if features.dim() == 2:
        return F.linear(features, weight, bias)
    logits = torch.einsum("bd...,cd->bc...", features, weight)
    if bias is not None:
        logits = logits + bias.view(1, -1, *([1] * (features.dim() - 2)))
    return logits


HeadFn = Callable[[Sequence[Tensor]], Tensor]  # the head's parameters -> its logits on the features


def head_penalties(
    head_fns: Sequence[HeadFn],
    head_params: Sequence[Sequence[Tensor]],
    loss_fns: Sequence[Callable[[Tensor], Tensor]],
) -> Tensor:
    """Exact per-task penalty ``[K]``: ``R_k = ||d L_k(head_k(params_k)) / d params_k||^2``.

    Each head's parameters are detached copies that require grad, so the heads stay fixed; the graph to the
    features (captured inside ``head_fns``) is kept (``create_graph=True``).
    """
    leaves = [[p.detach().requires_grad_(True) for p in params] for params in head_params]
    total = sum(loss_fn(head_fn(ps)) for head_fn, ps, loss_fn in zip(head_fns, leaves, loss_fns))
    flat = [p for ps in leaves for p in ps]
    grads = torch.autograd.grad(total, flat, create_graph=True, allow_unused=True)
    penalties, i = [], 0
    for ps in leaves:
        gs = [g for g in grads[i : i + len(ps)] if g is not None]
        i += len(ps)
        penalties.append(sum((g * g).sum() for g in gs) if gs else total.new_zeros(()))
    return torch.stack(penalties)


def linear_penalties(
    features: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    targets: Sequence[Tensor],
    losses: Sequence[str],
    masks: Sequence[Tensor | None],
    ignore_index: Sequence[int],
    reductions: Sequence[str],
) -> Tensor:
    """Per-task penalty ``[K]`` for linear dummy heads (the ``reference`` backend of ``dgr_penalty``)."""
    head_fns, params, loss_fns = [], [], []
    for k, (w, b) in enumerate(zip(weights, biases)):
        head_fns.append(lambda ps: linear_head(features, ps[0], ps[1] if len(ps) > 1 else None))
        params.append([w] if b is None else [w, b])
        loss_fns.append(
            lambda s, k=k: task_loss(
                s, targets[k], losses[k], mask=masks[k], ignore_index=ignore_index[k], reduction=reductions[k]
            )
        )
    return head_penalties(head_fns, params, loss_fns)


def module_head_fns(features: Tensor, heads: Sequence[nn.Module]) -> tuple[list[HeadFn], list[list[Tensor]]]:
    """Turn ``nn.Module`` dummy heads into ``head_penalties`` arguments (their own parameters are never modified)."""
    fns, params = [], []
    for head in heads:
        names = [n for n, _ in head.named_parameters()]
        fns.append(lambda ps, head=head, names=names: functional_call(head, dict(zip(names, ps)), (features,)))
        params.append([p for _, p in head.named_parameters()])
    return fns, params


def module_penalty(
    features: Tensor,
    heads: Sequence[nn.Module],
    loss_fns: Sequence[Callable[[Tensor], Tensor]],
    task_weights: Sequence[float] | None = None,
) -> Tensor:
    """Exact DGR penalty for arbitrary dummy heads: ``sum_k w_k^2 ||grad_{phi_k} L_k||^2``, 0-dim.

    Args:
        features: the shared features every head reads (any shape the heads accept).
        heads: dummy heads (their parameters are read, never trained or changed).
        loss_fns: ``loss_fns[k](logits_k) -> 0-dim`` task loss (targets bound inside).
        task_weights: ``w_k`` multiplying each task loss (default 1).
    Differentiable w.r.t. ``features`` to any order (double backward through the heads).
    """
    fns, params = module_head_fns(features, heads)
    penalties = head_penalties(fns, params, loss_fns)
    if task_weights is not None:
        penalties = penalties * torch.as_tensor(task_weights, dtype=penalties.dtype, device=penalties.device) ** 2
    return penalties.sum()


def finite_difference_features_grad(
    features: Tensor,
    heads: Sequence[nn.Module],
    loss_fns: Sequence[Callable[[Tensor], Tensor]],
    h: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """The authors' finite-difference estimate of the penalty's gradient w.r.t. the features.

    With ``L(phi) = sum_k L_k(head_k(phi_k; z))``, ``d = grad_phi L`` and ``u = d / ||d||``, the code evaluates
    ``L+ = L(phi + h u)`` and estimates ``dR/dz ~= 2 (L+ - L) (grad_z L+ - grad_z L) / h^2`` (an O(h) error).

    Returns:
        ``(penalty, grad)``: the exact ``||d||^2`` (0-dim) and the estimated gradient, shaped like ``features``.
    """
    z = features.detach().requires_grad_(True)
    fns, params = module_head_fns(z, heads)
    phi = [[p.detach().requires_grad_(True) for p in ps] for ps in params]
    flat = [p for ps in phi for p in ps]

    def dummy_loss(ps_per_head: Sequence[Sequence[Tensor]]) -> Tensor:
        return sum(loss_fn(fn(ps)) for fn, ps, loss_fn in zip(fns, ps_per_head, loss_fns))

    loss = dummy_loss(phi)
    grads = torch.autograd.grad(loss, flat + [z], allow_unused=True)
    d = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[:-1], flat)]
    grad_z = grads[-1] if grads[-1] is not None else torch.zeros_like(z)
    norm = torch.sqrt(sum((g * g).sum() for g in d))
    if norm == 0:
        return norm.square().detach(), torch.zeros_like(features)
    shifted, i = [], 0
    for ps in phi:
        shifted.append([p.detach() + h * g / norm for p, g in zip(ps, d[i : i + len(ps)])])
        i += len(ps)
    loss_plus = dummy_loss(shifted)
    (grad_z_plus,) = torch.autograd.grad(loss_plus, [z], allow_unused=True)
    grad_z_plus = grad_z_plus if grad_z_plus is not None else torch.zeros_like(z)
    estimate = 2 * (loss_plus - loss).detach() * (grad_z_plus - grad_z) / h**2
    return norm.square().detach(), estimate.to(features.dtype)
