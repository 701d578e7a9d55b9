"""Triton kernels of the fused DGR penalty (the ``triton`` backend; the math: docs/DESIGN.md section 4).

They compute what the ``torch`` backend's executable specification in ``dgr_fast/ops/dgr_penalty.py`` computes:

- ``forward`` = ``_torch_gradients`` (pass 1): per block of rows, ``s = z W^T + b``, the residual ``r`` of every
  task (``_residual_rows`` with ``u=None``), and partial ``G_W = r^T z``, ``G_b = sum r`` per program, reduced in a
  fixed order afterwards (``torch.sum`` over the program axis: deterministic, no float atomics). ``G_b`` is raw:
  the caller applies the bias mask.
- ``backward`` = ``_torch_features_grad`` (pass 2): per block of rows, ``s`` and ``u = 2 (Gt_W z + Gt_b)`` from one
  read of z, ``r`` and ``H u`` (``_residual_rows`` with ``u``), then ``dz = 2 Gt_W^T r + W^T H u`` written once.

Rows are ``i = b * P + p`` of ``z3 [B, D, P]`` read through its strides (no copy). Columns (the stacked heads) are
padded to a power of two >= 16 (``tl.dot`` needs every dim >= 16) and masked; each column carries its loss code,
task, target column, index inside its task and, for ``"ce"``, its softmax segment, so the residual of all tasks is
one vectorised where-chain plus a loop over the ``"ce"`` segments for their max and sums.

Accumulation is in the dtype of ``weight`` (fp32, or fp64 for fp64 features); half features are widened to it as
they are loaded, so every ``tl.dot`` multiplies fp32 (or fp64) tiles. Precision of the fp32 dots: ``"ieee"`` in the
interpreter, ``"tf32x3"`` on a GPU (tensor cores at about fp32 accuracy; plain tf32 would miss the 1e-5 target).
fp64 tiles use ``tl.dot`` as well, so there is one code path: the interpreter runs it in numpy, and for sm_90 Triton
lowers it to fp64 tensor-core MMAs (``mma.sync.m8n8k4.f64``; the ahead-of-time compile test builds it).

Pass 1's grid is persistent (at most two programs per SM, four in the interpreter), so the partials stay few; pass 2
has one program per row block and no partials.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

# Rows of a column's metadata in the int32 [5, C] table built by `_column_table`.
_CODE, _TASK, _YCOL, _LOCAL, _SEGMENT = range(5)
# Loss codes as in dgr_fast.ops.dgr_penalty.LOSS_CODES (0 ce, 1 bce, 2 mse, 3 l1); constexpr so kernels can read them.
_CE = tl.constexpr(0)
_BCE = tl.constexpr(1)
_MSE = tl.constexpr(2)


@triton.jit
def _columns(table_ptr, C, BLOCK_C: tl.constexpr):
    """Per-column metadata, the table's rows ``_CODE`` .. ``_SEGMENT`` in order: loss code, task, target column,
    index in the task, ce segment (-1 if none)."""
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    code = tl.load(table_ptr + 0 * C + cols, mask=col_mask, other=0)
    task = tl.load(table_ptr + 1 * C + cols, mask=col_mask, other=0)
    ycol = tl.load(table_ptr + 2 * C + cols, mask=col_mask, other=0)
    local = tl.load(table_ptr + 3 * C + cols, mask=col_mask, other=0)
    segment = tl.load(table_ptr + 4 * C + cols, mask=col_mask, other=-1)
    return cols, col_mask, code, task, ycol, local, segment


@triton.jit
def _rows(blk, R, P, stride_b, stride_p, BLOCK_R: tl.constexpr):
    """Row indices (int64), their mask, and their offsets into z3 (``b * stride_b + p * stride_p``)."""
    rows = (blk * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    return rows, rows < R, (rows // P) * stride_b + (rows % P) * stride_p


@triton.jit
def _z_tile(z_ptr, z_off, row_mask, d, D, stride_d, acc_ty: tl.constexpr):
    """``[BLOCK_R, BLOCK_D]`` tile of z widened to the accumulation dtype (0 outside the rows / D)."""
    ptrs = z_ptr + z_off[:, None] + d[None, :].to(tl.int64) * stride_d
    return tl.load(ptrs, mask=row_mask[:, None] & (d[None, :] < D), other=0).to(acc_ty)


@triton.jit
def _head_tile(m_ptr, cols, col_mask, d, D):
    """``[BLOCK_C, BLOCK_D]`` tile of a contiguous ``[C, D]`` matrix (W or Gt_W)."""
    return tl.load(m_ptr + cols[:, None] * D + d[None, :], mask=col_mask[:, None] & (d[None, :] < D), other=0)


@triton.jit
def _segment_sum(x, segment, N_CE, default):
    """Per column of a ce segment, the row sum of ``x`` over that segment; ``default`` in the other columns."""
    out = tl.zeros_like(x) + default
    for k in range(N_CE):
        in_seg = (segment == k)[None, :]
        total = tl.sum(tl.where(in_seg, x, 0), axis=1)
        out = tl.where(in_seg, total[:, None], out)
    return out


@triton.jit
def _residual(s, rows, row_mask, col_mask, code, task, ycol, local, segment, y_ptr, omega_ptr, Cy, T, N_CE):
    """``r = omega * dl/ds`` for a ``[BLOCK_R, BLOCK_C]`` tile of logits (``_residual_rows`` with ``u=None``).

    Also returns ``p`` (softmax over the ce segment, sigmoid elsewhere: what ``H u`` needs), ``omega`` per element
    and the element mask, so pass 2 reuses them. Padded rows and columns get r = 0.
    """
    valid = row_mask[:, None] & col_mask[None, :]
    omega = tl.load(omega_ptr + rows[:, None] * T + task[None, :], mask=valid, other=0)
    y = tl.load(y_ptr + rows[:, None] * Cy + ycol[None, :], mask=valid, other=0)
    # Softmax per ce segment, shifted by the segment's own max (a shared row max could underflow a whole task).
    shift = s
    for k in range(N_CE):
        in_seg = (segment == k)[None, :]
        seg_max = tl.max(tl.where(in_seg, s, float("-inf")), axis=1)
        shift = tl.where(in_seg, seg_max[:, None], shift)
    e = tl.exp(s - shift)
    softmax = e / _segment_sum(e, segment, N_CE, 1.0)
    small = tl.exp(-tl.abs(s))  # sigmoid without overflow, and accurate where it is tiny
    sigmoid = tl.where(s >= 0, 1 / (1 + small), small / (1 + small))
    is_ce = (code == _CE)[None, :]
    p = tl.where(is_ce, softmax, sigmoid)
    diff = s - y
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))  # sign(0) = 0, as torch.sign
    onehot = tl.where(local[None, :].to(s.dtype) == y, 1.0, 0.0)
    grad = tl.where(is_ce, p - onehot, tl.where((code == _BCE)[None, :], p - y, tl.where((code == _MSE)[None, :], 2 * diff, sign)))
    return tl.where(valid, omega * grad, 0), p, omega, valid


@triton.jit
def _gradients_kernel(
    z_ptr, w_ptr, bias_ptr, y_ptr, omega_ptr, table_ptr, gw_part_ptr, gb_part_ptr,
    R, P, D, C, Cy, T, N_CE, stride_b, stride_d, stride_p,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 1. Program ``pid`` takes row blocks ``pid, pid + grid, ...`` and writes its partial ``G_W`` ``[C, D]``
    at ``gw_part[pid]`` and ``G_b`` at ``gb_part[pid]``; nothing else writes there, so no atomics are needed."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    acc_ty = w_ptr.dtype.element_ty
    cols, col_mask, code, task, ycol, local, segment = _columns(table_ptr, C, BLOCK_C)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0)
    gw_part_ptr += pid.to(tl.int64) * C * D
    g_b = tl.zeros([BLOCK_C], dtype=acc_ty)
    for i in range(0, tl.cdiv(tl.cdiv(R, BLOCK_R) - pid, num_programs)):
        blk = pid + i * num_programs
        rows, row_mask, z_off = _rows(blk, R, P, stride_b, stride_p, BLOCK_R)
        s = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            z = _z_tile(z_ptr, z_off, row_mask, d, D, stride_d, acc_ty)
            s = tl.dot(z, tl.trans(_head_tile(w_ptr, cols, col_mask, d, D)), s, input_precision=PRECISION)
        r, _, _, _ = _residual(s + bias[None, :], rows, row_mask, col_mask, code, task, ycol, local, segment,
                               y_ptr, omega_ptr, Cy, T, N_CE)
        g_b += tl.sum(r, axis=0)
        # G_W needs the full-D logits first, so z is read again per D tile (the block was just read: cache hits).
        # The program's partial is read-modify-written per block; its first block writes it without reading.
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            z = _z_tile(z_ptr, z_off, row_mask, d, D, stride_d, acc_ty)
            ptrs = gw_part_ptr + cols[:, None] * D + d[None, :]
            mask = col_mask[:, None] & (d[None, :] < D)
            previous = tl.load(ptrs, mask=mask & (i > 0), other=0)
            tl.store(ptrs, tl.dot(tl.trans(r), z, previous, input_precision=PRECISION), mask=mask)
    tl.store(gb_part_ptr + pid * C + cols, g_b, mask=col_mask)


@triton.jit
def _features_grad_kernel(
    z_ptr, w_ptr, bias_ptr, y_ptr, omega_ptr, gt_w_ptr, gt_b_ptr, table_ptr, dz_ptr,
    R, P, D, C, Cy, T, N_CE, stride_b, stride_d, stride_p,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Pass 2, one row block per program: ``dz`` rows of the contiguous ``[B, D, P]`` output, all D, every element
    written (rows with omega = 0 get exactly 0)."""
    blk = tl.program_id(0)
    acc_ty = w_ptr.dtype.element_ty
    cols, col_mask, code, task, ycol, local, segment = _columns(table_ptr, C, BLOCK_C)
    rows, row_mask, z_off = _rows(blk, R, P, stride_b, stride_p, BLOCK_R)
    s = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    u = tl.zeros([BLOCK_R, BLOCK_C], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):  # the only read of z: s and u together
        d = d0 + tl.arange(0, BLOCK_D)
        z = _z_tile(z_ptr, z_off, row_mask, d, D, stride_d, acc_ty)
        s = tl.dot(z, tl.trans(_head_tile(w_ptr, cols, col_mask, d, D)), s, input_precision=PRECISION)
        u = tl.dot(z, tl.trans(_head_tile(gt_w_ptr, cols, col_mask, d, D)), u, input_precision=PRECISION)
    s += tl.load(bias_ptr + cols, mask=col_mask, other=0)[None, :]
    u = 2 * (u + tl.load(gt_b_ptr + cols, mask=col_mask, other=0)[None, :])
    r, p, omega, valid = _residual(s, rows, row_mask, col_mask, code, task, ycol, local, segment,
                                   y_ptr, omega_ptr, Cy, T, N_CE)
    # H u per loss: ce p (u - <p, u>_segment), bce q (1 - q) u, mse 2 u, l1 0.
    hu_ce = p * (u - _segment_sum(p * u, segment, N_CE, 0.0))
    hu = tl.where((code == _CE)[None, :], hu_ce,
                  tl.where((code == _BCE)[None, :], p * (1 - p) * u, tl.where((code == _MSE)[None, :], 2 * u, 0.0)))
    hu = tl.where(valid, omega * hu, 0)
    r2 = 2 * r
    out_off = (rows // P) * D * P + rows % P  # contiguous [B, D, P]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dz = tl.dot(r2, _head_tile(gt_w_ptr, cols, col_mask, d, D), input_precision=PRECISION)
        dz = tl.dot(hu, _head_tile(w_ptr, cols, col_mask, d, D), dz, input_precision=PRECISION)
        ptrs = dz_ptr + out_off[:, None] + d[None, :].to(tl.int64) * P
        tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_mask[:, None] & (d[None, :] < D))


