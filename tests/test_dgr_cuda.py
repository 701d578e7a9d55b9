"""The `cuda` backend of the DGR penalty: csrc/cuda/dgr_penalty.cu (kernels) and csrc/cuda/dgr_penalty_cuda.cpp (binding).

- Compile check, no GPU needed: every csrc/cuda/*.cu compiles for sm_90a with nvcc, warnings as errors; dgr_penalty.cu
  is compiled with the binding's extern "C" launcher declarations included first, so a signature that drifts between
  the two files is a compile error here rather than a crash on the GPU.
- The kernels on CPU, no GPU needed: dgr_penalty.cu compiled by the host compiler against a small emulator of the
  CUDA features it uses, its launchers called on CPU tensors and compared with the torch spec (every tile plan,
  layout and dtype path; outputs pre-filled with NaN).
- GPU tests, skipped with the reason unless torch sees a GPU and dgr_fast._C_cuda is built: the backend against
  `reference` (in fp64) through `dgr_fast.dgr_penalty`, the ops called directly against the torch spec with poisoned
  outputs, the size limits, run-to-run determinism, and the benchmark shapes of issue 3.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dgr_fast import dgr_penalty
from dgr_fast.backends import backend_status
from dgr_fast.ops import dgr_penalty as dp

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
# The flags setup.py gives nvcc, for the architecture the project targets; warnings are errors.
NVCC_FLAGS = ["-arch=sm_90a", "-cubin", "-O3", "-std=c++17", "--use_fast_math", "-Werror", "all-warnings"]
LOSSES = ("ce", "bce", "mse", "l1")


# ---------------------------------------------------------------------------------------------------------------
# Compile check


def _nvcc() -> str | None:
    candidates = [shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _launcher_declarations() -> str:
    """The extern "C" block of the binding, between its BEGIN/END marker comments, as a header."""
    text = (CUDA_DIR / "dgr_penalty_cuda.cpp").read_text()
    found = re.search(r"^// BEGIN dgr_penalty\.cu launchers.*?$(.*?)^// END dgr_penalty\.cu launchers", text, re.S | re.M)
    assert found, "dgr_penalty_cuda.cpp lost its '// BEGIN/END dgr_penalty.cu launchers' markers"
    assert "dgr_penalty_cuda_fwd(" in found.group(1) and "dgr_penalty_cuda_bwd(" in found.group(1)
    return "#include <cstdint>\n#include <cuda_runtime_api.h>\n" + found.group(1)


def test_cuda_sources_compile(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, /usr/local/bin, /usr/local/cuda/bin, $CUDA_HOME/bin): not compile-checked")
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert CUDA_DIR / "dgr_penalty.cu" in sources
    header = tmp_path / "dgr_penalty_launchers.h"
    header.write_text(_launcher_declarations())
    jobs = []
    for src in sources:  # all at once: the wall time is that of the slowest file
        extra = ["-include", str(header)] if src.name == "dgr_penalty.cu" else []
        cmd = [nvcc, *NVCC_FLAGS, *extra, "-o", str(tmp_path / f"{src.stem}.cubin"), str(src)]
        jobs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures = []
    for src, proc in jobs:
        out = proc.communicate(timeout=600)[0]
        if proc.returncode != 0 or out.strip():
            failures.append(f"--- {src.name} (exit {proc.returncode}):\n{out}")
    assert not failures, "nvcc " + " ".join(NVCC_FLAGS) + " failed or warned:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# Problems, the spec, comparisons (shared by the CPU-emulator and the GPU tests)


def _ids(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# Views of a larger tensor (base shape, view) per layout, so that z3 = features_3d(features) is not a copy.
# rows [N, D]: contiguous (D stride 1), transposed (rows stride 1), sliced (D stride 2), strided_rows (rows stride 2D).
# maps [B, D, H, W]: contiguous (P stride 1), channels_last (D stride 1), sliced (D stride 2P), generic (neither 1).
_ROW_LAYOUTS = {
    "contiguous": (lambda n, d: (n, d), lambda t: t),
    "transposed": (lambda n, d: (d, n), lambda t: t.t()),
    "sliced": (lambda n, d: (n, 2 * d), lambda t: t[:, ::2]),
    "strided_rows": (lambda n, d: (2 * n, d), lambda t: t[::2]),
}
_MAP_LAYOUTS = {
    "contiguous": (lambda b, d, h, w: (b, d, h, w), lambda t: t),
    "channels_last": (lambda b, d, h, w: (b, h, w, d), lambda t: t.permute(0, 3, 1, 2)),
    "sliced": (lambda b, d, h, w: (b, 2 * d, h, w), lambda t: t[:, ::2]),
    "generic": (lambda b, d, h, w: (b, h, w, d, 2), lambda t: t[..., 0].permute(0, 3, 1, 2)),
}


def make_case(
    shape: tuple[int, ...],
    *,
    classes: tuple[int, ...] = (5, 3, 2, 1),
    losses: tuple[str, ...] = LOSSES,
    dtype: torch.dtype = torch.float32,
    layout: str = "contiguous",
    seed: int = 0,
    ignore_index: int = -1,
    no_bias: tuple[int, ...] = (2,),
    masked: tuple[int, ...] = (1, 3),
    empty_task: int | None = None,
    device: str = "cuda",
) -> dict:
    """Keyword arguments of `dgr_penalty` on `device` for features `[N, D]` or `[B, D, H, W]` laid out as `layout`.

    "ce" targets have ~20% `ignore_index`; tasks in `masked` get a random mask, `empty_task` a mask with no valid row.
    """
    g = torch.Generator().manual_seed(seed)
    layouts = _ROW_LAYOUTS if len(shape) == 2 else _MAP_LAYOUTS
    base_shape, view = layouts[layout]
    base = torch.randn(base_shape(*shape), generator=g).to(device=device, dtype=dtype)
    features = view(base)
    assert features.shape == torch.Size(shape)
    z3 = dp.features_3d(features)
    assert z3.data_ptr() == features.data_ptr() and (layout == "contiguous") == z3.is_contiguous(), "z3 must be a view"
    n, d, spatial = shape[0], shape[1], tuple(shape[2:])
    row_shape = (n, *spatial)
    weights, biases, targets, masks = [], [], [], []
    for k, (c, loss) in enumerate(zip(classes, losses)):
        weights.append((torch.randn(c, d, generator=g) / d**0.5).to(device))
        biases.append(None if k in no_bias else torch.randn(c, generator=g).to(device))
        if loss == "ce":
            y = torch.randint(0, c, row_shape, generator=g)
            y[torch.rand(row_shape, generator=g) < 0.2] = ignore_index
        elif loss == "bce":
            y = torch.rand((n, c, *spatial), generator=g)
        else:
            y = torch.randn((n, c, *spatial), generator=g)
        targets.append(y.to(device))
        mask = torch.rand(row_shape, generator=g) < 0.7 if k in masked else None
        if k == empty_task:
            mask = torch.zeros(row_shape, dtype=torch.bool)
        masks.append(None if mask is None else mask.to(device))
    return dict(
        features=features, weights=weights, biases=biases, targets=targets, losses=list(losses), masks=masks,
        ignore_index=ignore_index,
    )


def _fp64(case: dict) -> dict:
    """The same problem in fp64 (the reference's ground truth; the features' values are those of `case`)."""
    as64 = lambda t: None if t is None else t.double() if t.is_floating_point() else t  # noqa: E731
    return {
        **case,
        "features": case["features"].double(),
        "weights": [as64(w) for w in case["weights"]],
        "biases": [as64(b) for b in case["biases"]],
        "targets": [as64(y) for y in case["targets"]],
    }


def _penalty_and_grad(case: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    features = case["features"].detach().requires_grad_(True)
    value = dgr_penalty(**{**case, "features": features}, **kwargs)
    (grad,) = torch.autograd.grad(value, features)
    return value.detach(), grad


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Every element within rtol of the largest magnitude of `expected` (elementwise relative error is meaningless
    where the exact value is ~0); NaN anywhere fails."""
    actual = actual.double()
    assert torch.isfinite(actual).all(), f"{what}: {int((~torch.isfinite(actual)).sum())} non-finite elements"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30, msg=lambda m: f"{what}: {m}")


RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # half: dz is rounded to the features' dtype


def _packed(case: dict) -> dp.Packed:
    checked = dp._check_inputs(
        case["features"], case["weights"], case["biases"], case["targets"], case["losses"], case["masks"],
        case["ignore_index"], None,
    )
    return dp.pack(case["features"], *checked)


def _op_args(p: dp.Packed) -> tuple:
    """Arguments of the forward op (dgr_penalty_fwd) for a packed problem."""
    return p.z3, p.weight, p.bias, p.rows.y, p.rows.omega, p.losses, p.col_offsets, p.rows.y_offsets


def _bwd_args(p: dp.Packed, gt_w: torch.Tensor, gt_b: torch.Tensor) -> tuple:
    """Arguments of the backward op (dgr_penalty_bwd)."""
    return p.z3, p.weight, p.bias, p.rows.y, p.rows.omega, gt_w, gt_b, p.losses, p.col_offsets, p.rows.y_offsets


def _spec(p: dp.Packed, gt_w: torch.Tensor, gt_b: torch.Tensor):
    """`_torch_gradients` (raw G_b: bias mask of ones) and `_torch_features_grad` in fp64."""
    f = lambda t: t.double()  # noqa: E731
    args = (f(p.rows.y), p.labels, f(p.rows.omega), p.losses, p.col_offsets, p.rows.y_offsets)
    g_w, g_b = dp._torch_gradients(f(p.z3), f(p.weight), f(p.bias), torch.ones_like(f(p.bias)), *args)
    dz = dp._torch_features_grad(f(p.z3), f(p.weight), f(p.bias), *args[:3], f(gt_w), f(gt_b), *args[3:])
    return g_w, g_b, dz


