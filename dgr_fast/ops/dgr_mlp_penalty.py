"""The DGR penalty for two-layer MLP dummy heads, ``Linear(D, H) - ReLU - Linear(H, C) [- ReLU]`` (the DGR authors'
UTKFace heads), in closed form: the penalty and its exact gradient w.r.t. row features ``z [N, D]``, every task's
head stacked so that each pass is a handful of GEMMs for all tasks at once.

Per row i and task k (``omega`` the validity over the valid count, folded into ``r`` as in ``dgr_penalty``)::

    a = W1 z + b1,  m1 = [a > 0],  h = m1 a,  s = W2 h + b2,  m2 = [s > 0] (final ReLU) or 1,  o = m2 s
    r = omega dl/do,  q = m2 r,  e = m1 (W2^T q)
    G_W2 = sum_i q h^T,  G_b2 = sum_i q,  G_W1 = sum_i e z^T,  G_b1 = sum_i e
    R_k = |G_W1|^2 + |G_b1|^2 + |G_W2|^2 + |G_b2|^2

Its gradient, for the incoming ``dR_k`` (``Gt = dR_k G`` per task; the ReLU masks have zero derivative a.e.)::

    u = 2 (Gt_W1 z + Gt_b1)                       # dR/de
    v = 2 (Gt_W2 h + Gt_b2) + W2 (m1 u)           # dR/dq
    o_bar = omega H (m2 v)                        # H: the loss Hessian w.r.t. o, as in dgr_penalty
    h_bar = 2 Gt_W2^T q + W2^T (m2 o_bar)
    dz = 2 Gt_W1^T e + W1^T (m1 h_bar)

Stacking: ``W1 [sum H_k, D]`` (one GEMM per pass), ``W2`` block-diagonal ``[sum C_k, sum H_k]`` (small), and the
residual, Hessian and class-index handling of ``dgr_penalty`` (``_residual_rows`` on the packed rows) on the
``[N, sum C_k]`` outputs. ``reference.module_penalty`` (autograd double backward through the same heads) is the
ground truth; the tests hold the two together in fp64 and gradcheck this closed form.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from dgr_fast.ops import dgr_penalty as dp


class MLPHead(NamedTuple):
    """One task's two-layer head: ``w1 [H, D]``, ``b1 [H]`` or None, ``w2 [C, H]``, ``b2 [C]`` or None, and
    whether a ReLU follows the second layer."""

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    final_relu: bool


def mlp_head_of(module: nn.Module) -> MLPHead | None:
    """The ``MLPHead`` of ``nn.Sequential(Linear, ReLU, Linear[, ReLU])``, or None for any other module."""
    if not isinstance(module, nn.Sequential) or len(module) not in (3, 4):
        return None
    layers = list(module)
    if not (type(layers[0]) is nn.Linear and type(layers[1]) is nn.ReLU and type(layers[2]) is nn.Linear):
        return None
    if len(layers) == 4 and type(layers[3]) is not nn.ReLU:
        return None
    first, second = layers[0], layers[2]
    if second.in_features != first.out_features:
        return None
    return MLPHead(first.weight, first.bias, second.weight, second.bias, len(layers) == 4)


class _Stacked(NamedTuple):
    w1: Tensor  # [sum H, D]
    b1: Tensor  # [sum H], 0 where a head has no first bias
    w2: Tensor  # [sum C, sum H], block-diagonal
    b2: Tensor  # [sum C]
    relu_cols: Tensor  # [sum C] bool: the column's head ends in a ReLU
    hidden_offsets: list[int]
    col_offsets: list[int]
    has_b1: list[bool]
    has_b2: list[bool]


def _stack(heads: Sequence[MLPHead], acc: torch.dtype) -> _Stacked:
    hidden = [h.w1.shape[0] for h in heads]
    cols = [h.w2.shape[0] for h in heads]
    device = heads[0].w1.device
    w1 = torch.cat([h.w1.detach() for h in heads]).to(acc)
    w2 = torch.block_diag(*[h.w2.detach().to(acc) for h in heads])
    b1 = torch.cat([torch.zeros(n, dtype=acc, device=device) if h.b1 is None else h.b1.detach().to(acc)
                    for n, h in zip(hidden, heads)])
    b2 = torch.cat([torch.zeros(n, dtype=acc, device=device) if h.b2 is None else h.b2.detach().to(acc)
                    for n, h in zip(cols, heads)])
    relu_cols = torch.cat([torch.full((n,), h.final_relu, dtype=torch.bool, device=device) for n, h in zip(cols, heads)])
    return _Stacked(w1.contiguous(), b1, w2, b2, relu_cols, [0, *itertools.accumulate(hidden)],
                    [0, *itertools.accumulate(cols)], [h.b1 is not None for h in heads], [h.b2 is not None for h in heads])


def _block_mask(hidden_offsets: Sequence[int], col_offsets: Sequence[int], like: Tensor) -> Tensor:
    """``[sum C, sum H]``: 1 where a column's head owns the hidden unit."""
    return torch.block_diag(*[like.new_ones(c1 - c0, h1 - h0) for (c0, c1), (h0, h1) in
                              zip(zip(col_offsets[:-1], col_offsets[1:]), zip(hidden_offsets[:-1], hidden_offsets[1:]))])


