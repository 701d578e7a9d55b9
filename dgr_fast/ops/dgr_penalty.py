"""The DGR penalty for linear (1x1-convolution) dummy heads: checks, packing, backends and autograd.

docs/DESIGN.md (the DGR penalty for linear dummy heads) has the math. Every task's head is stacked into one
``[C, D]`` matrix (``C = sum_k C_k``) and the features are read as ``z3 = [B, D, P]`` (rows are ``(b, p)`` pairs;
``[N, D]`` is ``[N, D, 1]``), without a copy where the spatial dims are mergeable. Per row ``i`` and column ``c`` of
task ``t``:

    s_i = W z_i + b                    r_ic = omega_it * dl/ds_ic          (omega: validity / n_t, folded in)
    G_W = sum_i r_i z_i^T,  G_b = sum_i r_i,   R_t = ||G_W[t]||^2 + ||G_b[t]||^2

Backward, given ``dR_t`` (``Gt = dR_t * G`` row-scaled per task):

    u_i = 2 (Gt_W z_i + Gt_b),   dz_i = 2 Gt_W^T r_i + W^T (omega_i * H_i u_i)

``pack`` puts the problem in the form every backend starts from (``Packed``), with no row-sized copy where dtypes
already match: per task, the targets as ``[B, P]`` class indices (``"ce"``, int64) or ``[B, C_k, P]`` (acc dtype)
views, the mask as a ``[B, P]`` bool view (or ``None``), ``ignore_index`` and ``per_row`` (``C_k`` for an
elementwise ``"mean"``, else 1). A row is valid for a task where its mask holds and, for ``"ce"``, its class index is
not ``ignore_index``; ``n_t`` is the number of valid rows times ``per_row[t]``, ``scales [T] = 1 / n_t`` and
``omega_it = valid_it * scales[t]``. The ``cpp`` kernels read targets and masks in place and find validity, ``n_t``
and bad class indices in their forward pass; they also sum ``R_t`` and scale ``G``'s rows by ``dR_t`` themselves
(``task_penalties``, ``row_scale``: a dozen small torch ops fewer per call). The ``torch``, ``triton`` and ``cuda``
code finds validity with torch ops (``row_validity``, ``Packed.validity``) and reads the problem packed into rows
(``pack_rows``, ``R = B * P`` rows in ``(b, p)`` order):

- ``y [R, Cy]``: per task, ``"ce"`` one column (the class index as a float, 0 where invalid; exact below 2^24
  classes in fp32, so the fused kernels, which stage the index the same way, take no larger "ce" head in fp32, and
  the ``torch`` backend reads ``Packed.labels`` instead), other losses ``C_k`` columns (the targets).
- ``omega [R, T]``: ``valid_it * scales[t]``.
- ``losses`` (codes, ``LOSS_CODES``), ``col_offsets`` ``[T+1]`` into ``C``, ``y_offsets`` ``[T+1]`` into ``Cy``.

The op computes unweighted per-task penalties; task weights (``R`` scales with ``w_k^2``), the norm and the
sum over tasks are applied afterwards in differentiable torch ops, so a learnable weight gets its gradient too.

``torch.compile`` traces the op with no graph break on every backend: the backend is chosen while tracing (see
``dgr_fast.backends``), the fused backends are the ``torch.library`` op pair ``dgr_fast::dgr_penalty_fwd`` /
``_bwd`` (fake implementations, autograd registered), and the class-index check becomes an assertion inside the
graph (``RuntimeError`` rather than ``ValueError``, without the index). ``torch.func`` transforms (``grad``,
``vmap``, ``jvp`` and their compositions) run the ``torch`` backend as plain differentiable ops (autograd, or
forward-mode AD, through the closed form of pass 1, rather than ``_TorchPenalty``'s recomputing backward) and the
``reference`` backend as ``torch.func.grad`` of each task's loss (``reference.linear_penalties``); the fused
backends refuse them, naming these two. A transform inside a compiled function is not detected (dynamo runs its own
transform machinery while tracing): there, name ``backend='torch'`` or ``'reference'``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torch._C import _functions

from dgr_fast.backends import ENV_VAR, resolve_backend
from dgr_fast.distributed import sync_for
from dgr_fast.reference import dgr as ref

LOSS_CODES = {"ce": 0, "bce": 1, "mse": 2, "l1": 3}
NORMS = ("squared", "l2")
IMPLEMENTED = ("cuda", "triton", "cpp", "torch", "reference")
FUNC_BACKENDS = ("torch", "reference")  # the backends torch.func transforms compose with
DTYPES = {
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "cpp": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


class Rows(NamedTuple):
    """The problem packed into rows (see the module docstring)."""

    y: Tensor  # [R, Cy], acc
    omega: Tensor  # [R, T], acc
    y_offsets: list[int]


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...), whose tensors an
    ``autograd.Function`` without ``setup_context``, an in-place write into a fresh tensor (``vmap``), or a read of a
    tensor's value (``vmap``) cannot take. Never true while torch.compile traces (its own tracing is not a transform
    of the user's function)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


class _lazy:
    """``functools.cached_property`` without the lock Python 3.11's takes, which torch.compile cannot trace."""

    def __init__(self, build):
        self.build, self.name = build, build.__name__
        self.__doc__ = build.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.build(obj)  # found there first from now on (no __set__ here)
        return value


@dataclass
class Packed:
    """The problem as every backend starts from it (see the module docstring)."""

    z3: Tensor  # [B, D, P], the features' dtype
    weight: Tensor  # [C, D], accumulation dtype
    bias: Tensor  # [C], 0 in the columns of a task without a bias
    has_bias: list[bool]  # per task: its head has a bias (its gradient counts in R)
    targets: list[Tensor]  # per task: "ce" int64 [B, P], else acc [B, C_k, P]; views of the caller's targets
    masks: list[Tensor | None]  # per task bool [B, P] views, None where no mask was given
    ignore_index: list[int]  # per task (read for "ce" only)
    per_row: list[int]  # per task: C_k for an elementwise "mean", else 1
    losses: list[int]
    col_offsets: list[int]

    @_lazy
    def bias_mask(self) -> Tensor:
        """``[C]``: 1 in the columns of a task with a bias, else 0."""
        return column_mask(self.has_bias, self.col_offsets, self.bias)

    @_lazy
    def validity(self) -> tuple[list[Tensor | None], Tensor]:
        """``(valid, scales)`` by torch ops, as the ``cpp`` kernels find them (bad class indices raise here)."""
        valid = row_validity(self.targets, self.masks, self.ignore_index, self.losses, self.col_offsets)
        return valid, row_scales(valid, self.per_row, self.z3, self.weight.dtype)

    @_lazy
    def rows(self) -> Rows:
        """The row-major layout of ``pack_rows``, built on first use."""
        return pack_rows(self.z3, self.targets, *self.validity, self.losses)

    @_lazy
    def labels(self) -> list[Tensor | None]:
        """``class_rows`` of the problem, built on first use."""
        return class_rows(self.targets, self.validity[0], self.losses)