# ---------------------------------------------------------------------------------------------------------------
# The kernels run on CPU: dgr_penalty.cu itself, compiled by the host compiler against a small emulator of the CUDA
# features it uses, so that the index arithmetic, the barriers and the tile plans are exercised without a GPU. Each
# block runs with blockDim real threads; __syncthreads is a block barrier, __shfl_xor_sync a warp exchange between two
# warp barriers (a thread that skips one makes the barrier time out and abort the run, rather than pass); dynamic shared
# memory is an exact-size buffer filled with NaN before every block (a read of an unwritten element shows up as NaN);
# the device (SM count, shared memory limits, blocks per SM) is a parameter, to drive every tile plan.
# Not emulated: memory-model subtleties between barriers, warp-synchronous timing, occupancy from registers.

_EMULATOR = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace emu {
class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long long phase = phase_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++phase_;
      done_.notify_all();
    } else if (!done_.wait_for(lock, std::chrono::seconds(120), [&] { return phase_ != phase; })) {
      std::fprintf(stderr, "emulated CUDA: a barrier timed out: some thread skipped a __syncthreads or a shuffle\n");
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  const unsigned count_;
  unsigned arrived_ = 0;
  unsigned long long phase_ = 0;
};

struct Index { unsigned x = 0, y = 0, z = 0; };
inline thread_local Index thread_idx, block_idx;
inline Index grid_dim;
inline Barrier* block_barrier = nullptr;
inline std::vector<std::unique_ptr<Barrier>> warp_barriers;
inline std::vector<float> lanes;
inline std::vector<unsigned char> shared;
inline int sms = 4, optin = 232448, per_sm = 233472, reserved = 1024, blocks_per_sm = 2;
inline std::map<const void*, int> max_dynamic;
inline cudaError_t last_error = cudaSuccess;
inline long long kernel_grid = 0;

