"""Built-in data sets: the registry's checks; multi-digits and synthetic against their definitions (scikit-learn's
digits, the MMoE formula); NYUv2 and UTKFace on tiny folders written here in the real formats, well and badly formed."""

import shutil
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch

from dgr_fast.data import DATASETS, DataError, MTLData, load_dataset
from dgr_fast.data.utkface import parse_name


def all_of(split):
    """Every sample of a split, via ``batch``."""
    return split.batch(torch.arange(len(split)))


def assert_same_data(a: MTLData, b: MTLData) -> None:
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        (xa, ya), (xb, yb) = all_of(split_a), all_of(split_b)
        assert torch.equal(xa, xb) and all(torch.equal(p, q) for p, q in zip(ya, yb, strict=True))


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_names_and_unknown_name():
    assert DATASETS == ("multi-digits", "synthetic", "nyuv2", "utkface")
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*multi-digits, synthetic, nyuv2, utkface"):
        load_dataset("mnist")


@pytest.mark.parametrize("name", ["nyuv2", "utkface"])
def test_file_based_sets_need_data_dir(name):
    with pytest.raises(DataError, match=f"{name} is read from your copy of it: pass data_dir"):
        load_dataset(name)


def test_generated_sets_refuse_data_dir(tmp_path):
    with pytest.raises(ValueError, match="synthetic is generated.*data_dir"):
        load_dataset("synthetic", tmp_path)


def test_unknown_options_are_named(tmp_path):
    with pytest.raises(TypeError, match="synthetic has no option colour, depth; its options are: num_tasks, corr"):
        load_dataset("synthetic", depth=3, colour="red")
    with pytest.raises(TypeError, match="nyuv2 has no option seeds; its options are: downsample"):
        load_dataset("nyuv2", tmp_path, seeds=1)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_sizes_must_be_positive_integers(size):
    with pytest.raises(ValueError, match="train_size must be a positive integer"):
        load_dataset("synthetic", train_size=size)


# --- multi-digits ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return pytest.importorskip("sklearn.datasets").load_digits()


def test_multi_digits_shapes_dtypes_ranges(digits):
    data = load_dataset("multi-digits")
    assert data.name == "multi-digits" and [t.name for t in data.tasks] == ["left", "right", "sum"]
    assert (len(data.train), len(data.test)) == (6000, 2000)
    assert data.train.input_shape == (1, 8, 16) and not data.train.dense
    x, (left, right, total) = all_of(data.train)
    assert x.shape == (6000, 1, 8, 16) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    assert left.dtype == right.dtype == torch.int64 and left.shape == right.shape == (6000,)
    assert set(left.tolist()) == set(right.tolist()) == set(range(10))
    assert total.dtype == torch.float32 and total.shape == (6000, 1)
    assert torch.equal(total[:, 0], (left + right).float())


def test_multi_digits_is_deterministic_in_the_seed(digits):
    a, b, c = (load_dataset("multi-digits", seed=s, train_size=50, test_size=20) for s in (1, 1, 2))
    assert_same_data(a, b)
    assert not torch.equal(a.train.x, c.train.x)


def test_multi_digits_pools_are_disjoint(digits):
    data = load_dataset("multi-digits", seed=3, train_size=3000, test_size=1000)
    train_pool, test_pool = set(data.train_sources.pool.tolist()), set(data.test_sources.pool.tolist())
    assert not train_pool & test_pool and train_pool | test_pool == set(range(len(digits.target)))
    assert len(test_pool) == round(0.2 * len(digits.target))
    assert set(data.train_sources.pairs.flatten().tolist()) <= train_pool
    assert set(data.test_sources.pairs.flatten().tolist()) <= test_pool


@pytest.mark.parametrize("max_overlap", [0, 4])
def test_multi_digits_composites_match_scikit_learn(digits, max_overlap):
    data = load_dataset("multi-digits", seed=5, train_size=20, test_size=40, max_overlap=max_overlap)
    sources = data.test_sources
    assert set(sources.overlap.tolist()) == set(range(max_overlap + 1))
    x, (left, right, total) = all_of(data.test)
    for k, ((a, b), overlap) in enumerate(zip(sources.pairs.tolist(), sources.overlap.tolist())):
        assert (left[k], right[k]) == (digits.target[a], digits.target[b])
        assert total[k, 0] == digits.target[a] + digits.target[b]
        first, second = (torch.from_numpy(digits.images[i]).float() / 16 for i in (a, b))
        canvas, start = torch.zeros(8, 16), 8 - overlap
        canvas[:, :8] = first
        canvas[:, start : start + 8] = torch.maximum(canvas[:, start : start + 8], second)
        assert torch.equal(x[k, 0], canvas)
        # Only the left digit reaches columns 0..3, and nothing lies past the right one.
        assert torch.equal(x[k, 0, :, : 8 - max_overlap], canvas[:, : 8 - max_overlap])
        assert not x[k, 0, :, 16 - overlap :].any()


