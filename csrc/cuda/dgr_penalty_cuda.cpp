// Binding of the `cuda` backend of the DGR penalty: torch.ops.dgr_fast_cuda.dgr_penalty_fwd / dgr_penalty_bwd
// (called by dgr_fast/ops/dgr_penalty.py, `_kernels("cuda")`). The kernels are in dgr_penalty.cu, behind the
// extern "C" launchers declared below; this file checks the tensors, allocates the outputs and the workspace with
// ATen on the inputs' device, and launches on the current stream. Arguments as the cpp backend (docs/DESIGN.md section 4).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <tuple>

// BEGIN dgr_penalty.cu launchers (tests/test_dgr_cuda.py compiles these declarations together with the .cu file)
extern "C" {
const char* dgr_penalty_cuda_status_string(int status);
int dgr_penalty_cuda_fwd_workspace(int dtype, int64_t batch, int64_t width, int64_t pixels, int num_columns,
                                   int64_t* workspace_floats);
int dgr_penalty_cuda_fwd(int dtype, const void* z, int64_t batch, int64_t width, int64_t pixels, int64_t stride_b,
                         int64_t stride_d, int64_t stride_p, const float* weight, const float* bias, const float* y,
                         const float* omega, int num_tasks, int num_columns, int y_columns, const int64_t* losses,
                         const int64_t* col_offsets, const int64_t* y_offsets, float* workspace,
                         int64_t workspace_floats, float* g_w, float* g_b, cudaStream_t stream);
int dgr_penalty_cuda_bwd(int dtype, const void* z, int64_t batch, int64_t width, int64_t pixels, int64_t stride_b,
                         int64_t stride_d, int64_t stride_p, const float* weight, const float* bias, const float* y,
                         const float* omega, const float* gt_w, const float* gt_b, int num_tasks, int num_columns,
                         int y_columns, const int64_t* losses, const int64_t* col_offsets, const int64_t* y_offsets,
                         void* dz, cudaStream_t stream);
}
// END dgr_penalty.cu launchers

namespace {

// The dtype codes of dgr_penalty.cu.
int dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: return -1;
  }
}

// The packed problem (see `pack()` in dgr_penalty.py), checked; small accumulation-dtype tensors made contiguous.
struct Problem {
  int dtype;
  int64_t batch, width, pixels;
  int tasks, columns, y_columns;
  at::Tensor weight, bias, y, omega;
};

