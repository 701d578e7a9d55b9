// CUDA kernels of the fused DGR penalty (the `cuda` backend); kernels and extern "C" launchers only, no torch
// headers, so `nvcc -arch=sm_90a -cubin` checks this file anywhere in seconds. The binding is dgr_penalty_cuda.cpp.
//
// What it computes: exactly the `torch` backend of dgr_fast/ops/dgr_penalty.py (docs/DESIGN.md section 4), in fp32
// whatever the features' dtype (fp32, fp16, bf16):
//   dgr_penalty_cuda_fwd == `_torch_gradients` before its bias mask: G_W = sum_i r_i z_i^T [C, D], G_b = sum_i r_i [C]
//   dgr_penalty_cuda_bwd == `_torch_features_grad`: dz_i = 2 Gt_W^T r_i + W^T hu_i, written as a contiguous [B, D, P]
//   tensor of z's dtype,
// with s_i = W z_i + b, u_i = 2 (Gt_W z_i + Gt_b), and r_i = omega_it dl/ds, hu_i = omega_it H u_i per task segment as
// `_residual_rows` (one device function per loss below, shared by both passes). Rows are (b, p) pairs of
// z3 [B, D, P], row i = b P + p, read in place with any strides.
//
// How: persistent blocks of kThreads threads loop over tiles of `bm` consecutive rows (bm in 8..128, chosen per launch
// from the shared memory the device offers). Per tile, everything stays in shared memory:
//   zt [D (+1)][bmp]  the features tile, transposed (rows along the fast dimension), converted to fp32. bmp = bm + 4 is
//                     4 times an odd number: rows stay 16-byte aligned for float4 reads and 8 consecutive feature
//                     rows fall in 8 different bank quads (conflict-free float4 reads along D).
//   rt [NS C4][bmp]   logits s (pass 2 also u), overwritten in place by r (and hu); C4 = C rounded up to 4.
// Pass 1 (forward): load zt, s = W zt + b, r, then G[c][d] += sum_m r[c][m] zt[d][m]. Row D of zt holds ones, so
//   column D of G is G_b. G lives in shared memory when it fits, otherwise in the block's own slice of the global
//   workspace (read-modify-written by the same thread every tile, no atomics). Each block writes its partial
//   [C][D+1] to workspace[blockIdx.x]; dgr_reduce_kernel sums the slices in block order: the result is bitwise
//   reproducible for a given device and problem size (no floating-point atomics anywhere).
// Pass 2 (backward): load zt, s and u, r and hu, then dz[d][m] = sum_c 2 Gt_W[c][d] r[c][m] + W[c][d] hu[c][m] into
//   zt (the features are no longer needed), and store zt to dz with coalesced writes.
// W, b, Gt_W, Gt_b are read through the read-only cache (__ldg); they are C x D, tiny beside the features.
//
// Limits (refused by the launchers with a status, see dgr_penalty_cuda_status_string): T <= kMaxTasks = 32 tasks,
// C <= kMaxColumns = 256 stacked head columns, and a tile of at least 8 rows must fit the device's shared memory per
// block: 4 * 12 * (D + 2 C4) + 128 bytes (pass 2, the larger); on sm_90 (227 KB) that is D <= 4096 for every C <= 256.
// The forward workspace is at most kMaxWorkspaceBytes (fewer blocks when C (D + 1) is large).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace {

constexpr int kThreads = 256;  // threads per block; a multiple of every tile height bm
constexpr int kMaxTasks = 32;
constexpr int kMaxColumns = 256;
constexpr int kMinRows = 8;    // smallest tile height: bm is a power of two in [kMinRows, kMaxRows]
constexpr int kMaxRows = 128;
constexpr int kMaxWidth = 1 << 20;  // sanity bound before D is narrowed to int (the shared memory bound is far lower)
constexpr long long kMaxWorkspaceBytes = 256LL << 20;

enum Loss : int { kCe = 0, kBce = 1, kMse = 2, kL1 = 3 };

enum Status : int {
  kOk = 0,
  kErrDtype = -1,
  kErrTasks = -2,
  kErrColumns = -3,
  kErrMeta = -4,
  kErrShape = -5,
  kErrTooWide = -6,
  kErrWorkspace = -7,
};

enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Tasks {
  int count;
  int loss[kMaxTasks];
  int col[kMaxTasks + 1];   // task t owns stacked columns col[t] .. col[t+1]
  int ycol[kMaxTasks + 1];  // and target columns ycol[t] .. ycol[t+1] of y
};

