"""Ground truth for the DGR penalty: autograd double backward through the dummy heads.

Shin, Do, Son, ECCV 2024 (arXiv 2409.16651). The penalty of task k is the squared norm of the gradient of its
(weighted) loss w.r.t. its dummy head's parameters; the heads are fixed, the gradient goes to the features.

- `task_loss` builds one task's loss exactly as the library defines it (docs/DESIGN.md section 4).
- `head_penalties` is the exact per-task penalty for any dummy heads (linear or `nn.Module`), by
  `torch.autograd.grad(..., create_graph=True)`: differentiable w.r.t. the features to any order.
- `linear_penalties` is the same for linear heads by `torch.func.grad`, which torch.compile and torch.func take.
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
    total, count = task_loss_sum(logits, target, loss, mask=mask, ignore_index=ignore_index, reduction=reduction)
    return total / count.clamp_min(1)


def task_loss_sum(
    logits: Tensor,
    target: Tensor,
    loss: str,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """``task_loss`` as ``(sum over the valid entries, their count)``: what a global mean over several processes'
    batches adds up (the distributed penalty of non-linear dummy heads)."""
    row_shape = logits.shape[:1] + logits.shape[2:]
    valid = torch.ones(row_shape, dtype=torch.bool, device=logits.device) if mask is None else mask
    if loss == "ce":
        valid = valid & (target != ignore_index)
        # any integer dtype, as the fused backends take (cross_entropy itself wants int64)
        per_row = F.cross_entropy(logits, torch.where(valid, target, 0).long(), reduction="none")
        return (per_row * valid).sum(), valid.sum()
    fn = {"bce": F.binary_cross_entropy_with_logits, "mse": F.mse_loss, "l1": _l1}[loss]
    per_element = fn(logits, target.to(logits.dtype), reduction="none")
    channel_mask = valid.unsqueeze(1)
    count = channel_mask.sum() * (logits.shape[1] if reduction == "mean" else 1)
    return (per_element * channel_mask).sum(), count


def _l1(logits: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``F.l1_loss(..., reduction="none")``, ``|d| = d sign(d)`` with the sign a constant: the same value and first
    derivative (0 at d = 0 as abs's), and the second derivative abs has almost everywhere, 0, without the zeros
    tensor abs's double backward creates, which torch.compile cannot trace inside ``torch.func.grad`` (the
    ``reference`` backend's gradient under torch.compile)."""
    assert reduction == "none"
    d = logits - target
    return d * d.sign().detach()


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
    """Per-task penalty ``[K]`` for linear dummy heads (the ``reference`` backend of ``dgr_penalty``):
    ``||d L_k / d (W_k, b_k)||^2`` with the gradient taken by ``torch.func.grad`` rather than ``head_penalties``'
    ``autograd.grad`` on fresh leaves. The same numbers, but functional: torch.compile traces it and torch.func
    transforms compose with it (neither takes ``requires_grad_()`` inside); differentiable w.r.t. the features to
    any order."""
    penalties = []
    for k, (w, b) in enumerate(zip(weights, biases)):
        def loss(params: tuple[Tensor, ...], k: int = k) -> Tensor:
            logits = linear_head(features, params[0], params[1] if len(params) > 1 else None)
            return task_loss(logits, targets[k], losses[k], mask=masks[k], ignore_index=ignore_index[k],
                             reduction=reductions[k])

        params = (w.detach(),) if b is None else (w.detach(), b.detach())
        penalties.append(sum(g.square().sum() for g in torch.func.grad(loss)(params)))
    return torch.stack(penalties)


def head_parameters(head: nn.Module) -> tuple[list[str], list[Tensor]]:
    """The names and values of a dummy head's parameters: its ``named_parameters()``, or for a head whose
    parameters were frozen into buffers (``DummyHeads``' module heads), the buffers ``dummy_parameter_names`` lists."""
    names = getattr(head, "dummy_parameter_names", None)
    if names is None:
        named = list(head.named_parameters())
        return [n for n, _ in named], [p for _, p in named]
    buffers = dict(head.named_buffers())
    return list(names), [buffers[n] for n in names]


