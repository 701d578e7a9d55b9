// AdaTask fused step on the CPU: every tensor of a (device, dtype) bucket in one at::parallel_for.
//
// Matches dgr_fast/reference/adatask.py (adatask_step_reference). The arithmetic follows the op order of
// torch.optim.Adam's single-tensor path (lerp as fma(w, g - m, m), addcmul as fma(c * g, g, b2 * v), addcdiv as
// (value * m) / denom), so K = 1 agrees with torch.optim.Adam to the last bit or so: the remaining difference is
// sqrt, correctly rounded here and not in ATen's vectorised kernel.
//
// Work is cut into chunks of at most kChunk elements of one tensor. A chunk keeps the running sum over tasks of the
// update in a small buffer that stays in L1, and streams each task's gradient and moments through once: θ, K
// gradients and 2K moments are read once and θ and the 2K moments written once.
// Fused multiply-adds only where torch.optim.Adam has them (explicit fmadd below): GCC contracts a * b + c by default.
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <type_traits>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 2048;
enum Variant : int64_t { kAdam = 0, kRmsprop = 1, kAdagrad = 2 };

template <typename P, typename S>
struct Slot {
  P* param;
  const P* grad;
  int64_t grad_stride;  // between tasks; a [K, P] buffer's per-parameter view has stride P
  S* exp_avg;           // [K, n], null for rmsprop/adagrad
  S* exp_avg_sq;        // [K, n]
  int64_t numel;
  S neg_step_size;  // -lr / (1 - b1^t) for adam, -lr otherwise
  S bc2_sqrt;       // sqrt(1 - b2^t) for adam, 1 otherwise
};

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

struct Hyper {
  double beta1, beta2, eps, decay, inv_scale;
  int64_t num_tasks;
};

// Per-element coefficients of one tensor, in the math type S.
template <typename S>
struct Coeffs {
  S w1, c2, beta2, eps, inv, nss, bc2;
};

template <bool kFma, typename S>
inline __attribute__((always_inline)) S fmadd(S a, S b, S c) {
  if constexpr (kFma) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// One element of one task: updates m and v, returns the task's term of the update, -lr_t * numer / denom.
template <int64_t V, bool kFma, typename S>
inline __attribute__((always_inline)) S update_one(S graw, S* m, S* v, const Coeffs<S>& c) {
  const S g = graw * c.inv;
  if constexpr (V == kAdam) {
    const S mi = fmadd<kFma>(c.w1, g - *m, *m);
    const S vi = fmadd<kFma>(c.c2 * g, g, *v * c.beta2);
    *m = mi;
    *v = vi;
    return (c.nss * mi) / (std::sqrt(vi) / c.bc2 + c.eps);
  } else {
    const S vi = fmadd<kFma>(c.c2 * g, g, V == kRmsprop ? *v * c.beta2 : *v);
    *v = vi;
    return (c.nss * g) / (std::sqrt(vi) + c.eps);
  }
}

// One task over one chunk, fp32 math, 8 lanes of AVX2 + FMA: the same operations as update_one<V, true, float>.
// Explicit intrinsics rather than auto-vectorisation: GCC will not vectorise sqrt without -fno-math-errno, and the
// build flags are shared with other sources.
template <int64_t V>
__attribute__((target("avx2,fma"))) float task_avx2(const float* g, float* m, float* v, float* acc, int64_t len,
                                                     const Coeffs<float>& c) {
  const __m256 w1 = _mm256_set1_ps(c.w1), c2 = _mm256_set1_ps(c.c2), beta2 = _mm256_set1_ps(c.beta2);
  const __m256 eps = _mm256_set1_ps(c.eps), inv = _mm256_set1_ps(c.inv), nss = _mm256_set1_ps(c.nss);
  const __m256 bc2 = _mm256_set1_ps(c.bc2);
  __m256 share = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), inv);
    const __m256 vo = _mm256_loadu_ps(v + i);
    __m256 u;
    if constexpr (V == kAdam) {
      const __m256 mo = _mm256_loadu_ps(m + i);
      const __m256 mi = _mm256_fmadd_ps(w1, _mm256_sub_ps(gi, mo), mo);
      const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(c2, gi), gi, _mm256_mul_ps(vo, beta2));
      _mm256_storeu_ps(m + i, mi);
      _mm256_storeu_ps(v + i, vi);
      u = _mm256_div_ps(_mm256_mul_ps(nss, mi), _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps));
    } else {
      const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(c2, gi), gi, V == kRmsprop ? _mm256_mul_ps(vo, beta2) : vo);
      _mm256_storeu_ps(v + i, vi);
      u = _mm256_div_ps(_mm256_mul_ps(nss, gi), _mm256_add_ps(_mm256_sqrt_ps(vi), eps));
    }
    _mm256_storeu_ps(acc + i, _mm256_add_ps(_mm256_loadu_ps(acc + i), u));
    share = _mm256_fmadd_ps(u, u, share);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, share);
  float total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < len; ++i) {
    const float u = update_one<V, true>(g[i], m == nullptr ? nullptr : m + i, v + i, c);
    acc[i] += u;
    total += u * u;
  }
  return total;
}

