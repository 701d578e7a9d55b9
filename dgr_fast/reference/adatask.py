"""AdaTask reference: the published rule written task by task, tensor by tensor (docs/DESIGN.md section 7).

This is the ground truth every fused AdaTask backend is tested against, and the "per-task loop" (the style of the
authors' code) that the benchmarks time. It favours being obviously right over being fast: no foreach ops, no fusion,
every quantity computed in fp32 (fp64 for fp64 parameters) straight from the formula.
"""

from __future__ import annotations

from typing import Sequence

import torch

VARIANTS: tuple[str, ...] = ("adam", "rmsprop", "adagrad")


def adatask_step_reference(
    params: Sequence[torch.Tensor],
    task_grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    variant: str,
    inv_grad_scale: float = 1.0,
) -> list[torch.Tensor]:
    """One AdaTask step, in place, for every tensor of ``params``.

    Args:
        params: parameters θ, any floating dtype, updated in place.
        task_grads: one ``[K, *θ.shape]`` tensor per parameter: task k's gradient in row k.
        exp_avgs, exp_avg_sqs: ``[K, *θ.shape]`` first/second moments (fp32, fp64 for fp64 θ), updated in place;
            ``exp_avgs`` is untouched by the rmsprop and adagrad variants.
        steps: the step number of each parameter *after* this step (1 on the first step).
        inv_grad_scale: gradients are multiplied by it first (the inverse of an AMP loss scale).

    Returns:
        one ``[K]`` fp32 tensor per parameter: ``sum over elements of (lr * u_k)^2``, the squared update each task
        contributed this step (the input of the AU diagnostic); ``u_k`` is task k's term of the update.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    shares = []
    for p, g_all, m_all, v_all, step in zip(params, task_grads, exp_avgs, exp_avg_sqs, steps):
        math_dtype = m_all.dtype
        theta = p.detach().to(math_dtype)
        # Decoupled weight decay (AdamW style), applied to θ before the update as torch.optim.AdamW does.
        theta = theta * (1.0 - lr * weight_decay)
        total = torch.zeros_like(theta)
        share = torch.zeros(g_all.shape[0], dtype=torch.float32)
        for k in range(g_all.shape[0]):
            g = g_all[k].to(math_dtype) * inv_grad_scale
            if variant == "adam":
                m_all[k] = beta1 * m_all[k] + (1.0 - beta1) * g
                v_all[k] = beta2 * v_all[k] + (1.0 - beta2) * g * g
                m_hat = m_all[k] / (1.0 - beta1**step)
                v_hat = v_all[k] / (1.0 - beta2**step)
                u = m_hat / (v_hat.sqrt() + eps)
            elif variant == "rmsprop":
                v_all[k] = beta2 * v_all[k] + (1.0 - beta2) * g * g
                u = g / (v_all[k].sqrt() + eps)
            else:
                v_all[k] = v_all[k] + g * g
                u = g / (v_all[k].sqrt() + eps)
            total += u
            share[k] = float((lr * u).double().square().sum())
        theta = theta - lr * total
        p.detach().copy_(theta)
        shares.append(share)
    return shares