def _use_gram(z: Tensor, st: _Stacked) -> bool:
    """Whether to go through the rows' Gram matrix ``K = z z^T``: ``G_W1 = e^T z`` then never needs forming, as
    ``G_W1 z_i = (K e)_i`` and ``G_W1^T e_i = (e e^T z)_i``. That trades three ``N D sum(H)`` products for two
    ``N^2 D`` ones: fewer flops for fewer rows than 1.5 sum(H) (the UTKFace batch of 64 with three 64-unit heads)."""
    return 2 * z.shape[0] < 3 * st.w1.shape[0]


def _forward_rows(z: Tensor, st: _Stacked, rows) -> dict[str, Tensor]:
    """Pass 1 on the rows ``z [N, D]``: the activations, masks, ``q``, ``e``, the gradients of the second layer and
    the first layer's ``G_W1`` (or, in the Gram form, ``K e``, its product with the rows)."""
    y, labels, omega, losses, y_offsets = rows
    a = torch.addmm(st.b1, z, st.w1.T)
    m1 = a > 0
    h = a * m1
    s = torch.addmm(st.b2, h, st.w2.T)
    m2 = (s > 0) | ~st.relu_cols
    o = s * m2
    q = dp._residual_rows(o, y, labels, omega, losses, st.col_offsets, y_offsets) * m2
    e = (q @ st.w2) * m1
    f = dict(m1=m1, h=h, m2=m2, o=o, q=q, e=e,
             g_w2=(q.T @ h) * _block_mask(st.hidden_offsets, st.col_offsets, h),
             g_b2=q.sum(0) * dp.column_mask(st.has_b2, st.col_offsets, q),
             g_b1=e.sum(0) * dp.column_mask(st.has_b1, st.hidden_offsets, e))
    if _use_gram(z, st):
        f["ke"] = (z @ z.T) @ e  # row i: G_W1 z_i
    else:
        f["g_w1"] = e.T @ z
    return f


def _task_penalties(f: dict[str, Tensor], st: _Stacked) -> Tensor:
    second = dp.task_penalties(f["g_w2"], f["g_b2"], st.col_offsets)
    if "g_w1" in f:
        return second + dp.task_penalties(f["g_w1"], f["g_b1"], st.hidden_offsets)
    # |G_W1[k]|^2 = sum over task k's hidden units j of <e_j, K e_j> (e_j: column j of e)
    per_unit = (f["ke"] * f["e"]).sum(0) + f["g_b1"] * f["g_b1"]
    return second + torch.stack([per_unit[h0:h1].sum() for h0, h1 in zip(st.hidden_offsets[:-1], st.hidden_offsets[1:])])


