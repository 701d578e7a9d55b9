"""``nyuv2``: your copy of NYUv2 in the preprocessed ``.npy`` layout of MTAN and Auto-Lambda (Shikun Liu's release,
also read by the DGR authors' ``SceneUnderstanding/create_dataset.py``).

Expected layout (795 train and 654 val samples in the release, 288 x 384 pixels; any H x W is accepted)::

    data_dir/train/image/0.npy ... {n-1}.npy    float [H, W, 3], RGB in [0, 1]
    data_dir/train/label/0.npy ...              [H, W], 13 classes 0..12, -1 = unlabelled (stored as floats)
    data_dir/train/depth/0.npy ...              [H, W, 1], 0 = no measurement
    data_dir/train/normal/0.npy ...             [H, W, 3], surface normals, 0 = no measurement
    data_dir/val/...                            the same four sub-folders

``train`` becomes ``MTLData.train`` and ``val`` ``MTLData.test``. Loading checks the folders, the numbering and one
sample of each kind; ``batch`` then reads the samples' files. Samples: ``x`` float32 ``[n, 3, H, W]`` in [0, 1] (the
DGR code feeds ``2 x - 1`` to its network; that is left to the model), segmentation int64 ``[n, H, W]``, depth float32
``[n, 1, H, W]``, normal float32 ``[n, 3, H, W]``. ``downsample`` = s shrinks all of them by s for CPU runs: the image
by s x s average pooling, the targets by keeping every s-th pixel, so the -1 and 0 markers survive.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dgr_fast.data.base import DataError, MTLData, MTLDataset, TaskSpec, existing_dir, split_size

TASKS = (
    TaskSpec("segmentation", "ce", 13, "miou", ignore_index=-1),
    TaskSpec("depth", "l1", 1, "abs_err", mask_zero=True),
    TaskSpec("normal", "l1", 3, "angle_err", mask_zero=True),
)
KINDS = ("image", "label", "depth", "normal")


def _shape_str(shape: tuple[int | str, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _read(path: Path, shape: tuple[int | str, ...]) -> np.ndarray:
    """The numeric array in ``path``, checked against ``shape`` (a str entry matches any size)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npy array: {e}") from e
    fits = array.ndim == len(shape) and all(isinstance(s, str) or s == t for s, t in zip(shape, array.shape))
    if not fits or array.dtype.kind not in "fiu":
        raise DataError(f"{path} holds a {array.dtype} array of shape {_shape_str(array.shape)}; "
                        f"expected numbers of shape {_shape_str(shape)}")
    return array


def _count(folder: Path) -> int:
    """How many samples ``folder`` holds, as ``0.npy`` to ``{n-1}.npy`` with no gaps."""
    names = {p.name for p in existing_dir(folder, "files 0.npy, 1.npy, ...").glob("*.npy")}
    if not names:
        raise DataError(f"no .npy files in {folder}; expected 0.npy, 1.npy, ...")
    missing = sorted(set(range(len(names))) - {int(n[:-4]) for n in names if n[:-4].isdecimal()})
    if missing:
        raise DataError(f"{folder} holds {len(names)} .npy files but not 0.npy to {len(names) - 1}.npy: "
                        f"{len(missing)} missing, the first {missing[0]}.npy")
    return len(names)


def _channels_first(t: Tensor) -> Tensor:
    """``[n, H, W, C]`` -> float32 ``[n, C, H, W]``."""
    return t.permute(0, 3, 1, 2).float()


class NYUv2Split(MTLDataset):
    """One split folder (``train`` or ``val``), checked when made and read lazily by ``batch``."""

    def __init__(self, folder: Path, size: int | None, downsample: int) -> None:
        existing_dir(folder, f"sub-folders {', '.join(KINDS)}")
        counts = {kind: _count(folder / kind) for kind in KINDS}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{kind}/ {n}" for kind, n in counts.items())
            raise DataError(f"the sub-folders of {folder} hold different numbers of samples: {listed}")
        h, w, _ = _read(folder / "image" / "0.npy", ("H", "W", 3)).shape
        if h % downsample or w % downsample:
            raise ValueError(f"downsample={downsample} must divide the {h} x {w} images of {folder}")
        self.shapes = {"image": (h, w, 3), "label": (h, w), "depth": (h, w, 1), "normal": (h, w, 3)}
        labels = np.unique(_read(folder / "label" / "0.npy", self.shapes["label"]))
        if labels.min() < -1 or labels.max() > 12:
            raise DataError(f"{folder / 'label' / '0.npy'} holds labels {labels.min():g}..{labels.max():g}; "
                            "expected the 13-class labels 0..12 with -1 for unlabelled pixels")
        for kind in ("depth", "normal"):
            _read(folder / kind / "0.npy", self.shapes[kind])
        super().__init__(TASKS, (3, h // downsample, w // downsample), dense=True)
        self.folder, self.downsample = folder, downsample
        self.size = split_size(size, counts["image"], str(folder))

    def __len__(self) -> int:
        return self.size

    def batch(self, indices: Tensor) -> tuple[Tensor, list[Tensor]]:
        ids = [range(self.size)[i] for i in indices.tolist()]  # IndexError past the split's (possibly cut) size
        image, label, depth, normal = (
            torch.from_numpy(np.stack([_read(self.folder / kind / f"{i}.npy", self.shapes[kind]) for i in ids]))
            for kind in KINDS
        )
        s = self.downsample
        x = F.avg_pool2d(_channels_first(image), s)
        seg = label[:, ::s, ::s].long()
        depth, normal = (_channels_first(t)[..., ::s, ::s] for t in (depth, normal))
        return x.contiguous(), [seg.contiguous(), depth.contiguous(), normal.contiguous()]


def load_nyuv2(data_dir: str | os.PathLike, *, train_size: int | None = None, test_size: int | None = None,
               downsample: int = 1) -> MTLData:
    """NYUv2 from ``data_dir`` (the layout above): the first ``train_size`` / ``test_size`` samples, all for None."""
    if not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")
    root = existing_dir(data_dir, "the preprocessed NYUv2 folder (MTAN / Auto-Lambda layout) with train/ and val/")
    train, test = (NYUv2Split(root / split, n, downsample) for split, n in (("train", train_size), ("val", test_size)))
    return MTLData("nyuv2", train, test)