struct Geometry {
  long long rows, pixels;  // rows = B * P
  long long stride_b, stride_d, stride_p;
  long long tiles;         // ceil(rows / bm)
  int width;               // D
  int columns, columns4;   // C, C rounded up to a multiple of 4
  int y_columns;           // Cy
  int bm, bm_log2, bmp;    // rows per tile, its log2, length of a shared tile row (bm + 4)
  int ks_log2;             // log2 of the lanes that split D for one logits micro tile
  int d_fast;              // z is contiguous along D (rows, channels_last): load with lanes along D
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------------------------
// Per-loss residuals for one row of one task, as `_residual_rows`. `s` points at the task's first logit of the row
// in the shared tile (columns `ld` floats apart) and is overwritten by r = w dl/ds; with kHessian, `u` (same layout)
// is overwritten by w H u. `y` points at the row's first target column of the task, `w` is omega_it.

// "ce": softmax over the task's columns; r = w (p - onehot(y)), H u = p (u - <p, u>).
template <bool kHessian>
__device__ __forceinline__ void ce_residual(float* s, float* u, int ld, int n, const float* y, float w) {
  const int target = static_cast<int>(__ldg(y));  // a class index stored as a float (0 on invalid rows, where w = 0)
  float top = s[0];
  for (int c = 1; c < n; ++c) top = fmaxf(top, s[c * ld]);
  float sum = 0.f;
  for (int c = 0; c < n; ++c) {
    const float e = expf(s[c * ld] - top);  // max-shifted: no overflow
    s[c * ld] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
  float pu = 0.f;
  if (kHessian) {
    for (int c = 0; c < n; ++c) pu = fmaf(s[c * ld] * inv, u[c * ld], pu);
  }
  for (int c = 0; c < n; ++c) {
    const float p = s[c * ld] * inv;
    if (kHessian) u[c * ld] = w * (p * (u[c * ld] - pu));
    s[c * ld] = w * (p - (c == target ? 1.f : 0.f));
  }
}

// "bce": q = sigmoid(s); r = w (q - y), H u = q (1 - q) u.
template <bool kHessian>
__device__ __forceinline__ void bce_residual(float* s, float* u, int ld, int n, const float* y, float w) {
  for (int c = 0; c < n; ++c) {
    const float q = 1.f / (1.f + expf(-s[c * ld]));  // expf overflows to inf for s << 0: q = 0, as it should
    if (kHessian) u[c * ld] = w * (q * (1.f - q) * u[c * ld]);
    s[c * ld] = w * (q - __ldg(y + c));
  }
}

// "mse": r = w 2 (s - y), H u = 2 u.
template <bool kHessian>
__device__ __forceinline__ void mse_residual(float* s, float* u, int ld, int n, const float* y, float w) {
  for (int c = 0; c < n; ++c) {
    if (kHessian) u[c * ld] = w * (2.f * u[c * ld]);
    s[c * ld] = w * (2.f * (s[c * ld] - __ldg(y + c)));
  }
}

// "l1": r = w sign(s - y) with sign(0) = 0 (as autograd), H u = 0.
template <bool kHessian>
__device__ __forceinline__ void l1_residual(float* s, float* u, int ld, int n, const float* y, float w) {
  for (int c = 0; c < n; ++c) {
    const float diff = s[c * ld] - __ldg(y + c);
    if (kHessian) u[c * ld] = 0.f;
    s[c * ld] = w * static_cast<float>((diff > 0.f) - (diff < 0.f));
  }
}

template <bool kHessian>
__device__ __forceinline__ void task_residual(int loss, float* s, float* u, int ld, int n, const float* y, float w) {
  switch (loss) {
    case kCe: ce_residual<kHessian>(s, u, ld, n, y, w); break;
    case kBce: bce_residual<kHessian>(s, u, ld, n, y, w); break;
    case kMse: mse_residual<kHessian>(s, u, ld, n, y, w); break;
    default: l1_residual<kHessian>(s, u, ld, n, y, w); break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tile phases. Every phase is executed by all kThreads threads of the block, between __syncthreads().

// Offsets of the tile's rows in z (and, for pass 2, in the contiguous [B, D, P] output).
__device__ __forceinline__ void row_offsets(long long* zoff, long long* ooff, const Geometry& g, long long row0,
                                            int nrows) {
  for (int m = threadIdx.x; m < nrows; m += kThreads) {
    const long long i = row0 + m, b = i / g.pixels, p = i - b * g.pixels;
    zoff[m] = b * g.stride_b + p * g.stride_p;
    if (ooff != nullptr) ooff[m] = b * g.width * g.pixels + p;
  }
}

// Calls f(m, d) once for every (row m < bm, feature d < D) of a tile. `along_d`: lanes walk D in warp tiles of
// 4 rows x 8 columns (8 consecutive elements of a row: whole 32-byte sectors in fp32; and conflict-free shared
// accesses, the 8 columns falling in 8 bank quads since bmp = 4 * odd). Otherwise lanes walk the rows (coalesced
// when consecutive rows are adjacent in memory: dense maps with P stride 1, transposed [N, D] rows).
template <typename F>
__device__ __forceinline__ void for_tile_elements(bool along_d, const Geometry& g, F&& f) {
  const int D = g.width;
  if (along_d) {
    const int lane = threadIdx.x & 31, ml = lane >> 3, dl = lane & 7;
    const int mq_log2 = g.bm_log2 - 2;  // bm / 4 row quads
    const int wtiles = ((D + 7) >> 3) << mq_log2;
    for (int q = threadIdx.x >> 5; q < wtiles; q += kThreads / 32) {
      const int m = ((q & ((1 << mq_log2) - 1)) << 2) + ml, d = ((q >> mq_log2) << 3) + dl;
      if (d < D) f(m, d);
    }
  } else {
    const int m = threadIdx.x & (g.bm - 1);
#pragma unroll 4
    for (int d = threadIdx.x >> g.bm_log2; d < D; d += kThreads >> g.bm_log2) f(m, d);
  }
}

// zt[d][m] = z[row m][d] in fp32; rows past the end of the data are zero.
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ z, float* __restrict__ zt,
                                          const long long* __restrict__ zoff, const Geometry& g, int nrows) {
  const int bmp = g.bmp;
  const long long sd = g.stride_d;
  for_tile_elements(g.d_fast != 0, g, [&](int m, int d) {
    zt[d * bmp + m] = m < nrows ? to_float(z[zoff[m] + d * sd]) : 0.f;
  });
}

// dz[row m][d] = zt[d][m] in dz's dtype, for the tile's rows that exist. dz is contiguous [B, D, P].
template <typename T>
__device__ __forceinline__ void store_tile(T* __restrict__ dz, const float* __restrict__ zt,
                                           const long long* __restrict__ ooff, const Geometry& g, int nrows) {
  const int bmp = g.bmp;
  const long long sd = g.pixels;
  for_tile_elements(g.pixels == 1, g, [&](int m, int d) {
    if (m < nrows) dz[ooff[m] + d * sd] = from_float<T>(zt[d * bmp + m]);
  });
}

// rt[c][m] = b0[c] + sum_d w0[c][d] zt[d][m] for the C4 rows of stack 0; with kStacks == 2, also
// rt[C4 + c][m] = 2 (b1[c] + sum_d w1[c][d] zt[d][m]) (u). Micro tiles of 4 columns x 4 rows; when there are fewer
// micro tiles than threads (small tiles, wide D), 2^ks_log2 lanes split the sum over d and combine it with a
// fixed butterfly of shuffles (deterministic). Padding columns c >= C repeat column C - 1 (finite, never stored).
template <int kStacks>
__device__ __forceinline__ void logits(const float* __restrict__ zt, float* __restrict__ rt,
                                       const float* __restrict__ w0, const float* __restrict__ b0,
                                       const float* __restrict__ w1, const float* __restrict__ b1,
                                       const Geometry& g) {
  const int D = g.width, C = g.columns, C4 = g.columns4, bmp = g.bmp;
  const int mg_log2 = g.bm_log2 - 2;
  const int tiles = (kStacks * (C4 >> 2)) << mg_log2;
  const int ks = 1 << g.ks_log2;
  const int sub = threadIdx.x & (ks - 1);
  const int group = threadIdx.x >> g.ks_log2, groups = kThreads >> g.ks_log2;
  // The same number of rounds for every thread: the shuffles below need every lane of the warp.
  const int rounds = (tiles + groups - 1) / groups;
  for (int round = 0; round < rounds; ++round) {
    const int q = group + round * groups;
    const bool active = q < tiles;
    const int cg = active ? q >> mg_log2 : 0;
    const int m0 = (q & ((1 << mg_log2) - 1)) << 2;
    const int stack = kStacks == 2 && cg * 4 >= C4 ? 1 : 0;
    const int c0 = cg * 4 - stack * C4;
    const float* w = stack ? w1 : w0;
    const float* wr[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) wr[j] = w + static_cast<long long>(min(c0 + j, C - 1)) * D;
    float acc[4][4] = {};
    if (active) {
#pragma unroll 4
      for (int k = sub; k < D; k += ks) {
        const float4 zv = *reinterpret_cast<const float4*>(zt + k * bmp + m0);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float wv = __ldg(wr[j] + k);
          acc[j][0] = fmaf(wv, zv.x, acc[j][0]);
          acc[j][1] = fmaf(wv, zv.y, acc[j][1]);
          acc[j][2] = fmaf(wv, zv.z, acc[j][2]);
          acc[j][3] = fmaf(wv, zv.w, acc[j][3]);
        }
      }
    }
    for (int offset = ks >> 1; offset > 0; offset >>= 1) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], offset);
      }
    }
    if (active && sub == 0) {
      const float* b = stack ? b1 : b0;
      const float scale = stack ? 2.f : 1.f;  // u = 2 (Gt_W z + Gt_b)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float bj = __ldg(b + min(c0 + j, C - 1));
        *reinterpret_cast<float4*>(rt + (cg * 4 + j) * bmp + m0) =
            make_float4(scale * (acc[j][0] + bj), scale * (acc[j][1] + bj), scale * (acc[j][2] + bj),
                        scale * (acc[j][3] + bj));
      }
    }
  }
}