def _features_grad(z: Tensor, st: _Stacked, rows, f: dict[str, Tensor], grad: Tensor) -> Tensor:
    """Pass 2: ``dz [N, D]`` for the incoming per-task ``grad [T]``."""
    y, labels, omega, losses, y_offsets = rows
    hidden_scale, col_scale = dp.row_scale(grad, st.hidden_offsets), dp.row_scale(grad, st.col_offsets)
    gt_b1 = f["g_b1"] * hidden_scale
    gt_w2, gt_b2 = f["g_w2"] * col_scale[:, None], f["g_b2"] * col_scale
    m1, m2, e = f["m1"], f["m2"], f["e"]
    if "g_w1" in f:
        gt_w1 = f["g_w1"] * hidden_scale[:, None]
        u = 2 * torch.addmm(gt_b1, z, gt_w1.T)
    else:
        u = 2 * (f["ke"] * hidden_scale + gt_b1)
    v = 2 * torch.addmm(gt_b2, f["h"], gt_w2.T) + (u * m1) @ st.w2.T
    o_bar = dp._residual_rows(f["o"], y, labels, omega, losses, st.col_offsets, y_offsets, u=v * m2)
    h_bar = 2 * (f["q"] @ gt_w2) + (o_bar * m2) @ st.w2
    through_w1 = (h_bar * m1) @ st.w1
    if "g_w1" in f:
        return torch.addmm(through_w1, 2 * e, gt_w1)
    return torch.addmm(through_w1, (2 * e * hidden_scale) @ e.T, z)  # 2 e Gt_W1 = (2 e diag(g) e^T) z


class _MLPPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, st, rows):
        f = _forward_rows(z, st, rows)
        ctx.save_for_backward(z)
        ctx.st, ctx.rows, ctx.f = st, rows, f
        return _task_penalties(f, st)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        f = ctx.f
        if torch.is_grad_enabled():  # create_graph: the activations and G depend on z, recompute them in the graph
            f = _forward_rows(z, ctx.st, ctx.rows)
        return _features_grad(z, ctx.st, ctx.rows, f, grad), None, None


def mlp_penalty_per_task(
    features: Tensor,
    heads: Sequence[MLPHead],
    targets: Sequence[Tensor],
    losses: Sequence[str] | str,
    *,
    masks: Sequence[Tensor | None] | None = None,
    ignore_index: int | Sequence[int] = -100,
    reductions: Sequence[str] | str | None = None,
) -> Tensor:
    """Unweighted per-task penalties ``[T]`` of MLP dummy heads on row features ``[N, D]`` (fp32, fp64 for fp64
    features), differentiable w.r.t. ``features`` (twice: the closed form is built from differentiable ops).
    ``targets``/``losses``/``masks``/``ignore_index``/``reductions`` as ``dgr_penalty`` takes them for ``[N, D]``."""
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a floating [N, D] tensor of rows, got {getattr(features, 'shape', features)}")
    heads = list(heads)
    if not heads or not all(isinstance(h, MLPHead) for h in heads):
        raise TypeError("heads must be a non-empty sequence of MLPHead")
    width = features.shape[1]
    for k, h in enumerate(heads):
        if h.w1.dim() != 2 or h.w1.shape[1] != width or h.w2.dim() != 2 or h.w2.shape[1] != h.w1.shape[0]:
            raise ValueError(f"heads[{k}]: w1 must be [H, D = {width}] and w2 [C, H], got {tuple(h.w1.shape)} and "
                             f"{tuple(h.w2.shape)}")
        if any(t is not None and t.device != features.device for t in h[:4]):
            raise ValueError(f"heads[{k}] is not on the features' device {features.device}")
    # The targets, masks, losses and reductions are checked as dgr_penalty checks them, against the heads' widths.
    _, _, targets, losses, masks, ignore_index, reductions = dp._check_inputs(
        features.new_empty(features.shape[0], 1), [features.new_empty(h.w2.shape[0], 1) for h in heads], None,
        targets, losses, masks, ignore_index, reductions)
    acc = dp.accumulation_dtype(features.dtype)
    st = _stack(heads, acc)
    codes = [dp.LOSS_CODES[name] for name in losses]
    n = features.shape[0]
    z3 = features.unsqueeze(-1)
    views = [t.reshape(n, 1).long() if code == dp.LOSS_CODES["ce"] else t.reshape(n, t.shape[1], 1).to(acc)
             for t, code in zip(targets, codes)]
    row_masks = [None if m is None else m.reshape(n, 1) for m in masks]
    per_row = [c1 - c0 if code != dp.LOSS_CODES["ce"] and r == "mean" else 1
               for c0, c1, code, r in zip(st.col_offsets[:-1], st.col_offsets[1:], codes, reductions)]
    valid = dp.row_validity(views, row_masks, ignore_index, codes, st.col_offsets)
    scales = dp.row_scales(valid, per_row, z3, acc)
    y, omega, y_offsets = dp.pack_rows(z3, views, valid, scales, codes)
    rows = (y, dp.class_rows(views, valid, codes), omega, codes, y_offsets)
    return _MLPPenalty.apply(features.to(acc), st, rows)