inline float* shared_memory() { return reinterpret_cast<float*>(shared.data()); }
inline void syncthreads() { block_barrier->arrive_and_wait(); }
inline float shfl_xor(unsigned mask, float v, int offset) {
  if (mask != 0xffffffffu || offset <= 0 || offset >= 32) std::abort();
  const unsigned t = thread_idx.x, lane = t % 32;
  lanes[t] = v;
  warp_barriers[t / 32]->arrive_and_wait();
  const float other = lanes[t - lane + (lane ^ offset)];
  warp_barriers[t / 32]->arrive_and_wait();
  return other;
}
template <class... P, class... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, size_t smem, cudaStream_t, A... args) {
  const auto found = max_dynamic.find(reinterpret_cast<const void*>(kernel));
  const size_t limit = found == max_dynamic.end() ? 48 * 1024 : found->second;
  if (grid < 1 || block < 32 || block > 1024 || block % 32 != 0 || smem > limit) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > 0) kernel_grid = grid;
  grid_dim.x = grid;
  shared.assign(smem, 0xff);
  Barrier bar(block);
  block_barrier = &bar;
  warp_barriers.clear();
  for (unsigned w = 0; w < block / 32; ++w) warp_barriers.push_back(std::make_unique<Barrier>(32));
  lanes.assign(block, 0.f);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      thread_idx.x = t;
      for (unsigned b = 0; b < grid; ++b) {
        block_idx.x = b;
        kernel(args...);
        bar.arrive_and_wait();
        if (t == 0) std::memset(shared.data(), 0xff, shared.size());
        bar.arrive_and_wait();
      }
    });
  }
  for (std::thread& th : threads) th.join();
}
}  // namespace emu

#define __launch_bounds__(...)
#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, v, offset) ::emu::shfl_xor(mask, v, offset)
template <class T> inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
template <class F> cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute a, int v) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v);
}