# ---------------------------------------------------------------------------------------------------------------
# Input checks: everything but the class indices (data, checked by `row_validity` or by the cpp forward pass as it reads
# them) is refused here, before a kernel runs, with the argument named.


def _seq(name: str, value, num_tasks: int, default) -> list:
    if value is None:
        return [default] * num_tasks
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value] * num_tasks
    if isinstance(value, Tensor) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be one value for every task or a sequence of one per task, got "
                        f"{type(value).__name__}")
    value = list(value)
    if len(value) != num_tasks:
        raise ValueError(f"{name} has {len(value)} entries but there are {num_tasks} tasks (len(weights))")
    return value


def _check_inputs(features, weights, biases, targets, losses, masks, ignore_index, reductions):
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating tensor, got {features.dtype}")
    if features.dim() < 2:
        raise ValueError(f"features must be [N, D] or [B, D, *spatial], got a {features.dim()}-D tensor of shape {tuple(features.shape)}")
    if isinstance(weights, Tensor):
        raise TypeError("weights must be a sequence of [C_k, D] tensors, one per task, not a single tensor")
    weights = list(weights)
    num_tasks = len(weights)
    if num_tasks == 0:
        raise ValueError("weights is empty: at least one task is needed")
    biases = _seq("biases", biases, num_tasks, None)
    targets = _seq("targets", targets, num_tasks, None)
    losses = _seq("losses", losses, num_tasks, None)
    masks = _seq("masks", masks, num_tasks, None)
    ignore_index = _seq("ignore_index", ignore_index, num_tasks, -100)
    for k, index in enumerate(ignore_index):
        # an int only (a float, None or a tensor reached the kernels' int64 schema raw, or compared inexactly)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"ignore_index[{k}] must be an int, got {index!r}")
    reductions = _seq("reductions", reductions, num_tasks, "mean")
    device, width = features.device, features.shape[1]
    row_shape = features.shape[:1] + features.shape[2:]
    for k in range(num_tasks):
        w, b, y, loss, m = weights[k], biases[k], targets[k], losses[k], masks[k]
        if loss not in LOSS_CODES:
            raise ValueError(f"losses[{k}] must be one of {tuple(LOSS_CODES)}, got {loss!r}")
        if reductions[k] not in ref.REDUCTIONS:
            raise ValueError(f"reductions[{k}] must be one of {ref.REDUCTIONS}, got {reductions[k]!r}")
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise TypeError(f"weights[{k}] must be a floating [C_k, D] tensor, got {getattr(w, 'shape', type(w).__name__)}")
        if w.shape[1] != width or w.shape[0] < 1:
            raise ValueError(f"weights[{k}] must be [C_k, D] with D = features.shape[1] = {width} and C_k >= 1, got {tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"weights[{k}] is on {w.device} but features are on {device}")
        classes = w.shape[0]
        if b is not None:
            if not isinstance(b, Tensor) or tuple(b.shape) != (classes,) or not b.is_floating_point():
                raise ValueError(f"biases[{k}] must be None or a floating [C_k] = [{classes}] tensor, got {getattr(b, 'shape', type(b).__name__)}")
            if b.device != device:
                raise ValueError(f"biases[{k}] is on {b.device} but features are on {device}")
        if m is not None:
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != row_shape:
                raise ValueError(f"masks[{k}] must be None or a bool {list(row_shape)} tensor, got {getattr(m, 'dtype', type(m).__name__)} {list(getattr(m, 'shape', []))}")
            if m.device != device:
                raise ValueError(f"masks[{k}] is on {m.device} but features are on {device}")
        if not isinstance(y, Tensor):
            raise TypeError(f"targets[{k}] must be a tensor, got {type(y).__name__}")
        if y.device != device:
            raise ValueError(f"targets[{k}] is on {y.device} but features are on {device}")
        if loss == "ce":
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"targets[{k}] (loss 'ce') must hold integer class indices, got {y.dtype}")
            if y.shape != row_shape:
                raise ValueError(f"targets[{k}] (loss 'ce') must be {list(row_shape)} class indices, got {list(y.shape)}")
        else:
            expected = features.shape[:1] + (classes,) + features.shape[2:]
            if not y.is_floating_point():
                raise TypeError(f"targets[{k}] (loss {loss!r}) must be a floating tensor, got {y.dtype}")
            if y.shape != expected:
                raise ValueError(f"targets[{k}] (loss {loss!r}) must be {list(expected)}, got {list(y.shape)}")
    return weights, biases, targets, losses, masks, ignore_index, reductions


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def features_3d(features: Tensor) -> Tensor:
    """``[N, D] -> [N, D, 1]``, ``[B, D, *spatial] -> [B, D, P]``: a view unless the spatial dims cannot merge."""
    return features.unsqueeze(-1) if features.dim() == 2 else features.flatten(2)


def pack(features, weights, biases, targets, losses, masks, ignore_index, reductions) -> Packed:
    """Stack the heads; view targets and masks as rows of ``z3``. Reads no row data."""
    acc, device = accumulation_dtype(features.dtype), features.device
    z3 = features_3d(features)
    n, p = z3.shape[0], z3.shape[2]
    widths = [w.shape[0] for w in weights]
    views = [target.reshape(n, p).long() if loss == "ce" else target.reshape(n, c, p).to(acc)
             for c, target, loss in zip(widths, targets, losses)]
    row_masks = [None if m is None else m.reshape(n, p) for m in masks]
    # "mean" averages over elements: n_t counts each valid row C_k times
    per_row = [c if loss != "ce" and reduction == "mean" else 1 for c, loss, reduction in zip(widths, losses, reductions)]
    col_offsets = [0, *itertools.accumulate(widths)]
    weight = torch.cat([w.detach() for w in weights]).to(acc)
    has_bias = [b is not None for b in biases]
    if all(has_bias):
        bias = torch.cat([b.detach() for b in biases]).to(acc)
    elif any(has_bias):
        bias = torch.cat([torch.zeros(c, dtype=acc, device=device) if b is None else b.detach().to(acc)
                          for c, b in zip(widths, biases)])
    else:
        bias = torch.zeros(col_offsets[-1], dtype=acc, device=device)
    codes = [LOSS_CODES[loss] for loss in losses]
    return Packed(z3, weight.contiguous(), bias, has_bias, views, row_masks, list(ignore_index), per_row, codes, col_offsets)


