"""Convolutions cut down to the kernel taps that read the input, not only its zero padding.

A dilated convolution on a small map reads some taps from the padding at every output position. DeepLab's ASPP at
rate 36 on the DGR authors' NYUv2 features (36 x 48: 288 x 384 crops at output stride 8) has 6 of its 9 taps in the
padding everywhere; on a 24 x 32 map the rate-24 and rate-36 convolutions have 6 and 8. Such a tap adds zero to every
output (for finite weights), so the output does not depend on its weights, and the convolution with the kernel cut
to the live taps (the padding reduced to match) is the same function of the input and the weights: the same output,
gradients (a dead tap's weight gradient is 0 either way) and derivatives of any order, up to the rounding of a sum
taken over fewer terms, for less work.

``skip_dead_taps()`` makes every ``conv1d`` / ``conv2d`` / ``conv3d`` call inside it take the cut kernel where one
exists. ``DummyHeads`` runs the exact penalty of its module heads under it (the dilated ASPP convolutions are most
of a DeepLab head's work); ``reference.module_penalty``, the ground truth, and the finite-difference estimate, which
reproduces the authors' computation bit for bit, do not. No convolution is cut while saved-tensor hooks are active:
activation checkpointing replays the forward in the backward, where this mode is not active, and the replay must
save what the forward saved.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CONVS = (F.conv1d, F.conv2d, F.conv3d)
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def live_range(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int] | None:
    """``(first, last)``: the taps of one spatial dimension that read an input element for some output position,
    or None if none does. Output ``r`` reads, through tap ``i``, the input at
    ``r * stride + i * dilation - padding``."""
    out = _out_size(size, kernel, stride, padding, dilation)
    live = []
    for i in range(kernel):
        offset = i * dilation - padding
        first = max(0, -(offset // stride))  # the first output reading at or after index 0 through this tap
        if first < out and first * stride + offset < size:
            live.append(i)
    return (live[0], live[-1]) if live else None


def _cut(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[slice, int] | None:
    """The kernel slice and the padding of the cut convolution along one dimension, or None where the whole kernel
    is live or the cut is not a convolution with symmetric padding and the same output size."""
    taps = live_range(size, kernel, stride, padding, dilation)
    if taps is None or taps == (0, kernel - 1):
        return None
    first, last = taps
    cut_padding = padding - first * dilation  # output r reads the same inputs through tap i - first
    out = _out_size(size, kernel, stride, padding, dilation)
    if cut_padding < 0 or _out_size(size, last - first + 1, stride, cut_padding, dilation) != out:
        return None
    return slice(first, last + 1), cut_padding


def _per_dim(value: Any, n: int) -> tuple[int, ...]:
    """An int or a sequence, as the convolutions take them (one entry stands for every dimension)."""
    if isinstance(value, (tuple, list)):
        return tuple(value) * n if len(value) == 1 else tuple(value)
    return (value,) * n


def cut_convolution(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` for ``func`` one of ``F.conv1d/2d/3d``, with the kernel cut to its live taps."""
    bound = {**_DEFAULTS, **dict(zip(_ARGS, args)), **kwargs}
    x, w = bound["input"], bound["weight"]
    if isinstance(bound["padding"], str):  # "valid" pads nothing, "same" pads by the kernel's extent: left whole
        return func(*args, **kwargs)
    n = w.dim() - 2
    stride, padding, dilation = (_per_dim(bound[k], n) for k in ("stride", "padding", "dilation"))
    if len(stride) != n or len(padding) != n or len(dilation) != n or min(stride + dilation) < 1:
        return func(*args, **kwargs)  # the convolution's own error
    cuts = [_cut(x.shape[x.dim() - n + a], w.shape[2 + a], stride[a], padding[a], dilation[a]) for a in range(n)]
    if all(c is None for c in cuts):
        return func(*args, **kwargs)
    index = (slice(None), slice(None)) + tuple(slice(None) if c is None else c[0] for c in cuts)
    cut_padding = tuple(p if c is None else c[1] for p, c in zip(padding, cuts))
    return func(x, w[index], bound["bias"], stride, cut_padding, dilation, bound["groups"])


class skip_dead_taps(TorchFunctionMode):
    """Inside this context every ``F.conv1d/2d/3d`` runs as ``cut_convolution``: the same function, less work."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS and not _saved_tensor_hooks_active():
            return cut_convolution(func, *args, **kwargs)
        return func(*args, **kwargs)


def _saved_tensor_hooks_active() -> bool:
    # torch has no public query for the hooks stack (torch.autograd.graph.saved_tensors_hooks pushes onto it), and
    # dynamo cannot trace this one; a compiled checkpoint replays its traced forward, cut as it was
    if torch.compiler.is_compiling():
        return False
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