def test_multi_digits_rejects_a_bad_overlap(digits):
    with pytest.raises(ValueError, match="max_overlap must be in 0..8"):
        load_dataset("multi-digits", max_overlap=9)


# --- synthetic ------------------------------------------------------------------------------------------------

ALPHAS = torch.arange(1, 11, dtype=torch.float64)  # the values of Google Research's generator
BETAS = torch.tensor([0, 1, 4, 9, 16, 25, 36, 49, 64, 81], dtype=torch.float64)


def mmoe_targets(x, w):
    """y_k = w_k^T x + sum_i sin(alpha_i w_k^T x + beta_i), written out independently of the module."""
    proj = x.double() @ w.T
    return proj + sum(torch.sin(a * proj + b) for a, b in zip(ALPHAS, BETAS))


def test_synthetic_shapes_dtypes():
    data = load_dataset("synthetic")
    assert [t.name for t in data.tasks] == ["task0", "task1"] and all(t.loss == "mse" for t in data.tasks)
    assert (len(data.train), len(data.test)) == (8000, 2000) and data.train.input_shape == (100,)
    x, ys = all_of(data.test)
    assert x.shape == (2000, 100) and x.dtype == torch.float32
    assert all(y.shape == (2000, 1) and y.dtype == torch.float32 for y in ys)


def test_synthetic_is_deterministic_in_the_seed():
    a, b, c = (load_dataset("synthetic", seed=s, train_size=30, test_size=10) for s in (4, 4, 5))
    assert_same_data(a, b)
    assert torch.equal(a.weights, b.weights) and not torch.equal(a.weights, c.weights)
    assert not torch.equal(a.train.x, c.train.x)


@pytest.mark.parametrize("num_tasks, correlation", [(2, 0.0), (2, 0.5), (3, 1.0), (5, 0.9)])
def test_synthetic_weights_have_the_asked_cosine(num_tasks, correlation):
    w = load_dataset("synthetic", num_tasks=num_tasks, correlation=correlation, input_dim=20, scale=2.0,
                     train_size=10, test_size=10).weights
    assert w.shape == (num_tasks, 20)
    norms = w.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((num_tasks,), 2.0, dtype=torch.float64))
    cosine = (w @ w.T) / torch.outer(norms, norms)
    expected = torch.full((num_tasks, num_tasks), correlation, dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(cosine, expected, atol=1e-12, rtol=0)


def test_synthetic_targets_follow_the_mmoe_formula():
    data = load_dataset("synthetic", seed=1, correlation=0.7, train_size=6000, test_size=4000)
    x = torch.cat([data.train.x, data.test.x])
    y = torch.cat([torch.cat(data.train.targets, 1), torch.cat(data.test.targets, 1)]).double()
    expected = mmoe_targets(x, data.weights)
    noise = y - expected
    assert noise.abs().max() < 0.06 and noise.mean().abs() < 1e-3
    assert 0.0095 < noise.std() < 0.0105  # eps ~ N(0, 0.01^2)
    # Over x ~ N(0, I), the linear parts of the two tasks correlate as their weights do.
    proj = x.double() @ data.weights.T
    assert abs(torch.corrcoef(proj.T)[0, 1] - 0.7) < 0.02
    noiseless = load_dataset("synthetic", seed=1, noise_std=0.0, train_size=100, test_size=1)
    expected = mmoe_targets(noiseless.train.x, noiseless.weights).float()
    torch.testing.assert_close(torch.cat(noiseless.train.targets, 1), expected)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"correlation": -0.1}, "correlation must be in"),
        ({"correlation": 1.5}, "correlation must be in"),
        ({"num_tasks": 1}, "num_tasks must be at least 2"),
        ({"num_tasks": 3, "input_dim": 3}, "input_dim must be at least num_tasks"),
        ({"scale": 0.0}, "scale must be positive"),
        ({"noise_std": -1.0}, "noise_std must be non-negative"),
    ],
)
def test_synthetic_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("synthetic", **options)