template <int64_t V, typename S>
float task_plain(const S* g, S* m, S* v, S* acc, int64_t len, const Coeffs<S>& c) {
  S total = S(0);
  for (int64_t i = 0; i < len; ++i) {
    const S u = update_one<V, false>(g[i], m == nullptr ? nullptr : m + i, v + i, c);
    acc[i] += u;
    total += u * u;
  }
  return float(total);
}

// One chunk of one tensor, every task. The fp32-math path runs on AVX2 + FMA where the CPU has it (checked at run
// time: the build flags carry no -march); the plain path (fp64, or an old CPU) is the same arithmetic without FMA.
template <int64_t V, typename P, typename S>
void chunk(const Slot<P, S>& s, const Chunk& ch, const Hyper& h, bool avx2, double* au) {
  const int64_t len = ch.end - ch.begin;
  const Coeffs<S> c{S(1.0 - h.beta1), S(V == kAdagrad ? 1.0 : 1.0 - h.beta2), S(h.beta2), S(h.eps),
                    S(h.inv_scale),   s.neg_step_size,                         s.bc2_sqrt};
  S acc[kChunk];
  S gbuf[std::is_same_v<P, S> ? 1 : kChunk];
  for (int64_t i = 0; i < len; ++i) acc[i] = S(0);
  for (int64_t k = 0; k < h.num_tasks; ++k) {
    const P* graw = s.grad + k * s.grad_stride + ch.begin;
    const S* g;
    if constexpr (std::is_same_v<P, S>) {
      g = graw;
    } else {
      for (int64_t i = 0; i < len; ++i) gbuf[i] = S(graw[i]);
      g = gbuf;
    }
    S* v = s.exp_avg_sq + k * s.numel + ch.begin;
    S* m = V == kAdam ? s.exp_avg + k * s.numel + ch.begin : nullptr;
    float share;
    if constexpr (std::is_same_v<S, float>) {
      share = avx2 ? task_avx2<V>(g, m, v, acc, len, c) : task_plain<V>(g, m, v, acc, len, c);
    } else {
      share = task_plain<V>(g, m, v, acc, len, c);
    }
    if (au != nullptr) au[k] += double(share);
  }
  // θ * (1 - lr wd) rounded, then the update added: torch.optim.AdamW's mul_ followed by addcdiv_.
  const S decay = S(h.decay);
  P* p = s.param + ch.begin;
  for (int64_t i = 0; i < len; ++i) {
    const S shrunk = S(p[i]) * decay;
    p[i] = P(shrunk + acc[i]);
  }
}

template <int64_t V, typename P, typename S>
void run(const std::vector<Slot<P, S>>& slots, const Hyper& h, double* au_partial, const std::vector<Chunk>& chunks) {
  static const bool avx2 = __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
  const int64_t K = h.num_tasks;
  at::parallel_for(0, int64_t(chunks.size()), 4, [&](int64_t begin, int64_t end) {
    for (int64_t ci = begin; ci < end; ++ci) {
      const Chunk& c = chunks[ci];
      double* au = au_partial == nullptr ? nullptr : au_partial + ci * K;
      chunk<V>(slots[c.tensor], c, h, avx2, au);
    }
  });
}

template <typename P, typename S>
void step_typed(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const at::Tensor& coef, const Hyper& h, int64_t variant, const c10::optional<at::Tensor>& au_sums) {
  const int64_t T = int64_t(params.size());
  const double* cf = coef.data_ptr<double>();
  std::vector<Slot<P, S>> slots(T);
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = params[t].numel();
    slots[t] = Slot<P, S>{params[t].data_ptr<P>(),
                          grads[t].const_data_ptr<P>(),
                          grads[t].stride(0),
                          variant == kAdam ? exp_avgs[t].data_ptr<S>() : nullptr,
                          exp_avg_sqs[t].data_ptr<S>(),
                          n,
                          S(-cf[2 * t]),
                          S(cf[2 * t + 1])};
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back(Chunk{t, b, std::min(n, b + kChunk)});
  }
  std::vector<double> au_partial;
  if (au_sums.has_value()) au_partial.assign(chunks.size() * h.num_tasks, 0.0);
  double* aup = au_sums.has_value() ? au_partial.data() : nullptr;
  switch (variant) {
    case kAdam:
      run<kAdam>(slots, h, aup, chunks);
      break;
    case kRmsprop:
      run<kRmsprop>(slots, h, aup, chunks);
      break;
    default:
      run<kAdagrad>(slots, h, aup, chunks);
  }
  if (au_sums.has_value()) {
    // A fixed-order reduction of the per-chunk partial sums: the result does not depend on the thread count.
    std::vector<double> total(T * h.num_tasks, 0.0);
    for (size_t ci = 0; ci < chunks.size(); ++ci)
      for (int64_t k = 0; k < h.num_tasks; ++k) total[chunks[ci].tensor * h.num_tasks + k] += au_partial[ci * h.num_tasks + k];
    float* out = au_sums->data_ptr<float>();
    for (int64_t i = 0; i < T * h.num_tasks; ++i) out[i] = float(total[i]);
  }
}

