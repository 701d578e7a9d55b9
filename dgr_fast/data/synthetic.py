"""``synthetic``: regression tasks with a controlled correlation (Ma et al., KDD 2018, the MMoE paper, section 4.1).

With orthonormal ``u_0, ..., u_K`` in R^d (a random rotation), task ``k`` has the weight vector
``w_k = c (sqrt(p) u_0 + sqrt(1 - p) u_k)``, so every ``w_k`` has norm ``c`` and every pair has cosine ``p``
(``correlation``). Inputs ``x ~ N(0, I_d)`` are shared by all tasks, and

    y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps,    eps ~ N(0, noise_std^2), m = 10.

For K = 2 the paper draws ``w_1 = c u_1``, ``w_2 = c (p u_1 + sqrt(1 - p^2) u_2)``: the same norms and cosine, so under
a random rotation the two constructions have the same distribution; this one extends to any K >= 2 with every pair at
cosine p (which needs p >= 0 and d >= K + 1). The paper leaves ``alpha_i``, ``beta_i`` unspecified ("given
parameters") and writes the noise as N(0, 0.01); we follow Google Research's generator of this benchmark
(``generate_task_pairs``): ``alpha_i = i`` and ``beta_i = (i - 1)^2`` for i = 1..m, shared by all tasks, and a noise
*standard deviation* of 0.01.

Samples: ``x`` float32 ``[N, d]``; one target per task, ``task{k}`` float32 ``[N, 1]``. Train and test samples are
drawn from the same weight vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dgr_fast.data.base import MTLData, TaskSpec, TensorMTLDataset

NUM_SINES = 10  # m
ALPHAS = torch.arange(1, NUM_SINES + 1, dtype=torch.float64)
BETAS = torch.arange(NUM_SINES, dtype=torch.float64) ** 2


@dataclass
class SyntheticData(MTLData):
    """``MTLData`` plus the task weight vectors ``w_k`` (float64 ``[K, d]``) the targets were made from."""

    weights: Tensor


def targets(x: Tensor, weights: Tensor) -> Tensor:
    """The noiseless targets ``w_k^T x + sum_i sin(alpha_i w_k^T x + beta_i)``: float64 ``[N, K]``."""
    proj = x.double() @ weights.T
    return proj + torch.sin(proj[..., None] * ALPHAS + BETAS).sum(-1)


def load_synthetic(
    *,
    seed: int = 0,
    train_size: int = 8000,
    test_size: int = 2000,
    num_tasks: int = 2,
    correlation: float = 0.5,
    input_dim: int = 100,
    scale: float = 1.0,
    noise_std: float = 0.01,
) -> SyntheticData:
    """``num_tasks`` regression tasks whose weight vectors (norm ``scale``) have pairwise cosine ``correlation``."""
    if num_tasks < 2:
        raise ValueError(f"num_tasks must be at least 2, got {num_tasks}")
    if not 0 <= correlation <= 1:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    if input_dim < num_tasks + 1:
        raise ValueError(f"input_dim must be at least num_tasks + 1 = {num_tasks + 1}, got {input_dim}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    gen = torch.Generator().manual_seed(seed)
    # QR of a Gaussian matrix, with R's diagonal made positive, gives Haar-distributed orthonormal columns.
    q, r = torch.linalg.qr(torch.randn(input_dim, num_tasks + 1, generator=gen, dtype=torch.float64))
    u = (q * torch.sign(torch.diagonal(r))).T
    weights = scale * (correlation**0.5 * u[0] + (1 - correlation) ** 0.5 * u[1:])
    n = train_size + test_size
    x = torch.randn(n, input_dim, generator=gen, dtype=torch.float64).float()
    y = (targets(x, weights) + noise_std * torch.randn(n, num_tasks, generator=gen, dtype=torch.float64)).float()
    tasks = [TaskSpec(f"task{k}", "mse", 1, "mae") for k in range(num_tasks)]
    rows = y.T.contiguous()  # [K, n]: one target row per task
    train, test = (
        TensorMTLDataset(tasks, x[s], [r[s, None] for r in rows]) for s in (slice(train_size), slice(train_size, n))
    )
    return SyntheticData("synthetic", train, test, weights)