def column_mask(per_task: Sequence[bool], col_offsets: Sequence[int], like: Tensor) -> Tensor:
    """``[C]`` in ``like``'s dtype and device: 1 in the columns of the tasks where ``per_task`` holds, else 0."""
    mask = torch.zeros(col_offsets[-1], dtype=like.dtype, device=like.device)
    for t, flag in enumerate(per_task):
        if flag:
            mask[col_offsets[t] : col_offsets[t + 1]] = 1
    return mask


def row_validity(targets: Sequence[Tensor], masks: Sequence[Tensor | None], ignore_index: Sequence[int],
                 losses: Sequence[int], col_offsets: Sequence[int], check: bool = True) -> list[Tensor | None]:
    """Per task the rows that count (bool, the targets' row shape; ``None`` where all do): the mask, and for ``"ce"``
    the class indices other than ``ignore_index``. With ``check``, a counted class index outside ``[0, C_k)`` raises
    ``ValueError`` (reading the indices: a device sync on a GPU); under torch.compile, ``RuntimeError`` when the
    graph runs. Inside a ``torch.func`` transform it is not checked here (``vmap`` can neither read the indices nor
    batch the assertion): the one-hot scatter (``torch``) or ``cross_entropy`` (``reference``) refuses the index."""
    valid = []
    for k, (code, y, m) in enumerate(zip(losses, targets, masks)):
        if code != LOSS_CODES["ce"]:
            valid.append(m)
            continue
        v = y != ignore_index[k]
        if m is not None:
            v = v & m
        if check and not functorch_active():
            classes = col_offsets[k + 1] - col_offsets[k]
            bad = v & ((y < 0) | (y >= classes))
            where = f"outside [0, {classes}) (C_k = weights[{k}].shape[0]; ignore_index = {ignore_index[k]})"
            if torch.compiler.is_compiling():
                # Reading the indices here would end the graph: the compiled graph asserts it itself.
                torch._assert_async(~bad.any(), f"targets[{k}] holds a class index {where}")
            elif bool(bad.any()):
                raise ValueError(f"targets[{k}] holds class index {int(y[bad][0])} {where}")
        valid.append(v)
    return valid


def row_counts(valid: Sequence[Tensor | None], per_row: Sequence[int], z3: Tensor, acc: torch.dtype) -> Tensor:
    """``n_t [T]`` in ``acc``: the valid rows of ``z3 [B, D, P]`` times ``per_row[t]``."""
    rows = z3.shape[0] * z3.shape[2]
    counts = [(torch.tensor(rows, device=z3.device) if v is None else v.sum()) * k for v, k in zip(valid, per_row)]
    return torch.stack(counts).to(acc)


def row_scales(valid: Sequence[Tensor | None], per_row: Sequence[int], z3: Tensor, acc: torch.dtype) -> Tensor:
    """``scales [T] = 1 / max(n_t, 1)`` in ``acc`` (``row_counts``)."""
    return 1 / row_counts(valid, per_row, z3, acc).clamp_min(1)


def class_rows(targets: Sequence[Tensor], valid: Sequence[Tensor | None], losses: Sequence[int]) -> list[Tensor | None]:
    """Per task: ``"ce"`` class indices as int64 rows ``[R]`` (0 where invalid), else None. The ``torch`` backend
    reads these rather than ``Rows.y``, whose float copy of an index is exact only up to 2^24 (fp32)."""
    return [torch.where(v, t, 0).reshape(-1) if code == LOSS_CODES["ce"] else None
            for code, t, v in zip(losses, targets, valid)]


def pack_rows(z3: Tensor, targets: Sequence[Tensor], valid: Sequence[Tensor | None], scales: Tensor,
              losses: Sequence[int]) -> Rows:
    """``Rows(y [R, Cy], omega [R, T], y_offsets)`` from ``Packed``'s per-task targets, validity and scales."""
    n, p = z3.shape[0], z3.shape[2]
    y_offsets = [0]
    for code, target in zip(losses, targets):
        y_offsets.append(y_offsets[-1] + (1 if code == LOSS_CODES["ce"] else target.shape[1]))
    if torch.compiler.is_compiling() or functorch_active():
        # vmap cannot write batched targets into a fresh, unbatched tensor, nor torch.compile trace a strided out=:
        # concatenate the per-task pieces instead (inductor fuses them into one write anyway).
        y = torch.cat([torch.where(v, target, 0)[..., None].to(scales.dtype) if code == LOSS_CODES["ce"]
                       else target.transpose(1, 2).to(scales.dtype)
                       for code, target, v in zip(losses, targets, valid)], 2)
        omega = torch.stack([scales[k].expand(n, p) if v is None else v * scales[k] for k, v in enumerate(valid)], 2)
        return Rows(y.reshape(n * p, y_offsets[-1]), omega.reshape(n * p, len(losses)), y_offsets)
    # Rows in (b, p) order: y [B, P, Cy] and omega [B, P, T] are [R, Cy] and [R, T]; each task writes its columns
    # in one strided copy (converting the dtype on the way), with no cat of per-task pieces.
    y = torch.empty(n, p, y_offsets[-1], dtype=scales.dtype, device=z3.device)
    omega = torch.empty(n, p, len(losses), dtype=scales.dtype, device=z3.device)
    for k, (code, target, v) in enumerate(zip(losses, targets, valid)):
        if code == LOSS_CODES["ce"]:
            y[:, :, y_offsets[k]].copy_(torch.where(v, target, 0))  # v is never None for ce
        else:
            y[:, :, y_offsets[k] : y_offsets[k + 1]].copy_(target.transpose(1, 2))
        if v is None:
            omega[:, :, k].copy_(scales[k])
        else:
            torch.mul(v, scales[k], out=omega[:, :, k])
    return Rows(y.view(n * p, y_offsets[-1]), omega.view(n * p, len(losses)), y_offsets)


