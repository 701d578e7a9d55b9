// AdaTask fused step on CUDA: every tensor of a (device, dtype) bucket in one launch. Kernels and an extern "C"
// launcher only, no torch headers (csrc/cuda/adatask_cuda.cpp binds it), so nvcc can compile-check it anywhere.
//
// Matches dgr_fast/reference/adatask.py; the arithmetic is that of csrc/cpu/adatask.cpp and
// dgr_fast/kernels/adatask.py, written with explicit round-to-nearest intrinsics so that --use_fast_math (on in
// setup.py) cannot make sqrt or division approximate or contract a multiply and an add behind our back.
//
// Multi-tensor by a table: block b owns kBlockElems elements of tensor blk_tensor[b] from blk_start[b]; each thread
// keeps kPerThread elements' running sum over tasks in registers, so θ is read and written once and each task's
// gradient and moments are read and written once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int kBlockElems = kThreads * kPerThread;

// One row of the tensor table, as the binding lays it out: six 64-bit words per tensor.
struct TensorEntry {
  void* param;
  const void* grad;
  int64_t grad_stride;  // elements between tasks
  float* exp_avg;       // [K, n] (adam only)
  float* exp_avg_sq;    // [K, n]
  int64_t numel;
};

template <typename P>
__device__ __forceinline__ float to_float(P x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename P>
__device__ __forceinline__ P from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float block_sum(float x, float* smem) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem is reused from the previous task
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += smem[w];
  return total;
}

template <typename P, int V, bool kTrackAu>
__global__ void __launch_bounds__(kThreads)
    adatask_kernel(const TensorEntry* __restrict__ table, const int32_t* __restrict__ blk_tensor,
                   const int64_t* __restrict__ blk_start, const double* __restrict__ coef, float* __restrict__ au_part,
                   const float* __restrict__ grad_scale, const float* __restrict__ found_inf, int64_t num_tasks,
                   float w1, float beta2, float c2, float eps, float decay) {
  // A skipped step writes nothing but zero AU partials: the flag is read on the device, no host sync.
  const bool skip = found_inf != nullptr && *found_inf != 0.f;
  const int b = blockIdx.x;
  const TensorEntry e = table[blk_tensor[b]];
  const int64_t start = blk_start[b];
  const float nss = -static_cast<float>(coef[2 * blk_tensor[b]]);
  const float bc2 = static_cast<float>(coef[2 * blk_tensor[b] + 1]);
  const float inv = grad_scale != nullptr ? __frcp_rn(*grad_scale) : 1.f;
  P* param = static_cast<P*>(e.param);
  const P* grad = static_cast<const P*>(e.grad);
  __shared__ float smem[kThreads / 32];

  int64_t idx[kPerThread];
  bool live[kPerThread];
  float acc[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    idx[j] = start + threadIdx.x + j * kThreads;
    live[j] = !skip && idx[j] < e.numel;
    acc[j] = 0.f;
  }
  for (int64_t k = 0; k < num_tasks; ++k) {
    const P* g_k = grad + k * e.grad_stride;
    float* v_k = e.exp_avg_sq + k * e.numel;
    float* m_k = V == 0 ? e.exp_avg + k * e.numel : nullptr;
    float share = 0.f;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (!live[j]) continue;
      const float g = __fmul_rn(to_float(g_k[idx[j]]), inv);
      float numer, denom, v;
      if (V == 0) {
        const float m_old = m_k[idx[j]];
        const float m = __fmaf_rn(w1, __fsub_rn(g, m_old), m_old);
        v = __fmaf_rn(__fmul_rn(c2, g), g, __fmul_rn(v_k[idx[j]], beta2));
        m_k[idx[j]] = m;
        numer = m;
        denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2), eps);
      } else {
        const float v_old = v_k[idx[j]];
        v = __fmaf_rn(__fmul_rn(c2, g), g, V == 1 ? __fmul_rn(v_old, beta2) : v_old);
        numer = g;
        denom = __fadd_rn(__fsqrt_rn(v), eps);
      }
      v_k[idx[j]] = v;
      const float u = __fdiv_rn(__fmul_rn(nss, numer), denom);
      acc[j] = __fadd_rn(acc[j], u);
      share = __fmaf_rn(u, u, share);
    }
    if (kTrackAu) {
      const float total = block_sum(share, smem);
      if (threadIdx.x == 0) au_part[b * num_tasks + k] = total;
    }
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    if (!live[j]) continue;
    param[idx[j]] = from_float<P>(__fadd_rn(__fmul_rn(to_float(param[idx[j]]), decay), acc[j]));
  }
}