// In place on rt: r (rows 0..C) and, with kHessian, hu (rows C4..C4+C), one (row, task) per thread.
// Rows past the end of the data get r = hu = 0, so they add nothing to G and their dz is 0 (never stored).
template <bool kHessian>
__device__ __forceinline__ void residuals(float* rt, const Geometry& g, const Tasks& tasks, const float* __restrict__ y,
                                          const float* __restrict__ omega, long long row0, int nrows) {
  const int bmp = g.bmp, items = tasks.count << g.bm_log2;
  for (int it = threadIdx.x; it < items; it += kThreads) {
    const int m = it & (g.bm - 1), t = it >> g.bm_log2;
    const int c0 = tasks.col[t], n = tasks.col[t + 1] - c0;
    float* s = rt + c0 * bmp + m;
    float* u = kHessian ? rt + (g.columns4 + c0) * bmp + m : nullptr;
    if (m < nrows) {
      const long long i = row0 + m;
      task_residual<kHessian>(tasks.loss[t], s, u, bmp, n, y + i * g.y_columns + tasks.ycol[t],
                              __ldg(omega + i * tasks.count + t));
    } else {
      for (int c = 0; c < n; ++c) {
        s[c * bmp] = 0.f;
        if (kHessian) u[c * bmp] = 0.f;
      }
    }
  }
}