# ---------------------------------------------------------------------------------------------------------------
# The `torch` backend: the closed form in plain torch ops. It is the executable specification the fused kernels
# match, and every op in it is differentiable, so its backward can itself be differentiated (gradgradcheck).


def _task_columns(losses: Sequence[int], col_offsets: Sequence[int], y_offsets: Sequence[int]):
    for t, code in enumerate(losses):
        yield t, code, col_offsets[t], col_offsets[t + 1], y_offsets[t]


def _residual_rows(s: Tensor, y: Tensor, labels: Sequence[Tensor | None], omega: Tensor, losses, col_offsets, y_offsets,
                   u: Tensor | None = None) -> Tensor:
    """``r = omega * dl/ds`` (``u is None``) or ``omega * H u`` for the rows ``s [R, C]``; ``y``/``omega`` packed,
    ``labels`` as ``Packed.labels`` (the class indices of ``"ce"`` tasks; their ``y`` column is not read)."""
    out = []
    for t, code, c0, c1, y0 in _task_columns(losses, col_offsets, y_offsets):
        seg = s[:, c0:c1]
        if code == LOSS_CODES["ce"]:
            p = torch.softmax(seg, dim=1)
            if u is None:
                onehot = torch.zeros_like(seg).scatter(1, labels[t][:, None], 1.0)  # out of place: vmap batches it
                val = p - onehot
            else:
                us = u[:, c0:c1]
                val = p * (us - (p * us).sum(1, keepdim=True))
        elif code == LOSS_CODES["bce"]:
            q = torch.sigmoid(seg)
            val = q - y[:, y0 : y0 + c1 - c0] if u is None else q * (1 - q) * u[:, c0:c1]
        elif code == LOSS_CODES["mse"]:
            val = 2 * (seg - y[:, y0 : y0 + c1 - c0]) if u is None else 2 * u[:, c0:c1]
        else:  # l1: sign(0) = 0 as autograd; its Hessian is 0
            val = torch.sign(seg - y[:, y0 : y0 + c1 - c0]) if u is None else torch.zeros_like(seg)
        out.append(omega[:, t : t + 1] * val)
    return torch.cat(out, 1)


# z3 is read in place through these three products. Row features ([N, D, 1]) take plain 2-D GEMMs: a batched
# matmul over N batches of one row would broadcast the small operand to N copies.


def _head_rows(z3: Tensor, m: Tensor) -> Tensor:
    """``[R, K]`` rows ``m z_i`` for ``m [K, D]``."""
    if z3.shape[2] == 1:
        return z3[:, :, 0] @ m.transpose(0, 1)
    return torch.matmul(z3.transpose(1, 2), m.transpose(0, 1)).reshape(-1, m.shape[0])


def _rows_times_z(x: Tensor, z3: Tensor) -> Tensor:
    """``sum_i x_i z_i^T``: ``[K, D]`` for rows ``x [R, K]``."""
    if z3.shape[2] == 1:
        return x.transpose(0, 1) @ z3[:, :, 0]
    return torch.matmul(x.view(z3.shape[0], z3.shape[2], x.shape[1]).transpose(1, 2), z3.transpose(1, 2)).sum(0)


def _rows_to_features(x: Tensor, m: Tensor, z3: Tensor) -> Tensor:
    """``[B, D, P]`` holding ``m^T x_i`` per row, for rows ``x [R, K]`` and ``m [K, D]``."""
    if z3.shape[2] == 1:
        return (x @ m).unsqueeze(-1)
    return torch.matmul(m.transpose(0, 1), x.view(z3.shape[0], z3.shape[2], x.shape[1]).transpose(1, 2))


def _torch_gradients(z3, weight, bias, bias_mask, y, labels, omega, losses, col_offsets, y_offsets) -> tuple[Tensor, Tensor]:
    """Pass 1: ``(G_W [C, D], G_b [C])``."""
    z = z3.to(weight.dtype)
    r = _residual_rows(_head_rows(z, weight) + bias, y, labels, omega, losses, col_offsets, y_offsets)
    return _rows_times_z(r, z), r.sum(0) * bias_mask


def _torch_features_grad(z3, weight, bias, y, labels, omega, gt_w, gt_b, losses, col_offsets, y_offsets) -> Tensor:
    """Pass 2: ``dz3 [B, D, P]`` from the row-scaled gradients ``Gt_W, Gt_b``."""
    z = z3.to(weight.dtype)
    c = weight.shape[0]
    s_u = _head_rows(z, torch.cat([weight, gt_w]))
    s, u = s_u[:, :c] + bias, 2 * (s_u[:, c:] + gt_b)
    r = _residual_rows(s, y, labels, omega, losses, col_offsets, y_offsets)
    hu = _residual_rows(s, y, labels, omega, losses, col_offsets, y_offsets, u=u)
    return _rows_to_features(torch.cat([r, hu], 1), torch.cat([2 * gt_w, weight]), z).to(z3.dtype)


def task_penalties(g_w: Tensor, g_b: Tensor, col_offsets: Sequence[int]) -> Tensor:
    """``R_t = ||G_W[t]||^2 + ||G_b[t]||^2`` per task segment: ``[T]``."""
    per_col = (g_w * g_w).sum(1) + g_b * g_b
    return torch.stack([per_col[c0:c1].sum() for c0, c1 in zip(col_offsets[:-1], col_offsets[1:])])


def row_scale(grad: Tensor, col_offsets: Sequence[int]) -> Tensor:
    """Expand a per-task ``[T]`` vector to the ``[C]`` columns of the stacked heads."""
    return torch.cat([grad[t : t + 1].expand(c1 - c0) for t, (c0, c1) in enumerate(zip(col_offsets[:-1], col_offsets[1:]))])