# --- NYUv2 ----------------------------------------------------------------------------------------------------

H, W = 12, 16


def nyuv2_sample(gen):
    """One sample in the MTAN / Auto-Lambda .npy format: (image, label, depth, normal) numpy arrays."""
    depth = torch.rand(H, W, 1, generator=gen, dtype=torch.float64) * 5
    depth[torch.rand(H, W, generator=gen) < 0.2] = 0
    normal = torch.nn.functional.normalize(torch.randn(H, W, 3, generator=gen), dim=-1) * (depth > 0)
    return (
        torch.rand(H, W, 3, generator=gen, dtype=torch.float64).numpy(),
        torch.randint(-1, 13, (H, W), generator=gen).double().numpy(),
        depth.numpy(),
        normal.numpy(),
    )


@pytest.fixture
def nyuv2_dir(tmp_path):
    """``tmp_path/nyuv2`` with 3 train and 2 val samples of 12 x 16; returns (folder, {split: [sample, ...]})."""
    gen, root, samples = torch.Generator().manual_seed(0), tmp_path / "nyuv2", {}
    for split, n in (("train", 3), ("val", 2)):
        samples[split] = [nyuv2_sample(gen) for _ in range(n)]
        for kind, arrays in zip(("image", "label", "depth", "normal"), zip(*samples[split])):
            (root / split / kind).mkdir(parents=True)
            for i, array in enumerate(arrays):
                np.save(root / split / kind / f"{i}.npy", array)
    return root, samples


def test_nyuv2_reads_the_mtan_layout(nyuv2_dir):
    root, samples = nyuv2_dir
    data = load_dataset("nyuv2", root)
    assert [(t.name, t.loss, t.out_features) for t in data.tasks] == [("segmentation", "ce", 13), ("depth", "l1", 1),
                                                                       ("normal", "l1", 3)]
    assert data.tasks[0].ignore_index == -1 and data.tasks[1].mask_zero and data.tasks[2].mask_zero
    assert (len(data.train), len(data.test)) == (3, 2)
    assert data.train.dense and data.train.input_shape == (3, H, W)
    x, (seg, depth, normal) = data.train.batch(torch.tensor([2, 0]))
    assert x.shape == (2, 3, H, W) and x.dtype == torch.float32
    assert seg.shape == (2, H, W) and seg.dtype == torch.int64 and seg.min() == -1
    assert depth.shape == (2, 1, H, W) and normal.shape == (2, 3, H, W)
    assert depth.dtype == normal.dtype == torch.float32
    for row, i in enumerate([2, 0]):
        image, label, d, n = (torch.from_numpy(a) for a in samples["train"][i])
        assert torch.equal(x[row], image.permute(2, 0, 1).float())
        assert torch.equal(seg[row], label.long())
        assert torch.equal(depth[row], d.permute(2, 0, 1).float())
        assert torch.equal(normal[row], n.permute(2, 0, 1).float())
    x_val, _ = data.test.batch(torch.tensor([1]))
    assert torch.equal(x_val[0], torch.from_numpy(samples["val"][1][0]).permute(2, 0, 1).float())