extern "C" {
cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = emu::per_sm; return cudaSuccess;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = emu::reserved; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > emu::optin) return cudaErrorInvalidValue;
  emu::max_dynamic[f] = value;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, const void* f, int, size_t smem, unsigned) {
  const auto found = emu::max_dynamic.find(f);
  const size_t limit = found == emu::max_dynamic.end() ? 48 * 1024 : found->second;
  const long long fit = emu::per_sm / static_cast<long long>(smem + emu::reserved);
  *n = smem > limit ? 0 : static_cast<int>(fit < emu::blocks_per_sm ? fit : emu::blocks_per_sm);
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
void emu_device(int sms, int optin, int per_sm, int blocks_per_sm) {
  emu::sms = sms;
  emu::optin = optin;
  emu::per_sm = per_sm;
  emu::blocks_per_sm = blocks_per_sm;
  emu::max_dynamic.clear();
}
long long emu_kernel_grid(void) { return emu::kernel_grid; }
}
"""

# Emulated devices (SMs, shared memory per block and per SM, blocks per SM): H100-like budgets (tall tiles, G in shared
# memory where it fits), and one SM with 20 KB per block (short tiles, G in the global workspace when it does not fit).
_DEVICES = {"h100": (3, 232448, 233472, 2), "small": (1, 20000, 40000, 2)}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _emulated_source() -> str:
    src = (CUDA_DIR / "dgr_penalty.cu").read_text()
    src, n_smem = re.subn(r"extern __shared__ __align__\(16\) float smem\[\];", "float* smem = ::emu::shared_memory();", src)
    src, n_launch = re.subn(r"([\w:]+(?:<\w+>)?)<<<(.*?)>>>\(", r"::emu::launch(\1, \2, ", src, flags=re.S)
    assert (n_smem, n_launch) == (2, 3), f"expected 2 shared arrays and 3 launches in dgr_penalty.cu, found {n_smem}, {n_launch}"
    return _EMULATOR + src


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    gxx, nvcc = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++"), _nvcc()
    roots = [os.environ.get("CUDA_HOME"), nvcc and Path(nvcc).resolve().parent.parent, "/usr/local/cuda"]
    include = next((Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_fp16.h").exists()), None)
    if gxx is None or include is None:
        pytest.skip("running the kernels on CPU needs a host C++17 compiler and the CUDA headers ($CUDA_HOME, next to nvcc, "
                    "/usr/local/cuda)")
    out = tmp_path_factory.mktemp("dgr_cuda_emulated")
    (out / "dgr_penalty_emulated.cpp").write_text(_emulated_source())
    lib = out / "libdgr_penalty_emulated.so"
    cmd = [gxx, "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-pthread", f"-I{include}", "-o", str(lib)]
    cmd.append(str(out / "dgr_penalty_emulated.cpp"))
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}{done.stderr}"
    so = ctypes.CDLL(str(lib))
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    so.dgr_penalty_cuda_status_string.restype = ctypes.c_char_p
    so.dgr_penalty_cuda_fwd_workspace.argtypes = [i32, i64, i64, i64, i32, ctypes.POINTER(i64)]
    so.dgr_penalty_cuda_fwd.argtypes = [i32, ptr, *[i64] * 6, *[ptr] * 4, i32, i32, i32, *[ptr] * 4, i64, ptr, ptr, ptr]
    so.dgr_penalty_cuda_bwd.argtypes = [i32, ptr, *[i64] * 6, *[ptr] * 6, i32, i32, i32, *[ptr] * 5]
    so.emu_kernel_grid.restype = ctypes.c_longlong
    return so


def _emulated_ops(so, p: dp.Packed, gt_w: torch.Tensor, gt_b: torch.Tensor):
    """Both launchers on CPU tensors, outputs pre-filled with NaN; returns (g_w, g_b, dz, kernel grid of pass 1)."""
    z3, ptr = p.z3, lambda t: ctypes.c_void_p(t.data_ptr())
    (batch, width, pixels), (C, Cy), T = z3.shape, (p.weight.shape[0], p.rows.y.shape[1]), len(p.losses)
    meta = [torch.tensor(v, dtype=torch.int64) for v in (p.losses, p.col_offsets, p.rows.y_offsets)]
    common = (_DTYPE_CODES[z3.dtype], ptr(z3), batch, width, pixels, *z3.stride())
    common += (ptr(p.weight), ptr(p.bias), ptr(p.rows.y), ptr(p.rows.omega))
    floats = ctypes.c_int64(0)
    status = so.dgr_penalty_cuda_fwd_workspace(_DTYPE_CODES[z3.dtype], batch, width, pixels, C, ctypes.byref(floats))
    assert status == 0, so.dgr_penalty_cuda_status_string(status)
    workspace = torch.full((floats.value,), float("nan"))
    g_w, g_b = torch.full((C, width), float("nan")), torch.full((C,), float("nan"))
    status = so.dgr_penalty_cuda_fwd(*common, T, C, Cy, *map(ptr, meta), ptr(workspace), floats.value, ptr(g_w), ptr(g_b), None)
    assert status == 0, so.dgr_penalty_cuda_status_string(status)
    grid = so.emu_kernel_grid()
    dz = torch.full(tuple(z3.shape), float("nan"), dtype=z3.dtype)
    status = so.dgr_penalty_cuda_bwd(*common, ptr(gt_w), ptr(gt_b), T, C, Cy, *map(ptr, meta), ptr(dz), None)
    assert status == 0, so.dgr_penalty_cuda_status_string(status)
    return g_w, g_b, dz, grid


EMULATED_CASES = [
    # device, shape, layout, classes, dtype, empty_task
    ("h100", (1, 5), "contiguous", (5, 3, 2, 1), torch.float32, None),
    ("h100", (37, 29), "transposed", (5, 3, 2, 1), torch.float32, 1),
    ("h100", (37, 29), "sliced", (5, 3, 2, 1), torch.float16, None),
    ("h100", (2, 11, 5, 7), "channels_last", (5, 3, 2, 1), torch.bfloat16, 2),
    ("h100", (3, 10, 7, 9), "generic", (5, 3, 2, 1), torch.float32, None),
    ("h100", (2000, 45), "strided_rows", (5, 3, 2, 1), torch.float32, None),  # 16 tiles on 6 blocks
    ("h100", (2, 513, 3, 5), "contiguous", (13, 1, 3, 2), torch.float32, 3),  # 32-row tiles, G global, 4 lanes per logit
    ("h100", (50, 40), "contiguous", (64, 64, 64, 64), torch.float32, None),  # C = 256
    ("small", (40, 301), "transposed", (5, 3, 2, 1), torch.float32, None),  # 5 8-row tiles, 2 blocks, G global, 32 lanes
    ("small", (2, 11, 5, 7), "generic", (5, 3, 2, 1), torch.bfloat16, 0),
]


@pytest.mark.parametrize("device, shape, layout, classes, dtype, empty_task", EMULATED_CASES, ids=_ids)
def test_kernels_on_cpu_emulator(emulated, device, shape, layout, classes, dtype, empty_task):
    emulated.emu_device(*_DEVICES[device])
    p = _packed(make_case(shape, classes=classes, dtype=dtype, layout=layout, empty_task=empty_task, seed=5, device="cpu"))
    p.rows.omega[::5] = 0  # rows no task counts
    g = torch.Generator().manual_seed(2)
    gt_w, gt_b = torch.randn(p.weight.shape, generator=g), torch.randn(p.weight.shape[0], generator=g)
    g_w, g_b, dz, grid = _emulated_ops(emulated, p, gt_w, gt_b)
    ref_w, ref_b, ref_dz = _spec(p, gt_w, gt_b)
    _assert_close(g_w, ref_w, 1e-5, "G_W")
    _assert_close(g_b, ref_b, 1e-5, "G_b")
    _assert_close(dz, ref_dz, 1e-5 if dtype == torch.float32 else RTOL[dtype], "dz")
    dead = (p.rows.omega == 0).all(1).view(p.z3.shape[0], p.z3.shape[2])
    assert bool((dz.transpose(1, 2)[dead] == 0).all())
    if shape == (2000, 45):
        assert grid == 6, "16 tiles on 3 SMs x 2 blocks: each block loops over several tiles"

# ---------------------------------------------------------------------------------------------------------------
# GPU tests


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    status = backend_status("cuda")
    return None if status.available else f"the cuda backend is unavailable: {status.reason}"


requires_gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))


def _raw_ops():
    """The extension's op pair itself, on rows packed by torch ops (``_op_args``); ``dp._kernels("cuda")`` wraps it in
    the per-task contract of the cpp ops."""
    import dgr_fast._C_cuda  # noqa: F401  (registers torch.ops.dgr_fast_cuda)

    return torch.ops.dgr_fast_cuda.dgr_penalty_fwd, torch.ops.dgr_fast_cuda.dgr_penalty_bwd

CASES = [
    ((37, 29), "contiguous", None),
    ((37, 29), "transposed", 1),
    ((37, 29), "sliced", None),
    ((37, 29), "strided_rows", 3),
    ((2, 11, 5, 7), "contiguous", None),
    ((2, 11, 5, 7), "channels_last", 2),
    ((2, 11, 5, 7), "sliced", None),
    ((2, 11, 5, 7), "generic", 0),
    ((1000, 301), "contiguous", None),  # several tiles per block
    ((3, 67, 13, 17), "channels_last", None),
    ((2, 129, 9, 31), "generic", 1),
]


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, layout, empty_task", CASES, ids=_ids)
def test_matches_reference(shape, layout, empty_task, dtype):
    case = make_case(shape, dtype=dtype, layout=layout, empty_task=empty_task, seed=len(shape) * 100 + shape[1])
    exact = _fp64(case)
    for i, (reduction, norm) in enumerate([("mean", "squared"), ("row_mean", "l2"), ("mean", "l2"), ("row_mean", "squared")]):
        task_weights = None if i % 2 == 0 else [0.5, 2.0, 1.0, 1.5]
        kwargs = dict(reductions=reduction, norm=norm, task_weights=task_weights)
        value, grad = _penalty_and_grad(case, backend="cuda", **kwargs)
        ref_value, ref_grad = _penalty_and_grad(exact, backend="reference", **kwargs)
        assert value.dtype == torch.float32 and grad.dtype == dtype and grad.shape == case["features"].shape
        what = f"{reduction}, {norm}, task_weights={task_weights}"
        _assert_close(value, ref_value, RTOL[dtype], f"penalty ({what})")
        _assert_close(grad, ref_grad, RTOL[dtype], f"gradient ({what})")


@requires_gpu
def test_nothing_valid_gives_zero():
    case = make_case((2, 11, 5, 7), masked=(0, 1, 2, 3), layout="channels_last")
    case["masks"] = [torch.zeros_like(m) for m in case["masks"]]
    for norm in ("squared", "l2"):
        value, grad = _penalty_and_grad(case, backend="cuda", norm=norm)
        assert float(value) == 0.0 and bool((grad == 0).all()), norm


def _poison_allocator(large_bytes: int) -> None:
    """Fill the memory the caching allocator will hand out next with NaN: after `empty_cache`, one whole small-pool
    segment (2 x 1 MiB) and one large block of `large_bytes`, freed again. An output element the kernels do not write
    then stays NaN; the elementwise comparison with the spec catches any other stale value."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(2)]
    blocks.append(torch.full((large_bytes // 4 + 1,), float("nan"), device="cuda"))
    del blocks


DIRECT_CASES = [
    # shape, layout, classes, dtype
    ((1, 5), "contiguous", (5, 3, 2, 1), torch.float32),  # a single row
    ((37, 29), "transposed", (5, 3, 2, 1), torch.float32),
    ((3, 10, 7, 9), "generic", (5, 3, 2, 1), torch.float32),  # tiles spanning several maps
    ((2, 33, 40, 41), "contiguous", (13, 1, 3, 2), torch.float32),
    ((2, 33, 40, 41), "channels_last", (13, 1, 3, 2), torch.bfloat16),
    ((300, 3000), "contiguous", (5, 3, 2, 1), torch.float32),  # wide: short tiles, G in the global workspace
    ((300, 3000), "sliced", (5, 3, 2, 1), torch.float16),
    ((64, 4096), "strided_rows", (16, 16, 16, 16), torch.float32),  # the documented width limit, C = 64
    ((50, 40), "contiguous", (64, 64, 64, 64), torch.float32),  # C = 256, the column limit
]


@requires_gpu
@pytest.mark.parametrize("shape, layout, classes, dtype", DIRECT_CASES, ids=_ids)
def test_direct_ops_write_every_element(shape, layout, classes, dtype):
    case = make_case(shape, classes=classes, dtype=dtype, layout=layout, seed=7)
    p = _packed(case)
    rows = p.rows.omega.shape[0]
    p.rows.omega[torch.arange(0, rows, 5, device="cuda")] = 0  # rows no task counts: their dz must be exactly 0
    fwd, bwd = _raw_ops()
    C, D = p.weight.shape
    g = torch.Generator(device="cuda").manual_seed(3)
    gt_w, gt_b = torch.randn(C, D, device="cuda", generator=g), torch.randn(C, device="cuda", generator=g)
    ref_w, ref_b, ref_dz = _spec(p, gt_w, gt_b)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _poison_allocator(min(64 * C * (D + 1) * sms, 1 << 31))  # more than the workspace of 16 blocks per SM
    g_w, g_b = fwd(*_op_args(p))
    assert g_w.shape == (C, D) and g_b.shape == (C,) and g_w.dtype == g_b.dtype == torch.float32
    _assert_close(g_w, ref_w, 1e-4, "G_W")
    _assert_close(g_b, ref_b, 1e-4, "G_b")

    _poison_allocator(2 * p.z3.numel() * p.z3.element_size())
    dz = bwd(*_bwd_args(p, gt_w, gt_b))
    assert dz.shape == p.z3.shape and dz.dtype == dtype and dz.is_contiguous()
    _assert_close(dz, ref_dz, RTOL[dtype], "dz")
    dead = (p.rows.omega == 0).all(1).view(p.z3.shape[0], p.z3.shape[2])  # [B, P]
    assert bool((dz.transpose(1, 2)[dead] == 0).all()), "dz of rows that no task counts must be exactly 0"


@requires_gpu
def test_limits_are_refused_with_a_reason():
    fwd, bwd = _raw_ops()
    too_many_tasks = _packed(make_case((9, 4), classes=(1,) * 33, losses=("mse",) * 33, masked=()))
    with pytest.raises(RuntimeError, match="number of tasks"):
        fwd(*_op_args(too_many_tasks))
    too_many_columns = _packed(make_case((9, 4), classes=(200, 57), losses=("bce", "mse"), masked=()))
    with pytest.raises(RuntimeError, match="columns"):
        fwd(*_op_args(too_many_columns))
    too_wide = _packed(make_case((9, 8192), classes=(3,), losses=("ce",), masked=()))
    with pytest.raises(RuntimeError, match="width D is too large"):
        fwd(*_op_args(too_wide))
    gt = (torch.zeros_like(too_wide.weight), torch.zeros_like(too_wide.bias))
    with pytest.raises(RuntimeError, match="width D is too large"):
        bwd(*_bwd_args(too_wide, *gt))


@requires_gpu
@pytest.mark.parametrize(
    "shape, layout", [((4, 64, 96, 128), "contiguous"), ((4096, 2048), "contiguous"), ((3, 48, 50, 70), "channels_last")]
)
def test_run_to_run_bitwise_deterministic(shape, layout):
    p = _packed(make_case(shape, layout=layout, classes=(13, 1, 3), losses=("ce", "l1", "l1"), masked=(1, 2)))
    fwd, bwd = _raw_ops()
    first = fwd(*_op_args(p))
    gt_w, gt_b = 3 * first[0], 3 * first[1]
    dz_first = bwd(*_bwd_args(p, gt_w, gt_b))
    for _ in range(3):
        again = fwd(*_op_args(p))
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
        assert torch.equal(bwd(*_bwd_args(p, gt_w, gt_b)), dz_first)


def _scene_case(batch: int, width: int, height: int, breadth: int) -> dict:
    """The dense benchmark of issue 3: seg (ce, 13 classes, ignore_index 255), depth (l1, 1, mask), normals (l1, 3,
    mask)."""
    g = torch.Generator().manual_seed(11)
    rows = (batch, height, breadth)
    seg = torch.randint(0, 13, rows, generator=g)
    seg[torch.rand(rows, generator=g) < 0.1] = 255
    valid = torch.rand(rows, generator=g) < 0.8
    classes = (13, 1, 3)
    return dict(
        features=torch.randn(batch, width, height, breadth, generator=g).cuda(),
        weights=[(torch.randn(c, width, generator=g) / width**0.5).cuda() for c in classes],
        biases=[torch.randn(c, generator=g).cuda() for c in classes],
        targets=[
            seg.cuda(),
            torch.rand(batch, 1, height, breadth, generator=g).cuda(),
            torch.randn(batch, 3, height, breadth, generator=g).cuda(),
        ],
        losses=["ce", "l1", "l1"],
        masks=[None, valid.cuda(), valid.cuda()],
        ignore_index=255,
        reductions=["mean", "row_mean", "row_mean"],
    )


@requires_gpu
@pytest.mark.parametrize("shape", [(8, 64, 288, 384), (8, 2048, 36, 48)], ids=_ids)
def test_benchmark_shapes(shape):
    case = _scene_case(*shape)
    value, grad = _penalty_and_grad(case, backend="cuda")
    ref_value, ref_grad = _penalty_and_grad(_fp64(case), backend="reference")
    # Sums over up to 884736 rows in fp32: a few 1e-6 relative (the fp32 `torch` backend is at 4e-7 on these shapes).
    _assert_close(value, ref_value, RTOL[torch.float32], "penalty")
    _assert_close(grad, ref_grad, RTOL[torch.float32], "gradient")
