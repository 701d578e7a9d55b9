"""Random DGR penalty problems of odd sizes, shared by the backend tests."""

from __future__ import annotations

import torch

LOSS_MIX = ("ce", "bce", "mse", "l1")


def make_case(
    shape: tuple[int, ...],
    classes: tuple[int, ...] = (5, 3, 2, 1),
    losses: tuple[str, ...] = LOSS_MIX,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    ignore_index: int = -1,
    masked: bool = True,
    no_bias: tuple[int, ...] = (2,),
    empty_task: int | None = None,
    layout: str = "contiguous",
) -> dict:
    """Keyword arguments of ``dgr_penalty`` for features of ``shape`` (``[N, D]`` or ``[B, D, *spatial]``).

    ``layout``: ``"contiguous"``, ``"transposed"`` (features a transposed view), ``"sliced"`` (a strided slice of a
    larger tensor) or ``"channels_last"`` (4-D only). ``empty_task``: that task has no valid row at all.
    """
    g = torch.Generator().manual_seed(seed)
    n, d, spatial = shape[0], shape[1], shape[2:]
    row_shape = (n, *spatial)
    if layout == "transposed":
        features = torch.randn(tuple(reversed(shape)), generator=g, dtype=dtype).permute(*reversed(range(len(shape))))
    elif layout == "sliced":
        big = torch.randn((shape[0], shape[1] * 2, *[s + 1 for s in spatial]), generator=g, dtype=dtype)
        features = big[(slice(None), slice(None, None, 2), *[slice(1, None) for _ in spatial])]
    elif layout == "channels_last":
        features = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        features = torch.randn(shape, generator=g, dtype=dtype)
    assert features.shape == torch.Size(shape)
    weights, biases, targets, masks = [], [], [], []
    for k, (c, loss) in enumerate(zip(classes, losses)):
        weights.append(torch.randn(c, d, generator=g, dtype=dtype) / d**0.5)
        biases.append(None if k in no_bias else torch.randn(c, generator=g, dtype=dtype))
        if loss == "ce":
            y = torch.randint(0, c, row_shape, generator=g)
            y[torch.rand(row_shape, generator=g) < 0.2] = ignore_index
        elif loss == "bce":
            y = torch.rand((n, c, *spatial), generator=g, dtype=dtype)
        else:
            y = torch.randn((n, c, *spatial), generator=g, dtype=dtype)
        targets.append(y)
        m = torch.rand(row_shape, generator=g) < 0.7 if masked and k % 2 == 1 else None
        if k == empty_task:
            m = torch.zeros(row_shape, dtype=torch.bool)
        masks.append(m)
    return dict(features=features, weights=weights, biases=biases, targets=targets, losses=list(losses), masks=masks, ignore_index=ignore_index)


def penalty_and_grad(fn, case: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(**case, **kwargs)`` and its gradient w.r.t. the features."""
    features = case["features"].detach().requires_grad_(True)
    value = fn(**{**case, "features": features}, **kwargs)
    (grad,) = torch.autograd.grad(value, features)
    return value.detach(), grad