void adatask_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const at::Tensor& coef, double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t variant, const c10::optional<at::Tensor>& grad_scale,
                   const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& au_sums) {
  const int64_t T = int64_t(params.size());
  TORCH_CHECK(T > 0, "adatask_step_: params is empty");
  TORCH_CHECK(variant >= kAdam && variant <= kAdagrad, "adatask_step_: variant must be 0, 1 or 2, got ", variant);
  TORCH_CHECK(int64_t(grads.size()) == T && int64_t(exp_avg_sqs.size()) == T,
              "adatask_step_: params, grads and exp_avg_sqs must have the same length");
  TORCH_CHECK(int64_t(exp_avgs.size()) == (variant == kAdam ? T : 0),
              "adatask_step_: exp_avgs must have one tensor per param for adam and none otherwise");
  const at::ScalarType pt = params[0].scalar_type();
  const at::ScalarType st = pt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t K = grads[0].dim() == 2 ? grads[0].size(0) : 0;
  TORCH_CHECK(K >= 1, "adatask_step_: grads must be [K, n] with K >= 1");
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    const int64_t n = p.numel();
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == pt,
                "adatask_step_: params[", t, "] must be a contiguous CPU tensor of ", pt);
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == pt && g.dim() == 2 && g.size(0) == K && g.size(1) == n &&
                    (n <= 1 || g.stride(1) == 1),
                "adatask_step_: grads[", t, "] must be a CPU [", K, ", ", n, "] tensor of ", pt, " with inner stride 1");
    const at::Tensor& v = exp_avg_sqs[t];
    TORCH_CHECK(v.device().is_cpu() && v.is_contiguous() && v.scalar_type() == st && v.dim() == 2 && v.size(0) == K &&
                    v.size(1) == n,
                "adatask_step_: exp_avg_sqs[", t, "] must be a contiguous CPU [", K, ", ", n, "] tensor of ", st);
    if (variant == kAdam) {
      const at::Tensor& m = exp_avgs[t];
      TORCH_CHECK(m.device().is_cpu() && m.is_contiguous() && m.scalar_type() == st && m.dim() == 2 &&
                      m.size(0) == K && m.size(1) == n,
                  "adatask_step_: exp_avgs[", t, "] must be a contiguous CPU [", K, ", ", n, "] tensor of ", st);
    }
  }
  TORCH_CHECK(coef.device().is_cpu() && coef.scalar_type() == at::kDouble && coef.is_contiguous() &&
                  coef.numel() == 2 * T,
              "adatask_step_: coef must be a contiguous CPU float64 [T, 2] tensor");
  if (au_sums.has_value()) {
    TORCH_CHECK(au_sums->device().is_cpu() && au_sums->scalar_type() == at::kFloat && au_sums->is_contiguous() &&
                    au_sums->numel() == T * K,
                "adatask_step_: au_sums must be a contiguous CPU float32 [T, K] tensor");
  }
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) {
    // GradScaler found inf/NaN: nothing moves. Reading the flag is free here, the tensors being on the host.
    if (au_sums.has_value()) au_sums->zero_();
    return;
  }
  Hyper h{beta1, beta2, eps, 1.0 - lr * weight_decay, 1.0, K};
  if (grad_scale.has_value()) h.inv_scale = double(1.0f / grad_scale->item<float>());
  switch (pt) {
    case at::kFloat:
      step_typed<float, float>(params, grads, exp_avgs, exp_avg_sqs, coef, h, variant, au_sums);
      break;
    case at::kDouble:
      step_typed<double, double>(params, grads, exp_avgs, exp_avg_sqs, coef, h, variant, au_sums);
      break;
    case at::kBFloat16:
      step_typed<at::BFloat16, float>(params, grads, exp_avgs, exp_avg_sqs, coef, h, variant, au_sums);
      break;
    case at::kHalf:
      step_typed<at::Half, float>(params, grads, exp_avgs, exp_avg_sqs, coef, h, variant, au_sums);
      break;
    default:
      TORCH_CHECK(false, "adatask_step_: params must be float32, float64, bfloat16 or float16, got ", pt);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgr_fast_cpu, m) {
  m.def(
      "adatask_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor coef, float lr, float beta1, float beta2, float eps, float weight_decay, int variant, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor(d!)? au_sums) -> ()");
}

TORCH_LIBRARY_IMPL(dgr_fast_cpu, CPU, m) { m.impl("adatask_step_", &adatask_step_); }