// Pass 1: gacc[c][d] += sum_m rt[c][m] zt[d][m] for c < C, d <= D (zt row D is ones: column D is G_b).
// Micro tiles of 4 columns x 1 feature, consecutive d across lanes (conflict-free float4 reads of zt, broadcast reads
// of rt, coalesced read-modify-write of gacc). A given gacc element is always updated by the same thread.
__device__ __forceinline__ void weight_grad(const float* __restrict__ zt, const float* __restrict__ rt, float* gacc,
                                            const Geometry& g) {
  const int D1 = g.width + 1, C = g.columns, bmp = g.bmp;
  const int tiles = (g.columns4 >> 2) * D1;
  for (int q = threadIdx.x; q < tiles; q += kThreads) {
    const int cg = q / D1, d = q - cg * D1;
    const float* zr = zt + d * bmp;
    const float* rr = rt + cg * 4 * bmp;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int m = 0; m < g.bm; m += 4) {
      const float4 zv = *reinterpret_cast<const float4*>(zr + m);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 rv = *reinterpret_cast<const float4*>(rr + j * bmp + m);
        acc[j] = fmaf(rv.x, zv.x, acc[j]);
        acc[j] = fmaf(rv.y, zv.y, acc[j]);
        acc[j] = fmaf(rv.z, zv.z, acc[j]);
        acc[j] = fmaf(rv.w, zv.w, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = cg * 4 + j;
      if (c < C) gacc[c * D1 + d] += acc[j];
    }
  }
}