class _TorchPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z3, weight, bias, bias_mask, y, labels, omega, losses, col_offsets, y_offsets):
        g_w, g_b = _torch_gradients(z3, weight, bias, bias_mask, y, labels, omega, losses, col_offsets, y_offsets)
        present = [t for t in labels if t is not None]
        ctx.save_for_backward(z3, weight, bias, bias_mask, y, omega, g_w, g_b, *present)
        ctx.meta = (losses, col_offsets, y_offsets, [t is not None for t in labels])
        return task_penalties(g_w, g_b, col_offsets)

    @staticmethod
    def backward(ctx, grad):
        z3, weight, bias, bias_mask, y, omega, g_w, g_b, *present = ctx.saved_tensors
        losses, col_offsets, y_offsets, has_labels = ctx.meta
        it = iter(present)
        labels = [next(it) if has else None for has in has_labels]
        if torch.is_grad_enabled():
            # create_graph: G depends on z, so recompute it in the graph for the second derivative to see that.
            g_w, g_b = _torch_gradients(z3, weight, bias, bias_mask, y, labels, omega, losses, col_offsets, y_offsets)
        scale = row_scale(grad, col_offsets)
        dz3 = _torch_features_grad(z3, weight, bias, y, labels, omega, scale[:, None] * g_w, scale * g_b, losses,
                                   col_offsets, y_offsets)
        return dz3, *([None] * 9)


# ---------------------------------------------------------------------------------------------------------------
# Fused backends: a torch.library op pair (so torch.compile sees an opaque op with a fake implementation), whose
# implementations call the backend's two passes. Their backward is once-differentiable.


def _kernels(backend: str):
    """``(forward, backward)`` of a fused backend, on ``Packed``'s per-task arguments as the ``cpp`` ops take them:
    ``forward(z3, weight, bias, has_bias, targets, masks, ignore_index, per_row, losses, col_offsets, stash)
    -> (R [T], G_W, G_b, scales, stash)`` (``G_b`` zero for a task without a bias) and
    ``backward(z3, weight, bias, targets, masks, ignore_index, scales, grad [T], G_W, G_b, losses, col_offsets, stash)
    -> dz3`` (``Gt = grad_t G`` per task, as ``row_scale``).

    ``stash``: asked for (True), the ``cpp`` forward may return the buffer its backward will write ``dz3`` into,
    holding the logits of the forward meanwhile, so that the backward does not recompute them (28% of its flops at the
    scene shape: 17 of the 30 rows it projects); it returns None where it cannot (fp16/bf16 features, or more logit columns than channels) and the other
    backends always do. The backward given that buffer writes ``dz3`` into it and returns it; given None it
    recomputes the logits and allocates ``dz3``."""
    if backend == "cpp":
        import dgr_fast._C  # noqa: F401  (registers torch.ops.dgr_fast_cpu)

        ops = torch.ops.dgr_fast_cpu

        def cpp_backward(z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses, col_offsets, stash):
            args = (z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses, col_offsets)
            if stash is None:
                return ops.dgr_penalty_bwd(*args)
            ops.dgr_penalty_bwd_stashed(stash, *args)
            return stash

        return ops.dgr_penalty_fwd, cpp_backward
    if backend == "cuda":
        import dgr_fast._C_cuda  # noqa: F401  (registers torch.ops.dgr_fast_cuda)

        fwd, bwd = torch.ops.dgr_fast_cuda.dgr_penalty_fwd, torch.ops.dgr_fast_cuda.dgr_penalty_bwd
    elif backend == "triton":
        from dgr_fast.kernels import dgr_penalty as triton_kernels

        fwd, bwd = triton_kernels.forward, triton_kernels.backward
    elif backend == "torch":
        # The closed form as a pass pair: what the global (distributed) penalty runs on each rank.
        def fwd(z3, weight, bias, y, omega, losses, col_offsets, y_offsets, labels):
            return _torch_gradients(z3, weight, bias, torch.ones_like(bias), y, labels, omega, losses, col_offsets,
                                    y_offsets)

        def bwd(z3, weight, bias, y, omega, gt_w, gt_b, losses, col_offsets, y_offsets, labels):
            return _torch_features_grad(z3, weight, bias, y, labels, omega, gt_w, gt_b, losses, col_offsets, y_offsets)
    else:
        raise ValueError(f"no fused kernels for backend {backend!r}")

    # These kernels read the targets packed into rows, with validity and scales found by torch ops: packed in each
    # pass, so that only one pass's copy is alive (the backward's targets were checked by the forward). The per-task
    # sums and scalings the cpp ops do inside are torch ops here. The torch closed form also reads the class indices
    # as integers (class_rows).
    def labels(targets, valid, losses) -> tuple:
        return (class_rows(targets, valid, losses),) if backend == "torch" else ()

    def forward(z3, weight, bias, has_bias, targets, masks, ignore_index, per_row, losses, col_offsets, _stash):
        valid = row_validity(targets, masks, ignore_index, losses, col_offsets)
        scales = row_scales(valid, per_row, z3, weight.dtype)
        y, omega, y_offsets = pack_rows(z3, targets, valid, scales, losses)
        g_w, g_b = fwd(z3, weight, bias, y, omega, losses, col_offsets, y_offsets, *labels(targets, valid, losses))
        if not all(has_bias):
            g_b = g_b * column_mask(has_bias, col_offsets, g_b)
        return task_penalties(g_w, g_b, col_offsets), g_w, g_b, scales, None

    def backward(z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses, col_offsets, _stash):
        valid = row_validity(targets, masks, ignore_index, losses, col_offsets, check=False)
        y, omega, y_offsets = pack_rows(z3, targets, valid, scales, losses)
        scale = row_scale(grad, col_offsets)
        return bwd(z3, weight, bias, y, omega, scale[:, None] * g_w, scale * g_b, losses, col_offsets, y_offsets,
                   *labels(targets, valid, losses))

    return forward, backward


@torch.compiler.assume_constant_result  # imports the extension: a constant of the process for torch.compile
def _missing_kernels(backend: str) -> str | None:
    """Why an available backend has no DGR kernels (None when it has them)."""
    if backend in ("cpp", "cuda"):
        _kernels(backend)  # imports the extension
        namespace = torch.ops.dgr_fast_cpu if backend == "cpp" else torch.ops.dgr_fast_cuda
        if not hasattr(namespace, "dgr_penalty_fwd"):
            return "the built extension has no dgr_penalty kernels (rebuild: pip install --no-build-isolation -e .)"
    return None


