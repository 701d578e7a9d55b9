"""ops.live_taps: a convolution cut to its live kernel taps is the same function as the whole one (values, first
and second derivatives, fp64), on random convolutions of every dimension, stride, dilation and padding."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from dgr_fast.ops.live_taps import cut_convolution, live_range, skip_dead_taps

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def brute_live(size, kernel, stride, padding, dilation):
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [i for i in range(kernel) if any(0 <= r * stride + i * dilation - padding < size for r in range(out))]
    return (live[0], live[-1]) if live else None


def test_live_range_is_its_definition():
    for size, kernel, stride, padding, dilation in itertools.product(range(1, 8), range(1, 5), range(1, 4),
                                                                     range(0, 7), range(1, 5)):
        if size + 2 * padding < dilation * (kernel - 1) + 1:
            continue  # no output position: conv refuses the shape
        assert live_range(size, kernel, stride, padding, dilation) == brute_live(size, kernel, stride, padding,
                                                                                 dilation)


def test_deeplab_rates_on_the_authors_maps():
    """ASPP's 3x3 convolutions (padding = dilation) on the NYUv2 features of the DGR authors' model (36 x 48) and
    on the 24 x 32 map of bench_dgr's small case."""
    assert [live_range(36, 3, 1, r, r) for r in (12, 24, 36)] == [(0, 2), (0, 2), (1, 1)]
    assert [live_range(48, 3, 1, r, r) for r in (12, 24, 36)] == [(0, 2)] * 3
    assert [live_range(24, 3, 1, r, r) for r in (12, 24, 36)] == [(0, 2), (1, 1), (1, 1)]
    assert [live_range(32, 3, 1, r, r) for r in (12, 24, 36)] == [(0, 2), (0, 2), (1, 1)]


def random_conv(rng: random.Random):
    dims = rng.choice([1, 2, 2, 3])
    groups = rng.choice([1, 1, 2])
    c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
    kernel = [rng.randint(1, 5) for _ in range(dims)]
    dilation = [rng.randint(1, 6) for _ in range(dims)]
    stride = [rng.choice([1, 1, 2, 3]) for _ in range(dims)]
    padding = [rng.choice([0, d * (k // 2), rng.randint(0, 9)]) for k, d in zip(kernel, dilation)]
    size = [max(rng.randint(1, 9), d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, padding)]
    batch = rng.choice([[], [rng.randint(1, 2)]])  # conv also takes one unbatched sample
    return dims, groups, c_in, c_out, kernel, dilation, stride, padding, size, batch


@pytest.mark.parametrize("seed", range(4))
def test_cut_convolution_is_the_same_function(seed):
    rng = random.Random(seed)
    cut_cases = 0
    for _ in range(40):
        dims, groups, c_in, c_out, kernel, dilation, stride, padding, size, batch = random_conv(rng)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        x = torch.randn(*batch, c_in, *size, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(c_out, c_in // groups, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True) if rng.random() < 0.5 else None
        conv = CONVS[dims]
        args = (x, w, b, stride, padding, dilation, groups)
        full = conv(*args)
        kernels = []

        def recording(*a, conv=conv, kernels=kernels):
            kernels.append(a[1].shape)
            return conv(*a)

        cut = cut_convolution(recording, *args)
        cut_cases += kernels != [w.shape]
        torch.testing.assert_close(cut, full, rtol=1e-12, atol=1e-12)
        inputs = [t for t in (x, w, b) if t is not None]
        seed_out = torch.randn(full.shape, generator=g, dtype=torch.float64)
        grads_full = torch.autograd.grad(full, inputs, seed_out, create_graph=True)
        grads_cut = torch.autograd.grad(cut, inputs, seed_out, create_graph=True)
        for gf, gc in zip(grads_full, grads_cut):
            torch.testing.assert_close(gc, gf, rtol=1e-12, atol=1e-12)
        # second order: the gradient's own gradient along a random direction
        second = [sum((gr * torch.randn(gr.shape, generator=g.manual_seed(7 + i), dtype=torch.float64)).sum()
                      for i, gr in enumerate(grads)) for grads in (grads_full, grads_cut)]
        for hf, hc in zip(torch.autograd.grad(second[0], inputs, allow_unused=True, materialize_grads=True),
                          torch.autograd.grad(second[1], inputs, allow_unused=True, materialize_grads=True)):
            torch.testing.assert_close(hc, hf, rtol=1e-12, atol=1e-12)
    assert cut_cases >= 5  # the random convolutions do have dead taps, and were cut


def test_the_mode_cuts_every_convolution_call_and_nothing_else():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.conv2d:
                seen.append(tuple(args[1].shape[2:]))
            return func(*args, **(kwargs or {}))

    with Spy(), skip_dead_taps():
        y = F.conv2d(x, w, padding=6, dilation=6)  # every tap but the centre reads the padding: a 1x1 convolution
        y_live = F.conv2d(x, w, padding=1)  # every tap is live: untouched
        y_same = F.conv2d(x, w, padding="same", dilation=6)  # string paddings are left alone
        s = torch.sin(x)
    assert seen == [(1, 1), (3, 3), (3, 3)]
    torch.testing.assert_close(y, F.conv2d(x, w, padding=6, dilation=6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_live, F.conv2d(x, w, padding=1), rtol=0, atol=0)
    torch.testing.assert_close(y_same, F.conv2d(x, w, padding="same", dilation=6), rtol=0, atol=0)
    torch.testing.assert_close(s, torch.sin(x), rtol=0, atol=0)


def test_the_mode_traces_into_one_compiled_graph():
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)

    def f(x, w):
        with skip_dead_taps():
            return F.conv2d(x, w, None, 1, (8, 3), (8, 3))

    explained = torch._dynamo.explain(f)(x, w)
    assert explained.graph_break_count == 0
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, w), F.conv2d(x, w, None, 1, (8, 3), (8, 3)),
                               rtol=1e-12, atol=1e-12)


def test_argument_forms_and_bad_arguments_behave_as_the_convolution():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for kwargs in (dict(padding=(6,), dilation=6), dict(padding=[6, 6], dilation=(6,)), dict(padding=6, dilation=[6]),
                   dict(stride=(2,), padding=6, dilation=6)):
        torch.testing.assert_close(cut_convolution(F.conv2d, x, w, **kwargs), F.conv2d(x, w, **kwargs),
                                   rtol=1e-12, atol=1e-12, msg=str(kwargs))
    for kwargs in (dict(stride=0, padding=6, dilation=6), dict(padding=6, dilation=0), dict(padding=(6, 6, 6))):
        with pytest.raises(RuntimeError) as want:
            F.conv2d(x, w, **kwargs)
        with pytest.raises(RuntimeError) as got:
            cut_convolution(F.conv2d, x, w, **kwargs)
        assert str(got.value) == str(want.value)


def test_nothing_is_cut_under_saved_tensor_hooks():
    """Activation checkpointing replays the forward in the backward, outside the mode: the replay must save the
    tensors the forward saved, so a checkpointed (or otherwise hooked) forward keeps whole kernels."""
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        return F.conv2d(x, w, padding=6, dilation=6).relu()

    with skip_dead_taps():
        y = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)
        grads = torch.autograd.grad(y.sum(), (x, w))
    want = torch.autograd.grad(f(x).sum(), (x, w))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)
