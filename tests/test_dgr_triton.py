"""The ``triton`` backend of the DGR penalty (dgr_fast/kernels/dgr_penalty.py) against the ground truth.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1), so the
shapes are small and the grids a handful of programs; an ahead-of-time compile for sm_90 checks that the same kernels
build for real hardware. With a GPU the same comparisons run on CUDA tensors, plus bf16 and the benchmark shapes.

Every buffer the kernels fill is NaN-poisoned (autouse fixture), so an element a kernel fails to write shows up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import dgr_fast
from dgr_fast.backends import triton_interpreting
from dgr_fast.ops import dgr_penalty as op

triton = pytest.importorskip("triton")
from dgr_fast.kernels import dgr_penalty as kernels  # noqa: E402  (needs triton)

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible to torch here)")
DEVICE = "cuda" if CUDA else "cpu"  # CPU tensors only run in the interpreter
if not CUDA and not triton_interpreting():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set: the triton backend cannot run", allow_module_level=True)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs (partials, dz) start as NaN: an unwritten element would survive into the result."""

    def nan_filled(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_new_output", nan_filled)


# ---------------------------------------------------------------------------------------------------------------
# Problem builder: odd sizes, every loss, ignore_index, masks (one task with no valid row), biases None for some.

TASKS = (("ce", 5), ("bce", 3), ("mse", 2), ("l1", 1), ("ce", 3))  # the last one: masked out entirely
IGNORE = -1


@dataclasses.dataclass
class Problem:
    features: torch.Tensor
    weights: list
    biases: list
    targets: list
    losses: list
    masks: list

    def penalty(self, backend, **kwargs):
        return dgr_fast.dgr_penalty(
            self.features, self.weights, self.biases, self.targets, self.losses, masks=self.masks,
            ignore_index=IGNORE, backend=backend, **kwargs,
        )

    def packed(self):
        return op.pack(self.features, self.weights, self.biases, self.targets, self.losses, self.masks,
                       [IGNORE] * len(self.losses), ["mean"] * len(self.losses))


def make_features(layout: str, dtype, device, generator, n=37, d=29, b=2, hw=(5, 7)) -> torch.Tensor:
    """Features of the given layout, with a non-trivial memory layout where the name says so."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "rows":
        return randn(n, d)
    if layout == "rows_transposed":  # D stride N, row stride 1
        return randn(d, n).t()
    if layout == "rows_sliced":  # row stride 2 * (d + 3), offset start
        return randn(2 * n, d + 3)[::2, 2 : 2 + d]
    if layout == "dense":
        return randn(b, d, *hw)
    if layout == "dense_channels_last":  # D stride 1, pixel stride D
        return randn(b, d, *hw).contiguous(memory_format=torch.channels_last)
    if layout == "dense_sliced":  # spatial dims that do not merge: the op flattens them with a copy
        return randn(b, d, hw[0], hw[1] + 2)[..., 1 : 1 + hw[1]]
    raise ValueError(layout)


def make_problem(features: torch.Tensor, generator, tasks=TASKS, scale=1.0, empty_last=True) -> Problem:
    """Heads, targets and masks for ``features``; heads are ``scale / sqrt(D)`` so logits are O(scale)."""
    device, acc = features.device, op.accumulation_dtype(features.dtype)
    d = features.shape[1]
    row_shape = features.shape[:1] + features.shape[2:]

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)

    def rand_mask():
        return (torch.rand(row_shape, generator=generator) < 0.7).to(device)

    weights, biases, targets, masks = [], [], [], []
    for k, (loss, c) in enumerate(tasks):
        weights.append(randn(c, d) * (scale / max(d, 1) ** 0.5))
        biases.append(None if loss in ("bce", "l1") else randn(c))
        if loss == "ce":
            y = torch.randint(0, c, row_shape, generator=generator)
            y[torch.rand(row_shape, generator=generator) < 0.2] = IGNORE
            targets.append(y.to(device))
        elif loss == "bce":
            targets.append(torch.rand(row_shape[:1] + (c,) + row_shape[1:], generator=generator, dtype=torch.float64).to(device, acc))
        else:
            targets.append(randn(*row_shape[:1], c, *row_shape[1:]))
        masks.append(None if k == 0 else rand_mask())
    if empty_last:
        masks[-1] = torch.zeros(row_shape, dtype=torch.bool, device=device)
    return Problem(features, weights, biases, targets, [loss for loss, _ in tasks], masks)


def value_and_grad(problem: Problem, backend: str, **kwargs):
    features = problem.features.detach().requires_grad_()
    value = dataclasses.replace(problem, features=features).penalty(backend, **kwargs)
    (grad,) = torch.autograd.grad(value, features)
    return value.detach(), grad


def assert_close(actual, expected, tol, what):
    """Max abs error within ``tol`` of the expected tensor's max magnitude (and everything finite)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten or overflowed)"
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def compare_with_reference(problem: Problem, tol: float, reference_dtype=None, **kwargs):
    """Value and feature gradient of the triton backend vs the reference (on features cast to reference_dtype)."""
    value, grad = value_and_grad(problem, "triton", **kwargs)
    ref_problem = problem if reference_dtype is None else dataclasses.replace(problem, features=problem.features.to(reference_dtype))
    ref_value, ref_grad = value_and_grad(ref_problem, "reference", **kwargs)
    assert grad.dtype == problem.features.dtype and grad.shape == problem.features.shape
    assert ref_value.abs() > 0 and ref_grad.abs().max() > 0, "degenerate problem: nothing to compare"
    assert_close(value, ref_value, tol, "penalty")
    assert_close(grad, ref_grad, tol, "features gradient")


LAYOUTS = ("rows", "rows_transposed", "rows_sliced", "dense", "dense_channels_last", "dense_sliced")
VARIANTS = {
    "mean": dict(reductions="mean"),
    "row_mean-l2-weighted": dict(reductions=("row_mean", "mean", "row_mean", "row_mean", "mean"), norm="l2", task_weights=(0.5, 2.0, 1.0, 1.5, 3.0)),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_matches_reference(dtype, layout, variant):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{layout}-{variant}-{dtype}".encode()))
    problem = make_problem(make_features(layout, dtype, DEVICE, gen), gen)
    compare_with_reference(problem, TOL[dtype], **VARIANTS[variant])


@pytest.fixture
def small_blocks(monkeypatch):
    """16-row blocks, 16-wide D tiles and at most 3 programs: rows span blocks and programs, D spans tiles."""
    config = kernels._config

    def small(rows, num_cols, width, dtype, gpu_programs):
        cfg = config(rows, num_cols, width, dtype, gpu_programs)
        return dataclasses.replace(cfg, block_r=16, block_d=16, programs=min(3, triton.cdiv(rows, 16)))

    monkeypatch.setattr(kernels, "_config", small)


@pytest.mark.parametrize("layout", ["rows_transposed", "dense_channels_last", "dense"])
def test_many_blocks_programs_and_d_tiles(small_blocks, layout):
    gen = torch.Generator().manual_seed(7)
    features = make_features(layout, torch.float64, DEVICE, gen, n=101, d=37, b=3, hw=(5, 7))
    problem = make_problem(features, gen)
    rows = features.numel() // features.shape[1]  # 101 or 3 * 35 = 105
    cfg = kernels._config(rows, 14, 37, torch.float64, None)
    assert (triton.cdiv(rows, cfg.block_r), cfg.programs, triton.cdiv(37, cfg.block_d)) == (7, 3, 3)  # blocks, programs, D tiles
    compare_with_reference(problem, TOL[torch.float64], reductions="row_mean")


def test_d_larger_than_one_tile_and_wide_heads():
    """D = 150 spans three default D tiles; 34 columns pad to 64 and three ce segments share a row."""
    gen = torch.Generator().manual_seed(11)
    features = make_features("rows", torch.float64, DEVICE, gen, n=45, d=150)
    tasks = (("ce", 20), ("bce", 2), ("ce", 7), ("l1", 2), ("ce", 3))
    problem = make_problem(features, gen, tasks=tasks, empty_last=False)
    cfg = kernels._config(45, 34, 150, torch.float64, None)
    assert cfg.block_c == 64 and triton.cdiv(150, cfg.block_d) > 1
    compare_with_reference(problem, TOL[torch.float64])


def test_segment_softmax_is_stable_with_large_logits():
    """Logits of O(1000) in one ce task and O(1) in another: each segment is shifted by its own max."""
    gen = torch.Generator().manual_seed(5)
    features = make_features("rows", torch.float64, DEVICE, gen, n=33, d=17)
    problem = make_problem(features, gen, tasks=(("ce", 4), ("ce", 3), ("bce", 2)), empty_last=False)
    problem.weights[0] = problem.weights[0] * 3000
    problem.weights[2] = problem.weights[2] * 300  # sigmoid saturates to 0 / 1 without NaN
    p = problem.packed()
    g_w, g_b = kernels.forward(p.z3, p.weight, p.bias, p.rows.y, p.rows.omega, p.losses, p.col_offsets, p.rows.y_offsets)
    ref_w, ref_b = op._torch_gradients(p.z3, p.weight, p.bias, torch.ones_like(p.bias), p.rows.y, p.labels, p.rows.omega, p.losses, p.col_offsets, p.rows.y_offsets)
    assert_close(g_w, ref_w, 1e-11, "G_W")
    assert_close(g_b, ref_b, 1e-11, "G_b")


@pytest.mark.parametrize("layout", ["rows_sliced", "dense_channels_last"])
def test_kernels_called_directly_match_the_torch_spec(layout):
    """forward / backward on packed inputs vs _torch_gradients / _torch_features_grad, outputs NaN-poisoned."""
    gen = torch.Generator().manual_seed(3)
    problem = make_problem(make_features(layout, torch.float32, DEVICE, gen), gen)
    problem.targets[0].view(-1)[:5] = IGNORE  # the first 5 rows: no task valid
    for mask in problem.masks[1:]:
        mask.view(-1)[:5] = False
    p = problem.packed()
    g_w, g_b = kernels.forward(p.z3, p.weight, p.bias, p.rows.y, p.rows.omega, p.losses, p.col_offsets, p.rows.y_offsets)
    ref_w, ref_b = op._torch_gradients(p.z3, p.weight, p.bias, torch.ones_like(p.bias), p.rows.y, p.labels, p.rows.omega, p.losses, p.col_offsets, p.rows.y_offsets)
    assert g_w.dtype == g_b.dtype == torch.float32
    assert_close(g_w, ref_w, 2e-5, "G_W")
    assert_close(g_b, ref_b, 2e-5, "G_b")
    gt_w = torch.randn(p.weight.shape, generator=gen).to(DEVICE)
    gt_b = torch.randn(p.bias.shape, generator=gen).to(DEVICE)
    dz = kernels.backward(p.z3, p.weight, p.bias, p.rows.y, p.rows.omega, gt_w, gt_b, p.losses, p.col_offsets, p.rows.y_offsets)
    ref = op._torch_features_grad(p.z3, p.weight, p.bias, p.rows.y, p.labels, p.rows.omega, gt_w, gt_b, p.losses, p.col_offsets, p.rows.y_offsets)
    assert dz.is_contiguous() and dz.dtype == p.z3.dtype
    assert_close(dz, ref, 2e-5, "dz")
    # Rows where no task is valid get exactly 0.
    dead = (p.rows.omega == 0).all(1)
    assert dead[:5].all()
    assert (dz.transpose(1, 2).reshape(-1, dz.shape[1])[dead] == 0).all()  # rows in (b, p) order


def test_nothing_valid_gives_zero_not_nan():
    gen = torch.Generator().manual_seed(9)
    problem = make_problem(make_features("dense", torch.float64, DEVICE, gen), gen)
    problem.masks = [torch.zeros_like(problem.masks[-1]) for _ in problem.losses]
    value, grad = value_and_grad(problem, "triton", norm="l2")
    assert value.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_no_rows_and_no_width():
    """Zero rows (called directly: nothing to launch, zeros out) and D = 0 (only the biases count)."""
    f64 = dict(dtype=torch.float64, device=DEVICE)
    z3 = torch.empty(0, 4, 1, **f64)
    weight, bias = torch.randn(3, 4, **f64), torch.randn(3, **f64)
    y, omega = torch.empty(0, 1, **f64), torch.empty(0, 1, **f64)
    g_w, g_b = kernels.forward(z3, weight, bias, y, omega, [0], [0, 3], [0, 1])
    assert torch.equal(g_w, torch.zeros(3, 4, **f64)) and torch.equal(g_b, torch.zeros(3, **f64))
    dz = kernels.backward(z3, weight, bias, y, omega, weight, bias, [0], [0, 3], [0, 1])
    assert dz.shape == z3.shape
    gen = torch.Generator().manual_seed(31)
    problem = make_problem(torch.empty(6, 0, dtype=torch.float64, device=DEVICE), gen, tasks=(("ce", 3), ("mse", 2)), empty_last=False)
    value = problem.penalty("triton")
    assert torch.allclose(value, problem.penalty("reference"), rtol=1e-12) and value > 0


@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_gradcheck_fp64(layout):
    gen = torch.Generator().manual_seed(13)
    features = make_features(layout, torch.float64, DEVICE, gen, n=5, d=3, b=1, hw=(2, 3))
    tasks = (("ce", 3), ("bce", 2), ("mse", 2), ("l1", 1))
    problem = make_problem(features, gen, tasks=tasks, empty_last=False)

    def penalty(x):
        return dataclasses.replace(problem, features=x).penalty("triton", norm="l2")

    assert torch.autograd.gradcheck(penalty, (features.detach().requires_grad_(),))


def test_fp16_features_match_fp32_reference():
    gen = torch.Generator().manual_seed(17)
    features = make_features("dense_channels_last", torch.float16, DEVICE, gen)
    problem = make_problem(features, gen)
    compare_with_reference(problem, TOL[torch.float16], reference_dtype=torch.float32)


@pytest.mark.skipif(not CUDA, reason="bf16 runs on a GPU only: the Triton interpreter's bf16 arithmetic is wrong (docs/DESIGN.md section 3)")
@pytest.mark.parametrize("layout", ["rows", "dense"])
def test_bf16_features_match_fp32_reference(layout):
    gen = torch.Generator().manual_seed(19)
    features = make_features(layout, torch.bfloat16, "cuda", gen, n=301, d=200, b=3, hw=(17, 23))
    compare_with_reference(make_problem(features, gen), TOL[torch.bfloat16], reference_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: the benchmark shapes, and run-to-run determinism of the partial reduction.

BENCH = {
    "dense-d64": dict(shape=(8, 64, 288, 384)),
    "dense-d2048": dict(shape=(8, 2048, 36, 48)),
}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", BENCH)
def test_benchmark_shapes_on_gpu(shape, dtype):
    gen = torch.Generator().manual_seed(23)
    b, d, h, w = BENCH[shape]["shape"]
    features = torch.randn(b, d, h, w, generator=gen).to("cuda", dtype)
    problem = make_problem(features, gen, tasks=(("ce", 13), ("l1", 1), ("l1", 3)), empty_last=False)
    problem.masks[0] = None  # seg: ignore_index only; depth and normals: masks
    value, grad = value_and_grad(problem, "triton", reductions="row_mean")
    ref_value, ref_grad = value_and_grad(dataclasses.replace(problem, features=features.float()), "torch", reductions="row_mean")
    tol = TOL[dtype] if dtype != torch.float32 else 1e-4  # long fp32 sums in different orders
    assert_close(value, ref_value, tol, "penalty")
    assert_close(grad, ref_grad, tol, "features gradient")


@needs_gpu
def test_deterministic_on_gpu():
    gen = torch.Generator().manual_seed(29)
    features = torch.randn(4, 256, 40, 50, generator=gen).to("cuda")
    problem = make_problem(features, gen)
    first = value_and_grad(problem, "triton")
    second = value_and_grad(problem, "triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90 (real Triton, not the interpreter), in a subprocess without TRITON_INTERPRET.

AOT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from dgr_fast.kernels import dgr_penalty as kernels

    z_type = sys.argv[1]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[z_type]
    acc_type = "fp64" if z_type == "fp64" else "fp32"
    # The configuration a GPU launch of the dense benchmark shape (17 columns, D = 64) gets.
    cfg = kernels._config(8 * 288 * 384, 17, 64, dtype, gpu_programs=264)
    constexprs = dict(BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, PRECISION=cfg.precision)
    result = {}
    for fn in (kernels._gradients_kernel, kernels._features_grad_kernel):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("z_ptr", "dz_ptr"):
                signature[name] = "*" + z_type
            elif name == "table_ptr":
                signature[name] = "*i32"
            elif name.endswith("_ptr"):
                signature[name] = "*" + acc_type
            else:
                signature[name] = "i32"
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        )
        result[fn.__name__] = dict(cubin=len(compiled.asm["cubin"]), sm90=".target sm_90" in compiled.asm["ptx"])
    print(json.dumps(result))
    """
)


def _cuda_target_available() -> str | None:
    """None if this triton can compile for CUDA here, else why not."""
    try:
        from triton.backends import backends
    except ImportError as exc:
        return f"triton.backends is not importable: {exc}"
    if "nvidia" not in backends:
        return f"this triton has no NVIDIA backend (it has {sorted(backends)})"
    return None


@pytest.mark.skipif(_cuda_target_available() is not None, reason=str(_cuda_target_available()))
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    # The dtypes compile in parallel: each takes several seconds of a core. fp64 checks that its tl.dot lowers.
    procs = {
        z: subprocess.Popen([sys.executable, "-c", AOT_SCRIPT, z], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for z in ("fp32", "bf16", "fp64")
    }
    for z, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{z}: compile for sm_90 failed:\n{err[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        assert set(result) == {"_gradients_kernel", "_features_grad_kernel"}
        for name, info in result.items():
            assert info["sm90"] and info["cubin"] > 0, f"{z} {name}: {info}"
