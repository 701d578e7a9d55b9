"""The `cpp` backend of dgr_penalty (csrc/cpu/dgr_penalty.cpp) against the reference and the torch closed form."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

from dgr_cases import make_case, penalty_and_grad
from dgr_fast import dgr_penalty
from dgr_fast.ops import dgr_penalty as dp

try:
    importlib.import_module("dgr_fast._C")
    FWD, BWD = torch.ops.dgr_fast_cpu.dgr_penalty_fwd, torch.ops.dgr_fast_cpu.dgr_penalty_bwd
    BWD_STASHED = torch.ops.dgr_fast_cpu.dgr_penalty_bwd_stashed
    BWD_EITHER = dp._kernels("cpp")[1]  # BWD given no stash, else BWD_STASHED into it (returned)
except (ImportError, AttributeError, RuntimeError) as exc:  # not built, built against another torch, or without the ops
    pytest.skip(f"the C++ extension dgr_fast._C with the dgr_penalty ops is not available: {exc}", allow_module_level=True)

REDUCTIONS = ["mean", "row_mean", "mean", "row_mean"]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def _layouts(shape):
    return ["contiguous", "transposed", "sliced"] + (["channels_last"] if len(shape) == 4 else [])


def _assert_close(actual, expected, **tol):
    # Tolerances relative to the largest entry: the gradient has entries near 0 where terms cancel.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape,layout",
    [(s, lay) for s in [(37, 29), (2, 11, 5, 7)] for lay in _layouts(s)] + [((3, 20, 9, 40), "contiguous"), ((300, 40), "contiguous")]
    # many channels: a [D][n] tile holds more than 64 KiB
    + [((2, 515, 3, 7), lay) for lay in ("contiguous", "sliced", "channels_last")],
)
def test_matches_reference(shape, layout, dtype):
    case = make_case(shape, dtype=dtype, layout=layout, seed=len(shape) * 10 + len(layout), empty_task=1)
    kwargs = dict(reductions=REDUCTIONS, task_weights=[0.5, 2.0, 1.0, 1.5])
    value, grad = penalty_and_grad(dgr_penalty, case, backend="cpp", **kwargs)
    ref_value, ref_grad = penalty_and_grad(dgr_penalty, case, backend="reference", **kwargs)
    assert value.dtype == dtype and grad.dtype == dtype and grad.shape == case["features"].shape
    _assert_close(value, ref_value, **TOL[dtype])
    _assert_close(grad, ref_grad, **TOL[dtype])


@pytest.mark.parametrize("norm", ["squared", "l2"])
@pytest.mark.parametrize("reduction", ["mean", "row_mean"])
@pytest.mark.parametrize("loss", ["ce", "bce", "mse", "l1"])
def test_each_loss_alone(loss, reduction, norm):
    # One task per call, with and without a bias, so that an error in one loss's residual cannot hide in the sum.
    for bias in (True, False):
        case = make_case((2, 7, 3, 5), classes=(4,), losses=(loss,), no_bias=() if bias else (0,), seed=3)
        case["masks"] = [torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(4)) < 0.6]
        value, grad = penalty_and_grad(dgr_penalty, case, backend="cpp", reductions=reduction, norm=norm)
        ref_value, ref_grad = penalty_and_grad(dgr_penalty, case, backend="reference", reductions=reduction, norm=norm)
        _assert_close(value, ref_value, **TOL[torch.float64])
        _assert_close(grad, ref_grad, **TOL[torch.float64])


def test_nothing_valid_gives_zero():
    case = make_case((9, 6), classes=(3, 2), losses=("ce", "l1"), seed=5)
    case["masks"] = [torch.zeros(9, dtype=torch.bool)] * 2
    for norm in ("squared", "l2"):
        value, grad = penalty_and_grad(dgr_penalty, case, backend="cpp", norm=norm)
        assert value.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 2, 3)])
def test_gradcheck(shape):
    case = make_case(shape, seed=6)
    features = case.pop("features").detach().requires_grad_(True)

    def penalty(z):
        return dgr_penalty(z, **case, reductions=REDUCTIONS, task_weights=[1.0, 0.5, 2.0, 1.0], backend="cpp")

    assert torch.autograd.gradcheck(penalty, (features,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [((37, 29), "contiguous"), ((2, 11, 5, 7), "contiguous"), ((2, 11, 5, 7), "channels_last")])
def test_half_inputs(shape, layout, dtype):
    # Half features are read as fp32 and the gradient rounded once to the features' dtype: compare with the fp32
    # reference on the same (rounded) features.
    case = make_case(shape, dtype=torch.float32, layout=layout, seed=7)
    half = dict(case, features=case["features"].to(dtype))
    value, grad = penalty_and_grad(dgr_penalty, half, backend="cpp", reductions=REDUCTIONS)
    ref_value, ref_grad = penalty_and_grad(dgr_penalty, dict(case, features=half["features"].float()), backend="reference", reductions=REDUCTIONS)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    _assert_close(value, ref_value, rtol=1e-4, atol=0.0)
    _assert_close(grad.float(), ref_grad, rtol=1e-2, atol=0.0)


def _packed(case, dtype=None):
    features = case["features"] if dtype is None else case["features"].to(dtype)
    return dp.pack(features, case["weights"], case["biases"], case["targets"], case["losses"], case["masks"], [case["ignore_index"]] * len(case["weights"]), REDUCTIONS)


def _poison(like):
    # A freed NaN buffer of dz's size is what the allocator is likely to hand out next: unwritten entries show.
    poison = torch.full(like.shape, float("nan"), dtype=like.dtype)
    del poison


def _can_stash(p):
    return p.z3.dtype == p.weight.dtype and p.col_offsets[-1] <= p.z3.shape[1]


def _direct(p, gt_seed=0, stash=False):
    """The op pair called directly on packed arguments (with ``stash``: the forward keeps the logits where it can and
    the backward writes dz over them), and the torch closed form on the same problem in rows: ``(R, G_W, G_b, dz)``
    of each. The scales the forward finds must be those of the torch ops (``Packed.validity``), bit for bit. The
    backward is given random G and per-task grad, so that every entry of both matters."""
    meta = (p.losses, p.col_offsets)
    _poison(p.z3)  # the stash is dz's buffer, allocated by the forward
    penalties, g_w, g_b, scales, kept = FWD(p.z3, p.weight, p.bias, p.has_bias, p.targets, p.masks, p.ignore_index,
                                            p.per_row, *meta, stash)
    assert torch.equal(scales, p.validity[1])
    assert (kept is not None) == (stash and _can_stash(p))
    gen = torch.Generator().manual_seed(gt_seed)
    rand_w = torch.randn(p.weight.shape, generator=gen, dtype=p.weight.dtype)
    rand_b = torch.randn(p.bias.shape, generator=gen, dtype=p.weight.dtype)
    grad = torch.randn(len(p.losses), generator=gen, dtype=p.weight.dtype)
    _poison(p.z3)
    dz = BWD_EITHER(p.z3, p.weight, p.bias, p.targets, p.masks, p.ignore_index, scales, grad, rand_w, rand_b, *meta, kept)
    z = p.z3.to(p.weight.dtype)
    y, omega, y_offsets = p.rows
    ref_w, ref_b = dp._torch_gradients(z, p.weight, p.bias, p.bias_mask, y, p.labels, omega, p.losses, p.col_offsets, y_offsets)
    scale = dp.row_scale(grad, p.col_offsets)
    ref_dz = dp._torch_features_grad(z, p.weight, p.bias, y, p.labels, omega, scale[:, None] * rand_w, scale * rand_b, p.losses,
                                     p.col_offsets, y_offsets)
    return (penalties, g_w, g_b, dz), (dp.task_penalties(ref_w, ref_b, p.col_offsets), ref_w, ref_b, ref_dz)


@pytest.mark.parametrize("stash", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,layout",
    [((37, 29), lay) for lay in ("contiguous", "transposed", "sliced")]
    + [((2, 11, 5, 7), lay) for lay in ("contiguous", "transposed", "sliced", "channels_last")]
    + [((3, 9, 1, 131), "contiguous"), ((130, 3), "contiguous"), ((1, 1), "contiguous")]
    + [((2, 515, 3, 7), lay) for lay in ("contiguous", "transposed", "sliced")]
    # wide dense tiles (128 pixels of 300 channels), the last one partial
    + [((1, 300, 2, 150), "contiguous")],
)
def test_direct_call_writes_everything(shape, layout, dtype, stash):
    # Odd sizes: partial tiles, partial vectors and partial register blocks in every layout the kernels tell apart
    # (pixels contiguous, channels contiguous, gathered, converted from fp16/bf16), with and without a stash (none
    # for fp16/bf16, nor where C > D: (130, 3), (1, 1)).
    case = make_case(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32, layout=layout, seed=8)
    p = _packed(case, dtype)
    (penalties, g_w, g_b, dz), (ref_penalties, ref_w, ref_b, ref_dz) = _direct(p, stash=stash)
    assert dz.dtype == dtype and dz.shape == p.z3.shape and dz.is_contiguous()
    assert penalties.dtype == g_w.dtype == g_b.dtype == p.weight.dtype
    tol = TOL.get(dtype, dict(rtol=1e-2, atol=0.0))
    acc_tol = TOL[p.weight.dtype]
    _assert_close(g_w, ref_w, **acc_tol)
    _assert_close(g_b, ref_b, **acc_tol)
    _assert_close(penalties, ref_penalties, **acc_tol)
    assert not dz.isnan().any()
    _assert_close(dz.to(ref_dz.dtype), ref_dz, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape,layout",
    [((2, 11, 5, 7), lay) for lay in ("contiguous", "sliced", "channels_last")] + [((37, 29), "transposed"),
     ((300, 40), "contiguous"), ((2, 16, 40, 50), "contiguous")],
)
def test_stash_gives_the_recomputed_result_bit_for_bit(shape, layout, dtype):
    # The stashed logits are the values the backward would recompute (same sums in the same order), so dz must not
    # change by a bit.
    p = _packed(make_case(shape, dtype=dtype, layout=layout, seed=15))
    kept, recomputed = _direct(p, stash=True)[0], _direct(p, stash=False)[0]
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 11, 5, 7), (7, 3)])
def test_a_stash_serves_one_backward_and_a_second_recomputes(shape):
    # Through dgr_penalty: the forward keeps its logits in dz's buffer when the features need a gradient ((7, 3):
    # more logit columns than channels, so no stash). After retain_graph=True a second backward must recompute them,
    # the first having turned the buffer into its dz, and leave that first result as it was.
    case = make_case(shape, dtype=torch.float64, seed=16)
    features = case.pop("features").detach().requires_grad_(True)
    value = dgr_penalty(features, **case, backend="cpp")
    (first,) = torch.autograd.grad(value, features, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(value, features)
    (ref,) = torch.autograd.grad(dgr_penalty(features, **case, backend="reference"), features)
    assert torch.equal(first, kept) and torch.equal(first, second)
    _assert_close(first, ref, **TOL[torch.float64])


@pytest.mark.parametrize("stash", [False, True])
@pytest.mark.parametrize("shape,layout", [((2, 11, 5, 7), "contiguous"), ((37, 29), "contiguous"), ((2, 11, 5, 7), "channels_last")])
def test_the_backward_leaves_out_tasks_whose_grad_is_zero(shape, layout, stash):
    # A task with dR_t = 0 adds exactly 0 to dz, so the backward computes the others only: dz must be the one of the
    # problem made of those tasks alone, bit for bit (with a stash, their logits are read from among all of them);
    # with every dR_t = 0, exact zeros.
    dtype = torch.float32
    case = make_case(shape, dtype=dtype, layout=layout, seed=17)
    p = _packed(case)
    meta = (p.losses, p.col_offsets)
    *_, scales, kept = FWD(p.z3, p.weight, p.bias, p.has_bias, p.targets, p.masks, p.ignore_index, p.per_row, *meta, stash)
    assert (kept is not None) == stash
    gen = torch.Generator().manual_seed(18)
    g_w, g_b = torch.randn(p.weight.shape, generator=gen), torch.randn(p.bias.shape, generator=gen)
    grad = torch.tensor([1.5, 0.0, -0.7, 0.0])

    def backward(grad, stash):
        return BWD_EITHER(p.z3, p.weight, p.bias, p.targets, p.masks, p.ignore_index, scales, grad, g_w, g_b, *meta, stash)

    keep = [0, 2]
    sub = dp.pack(case["features"], [case["weights"][t] for t in keep], [case["biases"][t] for t in keep],
                  [case["targets"][t] for t in keep], [case["losses"][t] for t in keep], [case["masks"][t] for t in keep],
                  [case["ignore_index"]] * 2, [REDUCTIONS[t] for t in keep])
    columns = torch.cat([torch.arange(p.col_offsets[t], p.col_offsets[t + 1]) for t in keep])
    expected = BWD(sub.z3, sub.weight, sub.bias, sub.targets, sub.masks, sub.ignore_index, scales[keep], grad[keep],
                   g_w[columns], g_b[columns], sub.losses, sub.col_offsets)
    dz = backward(grad, None if kept is None else kept.clone())
    assert torch.equal(dz, expected)
    assert torch.equal(backward(torch.zeros(4), kept), torch.zeros_like(dz))


def test_rows_without_any_valid_task_get_exact_zeros():
    case = make_case((3, 6, 4, 9), seed=9, dtype=torch.float32)
    dead = torch.zeros(3, 4, 9, dtype=torch.bool)
    dead[1] = True
    dead[2, :, 5:] = True
    case["masks"] = [~dead] * 4
    case["targets"][0] = torch.where(dead, -1, case["targets"][0])
    p = _packed(case)
    for stash in (False, True):
        (*_, dz), (*_, ref_dz) = _direct(p, stash=stash)
        assert torch.equal(dz.reshape(3, 6, 4, 9).permute(0, 2, 3, 1)[dead], torch.zeros(int(dead.sum()), 6))
        _assert_close(dz, ref_dz, **TOL[torch.float32])


@pytest.mark.parametrize("shape,layout", [((2, 16, 40, 50), "contiguous"), ((3000, 24), "contiguous"), ((2, 16, 40, 50), "channels_last")])
def test_independent_of_thread_count(shape, layout):
    # Several forward blocks (1024+ rows each): their partial sums are added in block order, whatever the threads.
    # (Only an extension compiled with -fopenmp runs them on several threads; this also catches a blocking that
    # depends on the thread count.)
    p = _packed(make_case(shape, dtype=torch.float32, layout=layout, seed=10))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _direct(p)[0]
        torch.set_num_threads(2)
        two = _direct(p)[0]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_refuses_bad_arguments():
    p = _packed(make_case((5, 40), dtype=torch.float32, seed=11))  # D >= C: the forward returns a stash
    meta = (p.losses, p.col_offsets)
    good = dict(z3=p.z3, weight=p.weight, bias=p.bias, has_bias=p.has_bias, targets=p.targets, masks=p.masks,
                ignore_index=p.ignore_index, per_row=p.per_row)

    def fwd(**override):
        a = {**good, **override}
        return FWD(a["z3"], a["weight"], a["bias"], a["has_bias"], a["targets"], a["masks"], a["ignore_index"],
                   a["per_row"], *override.pop("meta", meta), True)

    def task(t, value, items):
        return [value if k == t else x for k, x in enumerate(items)]

    ce = p.losses.index(dp.LOSS_CODES["ce"])
    other = next(t for t, code in enumerate(p.losses) if code != dp.LOSS_CODES["ce"])
    masked = next(t for t, m in enumerate(p.masks) if m is not None)
    cases = [
        (dict(z3=p.z3.to(torch.int32)), "z3 must be float32"),
        (dict(z3=p.z3[..., 0]), r"z3 must be \[B, D, P\]"),
        (dict(weight=p.weight.double()), "weight must be Float"),
        (dict(weight=p.weight[:, :2]), "weight must have shape"),
        (dict(weight=p.weight.t().contiguous().t()), "weight must be contiguous"),
        (dict(targets=task(ce, p.targets[ce].float(), p.targets)), rf"targets\[{ce}\] \(ce\) must be Long"),
        (dict(targets=task(ce, p.targets[ce][:2], p.targets)), rf"targets\[{ce}\] \(ce\) must have shape"),
        (dict(targets=task(other, p.targets[other].double(), p.targets)), rf"targets\[{other}\] must be Float"),
        (dict(targets=task(other, p.targets[other][:, :1], p.targets)), rf"targets\[{other}\] must have shape"),
        (dict(targets=p.targets[:-1]), "targets, masks and ignore_index"),
        (dict(ignore_index=p.ignore_index[:-1]), "targets, masks and ignore_index"),
        (dict(masks=task(masked, p.masks[masked].float(), p.masks)), rf"masks\[{masked}\] must be Bool"),
        (dict(masks=task(masked, p.masks[masked][:2], p.masks)), rf"masks\[{masked}\] must have shape"),
        (dict(per_row=p.per_row[:2]), "per_row and has_bias need 4 entries each"),
        (dict(has_bias=p.has_bias[:3]), "per_row and has_bias need 4 entries each"),
        (dict(per_row=[0] * 4), "per_row entries must be >= 1"),
        (dict(meta=([0, 1, 2, 9], meta[1])), "not a loss code"),
        (dict(meta=(meta[0], meta[1][:-1])), "col_offsets needs"),
        (dict(meta=(meta[0], [0, 5, 5, 7, 8])), "columns"),
    ]
    for override, message in cases:
        with pytest.raises(RuntimeError, match=message):
            fwd(**override)
    penalties, g_w, g_b, scales, stash = fwd()

    def bwd(scales=scales, grad=torch.ones_like(penalties), g_w=g_w):
        return BWD(p.z3, p.weight, p.bias, p.targets, p.masks, p.ignore_index, scales, grad, g_w, g_b, *meta)

    def bwd_stashed(stash=stash, z3=p.z3):
        return BWD_STASHED(stash, z3, p.weight, p.bias, p.targets, p.masks, p.ignore_index, scales, penalties, g_w, g_b, *meta)

    for override, message in [(dict(stash=stash[:1]), "stash must have shape"), (dict(stash=stash.double()), "stash must be Float"),
                              (dict(z3=p.z3.half()), "a stash needs float32/float64 features")]:
        with pytest.raises(RuntimeError, match=message):
            bwd_stashed(**override)

    for override, message in [(dict(g_w=g_w[:2]), "g_w must have shape"), (dict(scales=scales[:2]), "scales must have shape"),
                              (dict(scales=scales.double()), "scales must be Float"), (dict(grad=penalties[:2]), "grad must have shape"),
                              (dict(grad=penalties.double()), "grad must be Float")]:
        with pytest.raises(RuntimeError, match=message):
            bwd(**override)


def test_class_indices_are_checked_in_the_kernel():
    # The cpp forward checks the class indices of the rows it counts, as it stages them: the error must be the one the
    # torch ops give for the other backends, naming the task and its first bad index in row order, also when bad
    # indices lie in several forward blocks (3000 rows make 8 of them) and in several tasks.
    case = make_case((3000, 8), classes=(5, 3), losses=("ce", "ce"), seed=14)
    first, second = case["targets"][0].clone(), case["targets"][1].clone()
    first[[2100, 2900]], second[[700, 1500]] = torch.tensor([5, -7]), torch.tensor([9, 3])
    case["masks"] = [None, torch.arange(3000) != 700]  # the mask hides task 1's index 9: its first bad one is row 1500
    second[1500] = -2
    for targets, expected in [([first, case["targets"][1]], r"targets\[0\] holds class index 5 outside \[0, 5\)"),
                              ([case["targets"][0], second], r"targets\[1\] holds class index -2 outside \[0, 3\)")]:
        for backend in ("cpp", "torch", "reference"):
            with pytest.raises(ValueError, match=expected + r" \(C_k = weights\[\d\]\.shape\[0\]; ignore_index = -1\)"):
                dgr_penalty(**dict(case, targets=targets), backend=backend)


def test_reads_targets_and_masks_in_place_in_any_layout():
    # The targets and masks are read where they lie (no packed copy): strided views must give exactly what their
    # contiguous copies give, for dense maps and for rows.
    def interleaved(x):  # every element two apart: the row (pixel) stride is 2, the views still merge to [B, C, P]
        return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]

    def channels_last(x):  # a [B, C, H, W] target with C innermost: the pixel stride is C
        return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if x.dim() == 4 else interleaved(x)

    for shape in ((2, 11, 5, 7), (37, 29)):
        case = make_case(shape, dtype=torch.float32, seed=12)
        for layout in (interleaved, channels_last):
            views = dict(case, targets=[layout(y) for y in case["targets"]],
                         masks=[None if m is None else interleaved(m) for m in case["masks"]])
            assert sum(not y.is_contiguous() for y in views["targets"]) >= 3
            one, two = _direct(_packed(case))[0], _direct(_packed(views))[0]
            for a, b in zip(one, two):
                assert torch.equal(a, b)
    # ... and a case whose targets need a dtype conversion (int32 classes, fp64 regression targets) agrees too.
    case = make_case((2, 11, 5, 7), dtype=torch.float32, seed=13)
    cast = dict(case, targets=[y.int() if not y.is_floating_point() else y.double() for y in case["targets"]])
    for a, b in zip(_direct(_packed(case))[0], _direct(_packed(cast))[0]):
        assert torch.equal(a, b)


@pytest.mark.skipif(os.environ.get("DGR_FAST_CPU_BASELINE") is not None, reason="already running the baseline copy")
def test_baseline_copy():
    # The kernels are compiled twice (AVX2+FMA, and a baseline for other CPUs); on an AVX2 machine only the first runs
    # unless forced. Run the direct-call tests (every dtype and layout), the stash and zero-dR ones again on the
    # baseline copy (its 4-lane horizontal sums must keep the stashed logits bit-exact too).
    env = dict(os.environ, DGR_FAST_CPU_BASELINE="1")
    tests = "direct_call or rows_without or in_place or class_indices or stash or leaves_out"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