# ---------------------------------------------------------------------------------------------------------------
# Launchers.


@dataclass(frozen=True)
class Config:
    """Launch parameters: rows per block, D tile, padded columns, pass 1's grid size, fp32 dot precision, and the
    GPU compile options (ignored by the interpreter)."""

    block_r: int
    block_d: int
    block_c: int
    programs: int
    precision: str
    num_warps: int = 8
    num_stages: int = 2


# The interpreter costs about 0.5 ms per program instance: few programs there, each looping over several blocks.
_INTERPRETER_PROGRAMS = 4


def _config(rows: int, num_cols: int, width: int, dtype: torch.dtype, gpu_programs: int | None) -> Config:
    """One configuration per shape, chosen by rule: autotuning cannot run without a GPU, and none was at hand to
    tune on. Tiles are ``[64, 32]`` for heads of up to 64 columns, fewer rows for wider heads, with D tiles of 32.
    Compiled for sm_90 this is 8 warps at about 255 registers per thread with no or few bytes spilled (ptxas, for
    32 columns); spilling grows past 64 columns. ``gpu_programs``: pass 1's grid cap on a GPU, None in the
    interpreter."""
    block_c = max(16, triton.next_power_of_2(num_cols))
    block_r = max(16, min(64, 4096 // block_c))
    block_d = max(16, min(32, triton.next_power_of_2(width)))
    limit = _INTERPRETER_PROGRAMS if gpu_programs is None else gpu_programs
    # fp32 dots on tensor cores at about fp32 accuracy; fp64 (and the interpreter) multiply exactly.
    precision = "ieee" if gpu_programs is None or dtype == torch.float64 else "tf32x3"
    return Config(block_r, block_d, block_c, max(1, min(triton.cdiv(rows, block_r), limit)), precision)


@functools.lru_cache(maxsize=64)
def _column_table(losses: tuple[int, ...], col_offsets: tuple[int, ...], y_offsets: tuple[int, ...], device: str):
    """int32 ``[5, C]`` per-column metadata (rows ``_CODE`` .. ``_SEGMENT``) and the number of ce segments."""
    rows: list[list[int]] = [[] for _ in range(5)]
    num_ce = 0
    for t, code in enumerate(losses):
        for c in range(col_offsets[t], col_offsets[t + 1]):
            local = c - col_offsets[t]
            rows[_CODE].append(code)
            rows[_TASK].append(t)
            rows[_YCOL].append(y_offsets[t] + (0 if code == _CE.value else local))
            rows[_LOCAL].append(local)
            rows[_SEGMENT].append(num_ce if code == _CE.value else -1)
        num_ce += code == _CE.value
    return torch.tensor(rows, dtype=torch.int32, device=device), num_ce


def _new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer the kernels fill (partials, dz): uninitialised, since every element is written.
    Tests replace this with a NaN-filled allocation to check that."""
    return torch.empty(shape, dtype=dtype, device=device)


def _device_context(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _common(z3, weight, y, omega, losses, col_offsets, y_offsets):
    batch, width, pixels = z3.shape
    rows, num_cols = batch * pixels, weight.shape[0]
    table, num_ce = _column_table(tuple(losses), tuple(col_offsets), tuple(y_offsets), str(z3.device))
    # Pass 1's persistent grid: two programs per SM bound the number of partials to reduce.
    gpu_programs = 2 * torch.cuda.get_device_properties(z3.device).multi_processor_count if z3.is_cuda else None
    cfg = _config(rows, num_cols, width, z3.dtype, gpu_programs)
    scalars = (rows, pixels, width, num_cols, y.shape[1], omega.shape[1], num_ce, *z3.stride())
    meta = dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, PRECISION=cfg.precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return table, cfg, scalars, meta


def forward(z3: Tensor, weight: Tensor, bias: Tensor, y: Tensor, omega: Tensor, losses: Sequence[int],
            col_offsets: Sequence[int], y_offsets: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Pass 1: ``(G_W [C, D], G_b [C])`` in the accumulation dtype (``weight.dtype``); ``G_b`` without bias mask."""
    table, cfg, scalars, meta = _common(z3, weight, y, omega, losses, col_offsets, y_offsets)
    num_cols, width = weight.shape
    if scalars[0] == 0:  # no rows: nothing to launch
        return weight.new_zeros(num_cols, width), weight.new_zeros(num_cols)
    gw_part = _new_output((cfg.programs, num_cols, width), weight.dtype, weight.device)
    gb_part = _new_output((cfg.programs, num_cols), weight.dtype, weight.device)
    with _device_context(z3):
        _gradients_kernel[(cfg.programs,)](z3, weight, bias, y, omega, table, gw_part, gb_part, *scalars, **meta)
    return gw_part.sum(0), gb_part.sum(0)


def backward(z3: Tensor, weight: Tensor, bias: Tensor, y: Tensor, omega: Tensor, gt_w: Tensor, gt_b: Tensor,
             losses: Sequence[int], col_offsets: Sequence[int], y_offsets: Sequence[int]) -> Tensor:
    """Pass 2: ``dz3 [B, D, P]``, contiguous, in z3's dtype."""
    table, cfg, scalars, meta = _common(z3, weight, y, omega, losses, col_offsets, y_offsets)
    dz3 = _new_output(z3.shape, z3.dtype, z3.device)
    if scalars[0] == 0 or z3.shape[1] == 0:
        return dz3
    with _device_context(z3):
        _features_grad_kernel[(triton.cdiv(scalars[0], cfg.block_r),)](
            z3, weight, bias, y, omega, gt_w.contiguous(), gt_b.contiguous(), table, dz3, *scalars, **meta
        )
    return dz3