def test_nyuv2_downsample(nyuv2_dir):
    root, samples = nyuv2_dir
    data = load_dataset("nyuv2", root, downsample=2)
    assert data.train.input_shape == (3, H // 2, W // 2)
    x, (seg, depth, normal) = data.train.batch(torch.tensor([1]))
    image, label, d, n = (torch.from_numpy(a).float() for a in samples["train"][1])
    blocks = image.reshape(H // 2, 2, W // 2, 2, 3).mean(dim=(1, 3)).permute(2, 0, 1)
    torch.testing.assert_close(x[0], blocks)
    assert torch.equal(seg[0], label[::2, ::2].long())
    assert torch.equal(depth[0, 0], d[::2, ::2, 0]) and torch.equal(normal[0], n[::2, ::2].permute(2, 0, 1))
    assert (seg == -1).any() and (depth == 0).any()  # the markers survive


def test_nyuv2_sizes_take_the_first_samples(nyuv2_dir):
    root, _ = nyuv2_dir
    full, cut = load_dataset("nyuv2", root), load_dataset("nyuv2", root, train_size=2, test_size=1)
    assert (len(cut.train), len(cut.test)) == (2, 1)
    assert torch.equal(all_of(cut.train)[0], full.train.batch(torch.tensor([0, 1]))[0])
    with pytest.raises(IndexError):
        cut.train.batch(torch.tensor([2]))
    with pytest.raises(DataError, match="asked for 4 samples but .*train has only 3"):
        load_dataset("nyuv2", root, train_size=4)


BAD_NYUV2 = {  # case -> (how to break the folder, what the message must say)
    "no folder": (lambda r: shutil.rmtree(r), ["nyuv2 is not a folder", "train/ and val/"]),
    "no split": (lambda r: shutil.rmtree(r / "val"), ["val is not a folder", "image, label, depth, normal"]),
    "no sub-folder": (lambda r: shutil.rmtree(r / "train" / "depth"), ["depth is not a folder", "0.npy"]),
    "no files": (lambda r: [p.unlink() for p in (r / "train" / "normal").iterdir()], ["no .npy files in", "normal"]),
    "gap": (lambda r: (r / "train" / "label" / "1.npy").rename(r / "train" / "label" / "7.npy"),
            ["label holds 3 .npy files but not 0.npy to 2.npy", "the first 1.npy"]),
    "wrong shape": (lambda r: np.save(r / "train" / "depth" / "0.npy", np.zeros((H, W))),
                    ["depth/0.npy holds a float64 array of shape [12, 16]", "expected numbers of shape [12, 16, 1]"]),
    "wrong image": (lambda r: np.save(r / "val" / "image" / "0.npy", np.zeros((3, H, W))),
                    ["image/0.npy", "shape [3, 12, 16]", "[H, W, 3]"]),
    "text": (lambda r: np.save(r / "val" / "normal" / "0.npy", np.full((H, W, 3), "a")),
             ["normal/0.npy holds a <U1 array", "expected numbers"]),
    "not npy": (lambda r: (r / "train" / "image" / "0.npy").write_text("hello"), ["cannot read", "image/0.npy"]),
    "counts": (lambda r: (r / "val" / "normal" / "1.npy").unlink(),
               ["different numbers of samples", "image/ 2, label/ 2, depth/ 2, normal/ 1"]),
    "40 classes": (lambda r: np.save(r / "train" / "label" / "0.npy", np.full((H, W), 39.0)),
                   ["label/0.npy holds labels 39 on 192 of its 192 pixels", "0..12 with -1"]),
    # Every label file the split uses is checked, not only sample 0's.
    "NaN label in the last file": (lambda r: set_pixel(r / "train" / "label" / "2.npy", np.nan),
                                   ["train/label/2.npy holds labels nan on 1 of its 192 pixels", "0..12 with -1"]),
    "class 13 in val": (lambda r: set_pixel(r / "val" / "label" / "1.npy", 13.0), ["val/label/1.npy holds labels 13"]),
    "fractional label": (lambda r: set_pixel(r / "train" / "label" / "1.npy", 3.5), ["label/1.npy holds labels 3.5"]),
    # A 128-byte file claiming 240 GB: refused from its header, before numpy allocates anything.
    "header claims a huge array": (lambda r: write_header_only(r / "train" / "image" / "0.npy", (100000, 100000, 3)),
                                   ["train/image/0.npy: its header claims a float64 array of shape "
                                    "[100000, 100000, 3] (240000000000 bytes) but 0 bytes of data follow it"]),
    "truncated": (lambda r: truncate(r / "val" / "depth" / "0.npy", 8),
                  ["val/depth/0.npy: its header claims a float64 array of shape [12, 16, 1] (1536 bytes) "
                   "but 1528 bytes"]),
}


def set_pixel(path, value):
    array = np.load(path)
    array[H // 2, W // 2] = value
    np.save(path, array)


def write_header_only(path, shape):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})


def truncate(path, n_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:-n_bytes])


@pytest.mark.parametrize("case", BAD_NYUV2)
def test_nyuv2_malformed_folders(nyuv2_dir, case):
    root, _ = nyuv2_dir
    breaker, fragments = BAD_NYUV2[case]
    breaker(root)
    with pytest.raises(DataError) as error:
        load_dataset("nyuv2", root)
    assert all(f in str(error.value) for f in fragments), str(error.value)


def test_nyuv2_checks_every_file_it_reads(nyuv2_dir):
    root, _ = nyuv2_dir
    data = load_dataset("nyuv2", root)
    np.save(root / "train" / "normal" / "2.npy", np.zeros((H, W, 2)))
    with pytest.raises(DataError, match="normal/2.npy holds .* shape \\[12, 16, 2\\]"):
        data.train.batch(torch.tensor([2]))