// Pass 2: zt[d][m] = sum_c 2 gt_w[c][d] r[c][m] + w[c][d] hu[c][m] (the dz tile, over the no longer needed
// features). Micro tiles of 4 features x 4 rows, rows across lanes (float4 reads of rt and writes of zt).
__device__ __forceinline__ void features_grad(float* __restrict__ zt, const float* __restrict__ rt,
                                              const float* __restrict__ w, const float* __restrict__ gt_w,
                                              const Geometry& g) {
  const int D = g.width, C = g.columns, bmp = g.bmp, mg_log2 = g.bm_log2 - 2;
  const int tiles = ((D + 3) >> 2) << mg_log2;
  const float* hu = rt + g.columns4 * bmp;
  for (int q = threadIdx.x; q < tiles; q += kThreads) {
    const int d0 = (q >> mg_log2) << 2, m0 = (q & ((1 << mg_log2) - 1)) << 2;
    int dj[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) dj[j] = min(d0 + j, D - 1);  // past D: a valid column, result not stored
    float acc[4][4] = {};
    for (int c = 0; c < C; ++c) {
      const float4 rv = *reinterpret_cast<const float4*>(rt + c * bmp + m0);
      const float4 hv = *reinterpret_cast<const float4*>(hu + c * bmp + m0);
      const float* wr = w + static_cast<long long>(c) * D;
      const float* gr = gt_w + static_cast<long long>(c) * D;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float a = 2.f * __ldg(gr + dj[j]), b = __ldg(wr + dj[j]);
        acc[j][0] = fmaf(b, hv.x, fmaf(a, rv.x, acc[j][0]));
        acc[j][1] = fmaf(b, hv.y, fmaf(a, rv.y, acc[j][1]));
        acc[j][2] = fmaf(b, hv.z, fmaf(a, rv.z, acc[j][2]));
        acc[j][3] = fmaf(b, hv.w, fmaf(a, rv.w, acc[j][3]));
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (d0 + j < D) {
        *reinterpret_cast<float4*>(zt + (d0 + j) * bmp + m0) = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels. Shared memory (dynamic, 16-byte aligned): zt, rt, zoff [bm] (pass 2 also ooff [bm]), then (pass 1, when
// gacc_in_smem) gacc [C][D+1]; sizes in shared_bytes() below.

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dgr_fwd_kernel(const T* __restrict__ z, const float* __restrict__ weight, const float* __restrict__ bias,
                   const float* __restrict__ y, const float* __restrict__ omega, float* __restrict__ workspace,
                   int gacc_in_smem, const __grid_constant__ Geometry g, const __grid_constant__ Tasks tasks) {
  extern __shared__ __align__(16) float smem[];
  const int D = g.width, D1 = D + 1, bmp = g.bmp, gsize = g.columns * D1;
  float* zt = smem;
  float* rt = zt + D1 * bmp;
  long long* zoff = reinterpret_cast<long long*>(rt + g.columns4 * bmp);
  float* slice = workspace + static_cast<long long>(blockIdx.x) * gsize;
  float* gacc = gacc_in_smem ? reinterpret_cast<float*>(zoff + g.bm) : slice;
  for (int e = threadIdx.x; e < gsize; e += kThreads) gacc[e] = 0.f;
  for (int m = threadIdx.x; m < g.bm; m += kThreads) zt[D * bmp + m] = 1.f;  // loads never overwrite row D
  for (long long tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const long long row0 = tile * g.bm;
    const int nrows = static_cast<int>(min(static_cast<long long>(g.bm), g.rows - row0));
    row_offsets(zoff, nullptr, g, row0, nrows);
    __syncthreads();  // also orders the previous tile's reads of zt, rt before this tile's writes
    load_tile(z, zt, zoff, g, nrows);
    __syncthreads();
    logits<1>(zt, rt, weight, bias, nullptr, nullptr, g);
    __syncthreads();
    residuals<false>(rt, g, tasks, y, omega, row0, nrows);
    __syncthreads();
    weight_grad(zt, rt, gacc, g);
    __syncthreads();
  }
  if (gacc_in_smem) {
    for (int e = threadIdx.x; e < gsize; e += kThreads) slice[e] = gacc[e];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    dgr_bwd_kernel(const T* __restrict__ z, const float* __restrict__ weight, const float* __restrict__ bias,
                   const float* __restrict__ y, const float* __restrict__ omega, const float* __restrict__ gt_w,
                   const float* __restrict__ gt_b, T* __restrict__ dz, const __grid_constant__ Geometry g,
                   const __grid_constant__ Tasks tasks) {
  extern __shared__ __align__(16) float smem[];
  const int bmp = g.bmp;
  float* zt = smem;
  float* rt = zt + g.width * bmp;
  long long* zoff = reinterpret_cast<long long*>(rt + 2 * g.columns4 * bmp);
  long long* ooff = zoff + g.bm;
  for (long long tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const long long row0 = tile * g.bm;
    const int nrows = static_cast<int>(min(static_cast<long long>(g.bm), g.rows - row0));
    row_offsets(zoff, ooff, g, row0, nrows);
    __syncthreads();  // also orders the previous tile's store of zt before this tile's loads
    load_tile(z, zt, zoff, g, nrows);
    __syncthreads();
    logits<2>(zt, rt, weight, bias, gt_w, gt_b, g);
    __syncthreads();
    residuals<true>(rt, g, tasks, y, omega, row0, nrows);
    __syncthreads();
    features_grad(zt, rt, weight, gt_w, g);
    __syncthreads();
    store_tile(dz, zt, ooff, g, nrows);
    __syncthreads();
  }
}

// g_w[c][d] = sum over blocks of workspace[block][c][d], g_b[c] = ... [c][D]; blocks summed in order.
__global__ void __launch_bounds__(kThreads)
    dgr_reduce_kernel(const float* __restrict__ workspace, int blocks, int C, int D, float* __restrict__ g_w,
                      float* __restrict__ g_b) {
  const int D1 = D + 1;
  const long long n = static_cast<long long>(C) * D1;
  const long long e = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n) return;
  float acc = 0.f;
#pragma unroll 4
  for (int b = 0; b < blocks; ++b) acc += __ldg(workspace + b * n + e);
  const int c = static_cast<int>(e / D1), d = static_cast<int>(e - static_cast<long long>(c) * D1);
  if (d < D) {
    g_w[static_cast<long long>(c) * D + d] = acc;
  } else {
    g_b[c] = acc;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: argument checks, tile plan, launches.

int check_tasks(int T, int C, int Cy, const int64_t* losses, const int64_t* col, const int64_t* ycol, Tasks* tasks) {
  if (T < 1 || T > kMaxTasks) return kErrTasks;
  if (C < 1 || C > kMaxColumns) return kErrColumns;
  if (col[0] != 0 || ycol[0] != 0 || col[T] != C || ycol[T] != Cy) return kErrMeta;
  tasks->count = T;
  for (int t = 0; t < T; ++t) {
    const int64_t n = col[t + 1] - col[t], ny = ycol[t + 1] - ycol[t];
    if (losses[t] < kCe || losses[t] > kL1 || n < 1 || ny != (losses[t] == kCe ? 1 : n)) return kErrMeta;
    tasks->loss[t] = static_cast<int>(losses[t]);
  }
  for (int t = 0; t <= T; ++t) {
    tasks->col[t] = static_cast<int>(col[t]);
    tasks->ycol[t] = static_cast<int>(ycol[t]);
  }
  return kOk;
}

int check_shape(int64_t batch, int64_t width, int64_t pixels) {
  if (batch < 0 || pixels < 0 || width < 0 || width > kMaxWidth) return kErrShape;
  if (pixels > 0 && batch > INT64_MAX / pixels) return kErrShape;
  return kOk;
}

// Bytes of dynamic shared memory of a pass-1 (stacks = 1) or pass-2 (stacks = 2) block with tiles of bm rows.
size_t shared_bytes(int stacks, int D, int C, int bm, bool gacc) {
  const size_t C4 = static_cast<size_t>((C + 3) & ~3);
  const size_t zt_rows = static_cast<size_t>(stacks == 1 ? D + 1 : D);  // pass 1 keeps a row of ones
  return 4 * (zt_rows + stacks * C4) * static_cast<size_t>(bm + 4) + 8 * static_cast<size_t>(stacks) * bm +
         (gacc ? 4 * static_cast<size_t>(C) * (D + 1) : 0);
}

struct Plan {
  int bm = 0, bm_log2 = 0, ks_log2 = 0, gacc_in_smem = 0, blocks = 0;
  size_t smem = 0;
  long long tiles = 0;
};

// Picks the tile height and where pass 1 keeps G, then the grid (persistent: as many blocks as fit on the device at
// once, at most one per tile). Preference: two blocks per SM (one computes while the other loads) with tiles of at
// least 32 rows, G in shared memory first; else one block per SM with the tallest tile that fits.
template <typename Kernel>
int make_plan(Kernel kernel, int stacks, long long rows, int D, int C, Plan* plan) {
  int dev = 0, sms = 0, optin = 0, per_sm = 0, reserved = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev);
  if (err != cudaSuccess) return err;
  const size_t two_per_sm = std::min<size_t>(optin, static_cast<size_t>(std::max(per_sm / 2 - reserved, 0)));
  struct Try {
    size_t budget;
    bool gacc;
    int min_bm;
  };
  const Try tries[] = {{two_per_sm, true, 32}, {two_per_sm, false, 32}, {static_cast<size_t>(optin), true, kMinRows},
                       {static_cast<size_t>(optin), false, kMinRows}};
  plan->bm = 0;
  for (const Try& t : tries) {
    if (t.gacc && stacks != 1) continue;  // only pass 1 accumulates G
    for (int bm = kMaxRows; bm >= t.min_bm && plan->bm == 0; bm /= 2) {
      const size_t bytes = shared_bytes(stacks, D, C, bm, t.gacc);
      if (bytes <= t.budget) {
        plan->bm = bm;
        plan->smem = bytes;
        plan->gacc_in_smem = t.gacc ? 1 : 0;
      }
    }
    if (plan->bm != 0) break;
  }
  if (plan->bm == 0) return kErrTooWide;
  plan->bm_log2 = 0;
  while ((1 << plan->bm_log2) < plan->bm) ++plan->bm_log2;
  // Lanes per logits micro tile: the largest power of two (<= 32) that keeps every micro tile on its own lanes.
  const int micro_tiles = stacks * (((C + 3) & ~3) / 4) * (plan->bm / 4);
  plan->ks_log2 = 0;
  while (plan->ks_log2 < 5 && micro_tiles * (2 << plan->ks_log2) <= kThreads) ++plan->ks_log2;
  // The limit is the same value every time (the device's maximum), so concurrent callers cannot race on it.
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  int per_sm_blocks = 0;
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_blocks, kernel, kThreads, plan->smem);
  }
  if (err != cudaSuccess) return err;
  if (per_sm_blocks < 1) return kErrTooWide;
  plan->tiles = (rows + plan->bm - 1) / plan->bm;
  plan->blocks = static_cast<int>(std::min<long long>(plan->tiles, static_cast<long long>(per_sm_blocks) * sms));
  if (stacks == 1) {
    const long long slice = 4LL * C * (D + 1);
    plan->blocks = static_cast<int>(std::min<long long>(plan->blocks, std::max(1LL, kMaxWorkspaceBytes / slice)));
  }
  return kOk;
}

Geometry make_geometry(const Plan& plan, int64_t batch, int64_t width, int64_t pixels, int64_t stride_b,
                       int64_t stride_d, int64_t stride_p, int C, int Cy) {
  Geometry g;
  g.rows = batch * pixels;
  g.pixels = pixels;
  g.stride_b = stride_b;
  g.stride_d = stride_d;
  g.stride_p = stride_p;
  g.tiles = plan.tiles;
  g.width = static_cast<int>(width);
  g.columns = C;
  g.columns4 = (C + 3) & ~3;
  g.y_columns = Cy;
  g.bm = plan.bm;
  g.bm_log2 = plan.bm_log2;
  g.bmp = plan.bm + 4;
  g.ks_log2 = plan.ks_log2;
  // [N, D] rows (P = 1) and channels_last maps (D stride 1, P stride D) are contiguous along D.
  g.d_fast = stride_d == 1 && (pixels == 1 || stride_p != 1) ? 1 : 0;
  return g;
}

template <typename T>
int fwd_workspace(int64_t rows, int D, int C, int64_t* floats) {
  Plan plan;
  const int status = make_plan(dgr_fwd_kernel<T>, 1, rows, D, C, &plan);
  if (status != kOk) return status;
  *floats = static_cast<int64_t>(plan.blocks) * C * (D + 1);
  return kOk;
}

template <typename T>
int fwd(const void* z, int64_t batch, int64_t width, int64_t pixels, int64_t stride_b, int64_t stride_d,
        int64_t stride_p, const float* weight, const float* bias, const float* y, const float* omega, int C, int Cy,
        const Tasks& tasks, float* workspace, int64_t workspace_floats, float* g_w, float* g_b,
        cudaStream_t stream) {
  const int D = static_cast<int>(width);
  Plan plan;
  int status = make_plan(dgr_fwd_kernel<T>, 1, batch * pixels, D, C, &plan);
  if (status != kOk) return status;
  if (static_cast<int64_t>(plan.blocks) * C * (D + 1) > workspace_floats) return kErrWorkspace;
  const Geometry g = make_geometry(plan, batch, width, pixels, stride_b, stride_d, stride_p, C, Cy);
  if (plan.blocks > 0) {
    dgr_fwd_kernel<T><<<plan.blocks, kThreads, plan.smem, stream>>>(static_cast<const T*>(z), weight, bias, y, omega,
                                                                    workspace, plan.gacc_in_smem, g, tasks);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const long long n = static_cast<long long>(C) * (D + 1);
  dgr_reduce_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      workspace, plan.blocks, C, D, g_w, g_b);
  return cudaGetLastError();
}

template <typename T>
int bwd(const void* z, int64_t batch, int64_t width, int64_t pixels, int64_t stride_b, int64_t stride_d,
        int64_t stride_p, const float* weight, const float* bias, const float* y, const float* omega,
        const float* gt_w, const float* gt_b, int C, int Cy, const Tasks& tasks, void* dz, cudaStream_t stream) {
  const int D = static_cast<int>(width);
  if (batch * pixels == 0 || D == 0) return kOk;  // dz has no element
  Plan plan;
  const int status = make_plan(dgr_bwd_kernel<T>, 2, batch * pixels, D, C, &plan);
  if (status != kOk) return status;
  const Geometry g = make_geometry(plan, batch, width, pixels, stride_b, stride_d, stride_p, C, Cy);
  dgr_bwd_kernel<T><<<plan.blocks, kThreads, plan.smem, stream>>>(static_cast<const T*>(z), weight, bias, y, omega,
                                                                  gt_w, gt_b, static_cast<T*>(dz), g, tasks);
  return cudaGetLastError();
}

}  // namespace

extern "C" {

const char* dgr_penalty_cuda_status_string(int status) {
  switch (status) {
    case kOk: return "no error";
    case kErrDtype: return "the features' dtype must be float32, float16 or bfloat16";
    case kErrTasks: return "the number of tasks T must be between 1 and 32";
    case kErrColumns: return "the stacked heads must have between 1 and 256 columns C (sum of C_k)";
    case kErrMeta:
      return "inconsistent task metadata: loss codes 0..3, col_offsets increasing from 0 to C, y_offsets from 0 to "
             "Cy with one column per 'ce' task and C_k columns per other task";
    case kErrShape: return "negative or too large sizes";
    case kErrTooWide:
      return "the feature width D is too large for this kernel: a tile of 8 rows, 4 * 12 * (D + 2 ceil4(C)) + 128 "
             "bytes, must fit the shared memory of one block (D <= 4096 for every C <= 256 on sm_90)";
    case kErrWorkspace: return "the workspace is smaller than dgr_penalty_cuda_fwd_workspace asked for";
    default: return status > 0 ? cudaGetErrorString(static_cast<cudaError_t>(status)) : "unknown status";
  }
}

int dgr_penalty_cuda_fwd_workspace(int dtype, int64_t batch, int64_t width, int64_t pixels, int num_columns,
                                   int64_t* workspace_floats) {
  *workspace_floats = 0;
  int status = check_shape(batch, width, pixels);
  if (status != kOk) return status;
  if (num_columns < 1 || num_columns > kMaxColumns) return kErrColumns;
  const int D = static_cast<int>(width);
  switch (dtype) {
    case kFloat32: return fwd_workspace<float>(batch * pixels, D, num_columns, workspace_floats);
    case kFloat16: return fwd_workspace<__half>(batch * pixels, D, num_columns, workspace_floats);
    case kBFloat16: return fwd_workspace<__nv_bfloat16>(batch * pixels, D, num_columns, workspace_floats);
    default: return kErrDtype;
  }
}

int dgr_penalty_cuda_fwd(int dtype, const void* z, int64_t batch, int64_t width, int64_t pixels, int64_t stride_b,
                         int64_t stride_d, int64_t stride_p, const float* weight, const float* bias, const float* y,
                         const float* omega, int num_tasks, int num_columns, int y_columns, const int64_t* losses,
                         const int64_t* col_offsets, const int64_t* y_offsets, float* workspace,
                         int64_t workspace_floats, float* g_w, float* g_b, cudaStream_t stream) {
  int status = check_shape(batch, width, pixels);
  if (status != kOk) return status;
  Tasks tasks;
  status = check_tasks(num_tasks, num_columns, y_columns, losses, col_offsets, y_offsets, &tasks);
  if (status != kOk) return status;
  switch (dtype) {
    case kFloat32:
      return fwd<float>(z, batch, width, pixels, stride_b, stride_d, stride_p, weight, bias, y, omega, num_columns,
                        y_columns, tasks, workspace, workspace_floats, g_w, g_b, stream);
    case kFloat16:
      return fwd<__half>(z, batch, width, pixels, stride_b, stride_d, stride_p, weight, bias, y, omega, num_columns,
                         y_columns, tasks, workspace, workspace_floats, g_w, g_b, stream);
    case kBFloat16:
      return fwd<__nv_bfloat16>(z, batch, width, pixels, stride_b, stride_d, stride_p, weight, bias, y, omega,
                                num_columns, y_columns, tasks, workspace, workspace_floats, g_w, g_b, stream);
    default: return kErrDtype;
  }
}

int dgr_penalty_cuda_bwd(int dtype, const void* z, int64_t batch, int64_t width, int64_t pixels, int64_t stride_b,
                         int64_t stride_d, int64_t stride_p, const float* weight, const float* bias, const float* y,
                         const float* omega, const float* gt_w, const float* gt_b, int num_tasks, int num_columns,
                         int y_columns, const int64_t* losses, const int64_t* col_offsets, const int64_t* y_offsets,
                         void* dz, cudaStream_t stream) {
  int status = check_shape(batch, width, pixels);
  if (status != kOk) return status;
  Tasks tasks;
  status = check_tasks(num_tasks, num_columns, y_columns, losses, col_offsets, y_offsets, &tasks);
  if (status != kOk) return status;
  switch (dtype) {
    case kFloat32:
      return bwd<float>(z, batch, width, pixels, stride_b, stride_d, stride_p, weight, bias, y, omega, gt_w, gt_b,
                        num_columns, y_columns, tasks, dz, stream);
    case kFloat16:
      return bwd<__half>(z, batch, width, pixels, stride_b, stride_d, stride_p, weight, bias, y, omega, gt_w, gt_b,
                         num_columns, y_columns, tasks, dz, stream);
    case kBFloat16:
      return bwd<__nv_bfloat16>(z, batch, width, pixels, stride_b, stride_d, stride_p, weight, bias, y, omega, gt_w,
                                gt_b, num_columns, y_columns, tasks, dz, stream);
    default: return kErrDtype;
  }
}

}  // extern "C"
