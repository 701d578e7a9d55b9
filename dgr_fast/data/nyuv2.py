"""``nyuv2``: your copy of NYUv2 in the preprocessed ``.npy`` layout of MTAN and Auto-Lambda (Shikun Liu's release,
also read by the DGR authors' ``SceneUnderstanding/create_dataset.py``).

Expected layout (795 train and 654 val samples in the release, 288 x 384 pixels; any H x W is accepted)::

    data_dir/train/image/0.npy ... {n-1}.npy    float [H, W, 3], RGB in [0, 1]
    data_dir/train/label/0.npy ...              [H, W], 13 classes 0..12, -1 = unlabelled (stored as floats)
    data_dir/train/depth/0.npy ...              [H, W, 1], 0 = no measurement
    data_dir/train/normal/0.npy ...             [H, W, 3], surface normals, 0 = no measurement
    data_dir/val/...                            the same four sub-folders

``train`` becomes ``MTLData.train`` and ``val`` ``MTLData.test``. Every file is read header first: a dtype or shape
other than the above, or a header whose shape does not match the file's size, is a ``DataError`` naming the file,
before any data is allocated. Loading checks the folders and the numbering, the shapes of sample 0's four files, and
the label file of every sample the split uses (values -1, 0..12 only: a NaN, fraction or class 13+ would make the
segmentation loss fail mid-run); ``batch`` then reads the samples' files, and refuses NaN or infinite values in the
image, depth and normal files it reads (checking those at load would read the whole data set once more). Samples: ``x`` float32 ``[n, 3, H, W]`` in [0, 1] (the
DGR code feeds ``2 x - 1`` to its network; that is left to the model), segmentation int64 ``[n, H, W]``, depth float32
``[n, 1, H, W]``, normal float32 ``[n, 3, H, W]``. ``downsample`` = s shrinks all of them by s for CPU runs: the image
by s x s average pooling, the targets by keeping every s-th pixel, so the -1 and 0 markers survive.
"""

from __future__ import annotations

import math
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
    """The numeric array in ``path``, checked against ``shape`` (a str entry matches any size).

    The header is checked before the data is read: a tiny file whose header claims a huge array would otherwise have
    numpy allocate that array (a MemoryError, not a message), so a shape that does not fit ``shape`` or the file's
    size is refused first.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                stored, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                stored, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 only differs for structured dtypes with non-latin-1 field names, which are no data here
                raise ValueError(f".npy format version {version[0]}.{version[1]}; this reader takes 1.0 and 2.0")
            fits = len(stored) == len(shape) and all(isinstance(s, str) or s == t for s, t in zip(shape, stored))
            if not fits or dtype.kind not in "fiu":
                raise DataError(f"{path} holds a {dtype} array of shape {_shape_str(stored)}; "
                                f"expected numbers of shape {_shape_str(shape)}")
            data_bytes = math.prod(stored) * dtype.itemsize
            file_bytes = os.fstat(f.fileno()).st_size - f.tell()
            if data_bytes != file_bytes:
                raise DataError(f"{path}: its header claims a {dtype} array of shape {_shape_str(stored)} "
                                f"({data_bytes} bytes) but {file_bytes} bytes of data follow it; "
                                "expected a complete .npy file")
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npy array: {e}") from e


def _check_labels(path: Path, label: np.ndarray) -> None:
    """Refuse a label map with anything but -1 and 0..12 (NaN fails every comparison, so it is caught too)."""
    valid = (label >= -1) & (label <= 12) & (label == np.floor(label))
    if not valid.all():
        bad = np.unique(label[~valid])
        shown = ", ".join(f"{v:g}" for v in bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise DataError(f"{path} holds labels {shown} on {int((~valid).sum())} of its {label.size} pixels; "
                        "expected the 13-class labels 0..12 with -1 for unlabelled pixels")


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
        for kind in ("depth", "normal"):
            _read(folder / kind / "0.npy", self.shapes[kind])
        self.size = split_size(size, counts["image"], str(folder))
        # The label maps are the smallest files (a third of an image's), so reading all of them once costs an eighth
        # of what one epoch reads, and a bad one then fails here instead of in the loss of some later batch.
        for i in range(self.size):
            path = folder / "label" / f"{i}.npy"
            _check_labels(path, _read(path, self.shapes["label"]))
        super().__init__(TASKS, (3, h // downsample, w // downsample), dense=True)
        self.folder, self.downsample = folder, downsample

    def __len__(self) -> int:
        return self.size

    def batch(self, indices: Tensor) -> tuple[Tensor, list[Tensor]]:
        ids = [range(self.size)[i] for i in indices.tolist()]  # IndexError past the split's (possibly cut) size
        arrays = {kind: np.stack([_read(self.folder / kind / f"{i}.npy", self.shapes[kind]) for i in ids])
                  for kind in KINDS}
        for kind in ("image", "depth", "normal"):  # the labels were checked at load
            finite = np.isfinite(arrays[kind]).reshape(len(ids), -1).all(axis=1)
            if not finite.all():
                path = self.folder / kind / f"{ids[int(np.argmin(finite))]}.npy"
                raise DataError(f"{path} holds NaN or infinite values; expected finite numbers")
        image, label, depth, normal = (torch.from_numpy(arrays[kind]) for kind in KINDS)
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
