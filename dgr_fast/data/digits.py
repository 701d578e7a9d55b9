"""``multi-digits``: pairs of real handwritten digits side by side, with three tasks (left digit, right digit, sum).

Built from scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1797 images of 8 x 8 pixels, values
0..16), so nothing is downloaded. The 1797 source digits are first split 80/20 into disjoint train and test pools, so
test composites show handwriting the model never saw. A composite puts the left digit at columns 0..7 of an 8 x 16
canvas and the right digit at columns ``8 - overlap .. 15 - overlap``, with ``overlap`` drawn uniformly from
``0..max_overlap``; overlapping pixels take the max, and columns past the right digit stay 0.

Samples: ``x`` float32 ``[N, 1, 8, 16]`` in [0, 1]; targets ``left`` and ``right`` int64 ``[N]`` (0..9), and ``sum``
float32 ``[N, 1]``: the raw sum 0..18, not standardised, so its MAE is in digit units. The sum is trained with an L1
loss: its gradient is bounded like cross-entropy's, where a squared error on 0..18 would start ~50x larger than the
digit losses and drown them under equal weighting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dgr_fast.data.base import MTLData, TaskSpec, TensorMTLDataset

TASKS = (
    TaskSpec("left", "ce", 10, "accuracy"),
    TaskSpec("right", "ce", 10, "accuracy"),
    TaskSpec("sum", "l1", 1, "mae"),
)
TEST_POOL_FRACTION = 0.2
DIGIT = 8  # source digits are DIGIT x DIGIT pixels


@dataclass(frozen=True)
class DigitSources:
    """Where one split's composites come from; indices are into ``sklearn.datasets.load_digits()``."""

    pool: Tensor  # int64 [P]: the source digits this split draws from
    pairs: Tensor  # int64 [N, 2]: (left, right) source digit of each composite
    overlap: Tensor  # int64 [N]: columns by which the right digit overlaps the left one


@dataclass
class MultiDigitsData(MTLData):
    """``MTLData`` plus the provenance of every composite, for checks and plots."""

    train_sources: DigitSources
    test_sources: DigitSources


def source_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: images float32 ``[1797, 8, 8]`` scaled to [0, 1], labels int64 ``[1797]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("multi-digits is made from scikit-learn's digits: pip install scikit-learn "
                          "(or the demo extra: pip install 'dgr_fast[demo]')") from e
    digits = load_digits()
    return torch.from_numpy(digits.images).float() / 16, torch.from_numpy(digits.target).long()


def compose(images: Tensor, pairs: Tensor, overlap: Tensor) -> Tensor:
    """Composites float32 ``[N, 1, 8, 16]`` of ``images[pairs[:, 0]]`` (left) and ``images[pairs[:, 1]]`` (right)."""
    left = F.pad(images[pairs[:, 0]], (0, DIGIT))
    # Canvas column j shows column j - (8 - overlap) of the right digit, where that lies in 0..7.
    cols = torch.arange(2 * DIGIT) - (DIGIT - overlap[:, None])
    inside = (cols >= 0) & (cols < DIGIT)
    index = cols.clamp(0, DIGIT - 1)[:, None, :].expand(-1, DIGIT, -1)
    right = images[pairs[:, 1]].gather(2, index) * inside[:, None, :]
    return torch.maximum(left, right)[:, None]


def load_multi_digits(
    *, seed: int = 0, train_size: int = 6000, test_size: int = 2000, max_overlap: int = 4
) -> MultiDigitsData:
    """``train_size`` and ``test_size`` composites; bitwise identical for the same arguments."""
    if not 0 <= max_overlap <= DIGIT:
        raise ValueError(f"max_overlap must be in 0..{DIGIT}, got {max_overlap}")
    images, labels = source_digits()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    n_test_pool = round(TEST_POOL_FRACTION * len(labels))
    sources = []
    for pool, n in ((perm[n_test_pool:], train_size), (perm[:n_test_pool], test_size)):
        pairs = pool[torch.randint(len(pool), (n, 2), generator=gen)]
        sources.append(DigitSources(pool, pairs, torch.randint(max_overlap + 1, (n,), generator=gen)))
    train, test = (_split(images, labels, s) for s in sources)
    return MultiDigitsData("multi-digits", train, test, *sources)


def _split(images: Tensor, labels: Tensor, sources: DigitSources) -> TensorMTLDataset:
    left, right = labels[sources.pairs].unbind(1)
    targets = [left, right, (left + right).float()[:, None]]
    return TensorMTLDataset(TASKS, compose(images, sources.pairs, sources.overlap), targets)