void check_acc(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& z3) {
  TORCH_CHECK(t.device() == z3.device(), op, " (cuda): ", name, " is on ", t.device(), " but z3 is on ", z3.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, " (cuda): ", name, " must be float32 (the accumulation dtype), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, " (cuda): ", name, " must have shape ", shape, ", got ", t.sizes());
}

Problem check_problem(const char* op, const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& y, const at::Tensor& omega, at::IntArrayRef losses,
                      at::IntArrayRef col_offsets, at::IntArrayRef y_offsets) {
  TORCH_CHECK(z3.is_cuda(), op, " (cuda): z3 must be a CUDA tensor, got one on ", z3.device());
  TORCH_CHECK(z3.dim() == 3, op, " (cuda): z3 must be [B, D, P], got shape ", z3.sizes());
  Problem p;
  p.dtype = dtype_code(z3.scalar_type());
  TORCH_CHECK(p.dtype >= 0, op, " (cuda): z3 must be float32, float16 or bfloat16, got ", z3.scalar_type());
  p.batch = z3.size(0);
  p.width = z3.size(1);
  p.pixels = z3.size(2);
  const int64_t tasks = static_cast<int64_t>(losses.size());
  TORCH_CHECK(tasks >= 1 && static_cast<int64_t>(col_offsets.size()) == tasks + 1 &&
                  static_cast<int64_t>(y_offsets.size()) == tasks + 1,
              op, " (cuda): losses must have T >= 1 entries and col_offsets, y_offsets T + 1; got ", tasks, ", ",
              col_offsets.size(), ", ", y_offsets.size());
  TORCH_CHECK(weight.dim() == 2, op, " (cuda): weight must be [C, D], got shape ", weight.sizes());
  TORCH_CHECK(y.dim() == 2, op, " (cuda): y must be [R, Cy], got shape ", y.sizes());
  const int64_t columns = weight.size(0), y_columns = y.size(1);
  const int64_t rows = p.batch * p.pixels;
  TORCH_CHECK(col_offsets[tasks] == columns, op, " (cuda): col_offsets must end at C = weight.shape[0] = ", columns,
              ", got ", col_offsets[tasks]);
  TORCH_CHECK(y_offsets[tasks] == y_columns, op, " (cuda): y_offsets must end at y.shape[1] = ", y_columns, ", got ",
              y_offsets[tasks]);
  check_acc(op, "weight", weight, {columns, p.width}, z3);
  check_acc(op, "bias", bias, {columns}, z3);
  check_acc(op, "y", y, {rows, y_columns}, z3);
  check_acc(op, "omega", omega, {rows, tasks}, z3);
  // The launcher checks the limits (T, C, D) and the metadata itself and says which one is exceeded.
  TORCH_CHECK(tasks <= INT32_MAX && columns <= INT32_MAX && y_columns <= INT32_MAX, op, " (cuda): sizes too large");
  p.tasks = static_cast<int>(tasks);
  p.columns = static_cast<int>(columns);
  p.y_columns = static_cast<int>(y_columns);
  p.weight = weight.contiguous();
  p.bias = bias.contiguous();
  p.y = y.contiguous();
  p.omega = omega.contiguous();
  return p;
}

void check_status(const char* op, int status, const Problem& p) {
  TORCH_CHECK(status == 0, op, " (cuda) with T = ", p.tasks, " tasks, C = ", p.columns, " columns, D = ", p.width,
              ": ", dgr_penalty_cuda_status_string(status));
}

std::tuple<at::Tensor, at::Tensor> dgr_penalty_fwd_cuda(const at::Tensor& z3, const at::Tensor& weight,
                                                        const at::Tensor& bias, const at::Tensor& y,
                                                        const at::Tensor& omega, at::IntArrayRef losses,
                                                        at::IntArrayRef col_offsets, at::IntArrayRef y_offsets) {
  const char* op = "dgr_penalty_fwd";
  const Problem p = check_problem(op, z3, weight, bias, y, omega, losses, col_offsets, y_offsets);
  const c10::cuda::CUDAGuard guard(z3.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z3.device().index()).stream();
  int64_t workspace_floats = 0;
  check_status(op, dgr_penalty_cuda_fwd_workspace(p.dtype, p.batch, p.width, p.pixels, p.columns, &workspace_floats),
               p);
  const at::TensorOptions options = p.weight.options();
  at::Tensor workspace = at::empty({workspace_floats}, options);
  at::Tensor g_w = at::empty({p.columns, p.width}, options);
  at::Tensor g_b = at::empty({p.columns}, options);
  check_status(op,
               dgr_penalty_cuda_fwd(p.dtype, z3.data_ptr(), p.batch, p.width, p.pixels, z3.stride(0), z3.stride(1),
                                    z3.stride(2), p.weight.data_ptr<float>(), p.bias.data_ptr<float>(),
                                    p.y.data_ptr<float>(), p.omega.data_ptr<float>(), p.tasks, p.columns,
                                    p.y_columns, losses.data(), col_offsets.data(), y_offsets.data(),
                                    workspace.data_ptr<float>(), workspace_floats, g_w.data_ptr<float>(),
                                    g_b.data_ptr<float>(), stream),
               p);
  return {g_w, g_b};
}

at::Tensor dgr_penalty_bwd_cuda(const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& y, const at::Tensor& omega, const at::Tensor& gt_w,
                                const at::Tensor& gt_b, at::IntArrayRef losses, at::IntArrayRef col_offsets,
                                at::IntArrayRef y_offsets) {
  const char* op = "dgr_penalty_bwd";
  const Problem p = check_problem(op, z3, weight, bias, y, omega, losses, col_offsets, y_offsets);
  check_acc(op, "gt_w", gt_w, {p.columns, p.width}, z3);
  check_acc(op, "gt_b", gt_b, {p.columns}, z3);
  const at::Tensor gw = gt_w.contiguous(), gb = gt_b.contiguous();
  const c10::cuda::CUDAGuard guard(z3.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z3.device().index()).stream();
  at::Tensor dz = at::empty({p.batch, p.width, p.pixels}, z3.options());  // contiguous
  check_status(op,
               dgr_penalty_cuda_bwd(p.dtype, z3.data_ptr(), p.batch, p.width, p.pixels, z3.stride(0), z3.stride(1),
                                    z3.stride(2), p.weight.data_ptr<float>(), p.bias.data_ptr<float>(),
                                    p.y.data_ptr<float>(), p.omega.data_ptr<float>(), gw.data_ptr<float>(),
                                    gb.data_ptr<float>(), p.tasks, p.columns, p.y_columns, losses.data(),
                                    col_offsets.data(), y_offsets.data(), dz.data_ptr(), stream),
               p);
  return dz;
}

}  // namespace

// FRAGMENT: adatask_cuda.cpp adds its ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(dgr_fast_cuda, m) {
  m.def(
      "dgr_penalty_fwd(Tensor z3, Tensor weight, Tensor bias, Tensor y, Tensor omega, int[] losses, "
      "int[] col_offsets, int[] y_offsets) -> (Tensor, Tensor)");
  m.def(
      "dgr_penalty_bwd(Tensor z3, Tensor weight, Tensor bias, Tensor y, Tensor omega, Tensor gt_w, Tensor gt_b, "
      "int[] losses, int[] col_offsets, int[] y_offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(dgr_fast_cuda, CUDA, m) {
  m.impl("dgr_penalty_fwd", &dgr_penalty_fwd_cuda);
  m.impl("dgr_penalty_bwd", &dgr_penalty_bwd_cuda);
}
