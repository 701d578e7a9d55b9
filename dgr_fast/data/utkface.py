"""``utkface``: your copy of UTKFace, three face classification tasks as in the DGR paper (age group, gender, race).

``data_dir`` is the folder holding the images (e.g. the aligned and cropped release's ``UTKFace/``), named
``{age}_{gender}_{race}_{anything}.jpg``, e.g. ``26_0_2_20170104023102422.jpg.chip.jpg``; other files are ignored.
Gender is 0 (male) or 1 (female), race 0..4 (White, Black, Asian, Indian, Others). The age groups are those of the
DGR authors' code (``UTKFACE/main.py`` in github.com/Sinseokwon/LearningUnivforMTL, ``pd.cut`` with bins
0, 10, ..., 60, 120): ages up to 10, 11-20, 21-30, 31-40, 41-50, 51-60, and over 60.

A ``.jpg`` whose name does not parse (the release has 3 files missing a field) is a ``DataError`` listing them, unless
``skip_bad_names=True``, which leaves them out with a warning. There is no official split: the sorted file names are
shuffled by ``seed`` and the last ``round(test_fraction * N)`` become the test split; this is the permutation
``torch.utils.data.random_split`` draws with a generator seeded by ``seed``, as the DGR code does (which then drops
badly named files from its splits, as we do). ``train_size`` / ``test_size`` take the first samples of each split.

Loading opens every image the splits use (Pillow reads the header only, about an eighth of what decoding costs): a
file Pillow cannot identify, or one of more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb; the
release's crops are 200 x 200), is a ``DataError`` naming it before any training. The first image is also decoded
then; a file whose data is broken past its header fails, with a ``DataError`` naming it, in the ``batch`` that reads
it. Samples, read by ``batch``: ``x`` float32 ``[n, 3, S, S]`` in [0, 1] (RGB, resized bilinearly to ``image_size``
S, 1..``MAX_IMAGE_SIZE``; the DGR code also normalises by the ImageNet mean and std, which is left to the model);
targets ``age`` (0..6), ``gender`` (0..1), ``race`` (0..4), each int64 ``[n]``.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from pathlib import Path

import torch
from torch import Tensor

from dgr_fast.data.base import DataError, MTLData, MTLDataset, TaskSpec, existing_dir, split_size

TASKS = (
    TaskSpec("age", "ce", 7, "accuracy"),
    TaskSpec("gender", "ce", 2, "accuracy"),
    TaskSpec("race", "ce", 5, "accuracy"),
)
AGE_EDGES = torch.tensor([10, 20, 30, 40, 50, 60])  # upper ends (inclusive) of the first six age groups
NAME = re.compile(r"(\d+)_(\d+)_(\d+)_.*\.jpg", re.IGNORECASE)
# The largest image_size: 512 x 512 is 2.5 times the release's 200 x 200 crops already, and one batch of 64 such
# images is 200 MB of float32; a size far beyond it is a typo that would exhaust memory in the first batch.
MAX_IMAGE_SIZE = 512


def parse_name(name: str) -> tuple[int, int, int] | None:
    """``(age, gender, race)`` from an image's file name, or None where it does not follow the UTKFace scheme."""
    match = NAME.fullmatch(name)
    if match is None:
        return None
    age, gender, race = map(int, match.groups())
    return (age, gender, race) if gender in (0, 1) and 0 <= race <= 4 else None


def age_group(age: Tensor) -> Tensor:
    """Age group 0..6 of each age (int64): ``(.., 10]``, ``(10, 20]``, ..., ``(50, 60]``, ``(60, ..)``."""
    return torch.bucketize(age, AGE_EDGES)  # right=False: edges[i-1] < age <= edges[i], as pd.cut's closed right ends


