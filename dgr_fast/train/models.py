"""Small hard-parameter-sharing networks sized for the built-in data sets (CPU-friendly), with linear heads or the
DGR authors' head architectures (``heads="paper"``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgr_fast.data import MTLDataset, TaskSpec

FEATURES = 64  # width D of the shared features z every head (and every dummy head) reads
HEADS = ("linear", "paper")


class MTLModel(nn.Module):
    """A shared ``encoder`` producing features ``z`` and one linear ``heads[k]`` per task.

    ``z`` is ``[N, D]`` for row-wise tasks and ``[N, D, H, W]`` (the input's H, W) for dense ones, where each head is a
    1x1 convolution: both are the linear heads ``dgr_penalty`` fuses, so dummy heads of the same shape take the fast path.

    ``head_factories[k]`` builds a fresh, PyTorch-initialised head of head k's architecture (what
    ``DummyTask(head=...)`` takes for dummy heads that copy the model's heads), or is None for a linear head (the
    dummy heads' fused linear kind).
    """

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module],
                 head_factories: Sequence[Callable[[], nn.Module] | None] | None = None) -> None:
        super().__init__()
        self.encoder, self.heads = encoder, nn.ModuleList(heads)
        self.head_factories = list(head_factories) if head_factories is not None else [None] * len(heads)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


class _DenseEncoder(nn.Module):
    """Conv features at half resolution, upsampled back to the input's H, W (a 1x1 head commutes with the upsample)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _image_encoder(in_channels: int, height: int, width: int, features: int) -> nn.Module:
    """Stride-2 conv stages until the map is at most 8 on a side, then flatten: keeps *where* things are (the
    multi-digits tasks need left from right), which global pooling would lose."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU()]
    channels = 32
    while channels == 32 or max(height, width) > 8:  # at least one stage
        layers += [nn.Conv2d(channels, 64, 3, stride=2, padding=1), nn.ReLU()]
        channels, height, width = 64, (height + 1) // 2, (width + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * height * width, 128), nn.ReLU(),
                         nn.Linear(128, features), nn.ReLU())


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                      bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


class _ASPPPooling(nn.Sequential):
    """Image-level features: global average, 1x1 conv, broadcast back to the map's size."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class _ASPP(nn.Module):
    def __init__(self, branches: list[nn.Module], project: nn.Module) -> None:
        super().__init__()
        self.convs, self.project = nn.ModuleList(branches), project

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """DeepLabv3's head as the DGR authors' NYUv2 model has it (their create_network.py, after torchvision's):
    ASPP (a 1x1 branch, three 3x3 branches dilated by ``rates``, image pooling; each conv-BN-ReLU, ``width``
    channels, concatenated and projected back to ``width``), a 3x3 conv-BN-ReLU, a 1x1 conv to ``num_classes``.
    No dropout, as theirs. ``[N, in_channels, H, W]`` -> ``[N, num_classes, H, W]``; 16.1M parameters at
    ``in_channels=2048`` with 13 classes."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 256,
                 rates: tuple[int, int, int] = (12, 24, 36)) -> None:
        branches = [nn.Sequential(*_conv_bn_relu(in_channels, width))]
        branches += [nn.Sequential(*_conv_bn_relu(in_channels, width, 3, rate)) for rate in rates]
        branches.append(_ASPPPooling(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, width)))
        super().__init__(_ASPP(branches, nn.Sequential(*_conv_bn_relu(len(branches) * width, width))),
                         *_conv_bn_relu(width, width, 3), nn.Conv2d(width, num_classes, 1))


class UnitNormal(nn.Module):
    """Divides each pixel's output vector by its L2 norm over the channels, as the authors' model post-processes
    the surface-normal head (no epsilon, as theirs: an all-zero output gives NaN there too)."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(p=2, dim=1, keepdim=True)


def mlp_head(in_features: int, out_features: int, hidden: int = 64) -> nn.Sequential:
    """The DGR authors' UTKFace head: Linear-ReLU-Linear-ReLU (the ReLU on the logits is theirs)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features), nn.ReLU())


def paper_head_factory(task: TaskSpec, features: int, dense: bool) -> Callable[[], nn.Module]:
    """A builder of the authors' head for one task: a DeepLab head on dense tasks (normals L2-normalised), the MLP
    head on row tasks."""
    if not dense:
        return lambda: mlp_head(features, task.out_features)
    if task.metric == "angle_err":
        return lambda: nn.Sequential(DeepLabHead(features, task.out_features), UnitNormal())
    return lambda: DeepLabHead(features, task.out_features)


def make_model(data: MTLDataset, features: int = FEATURES, heads: str = "linear") -> MTLModel:
    """The network for a data set's input shape: an MLP for ``[d]`` rows, a CNN for ``[C, H, W]`` images (row
    features), a fully convolutional net for dense tasks (per-pixel features at the image size).

    ``heads``: ``"linear"`` (1x1 convolutions / ``Linear``) or ``"paper"`` (``paper_head_factory``). The authors
    apply their DeepLab heads to 1/8-size features and upsample the heads' outputs; here the features are already at
    the image size, so the heads run there (4x to 64x the work of theirs per pixel of input, the same function class).
    """
    if heads not in HEADS:
        raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    shape = data.input_shape
    if data.dense:
        encoder: nn.Module = _DenseEncoder(shape[0], features)
    elif len(shape) == 1:
        encoder = nn.Sequential(nn.Linear(shape[0], 128), nn.ReLU(), nn.Linear(128, features), nn.ReLU())
    elif len(shape) == 3:
        encoder = _image_encoder(*shape, features)
    else:
        raise ValueError(f"no model for inputs of shape {shape}: expected [d] rows or [C, H, W] images")
    if heads == "paper":
        factories: list[Callable[[], nn.Module] | None] = [paper_head_factory(t, features, data.dense)
                                                          for t in data.tasks]
        return MTLModel(encoder, [f() for f in factories], factories)
    if data.dense:
        return MTLModel(encoder, [nn.Conv2d(features, t.out_features, 1) for t in data.tasks])
    return MTLModel(encoder, [nn.Linear(features, t.out_features) for t in data.tasks])