def module_head_fns(features: Tensor | Sequence[Tensor],
                    heads: Sequence[nn.Module]) -> tuple[list[HeadFn], list[list[Tensor]]]:
    """Turn ``nn.Module`` dummy heads into ``head_penalties`` arguments (their own parameters are never modified);
    ``features``: what every head reads, or one tensor per head."""
    feats = [features] * len(heads) if isinstance(features, Tensor) else list(features)
    fns, params = [], []
    for head, z in zip(heads, feats):
        names, values = head_parameters(head)
        fns.append(lambda ps, head=head, names=names, z=z: functional_call(head, dict(zip(names, ps)), (z,)))
        params.append(values)
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
    features: Tensor | Sequence[Tensor],
    heads: Sequence[nn.Module],
    loss_fns: Sequence[Callable[[Tensor], Tensor]],
    h: float = 1e-3,
) -> tuple[Tensor, Tensor | tuple[Tensor, ...]]:
    """The authors' finite-difference estimate of the penalty's gradient w.r.t. the features, as their
    ``compute_hessian`` (Sinseokwon/LearningUnivforMTL, DGR_train.py) computes it, operation for operation, with the
    features in the place of the encoder's parameters.

    With ``L(phi) = sum_k L_k(head_k(phi_k; z))``, ``d = grad_phi L`` and ``g = grad_z L`` (two backward calls, as
    theirs), the heads move to ``phi + eps d`` with ``eps = h / |d|``, and with ``L+``, ``g+`` there the estimate is
    ``2 ((g+ L+ + g L) - (g+ L + g L+)) / h^2``, which is ``2 (L+ - L) (g+ - g) / h^2``; its error is O(h) only while
    no kink (ReLU, L1) flips between ``phi`` and ``phi + eps d``, which at realistic sizes is not the case
    (README: the measured error table).

    Args:
        features: the tensor every head reads, or one per head (a head of the MTAN kind reads its task's).
    Returns:
        ``(penalty, grad)``: the exact ``|d|^2`` (0-dim) and the estimate, shaped like ``features`` (a tuple of
        them, one per distinct tensor in the order first seen, for per-head features).
    """
    per_head = not isinstance(features, Tensor)
    feature_list = list(features) if per_head else [features] * len(heads)
    distinct: list[Tensor] = []
    for f in feature_list:
        if not any(f is t for t in distinct):
            distinct.append(f)
    leaves = [f.detach().requires_grad_(True) for f in distinct]
    reads = [leaves[next(i for i, t in enumerate(distinct) if t is f)] for f in feature_list]
    named = [head_parameters(head) for head in heads]
    names = [n for n, _ in named]
    phi = [[p.detach().requires_grad_(True) for p in values] for _, values in named]
    flat = [p for ps in phi for p in ps]

    def dummy_loss(ps_per_head: Sequence[Sequence[Tensor]]) -> Tensor:
        return sum(loss_fn(functional_call(head, dict(zip(ns, ps)), (z,)))
                   for head, ns, ps, z, loss_fn in zip(heads, names, ps_per_head, reads, loss_fns))

    loss = dummy_loss(phi)
    d = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    d = [torch.zeros_like(p) if g is None else g for g, p in zip(d, flat)]
    grad = [torch.zeros_like(z) if g is None else g
            for g, z in zip(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)]
    norm = torch.cat([w.reshape(-1) for w in d]).norm(2)  # reshape: a channels_last head's gradient is no view
    if norm == 0:
        zeros = tuple(torch.zeros_like(f) for f in distinct)
        return norm.square().detach(), zeros if per_head else zeros[0]
    eps = h / norm
    shifted, i = [], 0
    with torch.no_grad():
        for ps in phi:
            shifted.append([p + eps * g for p, g in zip(ps, d[i : i + len(ps)])])
            i += len(ps)
    dummyloss = dummy_loss(shifted)
    grad_p = [torch.zeros_like(z) if g is None else g
              for g, z in zip(torch.autograd.grad(dummyloss, leaves, allow_unused=True), leaves)]
    loss, dummyloss = loss.detach(), dummyloss.detach()
    prox = tuple((2 * ((g_p * dummyloss + g * loss) - (g_p * loss + g * dummyloss)) / h**2).to(f.dtype)
                 for g_p, g, f in zip(grad_p, grad, distinct))
    return norm.square().detach(), prox if per_head else prox[0]