def _pillow():
    """``PIL.Image``, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("the utkface data set reads images with Pillow: pip install pillow "
                          "(or the demo extra: pip install 'dgr_fast[demo]')") from e
    return Image


def _with_image(path: Path, use):
    """``use(image)`` on the image at ``path`` opened by Pillow; any way the file fails to be an image is a
    ``DataError`` naming it."""
    Image = _pillow()
    try:
        with warnings.catch_warnings():
            # Pillow only warns from MAX_IMAGE_PIXELS to twice that, and raises above: neither is a face crop, and
            # decoding one takes gigabytes, so both are refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return use(image)
    # Pillow's decoders report broken files with any of these (UnidentifiedImageError is an OSError).
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise DataError(f"cannot read the image {path}: {e}") from e


def check_image(path: Path) -> None:
    """Refuse ``path`` if Pillow cannot identify it as an image or it is too large to decode (headers only)."""
    _with_image(path, lambda image: None)


def read_image(path: Path, size: int) -> Tensor:
    """The image at ``path`` as float32 ``[3, size, size]`` in [0, 1]."""
    bilinear = _pillow().Resampling.BILINEAR
    rgb = _with_image(path, lambda image: image.convert("RGB").resize((size, size), bilinear))
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1) / 255


class UTKFaceSplit(MTLDataset):
    """Images and their labels; ``batch`` reads the images."""

    def __init__(self, paths: list[Path], labels: Tensor, image_size: int) -> None:
        """``labels``: int64 ``[3, len(paths)]``, the age groups, genders and races."""
        super().__init__(TASKS, (3, image_size, image_size), dense=False)
        self.paths, self.labels, self.image_size = paths, labels, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = torch.stack([read_image(self.paths[i], self.image_size) for i in indices.tolist()])
        return x, [y[indices] for y in self.labels]


def load_utkface(data_dir: str | os.PathLike, *, seed: int = 0, train_size: int | None = None,
                 test_size: int | None = None, image_size: int = 64, test_fraction: float = 0.2,
                 skip_bad_names: bool = False) -> MTLData:
    """UTKFace from the images in ``data_dir``, split by ``seed`` (see the module docstring)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer in 1..{MAX_IMAGE_SIZE}, got {image_size!r}")
    root = existing_dir(data_dir, "the UTKFace images, named {age}_{gender}_{race}_{date}.jpg")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())
    if not paths:
        raise DataError(f"no .jpg images in {root}; point data_dir at the folder holding the UTKFace images")
    parsed = [parse_name(p.name) for p in paths]
    bad = [p.name for p, labels in zip(paths, parsed) if labels is None]
    if bad and not skip_bad_names:
        raise DataError(f"{len(bad)} image names in {root} are not {{age}}_{{gender 0/1}}_{{race 0-4}}_..., e.g. "
                        f"{', '.join(bad[:3])}; pass skip_bad_names=True to leave them out")
    if len(bad) == len(paths):
        raise DataError(f"none of the {len(paths)} image names in {root} parse, e.g. {bad[0]}")
    if bad:
        warnings.warn(f"left out {len(bad)} UTKFace images whose names do not parse, e.g. {bad[0]}", stacklevel=2)
    read_image(next(p for p, labels in zip(paths, parsed) if labels is not None), image_size)  # fail now, not mid-run
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = len(paths) - round(test_fraction * len(paths))
    splits = []
    for split, ids, size in (("train", perm[:n_train], train_size), ("test", perm[n_train:], test_size)):
        ids = [i for i in ids if parsed[i] is not None]
        if not ids:
            raise DataError(f"the {split} split of the {len(paths)} images in {root} is empty "
                            f"(test_fraction={test_fraction})")
        ids = ids[: split_size(size, len(ids), f"the {split} split of {root}")]
        for i in ids:
            check_image(paths[i])
        ages, genders, races = torch.tensor([parsed[i] for i in ids]).T.contiguous()
        splits.append(UTKFaceSplit([paths[i] for i in ids], torch.stack([age_group(ages), genders, races]), image_size))
    return MTLData("utkface", *splits)
