// Binding of the CUDA AdaTask step (csrc/cuda/adatask.cu) as torch.ops.dgr_fast_cuda.adatask_step_, with the same
// schema and checks as the CPU op (csrc/cpu/adatask.cpp). Builds the tensor and block tables on the host, copies them
// to the device asynchronously, and launches once. The found-inf flag is read by the kernel: no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

extern "C" int dgr_fast_adatask_block_elems(void);
extern "C" int dgr_fast_adatask_step_cuda(int dtype, int variant, const void* table, int num_blocks,
                                          const int32_t* blk_tensor, const int64_t* blk_start, const double* coef,
                                          float* au_part, const float* grad_scale, const float* found_inf,
                                          int64_t num_tasks, float w1, float beta2, float c2, float eps, float decay,
                                          void* stream);

namespace {

at::Tensor to_device_async(const at::Tensor& host, const at::Device& device) {
  // Pinned staging lets the copy run asynchronously; the caching host allocator keeps the buffer alive until the
  // copy has been consumed by the stream.
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

void adatask_step_cuda_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, const at::Tensor& coef, double lr, double beta1, double beta2,
                        double eps, double weight_decay, int64_t variant, const c10::optional<at::Tensor>& grad_scale,
                        const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& au_sums) {
  const int64_t T = int64_t(params.size());
  TORCH_CHECK(T > 0, "adatask_step_: params is empty");
  TORCH_CHECK(variant >= 0 && variant <= 2, "adatask_step_: variant must be 0, 1 or 2, got ", variant);
  TORCH_CHECK(int64_t(grads.size()) == T && int64_t(exp_avg_sqs.size()) == T,
              "adatask_step_: params, grads and exp_avg_sqs must have the same length");
  TORCH_CHECK(int64_t(exp_avgs.size()) == (variant == 0 ? T : 0),
              "adatask_step_: exp_avgs must have one tensor per param for adam and none otherwise");
  const at::Device device = params[0].device();
  const at::ScalarType pt = params[0].scalar_type();
  int dtype_code;
  switch (pt) {
    case at::kFloat:
      dtype_code = 0;
      break;
    case at::kHalf:
      dtype_code = 1;
      break;
    case at::kBFloat16:
      dtype_code = 2;
      break;
    default:
      TORCH_CHECK(false, "adatask_step_ (cuda): params must be float32, float16 or bfloat16, got ", pt);
  }
  const int64_t K = grads[0].dim() == 2 ? grads[0].size(0) : 0;
  TORCH_CHECK(K >= 1, "adatask_step_: grads must be [K, n] with K >= 1");
  const int64_t block = dgr_fast_adatask_block_elems();
  std::vector<int64_t> table(6 * T);
  std::vector<int32_t> blk_tensor;
  std::vector<int64_t> blk_start;
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    const at::Tensor& v = exp_avg_sqs[t];
    const int64_t n = p.numel();
    TORCH_CHECK(p.device() == device && p.is_contiguous() && p.scalar_type() == pt,
                "adatask_step_: params[", t, "] must be a contiguous tensor of ", pt, " on ", device);
    TORCH_CHECK(g.device() == device && g.scalar_type() == pt && g.dim() == 2 && g.size(0) == K && g.size(1) == n &&
                    (n <= 1 || g.stride(1) == 1),
                "adatask_step_: grads[", t, "] must be a [", K, ", ", n, "] tensor of ", pt, " with inner stride 1");
    TORCH_CHECK(v.device() == device && v.is_contiguous() && v.scalar_type() == at::kFloat && v.dim() == 2 &&
                    v.size(0) == K && v.size(1) == n,
                "adatask_step_: exp_avg_sqs[", t, "] must be a contiguous float32 [", K, ", ", n, "] tensor");
    void* m_ptr = nullptr;
    if (variant == 0) {
      const at::Tensor& m = exp_avgs[t];
      TORCH_CHECK(m.device() == device && m.is_contiguous() && m.scalar_type() == at::kFloat && m.dim() == 2 &&
                      m.size(0) == K && m.size(1) == n,
                  "adatask_step_: exp_avgs[", t, "] must be a contiguous float32 [", K, ", ", n, "] tensor");
      m_ptr = m.data_ptr();
    }
    table[6 * t + 0] = reinterpret_cast<int64_t>(p.data_ptr());
    table[6 * t + 1] = reinterpret_cast<int64_t>(g.data_ptr());
    table[6 * t + 2] = g.stride(0);
    table[6 * t + 3] = reinterpret_cast<int64_t>(m_ptr);
    table[6 * t + 4] = reinterpret_cast<int64_t>(v.data_ptr());
    table[6 * t + 5] = n;
    for (int64_t s = 0; s < n; s += block) {
      blk_tensor.push_back(int32_t(t));
      blk_start.push_back(s);
    }
  }
  TORCH_CHECK(coef.device() == device && coef.scalar_type() == at::kDouble && coef.is_contiguous() &&
                  coef.numel() == 2 * T,
              "adatask_step_: coef must be a contiguous float64 [T, 2] tensor on ", device);
  for (const auto* opt : {&grad_scale, &found_inf}) {
    if (opt->has_value()) {
      TORCH_CHECK((*opt)->device() == device && (*opt)->scalar_type() == at::kFloat && (*opt)->numel() == 1,
                  "adatask_step_: grad_scale and found_inf must be 1-element float32 tensors on ", device);
    }
  }
  if (au_sums.has_value()) {
    TORCH_CHECK(au_sums->device() == device && au_sums->scalar_type() == at::kFloat && au_sums->is_contiguous() &&
                    au_sums->numel() == T * K,
                "adatask_step_: au_sums must be a contiguous float32 [T, K] tensor on ", device);
  }
  const int64_t NB = int64_t(blk_tensor.size());
  if (NB == 0) {
    if (au_sums.has_value()) au_sums->zero_();
    return;
  }
  c10::cuda::CUDAGuard guard(device);
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  const at::Tensor table_d = to_device_async(at::from_blob(table.data(), {6 * T}, long_opts), device);
  const at::Tensor blk_tensor_d =
      to_device_async(at::from_blob(blk_tensor.data(), {NB}, at::TensorOptions().dtype(at::kInt)), device);
  const at::Tensor blk_start_d = to_device_async(at::from_blob(blk_start.data(), {NB}, long_opts), device);
  at::Tensor au_part;
  if (au_sums.has_value()) au_part = at::empty({NB, K}, at::TensorOptions().dtype(at::kFloat).device(device));
  const int err = dgr_fast_adatask_step_cuda(
      dtype_code, int(variant), table_d.data_ptr(), int(NB), blk_tensor_d.data_ptr<int32_t>(),
      blk_start_d.data_ptr<int64_t>(), coef.data_ptr<double>(), au_sums.has_value() ? au_part.data_ptr<float>() : nullptr,
      grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr,
      found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr, K, float(1.0 - beta1), float(beta2),
      float(variant == 2 ? 1.0 : 1.0 - beta2), float(eps), float(1.0 - lr * weight_decay),
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == 0, "adatask_step_ (cuda): kernel launch failed with cudaError ", err);
  if (au_sums.has_value()) au_sums->zero_().index_add_(0, blk_tensor_d.to(at::kLong), au_part);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dgr_fast_cuda, m) {
  m.def(
      "adatask_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor coef, float lr, float beta1, float beta2, float eps, float weight_decay, int variant, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor(d!)? au_sums) -> ()");
}

TORCH_LIBRARY_IMPL(dgr_fast_cuda, CUDA, m) { m.impl("adatask_step_", &adatask_step_cuda_); }
