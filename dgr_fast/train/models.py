"""Small hard-parameter-sharing networks sized for the built-in data sets (CPU-friendly)."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dgr_fast.data import MTLDataset

FEATURES = 64  # width D of the shared features z every head (and every dummy head) reads


class MTLModel(nn.Module):
    """A shared ``encoder`` producing features ``z`` and one linear ``heads[k]`` per task.

    ``z`` is ``[N, D]`` for row-wise tasks and ``[N, D, H, W]`` (the input's H, W) for dense ones, where each head is a
    1x1 convolution: both are the linear heads ``dgr_penalty`` fuses, so dummy heads of the same shape take the fast path.
    """

    def __init__(self, encoder: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder, self.heads = encoder, nn.ModuleList(heads)

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


def make_model(data: MTLDataset, features: int = FEATURES) -> MTLModel:
    """The network for a data set's input shape: an MLP for ``[d]`` rows, a CNN for ``[C, H, W]`` images (row
    features), a fully convolutional net for dense tasks (per-pixel features)."""
    shape = data.input_shape
    if data.dense:
        encoder: nn.Module = _DenseEncoder(shape[0], features)
        heads = [nn.Conv2d(features, t.out_features, 1) for t in data.tasks]
    else:
        if len(shape) == 1:
            encoder = nn.Sequential(nn.Linear(shape[0], 128), nn.ReLU(), nn.Linear(128, features), nn.ReLU())
        elif len(shape) == 3:
            encoder = _image_encoder(*shape, features)
        else:
            raise ValueError(f"no model for inputs of shape {shape}: expected [d] rows or [C, H, W] images")
        heads = [nn.Linear(features, t.out_features) for t in data.tasks]
    return MTLModel(encoder, heads)