def test_nyuv2_batch_refuses_non_finite_values(nyuv2_dir):
    """NaN in a depth, normal or image file would make every loss NaN without an error; ``batch`` names the file."""
    root, _ = nyuv2_dir
    data = load_dataset("nyuv2", root)
    set_pixel(root / "train" / "depth" / "1.npy", np.nan)
    set_pixel(root / "train" / "normal" / "2.npy", np.inf)
    data.train.batch(torch.tensor([0]))
    with pytest.raises(DataError, match="train/depth/1.npy holds NaN or infinite values"):
        data.train.batch(torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="train/normal/2.npy holds NaN or infinite values"):
        data.train.batch(torch.tensor([2]))


@pytest.mark.parametrize("downsample, message", [(0, "positive integer"), (5, "downsample=5 must divide the 12 x 16")])
def test_nyuv2_rejects_a_bad_downsample(nyuv2_dir, downsample, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("nyuv2", nyuv2_dir[0], downsample=downsample)


# --- UTKFace --------------------------------------------------------------------------------------------------

FACES = {  # file name -> (colour, age group)
    "1_0_0_20170109150557335.jpg.chip.jpg": ((250, 10, 10), 0),
    "10_1_1_20170109150557336.jpg.chip.jpg": ((10, 250, 10), 0),
    "11_0_2_20170109150557337.jpg.chip.jpg": ((10, 10, 250), 1),
    "35_1_3_20170109150557338.jpg.chip.jpg": ((200, 200, 10), 3),
    "61_0_4_20170109150557339.jpg": ((10, 200, 200), 6),
    "116_1_0_2017.jpg": ((128, 128, 128), 6),
}


@pytest.fixture
def faces_dir(tmp_path):
    """``tmp_path/UTKFace`` with the 20 x 20 single-colour images of ``FACES``, and a landmarks file to ignore."""
    image = pytest.importorskip("PIL.Image")
    root = tmp_path / "UTKFace"
    root.mkdir()
    for name, (colour, _) in FACES.items():
        image.new("RGB", (20, 20), colour).save(root / name, quality=95)
    (root / "landmarks.txt").write_text("not an image")
    return root


def by_name(data):
    """{file name: (x, [age, gender, race])} over both splits."""
    out = {}
    for split in (data.train, data.test):
        x, ys = all_of(split)
        for k, path in enumerate(split.paths):
            out[path.name] = (x[k], [int(y[k]) for y in ys])
    return out


def test_utkface_reads_images_and_names(faces_dir):
    data = load_dataset("utkface", faces_dir, image_size=8)
    assert [(t.name, t.out_features) for t in data.tasks] == [("age", 7), ("gender", 2), ("race", 5)]
    assert (len(data.train), len(data.test)) == (5, 1) and data.train.input_shape == (3, 8, 8)
    x, ys = all_of(data.train)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert all(y.dtype == torch.int64 and y.shape == (5,) for y in ys)
    samples = by_name(data)
    assert samples.keys() == FACES.keys()
    for name, (colour, age_group) in FACES.items():
        image, labels = samples[name]
        _, gender, race = parse_name(name)
        assert labels == [age_group, gender, race]
        solid = (torch.tensor(colour) / 255)[:, None, None].expand(3, 8, 8)
        torch.testing.assert_close(image, solid, atol=0.03, rtol=0)  # JPEG is lossy


def test_utkface_split_is_seeded_and_matches_random_split(faces_dir):
    a, b, c = (load_dataset("utkface", faces_dir, seed=s, test_fraction=0.5) for s in (0, 0, 1))
    assert [p.name for p in a.train.paths] == [p.name for p in b.train.paths]
    assert [p.name for p in a.train.paths] != [p.name for p in c.train.paths]
    assert not set(a.train.paths) & set(a.test.paths) and len(a.train.paths) + len(a.test.paths) == 6
    names = sorted(FACES)
    train, test = torch.utils.data.random_split(names, [3, 3], generator=torch.Generator().manual_seed(1))
    assert [p.name for p in c.train.paths] == list(train) and [p.name for p in c.test.paths] == list(test)
    cut = load_dataset("utkface", faces_dir, seed=1, test_fraction=0.5, train_size=2)
    assert cut.train.paths == c.train.paths[:2] and cut.test.paths == c.test.paths


def test_utkface_bad_names(faces_dir):
    bad = ["39_1_20170116174525125.jpg.chip.jpg", "30_2_0_1.jpg", "30_0_5_1.jpg", "x_0_0_1.jpg"]
    for name in bad:
        shutil.copy(faces_dir / next(iter(FACES)), faces_dir / name)
    with pytest.raises(DataError) as error:
        load_dataset("utkface", faces_dir)
    message = str(error.value)
    assert "4 image names" in message and "skip_bad_names=True" in message
    assert "30_0_5_1.jpg, 30_2_0_1.jpg, 39_1_20170116174525125.jpg.chip.jpg" in message
    with pytest.warns(UserWarning, match="left out 4 UTKFace images"):
        data = load_dataset("utkface", faces_dir, skip_bad_names=True)
    assert by_name(data).keys() == FACES.keys()


def test_utkface_parse_name():
    assert parse_name("26_0_2_20170104023102422.jpg.chip.jpg") == (26, 0, 2)
    assert parse_name("26_1_4_a_b.JPG") == (26, 1, 4)
    for name in ["26_0_2.jpg", "26_0_2_1.png", "26_0_2_1.jpg.txt", "-1_0_0_1.jpg", "26_0_9_1.jpg", "2 6_0_0_1.jpg"]:
        assert parse_name(name) is None, name


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "all bad"])
def test_utkface_malformed_folders(faces_dir, case):
    fragments = {"missing": "is not a folder", "empty": "no .jpg images in", "corrupt": "cannot read the image",
                 "all bad": "none of the 6 image names"}[case]
    if case == "missing":
        shutil.rmtree(faces_dir)
    elif case == "empty":
        [p.unlink() for p in faces_dir.glob("*.jpg")]
    elif case == "corrupt":
        (faces_dir / "0_0_0_broken.jpg").write_bytes(b"not a jpeg")  # sorts first, so it is read at load time
    else:
        [p.rename(faces_dir / ("x" + p.name)) for p in faces_dir.glob("*.jpg")]
    with warnings.catch_warnings(), pytest.raises(DataError, match=fragments):
        warnings.simplefilter("ignore")
        load_dataset("utkface", faces_dir, skip_bad_names=True)