def _fused_forward(
    z3: Tensor, weight: Tensor, bias: Tensor, has_bias: list[bool], targets: list[Tensor], masks: list[Tensor | None],
    ignore_index: list[int], per_row: list[int], losses: list[int], col_offsets: list[int], backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 1: ``(R [T], G_W, G_b, scales [T])``, without a stash (an op's output may not be memory its backward
    writes into)."""
    return _kernels(backend)[0](z3, weight, bias, has_bias, targets, masks, ignore_index, per_row, losses, col_offsets,
                                False)[:4]


def _fused_features_grad(
    z3: Tensor, weight: Tensor, bias: Tensor, targets: list[Tensor], masks: list[Tensor | None], ignore_index: list[int],
    scales: Tensor, grad: Tensor, g_w: Tensor, g_b: Tensor, losses: list[int], col_offsets: list[int], backend: str,
) -> Tensor:
    """Pass 2: ``dz3`` for the incoming ``grad [T]``, the logits recomputed."""
    return _kernels(backend)[1](z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses, col_offsets,
                                None)


# The op pair torch.compile sees. Eager calls go through _FusedPenalty instead: torch.library's Python dispatch and
# autograd wrapper cost about 1 ms per forward + backward on CPU (measured at N = 64), ten times the kernels there.
_fused_fwd = torch.library.custom_op("dgr_fast::dgr_penalty_fwd", _fused_forward, mutates_args=())
_fused_bwd = torch.library.custom_op("dgr_fast::dgr_penalty_bwd", _fused_features_grad, mutates_args=())


@_fused_fwd.register_fake
def _(z3, weight, bias, has_bias, targets, masks, ignore_index, per_row, losses, col_offsets, backend):
    tasks = weight.new_empty(len(losses))
    return tasks, torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(tasks)


@_fused_bwd.register_fake
def _(z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses, col_offsets, backend):
    return torch.empty_like(z3, memory_format=torch.contiguous_format)


def _save(ctx, graph_input, z3, weight, bias, targets, masks, ignore_index, losses, col_offsets, backend, g_w, g_b,
          scales) -> None:
    """``graph_input``: the op's input that carries the features' graph (the features in eager mode, where ``z3`` is
    detached; ``z3`` itself under torch.compile): a second derivative must see the backward depend on it."""
    ctx.save_for_backward(graph_input, z3, weight, bias, scales, g_w, g_b, *targets, *masks)
    ctx.meta = (losses, col_offsets, ignore_index, backend)


def _features_grad(ctx, grad: Tensor, eager: bool) -> Tensor:
    """``dz3`` for the incoming ``grad [T]``: by ``_fused_bwd`` (torch.compile), or (eager) by the kernels directly,
    on the forward's stash if there is one, and in the features' shape. A stash serves one backward (it becomes dz3):
    a second one, after ``retain_graph=True``, recomputes the logits."""
    graph_input, z3, weight, bias, scales, g_w, g_b, *per_task = ctx.saved_tensors
    losses, col_offsets, ignore_index, backend = ctx.meta
    targets, masks = per_task[: len(losses)], per_task[len(losses) :]
    args = (z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses, col_offsets)
    with torch.no_grad():
        if eager:
            stash, ctx.stash = ctx.stash, None
            # dz3 is contiguous and ours: resize_ gives it the features' shape in place. A view of it would do too,
            # but autograd cannot add another gradient into a view in place: where the features feed other
            # consumers too (the task heads), their gradients were summed out of place, twice (+1 ms a step at
            # 49,152 pixels x 64 channels).
            dz3 = _kernels(backend)[1](*args, stash).resize_(ctx.features_shape)
        else:
            dz3 = _fused_bwd(*args, backend)
    if torch.is_grad_enabled():
        # create_graph=True: the result is usable as a value, but differentiating it again must fail loudly rather
        # than silently miss the kernel's dependence on z. torch's once_differentiable is not enough: its error node
        # hangs off a detached copy, so autograd.grad(..., inputs=z) prunes it and returns the other terms alone.
        # Here the node also takes the features (and the incoming gradient) as inputs, so every route from dz3 to
        # them runs it and raises.
        anchors = [t for t in (graph_input, grad) if t.requires_grad]
        error = _functions.DelayedError(_ONCE_DIFFERENTIABLE.format(backend).encode(), 1 + len(anchors))
        outputs = error(dz3.detach().requires_grad_(), *anchors)
        dz3 = outputs[0] if anchors else outputs
    return dz3


def _fused_setup_context(ctx, inputs, output):
    z3, weight, bias, _has_bias, targets, masks, ignore_index, _per_row, losses, col_offsets, backend = inputs
    _save(ctx, z3, z3, weight, bias, targets, masks, ignore_index, losses, col_offsets, backend, *output[1:])
    # The gradients must mirror how torch.library flattened the inputs: a list of tensors into its tensors, but a
    # list that holds a None (a task without a mask) as one argument.
    ctx.masks_flattened = all(m is not None for m in masks)


def _fused_backward(ctx, grad, _grad_g_w, _grad_g_b, _grad_scales):
    tasks = len(ctx.meta[0])
    masks_grad = [None] * tasks if ctx.masks_flattened else None
    return (_features_grad(ctx, grad, eager=False), None, None, None, [None] * tasks, masks_grad,
            None, None, None, None, None)


class _FusedPenalty(torch.autograd.Function):
    """The eager path of the fused op pair: the same passes and saved tensors, without torch.library's dispatch, and
    with a stash where the features need a gradient (``_kernels``): the cpp backward then skips the logits, and the
    buffer that becomes dz3 is allocated in the forward rather than in the backward (held from one to the other).
    It takes the features themselves (their gradient is returned in their shape, see ``_features_grad``) and ``z3``,
    their ``[B, D, P]`` view, detached."""

    @staticmethod
    def forward(ctx, features, z3, weight, bias, has_bias, targets, masks, ignore_index, per_row, losses, col_offsets,
                backend):
        penalties, *saved, ctx.stash = _kernels(backend)[0](z3, weight, bias, has_bias, targets, masks, ignore_index,
                                                            per_row, losses, col_offsets, ctx.needs_input_grad[0])
        _save(ctx, features, z3, weight, bias, targets, masks, ignore_index, losses, col_offsets, backend, *saved)
        ctx.features_shape = features.shape
        return penalties

    @staticmethod
    def backward(ctx, grad):
        return _features_grad(ctx, grad, eager=True), *([None] * 11)


class _GlobalPenalty(torch.autograd.Function):
    """The penalty of the global batch over the ranks of ``sync`` (distributed training), on any backend's passes.

    ``G`` is a mean over the valid rows of every rank: each rank's pass 1 gives its ``G`` normalised by its own
    ``n_t``; ``n_t G`` (the unnormalised sums) and ``n_t`` go out in one ``[C (D + 1) + T]`` all-reduce, and
    ``G = sum(n_t G) / sum(n_t)`` and ``R`` are the same on every rank. Pass 2 gives each rank the exact gradient of
    the global ``R`` w.r.t. its own rows (``omega`` with the global ``n_t``), times the world size W: the averaging of
    parameter gradients that follows (DDP's, or the library's) then yields the global penalty's exact gradient."""

    @staticmethod
    def forward(ctx, features, z3, weight, bias, has_bias, targets, masks, ignore_index, per_row, losses, col_offsets,
                backend, sync):
        valid = row_validity(targets, masks, ignore_index, losses, col_offsets)
        counts = row_counts(valid, per_row, z3, weight.dtype)
        _, g_w, g_b, _, _ = _kernels(backend)[0](z3, weight, bias, has_bias, targets, masks, ignore_index, per_row,
                                                 losses, col_offsets, False)
        unscale = row_scale(counts.clamp_min(1), col_offsets)
        sums = torch.cat([(g_w * unscale[:, None]).reshape(-1), g_b * unscale, counts])
        sync.all_reduce_sum_([sums])
        c, d = g_w.shape
        counts = sums[c * (d + 1) :]
        rescale = row_scale(1 / counts.clamp_min(1), col_offsets)
        g_w = sums[: c * d].view(c, d) * rescale[:, None]
        g_b = sums[c * d : c * (d + 1)] * rescale
        _save(ctx, features, z3, weight, bias, targets, masks, ignore_index, losses, col_offsets, backend, g_w, g_b,
              1 / counts.clamp_min(1))
        ctx.features_shape, ctx.stash, ctx.world_size = features.shape, None, sync.world_size
        return task_penalties(g_w, g_b, col_offsets)

    @staticmethod
    def backward(ctx, grad):
        return _features_grad(ctx, grad * ctx.world_size, eager=True), *([None] * 12)


_ONCE_DIFFERENTIABLE = (
    "dgr_penalty backend {!r}: the fused backward is once-differentiable; for a second derivative "
    "use backend='torch' or backend='reference'"
)
_fused_fwd.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points.


# The cuda kernels' limits (dgr_penalty.cu): at most 32 tasks and 256 stacked columns, and a tile of 8 rows of pass 2
# must fit one block's shared memory: shared_bytes(2, D, C, 8, false) = 48 (D + 2 ceil4(C)) + 128 bytes.
CUDA_MAX_TASKS, CUDA_MAX_COLUMNS = 32, 256


def _cuda_limit(device: torch.device, tasks: int, columns: int, width: int) -> str | None:
    """Why the cuda kernels cannot take this problem on ``device`` (None when they can)."""
    if tasks > CUDA_MAX_TASKS:
        return f"{tasks} tasks; its kernels take at most {CUDA_MAX_TASKS}"
    if columns > CUDA_MAX_COLUMNS:
        return f"{columns} stacked head columns; its kernels take at most {CUDA_MAX_COLUMNS}"
    # A torch too old to report the opt-in limit: the launcher still refuses a width that does not fit, by name.
    budget = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    need = 48 * (width + 2 * ((columns + 3) // 4 * 4)) + 128
    if budget is not None and need > budget:
        return f"feature width D = {width} with C = {columns}: a tile needs {need} bytes of shared memory, the device has {budget} per block"
    return None


# The fused kernels compare a "ce" column index with the class index staged in the accumulation dtype (Rows.y for
# triton and cuda, the tile's copy for cpp): exact for every index up to 2^24 in fp32.
FUSED_MAX_FP32_CLASSES = 2**24


def _resolve(device: torch.device, dtype: torch.dtype, backend: str | None,
             shape: tuple[int, int, int, int] | None) -> str:
    """The backend for features of ``device``/``dtype``; with ``shape = (tasks, columns, width, ce_classes)``
    (``ce_classes``: the widest "ce" head, 0 without one), an automatic choice also passes over a backend whose
    kernels cannot take that problem (and a named one says so)."""
    def probe(name: str) -> str | None:
        missing = _missing_kernels(name)
        if missing or shape is None or name in ("torch", "reference"):
            return missing
        if name == "cuda":
            return _cuda_limit(device, *shape[:3])
        if accumulation_dtype(dtype) == torch.float32 and shape[3] > FUSED_MAX_FP32_CLASSES:
            return (f"a 'ce' head of {shape[3]} classes: its kernels carry class indices in fp32, exact up to "
                    f"{FUSED_MAX_FP32_CLASSES} classes")
        return None

    return resolve_backend("dgr_penalty", backend, device, dtype, IMPLEMENTED, DTYPES, probe)


def dgr_penalty_backend(device: torch.device | str, dtype: torch.dtype = torch.float32, backend: str | None = None) -> str:
    """The backend ``dgr_penalty(..., backend=backend)`` runs on for features of ``device``/``dtype``.

    Resolved as the op resolves it (``$DGR_FAST_BACKEND`` when ``backend`` is None), before any shape is known: on a
    GPU, a problem beyond the cuda kernels' limits (see ``_cuda_limit``) falls back further when it runs.
    """
    return _resolve(torch.device(device), dtype, backend, None)


def dgr_penalty_per_task(
    features: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None,
    targets: Sequence[Tensor],
    losses: Sequence[str] | str,
    *,
    masks: Sequence[Tensor | None] | None = None,
    ignore_index: int | Sequence[int] = -100,
    reductions: Sequence[str] | str | None = None,
    backend: str | None = None,
    process_group: object = None,
) -> Tensor:
    """Unweighted per-task penalties ``[T]`` (fp32, or fp64 for fp64 features); arguments as ``dgr_penalty``."""
    weights, biases, targets, losses, masks, ignore_index, reductions = _check_inputs(
        features, weights, biases, targets, losses, masks, ignore_index, reductions
    )
    sync = sync_for(process_group)
    ce_classes = max([w.shape[0] for w, loss in zip(weights, losses) if loss == "ce"], default=0)
    # The width from the heads, not the features: a constant while torch.compile traces even where the features'
    # dims are dynamic (backend choice runs as a constant function of these numbers).
    shape = (len(weights), sum(w.shape[0] for w in weights), weights[0].shape[1], ce_classes)
    name = _resolve(features.device, features.dtype, backend, shape)
    transformed = functorch_active()
    if transformed and name not in FUNC_BACKENDS:
        if backend is None and not os.environ.get(ENV_VAR):
            name = "torch"  # an automatic choice: the fastest backend that composes with the transform
        else:
            source = "backend=" if backend is not None else f"${ENV_VAR}"
            raise RuntimeError(f"dgr_penalty(backend={name!r}) ({source}) does not support torch.func transforms "
                               f"(grad, vmap, jvp, ...); use backend='torch' (or backend='reference')")
    if sync is not None and name == "reference":
        raise ValueError("process_group: the reference backend computes each rank's own penalty only; give "
                         "process_group='local' for that, or another backend for the global batch's penalty")
    if sync is not None and transformed:
        raise ValueError("process_group: the global batch's penalty does not support torch.func transforms; give "
                         "process_group='local' for each rank's own penalty")
    if name == "reference":
        codes = [LOSS_CODES[loss] for loss in losses]
        row_validity(targets, masks, ignore_index, codes, [0, *itertools.accumulate(w.shape[0] for w in weights)])
        acc = accumulation_dtype(features.dtype)
        return ref.linear_penalties(
            features.to(acc), [w.to(acc) for w in weights], [None if b is None else b.to(acc) for b in biases],
            targets, losses, masks, ignore_index, reductions,
        )
    p = pack(features, weights, biases, targets, losses, masks, ignore_index, reductions)
    args = (p.weight, p.bias, p.has_bias, p.targets, p.masks, p.ignore_index, p.per_row, p.losses, p.col_offsets, name)
    if sync is not None:
        return _GlobalPenalty.apply(features, p.z3.detach(), *args, sync)
    if name == "torch":
        y, omega, y_offsets = p.rows
        if transformed:
            # Plain differentiable ops: the transform differentiates (or batches) pass 1 itself.
            g_w, g_b = _torch_gradients(p.z3, p.weight, p.bias, p.bias_mask, y, p.labels, omega, p.losses,
                                        p.col_offsets, y_offsets)
            return task_penalties(g_w, g_b, p.col_offsets)
        return _TorchPenalty.apply(p.z3, p.weight, p.bias, p.bias_mask, y, p.labels, omega, p.losses, p.col_offsets,
                                   y_offsets)
    if torch.compiler.is_compiling():
        return _fused_fwd(p.z3, *args)[0]
    return _FusedPenalty.apply(features, p.z3.detach(), *args)


def apply_norm(penalty: Tensor, norm: str) -> Tensor:
    """``"squared"``: ``R`` itself; ``"l2"``: ``sqrt(R)`` with gradient 0 at ``R = 0`` (not NaN)."""
    if norm == "squared":
        return penalty
    positive = penalty > 0
    return torch.where(positive, torch.where(positive, penalty, 1).sqrt(), 0)


def dgr_penalty(
    features: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None,
    targets: Sequence[Tensor],
    losses: Sequence[str] | str,
    *,
    task_weights: Sequence[float] | Tensor | None = None,
    masks: Sequence[Tensor | None] | None = None,
    ignore_index: int | Sequence[int] = -100,
    reductions: Sequence[str] | str | None = None,
    norm: str = "squared",
    backend: str | None = None,
    process_group: object = None,
) -> Tensor:
    """DGR penalty of linear (1x1-convolution) dummy heads on shared features, with its exact gradient.

    ``R = sum_k w_k^2 (||dL_k/dW_k||_F^2 + ||dL_k/db_k||^2)``: the squared norm of the gradient of the weighted
    dummy loss w.r.t. all dummy head parameters (Shin, Do, Son, ECCV 2024).

    Args:
        features: ``[N, D]`` rows or ``[B, D, *spatial]`` maps, any strides; fp32/fp16/bf16 (fp64 on the
            ``torch``, ``reference``, ``cpp`` and ``triton`` backends).
        weights: per task ``[C_k, D]``, the dummy heads (never trained; they receive no gradient).
        biases: ``None`` or per task ``[C_k]`` / ``None``.
        targets: per task: ``"ce"``: integer class indices ``[N]`` / ``[B, *spatial]``; otherwise floats
            ``[N, C_k]`` / ``[B, C_k, *spatial]``.
        losses: per task (or one for all) ``"ce"``, ``"bce"``, ``"mse"``, ``"l1"``.
        task_weights: ``w_k`` multiplying each task loss (default 1); may require grad.
        masks: per task ``None`` or bool ``[N]`` / ``[B, *spatial]``: the rows/pixels that count.
        ignore_index: ``"ce"`` targets that do not count (one for all tasks or one per task).
        reductions: per task (or one for all) ``"mean"`` over valid elements (default) or ``"row_mean"``
            (summed over channels, averaged over valid rows/pixels: the official dense-prediction losses).
        norm: ``"squared"`` (``R``, the official code) or ``"l2"`` (``sqrt(R)``, gradient 0 at 0).
        backend: ``None`` (fastest that supports the inputs, or ``$DGR_FAST_BACKEND``) or a name from
            ``dgr_fast.BACKENDS``.
        process_group: under ``torch.distributed``, ``None`` (the default group) or a group: the penalty of the
            *global* batch (``G`` and the valid counts all-reduced, one ``[C (D + 1) + T]`` buffer), its gradient
            times the world size so that averaging the parameter gradients over the ranks (DDP) gives its exact
            gradient; ``"local"``: each rank's own penalty. A collective: every rank must call it.
    Returns:
        0-dim tensor, fp32 (fp64 for fp64 features), differentiable w.r.t. ``features`` (and ``task_weights``).
        A batch with nothing valid gives 0 with a zero gradient.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    per_task = dgr_penalty_per_task(
        features, weights, biases, targets, losses, masks=masks, ignore_index=ignore_index, reductions=reductions,
        backend=backend, process_group=process_group,
    )
    return apply_norm(weighted_sum(per_task, task_weights), norm)


def weighted_sum(per_task: Tensor, task_weights: Sequence[float] | Tensor | None) -> Tensor:
    """``sum_k w_k^2 R_k`` over the last dim of ``per_task [..., T]`` (the penalty scales with the square of the weight)."""
    if task_weights is None:
        return per_task.sum(-1)
    w = torch.as_tensor(task_weights, device=per_task.device).to(per_task.dtype) if not isinstance(task_weights, Tensor) else task_weights.to(per_task.dtype)
    if w.shape != per_task.shape[-1:]:
        raise ValueError(f"task_weights must have one entry per task ({per_task.shape[-1]}), got shape {tuple(w.shape)}")
    return (per_task * w * w).sum(-1)