template <typename P, int V>
cudaError_t launch_typed(bool track_au, const TensorEntry* table, int num_blocks, const int32_t* blk_tensor,
                         const int64_t* blk_start, const double* coef, float* au_part, const float* grad_scale,
                         const float* found_inf, int64_t num_tasks, float w1, float beta2, float c2, float eps,
                         float decay, cudaStream_t stream) {
  if (track_au) {
    adatask_kernel<P, V, true><<<num_blocks, kThreads, 0, stream>>>(table, blk_tensor, blk_start, coef, au_part,
                                                                    grad_scale, found_inf, num_tasks, w1, beta2, c2,
                                                                    eps, decay);
  } else {
    adatask_kernel<P, V, false><<<num_blocks, kThreads, 0, stream>>>(table, blk_tensor, blk_start, coef, au_part,
                                                                     grad_scale, found_inf, num_tasks, w1, beta2, c2,
                                                                     eps, decay);
  }
  return cudaGetLastError();
}

template <typename P>
cudaError_t launch_variant(int variant, bool track_au, const TensorEntry* table, int num_blocks,
                           const int32_t* blk_tensor, const int64_t* blk_start, const double* coef, float* au_part,
                           const float* grad_scale, const float* found_inf, int64_t num_tasks, float w1, float beta2,
                           float c2, float eps, float decay, cudaStream_t stream) {
  switch (variant) {
    case 0:
      return launch_typed<P, 0>(track_au, table, num_blocks, blk_tensor, blk_start, coef, au_part, grad_scale,
                                found_inf, num_tasks, w1, beta2, c2, eps, decay, stream);
    case 1:
      return launch_typed<P, 1>(track_au, table, num_blocks, blk_tensor, blk_start, coef, au_part, grad_scale,
                                found_inf, num_tasks, w1, beta2, c2, eps, decay, stream);
    case 2:
      return launch_typed<P, 2>(track_au, table, num_blocks, blk_tensor, blk_start, coef, au_part, grad_scale,
                                found_inf, num_tasks, w1, beta2, c2, eps, decay, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

// Elements per block: the binding cuts every tensor into blocks of this many elements.
int dgr_fast_adatask_block_elems(void) { return kBlockElems; }

// dtype: 0 float32, 1 float16, 2 bfloat16; variant: 0 adam, 1 rmsprop, 2 adagrad. `table` (device memory) holds
// six 64-bit words per tensor in TensorEntry's order. grad_scale, found_inf, au_part may be null. Returns a
// cudaError_t (0 on success).
int dgr_fast_adatask_step_cuda(int dtype, int variant, const void* table, int num_blocks, const int32_t* blk_tensor,
                               const int64_t* blk_start, const double* coef, float* au_part, const float* grad_scale,
                               const float* found_inf, int64_t num_tasks, float w1, float beta2, float c2, float eps,
                               float decay, void* stream) {
  if (num_blocks <= 0) return cudaSuccess;
  const auto* t = static_cast<const TensorEntry*>(table);
  const auto s = static_cast<cudaStream_t>(stream);
  const bool track = au_part != nullptr;
  switch (dtype) {
    case 0:
      return launch_variant<float>(variant, track, t, num_blocks, blk_tensor, blk_start, coef, au_part, grad_scale,
                                   found_inf, num_tasks, w1, beta2, c2, eps, decay, s);
    case 1:
      return launch_variant<__half>(variant, track, t, num_blocks, blk_tensor, blk_start, coef, au_part, grad_scale,
                                    found_inf, num_tasks, w1, beta2, c2, eps, decay, s);
    case 2:
      return launch_variant<__nv_bfloat16>(variant, track, t, num_blocks, blk_tensor, blk_start, coef, au_part,
                                           grad_scale, found_inf, num_tasks, w1, beta2, c2, eps, decay, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // extern "C"