def png_header(width: int, height: int) -> bytes:
    """A PNG of nothing but its signature, an IHDR chunk claiming ``width`` x ``height`` RGB pixels, and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


BAD_IMAGES = {  # file content -> what the message must say besides the file's name
    # Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS, and only warns between once and twice it.
    "30000 x 30000 PNG": (png_header(30000, 30000), "could be decompression bomb"),
    "10000 x 10000 PNG": (png_header(10000, 10000), "could be decompression bomb"),
    "text": (b"<html>not found</html>", "cannot identify image file"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_utkface_checks_every_image_at_load(faces_dir, case):
    # "20_..." sorts after the first image, the only one read at load before
    content, message = BAD_IMAGES[case]
    (faces_dir / "20_0_0_bad.jpg").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning let through would fail the test too
        with pytest.raises(DataError, match=f"cannot read the image .*20_0_0_bad.jpg: .*{message}"):
            load_dataset("utkface", faces_dir, test_fraction=0.5)


def test_utkface_batch_names_an_image_broken_past_its_header(faces_dir):
    data = load_dataset("utkface", faces_dir, test_fraction=0.5)
    broken = data.train.paths[-1]
    broken.write_bytes(png_header(20, 20))  # a valid header, no pixel data: only decoding finds out
    with pytest.raises(DataError, match=f"cannot read the image .*{broken.name}"):
        all_of(data.train)


@pytest.mark.parametrize("options, message", [({"test_fraction": 1.0}, "test_fraction must be between 0 and 1"),
                                               ({"test_fraction": 0.01}, "the test split of the 6 images .* is empty"),
                                               ({"image_size": 0}, r"image_size must be an integer in 1\.\.512, got 0"),
                                               # one past the bound: were it accepted, this test stays cheap
                                               ({"image_size": 513}, r"image_size must be an integer in 1\.\.512"),
                                               ({"image_size": 2.5}, r"image_size must be an integer")])
def test_utkface_rejects_bad_options(faces_dir, options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("utkface", faces_dir, **options)


def test_age_groups_follow_the_dgr_bins():
    from dgr_fast.data.utkface import age_group

    ages = torch.tensor([0, 1, 10, 11, 20, 21, 50, 51, 60, 61, 116])
    assert age_group(ages).tolist() == [0, 0, 0, 1, 1, 2, 4, 5, 5, 6, 6]
