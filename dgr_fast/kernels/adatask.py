"""AdaTask fused step in Triton: every tensor of a (device, dtype) bucket in one launch.

Matches ``dgr_fast.reference.adatask.adatask_step_reference``. Multi-tensor by a pointer table: each program owns
``BLOCK`` elements of one tensor (a block table maps program id to (tensor, start)), loads θ once, streams the K
gradients and 2K moments through once, and writes θ and the moments once. Runs on CUDA tensors, and on CPU tensors
under ``TRITON_INTERPRET=1`` (for tests; bf16 arithmetic is unreliable there).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _adatask_kernel(
    p_tab,  # [T] int64 addresses of θ (PDT)
    g_tab,  # [T] int64 addresses of the [K, n] gradients (PDT)
    gs_tab,  # [T] int64 stride between tasks of each gradient
    m_tab,  # [T] int64 addresses of the [K, n] fp32 first moments (adam only)
    v_tab,  # [T] int64 addresses of the [K, n] fp32 second moments
    n_tab,  # [T] int64 element counts
    blk_t,  # [NB] int32 tensor of each program
    blk_s,  # [NB] int64 first element of each program
    coef,  # [T, 2] fp64: lr / (1 - b1^t), sqrt(1 - b2^t)
    au_part,  # [NB, K] fp32 out: sum of squared update per program and task
    scale_ptr,  # [1] fp32 AMP scale (HAS_SCALE)
    found_ptr,  # [1] fp32 non-zero: skip (HAS_FOUND)
    w1,  # 1 - beta1, rounded from fp64 on the host as the other backends do
    beta2,
    c2,  # 1 - beta2 (1 for adagrad)
    eps,
    decay,  # 1 - lr * weight_decay
    K,
    VARIANT: tl.constexpr,  # 0 adam, 1 rmsprop, 2 adagrad
    PDT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND: tl.constexpr,
    TRACK_AU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.load(blk_t + b)
    start = tl.load(blk_s + b)
    n = tl.load(n_tab + t)
    offs = start + tl.arange(0, BLOCK)
    limit = n
    if HAS_FOUND:
        # A skipped step writes nothing (the masked loads give zeros, so the AU partials are zero too): no host sync.
        limit = tl.where(tl.load(found_ptr) == 0, n, 0)
    mask = offs < limit
    inv = 1.0
    if HAS_SCALE:
        inv = 1.0 / tl.load(scale_ptr)
    nss = -tl.load(coef + 2 * t).to(tl.float32)
    bc2 = tl.load(coef + 2 * t + 1).to(tl.float32)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(PDT))
    g_ptr = tl.load(g_tab + t).to(tl.pointer_type(PDT))
    g_stride = tl.load(gs_tab + t)
    v_ptr = tl.load(v_tab + t).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(K):
        g = tl.load(g_ptr + k * g_stride + offs, mask=mask, other=0.0).to(tl.float32) * inv
        v = tl.load(v_ptr + k * n + offs, mask=mask, other=0.0)
        # Correctly rounded sqrt and division (tl.sqrt and / are approximate on NVIDIA GPUs), fma where torch's
        # Adam has one: the same arithmetic as csrc/cpu/adatask.cpp.
        if VARIANT == 0:
            m = tl.load(m_ptr + k * n + offs, mask=mask, other=0.0)
            m = tl.fma(w1, g - m, m)
            v = tl.fma(c2 * g, g, v * beta2)
            tl.store(m_ptr + k * n + offs, m, mask=mask)
            numer = m
            denom = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
        else:
            if VARIANT == 1:
                v = tl.fma(c2 * g, g, v * beta2)
            else:
                v = tl.fma(c2 * g, g, v)
            numer = g
            denom = tl.sqrt_rn(v) + eps
        tl.store(v_ptr + k * n + offs, v, mask=mask)
        # Masked lanes must add nothing, even where a skipped first step has nss = -inf and bc2 = 0.
        u = tl.where(mask, tl.div_rn(nss * numer, denom), 0.0)
        acc += u
        if TRACK_AU:
            tl.store(au_part + b * K + k, tl.sum(u * u, axis=0))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + offs, (p * decay + acc).to(PDT), mask=mask)


def _address_table(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True)


def adatask_step_triton(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    coef: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    variant: int,
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    au_sums: Optional[torch.Tensor],
) -> None:
    """One launch over every tensor of the bucket, in place. The arguments (shapes as ``StepArgs`` of
    ``dgr_fast.optim.adatask`` documents them) and their order are the extension op ``adatask_step_``'s. θ is
    fp32/fp16/bf16 and contiguous; the moments are fp32."""
    device = params[0].device
    dtype = params[0].dtype
    if dtype not in _TL_DTYPE:
        raise TypeError(f"adatask_step_triton: params must be float32, float16 or bfloat16, got {dtype}")
    T = len(params)
    K = grads[0].shape[0]
    numels = [p.numel() for p in params]
    blocks_per = [max(1, triton.cdiv(n, BLOCK)) for n in numels]
    blk_t = torch.repeat_interleave(torch.arange(T, dtype=torch.int32), torch.tensor(blocks_per))
    blk_s = torch.cat([torch.arange(nb, dtype=torch.int64) * BLOCK for nb in blocks_per])
    NB = blk_t.numel()
    au_part = torch.empty(NB, K, dtype=torch.float32, device=device) if au_sums is not None else coef
    dummy = coef  # never read when the matching flag is off
    _adatask_kernel[(NB,)](
        _address_table(params, device),
        _address_table(grads, device),
        torch.tensor([g.stride(0) for g in grads], dtype=torch.int64).to(device, non_blocking=True),
        _address_table(exp_avgs if exp_avgs else exp_avg_sqs, device),
        _address_table(exp_avg_sqs, device),
        torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True),
        blk_t.to(device, non_blocking=True),
        blk_s.to(device, non_blocking=True),
        coef,
        au_part,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        1.0 - beta1,
        beta2,
        1.0 if variant == 2 else 1.0 - beta2,
        eps,
        1.0 - lr * weight_decay,
        K,
        VARIANT=variant,
        PDT=_TL_DTYPE[dtype],
        HAS_SCALE=grad_scale is not None,
        HAS_FOUND=found_inf is not None,
        TRACK_AU=au_sums is not None,
        BLOCK=BLOCK,
        # No contraction beyond the explicit tl.fma: θ * decay + update stays two roundings, as in torch's AdamW.
        enable_fp_fusion=False,
    )
    if au_sums is not None:
        au_sums.zero_().index_add_(0, blk_t.to(device=device, dtype=torch.int64), au_part)


# What torch.compile sees: an opaque op that mutates its inputs in place (a traced kernel launch would read data
# pointers, which Dynamo cannot trace). Eager steps call the function directly: torch.library's Python dispatch costs
# more than the launch.
adatask_step_triton_op = torch.library.custom_op(
    "dgr_fast::adatask_step_triton_", adatask_step_triton, mutates_args=("params", "exp_avgs", "exp_avg_sqs", "au_sums")
)


@adatask_step_triton_op.register_fake
def _(*args: object) -> None:
    return None  # in place: nothing to allocate
