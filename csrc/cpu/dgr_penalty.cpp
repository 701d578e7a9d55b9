// The `cpp` backend of dgr_fast.dgr_penalty: the two passes of docs/DESIGN.md section 4 on CPU tensors.
//
// Matches the `torch` backend of dgr_fast/ops/dgr_penalty.py, which reads the same problem packed into rows:
//   dgr_penalty_fwd == `_torch_gradients`: (G_W, G_b) = sum over rows of (r z^T, r), and `task_penalties` of them;
//   dgr_penalty_bwd == `row_scale` then `_torch_features_grad`: dz = [2 Gt_W; W]^T [r; H u], s and r recomputed;
//   the per-loss functions below (`ce_columns` ...) are `_residual_rows`: r without u, and H u with it, one function
//   per loss for both passes.
// The same sums in a different order: rows are cut into tiles (up to 256 pixels of one image, or up to 64 rows);
// per tile the logits are one small GEMM, the residuals are computed in place, and the tile's G contribution
// (forward) or dz (backward) is a second GEMM. Columns of l1 tasks have H = 0: the backward leaves them out of
// u and H u instead of multiplying by zero.
//
// The targets and masks are read in place too (`Source`, per task), staged tile by tile, and each row's validity is
// decided there: the op allocates nothing row-sized but dz, and its caller makes no pass over the targets. The forward
// counts each task's valid rows n_t, checks the class indices of the valid ce rows, and sums G with omega = valid;
// it scales task t's rows of G by 1 / n_t (the `scales` it returns) at the end, which is the same sum as
// `_torch_gradients` with omega = valid / n_t. The backward is given those scales.
//
// Stash: asked for, the forward allocates dz3 and writes each tile's logits s into that tile's own region of it; the
// backward given that buffer (dgr_penalty_bwd_stashed) reads them back instead of recomputing them (C of its C + Ch
// projected rows) before it writes the tile's dz over them. The logits are the values the recomputation gives, bit for
// bit (hsum adds in the order of hsums' tree, so no value depends on its place in a register block).
//
// Layouts, without a copy of z: a tile is read in place either as [D][n] (pixels contiguous: dense maps, a transposed
// [N, D]) or as [n][D] (channels contiguous: [N, D] rows, channels_last maps). fp16/bf16 tiles and other strides are
// converted or gathered into a per-thread buffer of one of those two forms. Accumulation is in fp32 (fp64 for fp64
// inputs).
//
// Determinism: the forward cuts the tiles into blocks whose size depends on the shape only; each block sums into
// its own partial (G_W, G_b), and the partials are added in block order: the result is the same for any number of
// threads. The backward writes each row of dz from its own tile only.
//
// Instruction sets: the build carries no -march, so the kernels (the second half of this file) are compiled twice,
// by including this file into itself: for AVX2+FMA with 32-byte vectors, and for the baseline with 16-byte vectors;
// the copy is picked at run time. A function `target` attribute alone is not enough: GCC lowers the generic vector
// code of the (baseline) helpers before inlining them, and the AVX2 copy then runs a third slower.
//
// at::parallel_for is only parallel when this file is compiled with -fopenmp (ATen's OpenMP backend is a header).
#ifndef DGR_PENALTY_KERNELS
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define DGR_INLINE inline __attribute__((always_inline))
#if !defined(__clang__)
// The kernels pass vectors only between inlined functions: GCC's note about their ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace dgr_penalty_cpu {
namespace {

enum Loss : int64_t { kCe = 0, kBce = 1, kMse = 2, kL1 = 3 };

// Buffer rows are whole 32-byte vectors (enough for both copies of the kernels) plus one cache line: rows whose
// distance is a multiple of 4 KiB share an L1 set, and a GEMM walking down more of them than the cache has ways
// thrashes it (measured on W = [C, 2048]: 2.5 times slower). z and dz are read and written in place all the same:
// staging every tile through such a buffer cost as much as it saved.
constexpr int64_t kRowAlign = 32, kRowPad = 64;
// Buffers start on a cache line, so that their rows (whole vectors apart) do too: an unaligned 32-byte load splits
// across two lines half of the time.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, LineAligned<T>>;

// Tiles of up to 64 KiB of z: the dense forward's dot products over the tile's pixels get long enough, and the tile
// stays in L2 (measured at D = 64: 32 and 128 KiB are slower). Dense tiles ([D][n]) keep at least 128 pixels even
// where that is more (1 MiB at D = 2048): below that the horizontal sums of those dot products cost as much as the
// products (measured at 2x2048x36x48: 16-pixel tiles ran the forward at 0.15-0.19 of the matmul rate, 128-pixel
// tiles at 0.41-0.50, and the backward 1.5x faster too).
constexpr int64_t kTileBytes = 64 * 1024, kMinDenseTile = 128;

// One task's targets and mask, read in place: element (b, c, p) of the targets is y[b * sb + c * sc + p * sp] (cls,
// the class indices, for ce), and row (b, p) is valid where mask[b * vb + p * vp] (every row where null) and, for
// ce, its class index is not `ignore`. Valid rows have weight omega = scale. (The packed omega of the other
// backends is valid / n_t.)
template <typename T>
struct Source {
  const T* y = nullptr;
  const int64_t* cls = nullptr;
  int64_t sb = 0, sc = 0, sp = 0;
  const bool* mask = nullptr;
  int64_t vb = 0, vp = 0;
  int64_t ignore = 0, classes = 0;
  T scale = T(0);
};

// What the forward learns of the rows while it stages them, per block and task: valid rows, and the first valid ce
// row (b * P + p) whose class index is outside [0, C_t), with that index. kTally entries per task.
enum TallyEntry : int64_t { kCount = 0, kBadRow = 1, kBadClass = 2, kTally = 3 };

// The problem, normalised: z3 is read as B images of P rows; [N, D, 1] becomes one image of N rows (swapped), so
// that a tile of consecutive rows is one affine block of memory in every layout.
template <typename T>
struct Problem {
  at::ScalarType dtype;  // of z3 and dz3
  bool same;             // dtype is T: z3 may be read and dz3 written in place
  int64_t B, D, P;
  bool swapped;        // z3 was [N, D, 1]: its batch dimension is read as the row dimension
  int64_t zb, zd, zp;  // strides of z3
  int64_t ob, od, op;  // strides of dz3 (contiguous [B, D, P] before normalisation)
  bool rows;           // tiles are [n][D] (channels contiguous) rather than [D][n]
  int64_t tile;        // rows per tile
  int64_t ld, ldd;     // buffer row strides for tile rows (pixels of a channel, logits ...) and for D channels
  int64_t tiles_per_image, tiles;

  // The tasks the kernels compute: all of the op's in the forward; in the backward those with dR_t != 0 (the
  // others add exactly 0 to dz: their rows of Gt are 0, so are their u and H u).
  int64_t C, Cy, tasks, Ch;  // logit columns, target columns, tasks, columns with a non-zero Hessian
  std::vector<int64_t> loss, c0, y0, h0;  // per task; c0 and y0 have tasks + 1 entries; h0 = -1 for l1 tasks
  std::vector<int64_t> task_src, col_src;  // per task / per column: its index among the op's tasks / stacked columns
  std::vector<Source<T>> src;              // per task

  // The first GEMM gives [s; u] = A1 z + bias1 (M1 = C rows in the forward, C + Ch in the backward); the backward's
  // second is dz = A2^T [r; H u]. A1, A2: M1 rows of D, ldd apart.
  const T* A1;
  const T* bias1;
  const T* A2;
  int64_t M1;

  // Where the forward keeps each tile's logits s for the backward, or nullptr: the memory of dz3 itself (T, laid
  // out as dz3), the logits of a tile inside that tile's own region of it (`stash_logits`), so that the backward
  // reads them before it writes the tile's dz over them and needs no extra buffer.
  T* stash = nullptr;
};

template <typename T>
void set_geometry(Problem<T>& pr, const at::Tensor& z3) {
  pr.dtype = z3.scalar_type();
  pr.same = pr.dtype == c10::CppTypeToScalarType<T>::value;
  pr.B = z3.size(0);
  pr.D = z3.size(1);
  pr.P = z3.size(2);
  pr.zb = z3.stride(0);
  pr.zd = z3.stride(1);
  pr.zp = z3.stride(2);
  pr.ob = pr.D * pr.P;
  pr.od = pr.P;
  pr.op = 1;
  pr.swapped = pr.P == 1;
  if (pr.swapped) {
    std::swap(pr.B, pr.P);
    pr.zp = pr.zb;
    pr.op = pr.ob;
    pr.zb = pr.ob = 0;
  }
  // The stride of a dimension of size 1 is arbitrary; 1 keeps the layout tests below meaningful.
  if (pr.D == 1) pr.zd = pr.od = 1;
  if (pr.P == 1) pr.zp = pr.op = 1;
  pr.rows = pr.zp != 1 && pr.zd == 1;
  const int64_t per_row = std::max<int64_t>(pr.D, 1) * int64_t(sizeof(T)), lanes = kRowAlign / int64_t(sizeof(T));
  int64_t tile = pr.rows ? 64 : 256;
  const int64_t min_tile = pr.rows ? 2 * lanes : kMinDenseTile;
  while (tile > min_tile && tile * per_row > kTileBytes) tile /= 2;
  pr.tile = std::min(tile, std::max<int64_t>(pr.P, 1));
  const auto padded = [&](int64_t n) { return (n + lanes - 1) / lanes * lanes + kRowPad / int64_t(sizeof(T)); };
  pr.ld = padded(pr.tile);
  pr.ldd = padded(pr.D);
  pr.tiles_per_image = (pr.P + pr.tile - 1) / pr.tile;
  pr.tiles = pr.B * pr.tiles_per_image;
}

// The tile's targets are staged as y0 rows per task (one for ce's class index, C_k otherwise), as the packed layout.
// grad: the backward's dR (the tasks with dR_t == 0 are left out), or nullptr for every task.
template <typename T>
void set_heads(Problem<T>& pr, at::IntArrayRef losses, at::IntArrayRef col_offsets, const at::Tensor* grad) {
  pr.loss.clear();
  pr.task_src.clear();
  pr.col_src.clear();
  pr.h0.clear();
  pr.c0.assign(1, 0);
  pr.y0.assign(1, 0);
  pr.Ch = 0;
  for (int64_t t = 0; t < int64_t(losses.size()); ++t) {
    if (grad && grad->accessor<T, 1>()[t] == T(0)) continue;
    const int64_t nc = col_offsets[t + 1] - col_offsets[t];
    pr.task_src.push_back(t);
    for (int64_t c = col_offsets[t]; c < col_offsets[t + 1]; ++c) pr.col_src.push_back(c);
    pr.loss.push_back(losses[t]);
    pr.c0.push_back(pr.c0.back() + nc);
    pr.y0.push_back(pr.y0.back() + (losses[t] == kCe ? 1 : nc));
    pr.h0.push_back(losses[t] == kL1 ? -1 : pr.Ch);
    if (losses[t] != kL1) pr.Ch += nc;
  }
  pr.tasks = int64_t(pr.task_src.size());
  pr.C = pr.c0.back();
  pr.Cy = pr.y0.back();
}

// After set_geometry: the row strides follow z3's normalisation (a swapped problem reads the batch stride as p's).
// scales: one per task (the backward), or nullptr for 1 (the forward, which finds them).
template <typename T>
void set_sources(Problem<T>& pr, at::TensorList targets, const c10::List<std::optional<at::Tensor>>& masks,
                 at::IntArrayRef ignore_index, const T* scales) {
  const auto rows = [&](int64_t sb, int64_t sp, int64_t* ob, int64_t* op) {
    *ob = pr.swapped ? 0 : sb;
    *op = pr.swapped ? sb : sp;
  };
  pr.src.assign(pr.tasks, Source<T>{});
  for (int64_t t = 0; t < pr.tasks; ++t) {
    Source<T>& s = pr.src[t];
    const int64_t k = pr.task_src[t];
    const at::Tensor& y = targets[k];
    if (pr.loss[t] == kCe) {
      s.cls = y.data_ptr<int64_t>();
      rows(y.stride(0), y.stride(1), &s.sb, &s.sp);
    } else {
      s.y = y.data_ptr<T>();
      s.sc = y.stride(1);
      rows(y.stride(0), y.stride(2), &s.sb, &s.sp);
    }
    const std::optional<at::Tensor> m = masks.get(k);
    if (m.has_value() && m->defined()) {
      s.mask = m->data_ptr<bool>();
      rows(m->stride(0), m->stride(1), &s.vb, &s.vp);
    }
    s.ignore = ignore_index[k];
    s.classes = pr.c0[t + 1] - pr.c0[t];
    s.scale = scales ? scales[k] : T(1);
  }
}

// f(Storage{}) for the storage type of z3 and dz3: T itself, or fp16/bf16 for fp32 accumulation.
template <typename T, typename F>
void with_storage(at::ScalarType dtype, const F& f) {
  if constexpr (std::is_same_v<T, double>) {
    f(double{});
  } else {
    switch (dtype) {
      case at::kHalf: f(at::Half{}); break;
      case at::kBFloat16: f(at::BFloat16{}); break;
      default: f(float{}); break;
    }
  }
}

// Elements per forward block partial (G_W [C][ldd], then G_b [C]), whole cache lines so that every partial starts on
// one.
template <typename T>
int64_t partial_slot(const Problem<T>& pr) {
  const int64_t line = 64 / int64_t(sizeof(T));
  return (pr.C * pr.ldd + pr.C + line - 1) / line * line;
}

// Copies an outer x inner block, src[o * so + k * sk] to dst[o * dout + k * dk], converting.
template <typename S, typename D>
DGR_INLINE void copy_block(const S* src, int64_t so, int64_t sk, D* dst, int64_t dout, int64_t dk, int64_t outer, int64_t inner) {
  for (int64_t o = 0; o < outer; ++o) {
    const S* s = src + o * so;
    D* d = dst + o * dout;
    if (sk == 1 && dk == 1) {
      for (int64_t k = 0; k < inner; ++k) d[k] = static_cast<D>(s[k]);
    } else {
      for (int64_t k = 0; k < inner; ++k) d[k * dk] = static_cast<D>(s[k * sk]);
    }
  }
}

// Whether z3 is T and has the compute layout's contiguous dimension (dz3 likewise): then its tiles are read (written)
// in place rather than through a per-thread buffer.
template <typename T>
bool reads_z_in_place(const Problem<T>& pr) {
  return pr.same && (pr.rows || pr.zp == 1);
}

template <typename T>
bool writes_dz_in_place(const Problem<T>& pr) {
  return pr.same && (pr.rows ? pr.od == 1 : pr.op == 1);
}

// The tile of rows p0 .. p0 + n of image b, as [D][n] (rows == false) or [n][D], in T; *ldz receives its row
// stride. Read in place where reads_z_in_place, else staged in buf ([D][ld] or [n][ldd]), the copy's inner loop
// along z3's smaller stride.
template <typename T>
DGR_INLINE const T* tile_z(const Problem<T>& pr, const void* z, int64_t b, int64_t p0, int64_t n, T* buf, int64_t* ldz) {
  const int64_t offset = b * pr.zb + p0 * pr.zp;
  if (reads_z_in_place(pr)) {
    *ldz = pr.rows ? pr.zp : pr.zd;
    return static_cast<const T*>(z) + offset;
  }
  *ldz = pr.rows ? pr.ldd : pr.ld;
  const int64_t bi = pr.rows ? pr.ldd : 1, bd = pr.rows ? 1 : pr.ld;  // element (i, d) is buf[i * bi + d * bd]
  with_storage<T>(pr.dtype, [&](auto tag) {
    const auto* base = static_cast<const decltype(tag)*>(z) + offset;
    if (pr.zp <= pr.zd)
      copy_block(base, pr.zd, pr.zp, buf, bd, bi, pr.D, n);
    else
      copy_block(base, pr.zp, pr.zd, buf, bi, bd, n, pr.D);
  });
  return buf;
}

// Where the tile of dz was computed in a buffer (laid out as tile_z's): copy (and convert) it into dz3.
template <typename T>
void store_tile(const Problem<T>& pr, const T* buf, int64_t ldb, int64_t n, void* dz, int64_t offset) {
  const int64_t bi = pr.rows ? ldb : 1, bd = pr.rows ? 1 : ldb;
  with_storage<T>(pr.dtype, [&](auto tag) {
    auto* base = static_cast<decltype(tag)*>(dz) + offset;
    if (pr.op <= pr.od)
      copy_block(buf, bd, bi, base, pr.od, pr.op, pr.D, n);
    else
      copy_block(buf, bi, bd, base, pr.op, pr.od, n, pr.D);
  });
}

}  // namespace
}  // namespace dgr_penalty_cpu

// The two copies of the kernels (the #else branch at the end of this file). The AVX2 copy needs GCC's target pragma.
#define DGR_PENALTY_KERNELS
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DGR_HAVE_AVX2_COPY 1
#define DGR_VEC_BYTES 32
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace dgr_penalty_cpu {
namespace {
namespace avx2 {
#include "dgr_penalty.cpp"
}  // namespace avx2
}  // namespace
}  // namespace dgr_penalty_cpu
#pragma GCC pop_options
#undef DGR_VEC_BYTES
#else
#define DGR_HAVE_AVX2_COPY 0
#endif
#define DGR_VEC_BYTES 16
namespace dgr_penalty_cpu {
namespace {
namespace baseline {
#include "dgr_penalty.cpp"
}  // namespace baseline
}  // namespace
}  // namespace dgr_penalty_cpu
#undef DGR_VEC_BYTES
#undef DGR_PENALTY_KERNELS

namespace dgr_penalty_cpu {
namespace {

#if DGR_HAVE_AVX2_COPY
// DGR_FAST_CPU_BASELINE=1 forces the baseline copy, so that tests reach it on AVX2 machines. Read once.
bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("DGR_FAST_CPU_BASELINE") == nullptr;
  return yes;
}
#endif

// The kernels' best copy for this CPU. fp64 is the gradcheck path: the baseline copy only, which keeps the build
// shorter.
template <typename T>
void dispatch_forward(const Problem<T>& pr, const void* z, int64_t per_block, int64_t blk0, int64_t blk1, T* parts,
                      int64_t* tallies) {
#if DGR_HAVE_AVX2_COPY
  if constexpr (std::is_same_v<T, float>)
    if (use_avx2()) return avx2::forward_blocks(pr, z, per_block, blk0, blk1, parts, tallies);
#endif
  baseline::forward_blocks(pr, z, per_block, blk0, blk1, parts, tallies);
}

template <typename T>
void dispatch_backward(const Problem<T>& pr, const void* z, int64_t t0, int64_t t1, void* dz) {
#if DGR_HAVE_AVX2_COPY
  if constexpr (std::is_same_v<T, float>)
    if (use_avx2()) return avx2::backward_tiles(pr, z, t0, t1, dz);
#endif
  baseline::backward_tiles(pr, z, t0, t1, dz);
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checks (for direct callers; `pack()` already guarantees all of this) and the two ops.

void check_tensor(const at::Tensor& x, const std::string& name, at::ScalarType dtype, at::IntArrayRef shape, bool contiguous) {
  TORCH_CHECK(x.device().is_cpu(), "dgr_penalty (cpp): ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == dtype, "dgr_penalty (cpp): ", name, " must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.sizes() == shape, "dgr_penalty (cpp): ", name, " must have shape ", shape, ", got ", x.sizes());
  TORCH_CHECK(!contiguous || x.is_contiguous(), "dgr_penalty (cpp): ", name, " must be contiguous");
}

// Returns the accumulation dtype (that of weight, bias, scales and the float targets).
at::ScalarType check_args(const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias, at::TensorList targets,
                          const c10::List<std::optional<at::Tensor>>& masks, at::IntArrayRef ignore_index,
                          at::IntArrayRef losses, at::IntArrayRef col_offsets) {
  TORCH_CHECK(z3.device().is_cpu(), "dgr_penalty (cpp): z3 must be a CPU tensor, got ", z3.device());
  TORCH_CHECK(z3.dim() == 3, "dgr_penalty (cpp): z3 must be [B, D, P], got ", z3.sizes());
  const auto zt = z3.scalar_type();
  TORCH_CHECK(zt == at::kFloat || zt == at::kDouble || zt == at::kHalf || zt == at::kBFloat16,
              "dgr_penalty (cpp): z3 must be float32, float64, float16 or bfloat16, got ", zt);
  const auto acc = zt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t T = int64_t(losses.size());
  TORCH_CHECK(T >= 1, "dgr_penalty (cpp): losses is empty");
  TORCH_CHECK(int64_t(col_offsets.size()) == T + 1 && int64_t(targets.size()) == T && int64_t(masks.size()) == T &&
                  int64_t(ignore_index.size()) == T,
              "dgr_penalty (cpp): col_offsets needs len(losses) + 1 = ", T + 1, " entries and targets, masks and ",
              "ignore_index ", T, ", got ", col_offsets.size(), ", ", targets.size(), ", ", masks.size(), " and ",
              ignore_index.size());
  TORCH_CHECK(col_offsets[0] == 0, "dgr_penalty (cpp): col_offsets must start at 0");
  const int64_t B = z3.size(0), D = z3.size(1), P = z3.size(2);
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(losses[t] >= kCe && losses[t] <= kL1, "dgr_penalty (cpp): losses[", t, "] = ", losses[t],
                " is not a loss code (0 ce, 1 bce, 2 mse, 3 l1)");
    const int64_t nc = col_offsets[t + 1] - col_offsets[t];
    TORCH_CHECK(nc >= 1, "dgr_penalty (cpp): task ", t, " has ", nc, " columns (col_offsets must increase)");
    const std::string name = "targets[" + std::to_string(t) + "]";
    if (losses[t] == kCe)
      check_tensor(targets[t], name + " (ce)", at::kLong, {B, P}, false);
    else
      check_tensor(targets[t], name, acc, {B, nc, P}, false);
    const std::optional<at::Tensor> m = masks.get(t);
    if (m.has_value() && m->defined()) check_tensor(*m, "masks[" + std::to_string(t) + "]", at::kBool, {B, P}, false);
  }
  check_tensor(weight, "weight", acc, {col_offsets[T], D}, true);
  check_tensor(bias, "bias", acc, {col_offsets[T]}, false);
  return acc;
}

// scales, grad: the backward's (checked; scales contiguous), or nullptr in the forward.
template <typename T>
Problem<T> make_problem(const at::Tensor& z3, at::TensorList targets, const c10::List<std::optional<at::Tensor>>& masks,
                        at::IntArrayRef ignore_index, const at::Tensor* scales, const at::Tensor* grad,
                        at::IntArrayRef losses, at::IntArrayRef col_offsets) {
  Problem<T> pr;
  set_heads(pr, losses, col_offsets, grad);
  set_geometry(pr, z3);
  set_sources(pr, targets, masks, ignore_index, scales ? scales->data_ptr<T>() : nullptr);
  return pr;
}

// A stash is possible where z3 is the accumulation dtype acc (the logits are kept exactly) and a row's `columns`
// logits fit in its D channels.
bool can_stash(const at::Tensor& z3, at::ScalarType acc, int64_t columns) {
  return z3.scalar_type() == acc && columns <= z3.size(1);
}

// Returns (R, G_W, G_b, scales, stash): scales[t] = 1 / max(n_t, 1), n_t = task t's valid rows times per_row[t]
// (its columns for an elementwise mean), task t's rows of G scaled by it, G_b zero for a task without a bias,
// R[t] = ||G_W[t]||^2 + ||G_b[t]||^2 (`task_penalties`), and with `stash` (where can_stash) the buffer dz3 will be,
// holding the tile logits (see Problem::stash); else an undefined tensor (None).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    Problem<T> pr, const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias,
    const c10::List<bool>& has_bias, at::IntArrayRef per_row, bool stash) {
  const int64_t C = pr.C, D = pr.D, ldd = pr.ldd;
  const at::Tensor b = bias.contiguous();
  Buffer<T> A1(C * ldd);
  const T* W = weight.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) std::copy(W + c * D, W + (c + 1) * D, A1.data() + c * ldd);
  pr.A1 = A1.data();
  pr.bias1 = b.data_ptr<T>();
  pr.A2 = nullptr;
  pr.M1 = C;
  at::Tensor kept;
  if (stash && can_stash(z3, weight.scalar_type(), C)) {
    kept = at::empty(z3.sizes(), z3.options().memory_format(at::MemoryFormat::Contiguous));
    pr.stash = kept.data_ptr<T>();
  }
  // Blocks of 1024 rows, and at least 16 rows per logit column, so that the partials stay small next to z; a smaller
  // problem is cut into up to 8 blocks, of at least 4 rows per logit column (partials at most a quarter of z), so that
  // its forward does not run on one thread (1024 rows, C = 16 or 64: 1.8x faster on 2 threads). The blocking depends
  // on the shape only.
  const int64_t rows = pr.B * pr.P, large = std::max<int64_t>(1024, 16 * pr.C);
  const int64_t block_rows = std::max<int64_t>(4 * pr.C, std::min<int64_t>(large, (rows + 7) / 8));
  const int64_t per_block = std::max<int64_t>(1, (block_rows + pr.tile - 1) / pr.tile);
  const int64_t blocks = (pr.tiles + per_block - 1) / per_block, slot = partial_slot(pr);
  Buffer<T> parts(blocks * slot);
  std::vector<int64_t> tallies(blocks * pr.tasks * kTally);
  const void* z = z3.data_ptr();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    dispatch_forward(pr, z, per_block, b0, b1, parts.data(), tallies.data());
  });
  at::Tensor scales = at::empty({pr.tasks}, weight.options());
  T* sc = scales.data_ptr<T>();
  for (int64_t t = 0; t < pr.tasks; ++t) {
    int64_t valid_rows = 0;
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t* tally = tallies.data() + (k * pr.tasks + t) * kTally;
      // Blocks are in row order: the first block that saw a bad class index holds the task's first one. The message
      // is the one `dgr_penalty`'s own check gives for the other backends.
      TORCH_CHECK_VALUE(tally[kBadRow] < 0, "targets[", t, "] holds class index ", tally[kBadClass], " outside [0, ",
                        pr.src[t].classes, ") (C_k = weights[", t, "].shape[0]; ignore_index = ", pr.src[t].ignore, ")");
      valid_rows += tally[kCount];
    }
    sc[t] = T(1) / T(std::max<int64_t>(valid_rows * per_row[t], 1));
  }
  // Per column: its task's scale, and for G_b 0 where the task has no bias (its G_b does not count in R).
  std::vector<T> column_scale(C), bias_scale(C);
  for (int64_t t = 0; t < pr.tasks; ++t)
    for (int64_t c = pr.c0[t]; c < pr.c0[t + 1]; ++c) {
      column_scale[c] = sc[t];
      bias_scale[c] = has_bias.get(t) ? sc[t] : T(0);
    }
  at::Tensor g_w = at::zeros({C, D}, weight.options()), g_b = at::zeros({C}, weight.options());
  T *gw = g_w.data_ptr<T>(), *gb = g_b.data_ptr<T>();
  std::vector<T> row_norms(C);  // ||G_W[c]||^2
  // Row c < C of G_W, or G_b for c == C, summed over the blocks in block order, then scaled.
  at::parallel_for(0, C + 1, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* out = c < C ? gw + c * D : gb;
      const int64_t from = c * ldd, len = c < C ? D : C;
      for (int64_t k = 0; k < blocks; ++k) {
        const T* part = parts.data() + k * slot + from;
        for (int64_t e = 0; e < len; ++e) out[e] += part[e];
      }
      T norm = 0;
      for (int64_t e = 0; e < len; ++e) {
        out[e] *= c < C ? column_scale[c] : bias_scale[e];
        norm += out[e] * out[e];
      }
      if (c < C) row_norms[c] = norm;
    }
  });
  at::Tensor penalties = at::zeros({pr.tasks}, weight.options());
  T* R = penalties.data_ptr<T>();
  for (int64_t t = 0; t < pr.tasks; ++t)
    for (int64_t c = pr.c0[t]; c < pr.c0[t + 1]; ++c) R[t] += row_norms[c] + gb[c] * gb[c];
  return {penalties, g_w, g_b, scales, kept};
}

// grad: dR_t per task; Gt = grad_t G, G's rows scaled by their task's grad (`row_scale`), G = the forward's (G_W, G_b).
// stash: the forward's (dz3 is written into it), or undefined (dz3 is allocated).
template <typename T>
at::Tensor backward_impl(Problem<T> pr, const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& grad, const at::Tensor& g_w, const at::Tensor& g_b, const at::Tensor& stash) {
  const int64_t C = pr.C, D = pr.D, ldd = pr.ldd;
  pr.M1 = C + pr.Ch;
  // A1 = [W; 2 Gt_W (Hessian columns)], bias1 = [b; 2 Gt_b (same)], A2 = [2 Gt_W; W (Hessian columns)].
  const at::Tensor b = bias.contiguous(), gw = g_w.contiguous(), gb = g_b.contiguous();
  const T *W = weight.data_ptr<T>(), *bp = b.data_ptr<T>(), *GW = gw.data_ptr<T>(), *GB = gb.data_ptr<T>();
  const auto dR = grad.accessor<T, 1>();
  Buffer<T> A1(pr.M1 * ldd), bias1(pr.M1), A2(pr.M1 * ldd);
  for (int64_t t = 0; t < pr.tasks; ++t) {
    const T twice = T(2) * dR[pr.task_src[t]];
    for (int64_t c = pr.c0[t]; c < pr.c0[t + 1]; ++c) {
      const int64_t h = pr.h0[t] < 0 ? -1 : C + pr.h0[t] + (c - pr.c0[t]), k = pr.col_src[c];
      bias1[c] = bp[k];
      if (h >= 0) bias1[h] = twice * GB[k];
      for (int64_t d = 0; d < D; ++d) {
        A1[c * ldd + d] = W[k * D + d];
        A2[c * ldd + d] = twice * GW[k * D + d];
        if (h >= 0) {
          A1[h * ldd + d] = twice * GW[k * D + d];
          A2[h * ldd + d] = W[k * D + d];
        }
      }
    }
  }
  pr.A1 = A1.data();
  pr.bias1 = bias1.data();
  pr.A2 = A2.data();
  at::Tensor dz3 =
      stash.defined() ? stash : at::empty(z3.sizes(), z3.options().memory_format(at::MemoryFormat::Contiguous));
  if (stash.defined()) pr.stash = dz3.data_ptr<T>();
  const void* z = z3.data_ptr();
  void* dz = dz3.data_ptr();
  at::parallel_for(0, pr.tiles, 1, [&](int64_t t0, int64_t t1) { dispatch_backward(pr, z, t0, t1, dz); });
  return dz3;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dgr_penalty_fwd(
    const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias, const c10::List<bool>& has_bias,
    at::TensorList targets, const c10::List<std::optional<at::Tensor>>& masks, at::IntArrayRef ignore_index,
    at::IntArrayRef per_row, at::IntArrayRef losses, at::IntArrayRef col_offsets, bool stash) {
  check_args(z3, weight, bias, targets, masks, ignore_index, losses, col_offsets);
  TORCH_CHECK(per_row.size() == losses.size() && has_bias.size() == losses.size(), "dgr_penalty (cpp): per_row and ",
              "has_bias need ", losses.size(), " entries each, got ", per_row.size(), " and ", has_bias.size());
  for (const int64_t k : per_row) TORCH_CHECK(k >= 1, "dgr_penalty (cpp): per_row entries must be >= 1, got ", k);
  if (z3.scalar_type() == at::kDouble)
    return forward_impl(make_problem<double>(z3, targets, masks, ignore_index, nullptr, nullptr, losses, col_offsets),
                        z3, weight, bias, has_bias, per_row, stash);
  return forward_impl(make_problem<float>(z3, targets, masks, ignore_index, nullptr, nullptr, losses, col_offsets), z3,
                      weight, bias, has_bias, per_row, stash);
}

// stash: undefined, or the forward's (checked here as far as it can be: it must hold the logits of this z3).
at::Tensor backward_op(const at::Tensor& stash, const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias,
                       at::TensorList targets, const c10::List<std::optional<at::Tensor>>& masks,
                       at::IntArrayRef ignore_index, const at::Tensor& scales, const at::Tensor& grad,
                       const at::Tensor& g_w, const at::Tensor& g_b, at::IntArrayRef losses,
                       at::IntArrayRef col_offsets) {
  const auto acc = check_args(z3, weight, bias, targets, masks, ignore_index, losses, col_offsets);
  check_tensor(scales, "scales", acc, {int64_t(losses.size())}, true);
  check_tensor(grad, "grad", acc, {int64_t(losses.size())}, false);
  check_tensor(g_w, "g_w", acc, weight.sizes(), false);
  check_tensor(g_b, "g_b", acc, bias.sizes(), false);
  if (stash.defined()) {
    TORCH_CHECK(can_stash(z3, acc, col_offsets.back()), "dgr_penalty (cpp): a stash needs ",
                "float32/float64 features with at least as many channels as logit columns (the forward returns none ",
                "otherwise)");
    check_tensor(stash, "stash", acc, z3.sizes(), true);
  }
  if (z3.scalar_type() == at::kDouble)
    return backward_impl(make_problem<double>(z3, targets, masks, ignore_index, &scales, &grad, losses, col_offsets), z3,
                         weight, bias, grad, g_w, g_b, stash);
  return backward_impl(make_problem<float>(z3, targets, masks, ignore_index, &scales, &grad, losses, col_offsets), z3,
                       weight, bias, grad, g_w, g_b, stash);
}

at::Tensor dgr_penalty_bwd(const at::Tensor& z3, const at::Tensor& weight, const at::Tensor& bias, at::TensorList targets,
                           const c10::List<std::optional<at::Tensor>>& masks, at::IntArrayRef ignore_index,
                           const at::Tensor& scales, const at::Tensor& grad, const at::Tensor& g_w,
                           const at::Tensor& g_b, at::IntArrayRef losses, at::IntArrayRef col_offsets) {
  return backward_op(at::Tensor(), z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses,
                     col_offsets);
}

// dgr_penalty_bwd on the forward's stash: dz3 is written into it.
void dgr_penalty_bwd_stashed(const at::Tensor& stash, const at::Tensor& z3, const at::Tensor& weight,
                             const at::Tensor& bias, at::TensorList targets,
                             const c10::List<std::optional<at::Tensor>>& masks, at::IntArrayRef ignore_index,
                             const at::Tensor& scales, const at::Tensor& grad, const at::Tensor& g_w,
                             const at::Tensor& g_b, at::IntArrayRef losses, at::IntArrayRef col_offsets) {
  TORCH_CHECK(stash.defined(), "dgr_penalty (cpp): dgr_penalty_bwd_stashed needs the forward's stash");
  backward_op(stash, z3, weight, bias, targets, masks, ignore_index, scales, grad, g_w, g_b, losses, col_offsets);
}

}  // namespace
}  // namespace dgr_penalty_cpu

TORCH_LIBRARY_FRAGMENT(dgr_fast_cpu, m) {
  m.def(
      "dgr_penalty_fwd(Tensor z3, Tensor weight, Tensor bias, bool[] has_bias, Tensor[] targets, Tensor?[] masks, "
      "int[] ignore_index, int[] per_row, int[] losses, int[] col_offsets, bool stash) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dgr_penalty_bwd(Tensor z3, Tensor weight, Tensor bias, Tensor[] targets, Tensor?[] masks, int[] ignore_index, "
      "Tensor scales, Tensor grad, Tensor g_w, Tensor g_b, int[] losses, int[] col_offsets) -> Tensor");
  m.def(
      "dgr_penalty_bwd_stashed(Tensor(a!) stash, Tensor z3, Tensor weight, Tensor bias, Tensor[] targets, "
      "Tensor?[] masks, int[] ignore_index, Tensor scales, Tensor grad, Tensor g_w, Tensor g_b, int[] losses, "
      "int[] col_offsets) -> ()");
}

TORCH_LIBRARY_IMPL(dgr_fast_cpu, CPU, m) {
  m.impl("dgr_penalty_fwd", &dgr_penalty_cpu::dgr_penalty_fwd);
  m.impl("dgr_penalty_bwd", &dgr_penalty_cpu::dgr_penalty_bwd);
  m.impl("dgr_penalty_bwd_stashed", &dgr_penalty_cpu::dgr_penalty_bwd_stashed);
}

#else  // DGR_PENALTY_KERNELS: the kernels, compiled once per copy (namespaces avx2 and baseline above)

// ---------------------------------------------------------------------------------------------------------------
// DGR_VEC_BYTES-wide vectors (GCC vector extensions): one AVX register or one SSE/NEON register.

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(DGR_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(DGR_VEC_BYTES)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(DGR_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(DGR_VEC_BYTES)));
};
template <typename T>
using Vec = typename Simd<T>::V;
template <typename T>
constexpr int64_t kLanes = DGR_VEC_BYTES / sizeof(T);

template <typename T>
DGR_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
DGR_INLINE void vstore(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}
// x - 0 is x exactly (x + 0 is not, for x = -0): a plain broadcast, from memory where x is loaded.
template <typename T>
DGR_INLINE Vec<T> vsplat(T x) {
  return x - Vec<T>{};
}
// For fp32 in the order of hsums' tree below, so that a dot product's value does not depend on whether it was summed
// in a group of four or alone (which its place in the register blocks decides).
template <typename T>
DGR_INLINE T hsum(Vec<T> v) {
  if constexpr (std::is_same_v<T, float> && kLanes<T> == 8) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  } else if constexpr (std::is_same_v<T, float> && kLanes<T> == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    T s = 0;
    for (int64_t i = 0; i < kLanes<T>; ++i) s += v[i];
    return s;
  }
}

#if defined(__clang__)
#define DGR_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DGR_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, typename Simd<T>::I{__VA_ARGS__})
#endif

// out[i] = horizontal sum of c[i] for i < n; for fp32 four at a time, by a transposing tree of adds.
template <typename T>
DGR_INLINE void hsums(const Vec<T>* c, int n, T* out) {
  int i = 0;
  if constexpr (std::is_same_v<T, float> && kLanes<T> == 8) {
    for (; i + 4 <= n; i += 4) {
      const Vec<T> ab = DGR_SHUFFLE(c[i], c[i + 1], 0, 2, 8, 10, 4, 6, 12, 14) + DGR_SHUFFLE(c[i], c[i + 1], 1, 3, 9, 11, 5, 7, 13, 15);
      const Vec<T> cd = DGR_SHUFFLE(c[i + 2], c[i + 3], 0, 2, 8, 10, 4, 6, 12, 14) + DGR_SHUFFLE(c[i + 2], c[i + 3], 1, 3, 9, 11, 5, 7, 13, 15);
      const Vec<T> q = DGR_SHUFFLE(ab, cd, 0, 2, 8, 10, 4, 6, 12, 14) + DGR_SHUFFLE(ab, cd, 1, 3, 9, 11, 5, 7, 13, 15);
      for (int j = 0; j < 4; ++j) out[i + j] = q[j] + q[j + 4];
    }
  } else if constexpr (std::is_same_v<T, float> && kLanes<T> == 4) {
    for (; i + 4 <= n; i += 4) {
      const Vec<T> ab = DGR_SHUFFLE(c[i], c[i + 1], 0, 4, 1, 5) + DGR_SHUFFLE(c[i], c[i + 1], 2, 6, 3, 7);
      const Vec<T> cd = DGR_SHUFFLE(c[i + 2], c[i + 3], 0, 4, 1, 5) + DGR_SHUFFLE(c[i + 2], c[i + 3], 2, 6, 3, 7);
      const Vec<T> q = DGR_SHUFFLE(ab, cd, 0, 1, 4, 5) + DGR_SHUFFLE(ab, cd, 2, 3, 6, 7);
      for (int j = 0; j < 4; ++j) out[i + j] = q[j];
    }
  }
  for (; i < n; ++i) out[i] = hsum<T>(c[i]);
}
#undef DGR_SHUFFLE

// exp(x) = 2^k e^f with k = round(x / ln 2), |f| <= ln(2) / 2, e^f by its Taylor polynomial of degree 7 (relative
// error below 1e-8, under fp32 rounding). x is clamped to [-87, 88] so that 2^k stays a normal float; softmax
// and sigmoid only lose terms below 1e-38 that way.
DGR_INLINE Vec<float> vexp(Vec<float> x) {
  typedef Simd<float>::V V;
  typedef Simd<float>::I I;
  x = x < -87.0f ? vsplat(-87.0f) : x;
  x = x > 88.0f ? vsplat(88.0f) : x;
  const V k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // adding 1.5 * 2^23 rounds to an integer
  const V f = (x - k * 0.693145751953125f) - k * 1.428606765330187e-6f;  // ln 2 split in two: f exact enough
  V p = vsplat(1.0f / 5040.0f);
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const I bits = (__builtin_convertvector(k, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
// fp64 is the gradcheck path: libm's exp, lane by lane.
DGR_INLINE Vec<double> vexp(Vec<double> x) {
  for (int64_t i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// The two GEMM shapes every product here reduces to. Both handle any M, N, K exactly (no reads or writes outside
// the given extents). Register blocks: kAxpyRows x kAxpyVecs vectors; kDotRows x kDotCols dot products.
// 6 x 2 axpy blocks hold 12 accumulators, 2 vectors of B and a broadcast in 15 of AVX2's 16 registers, and walk a
// strip of B once per 6 rows of the output. 3 x 4 blocks (the same 12 accumulators) needed 17 registers and walked
// the strip twice as often: 6 x 2 made both kernels 15-20% faster on dense maps of 64 and 256 channels and 4% on
// [4096, 2048] rows (A/B in one process, interleaved); at 2048-channel maps the backward is 5% slower.

constexpr int kAxpyRows = 6, kAxpyVecs = 2, kDotRows = 4, kDotCols = 3;

// O[i][j] = (acc ? O[i][j] : bias[i] or 0) + sum_k A[i*am + k*ak] B[k*ldb + j] for i < MR and NV vectors of
// columns j (NV = 0: a single column).
template <typename T, int MR, int NV>
DGR_INLINE void axpy_block(int64_t K, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb, T* O,
                           int64_t ldo, const T* bias, bool acc) {
  if constexpr (NV == 0) {
    T c[MR];
    for (int i = 0; i < MR; ++i) c[i] = acc ? O[i * ldo] : bias ? bias[i] : T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T b = B[k * ldb];
      for (int i = 0; i < MR; ++i) c[i] += A[i * am + k * ak] * b;
    }
    for (int i = 0; i < MR; ++i) O[i * ldo] = c[i];
  } else {
    constexpr int64_t L = kLanes<T>;
    Vec<T> c[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) c[i][v] = acc ? vload(O + i * ldo + v * L) : vsplat<T>(bias ? bias[i] : T(0));
    for (int64_t k = 0; k < K; ++k) {
      Vec<T> b[NV];
      for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + v * L);
      for (int i = 0; i < MR; ++i) {
        const Vec<T> a = vsplat(A[i * am + k * ak]);
        for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) vstore(O + i * ldo + v * L, c[i][v]);
  }
}

// The last rows < MR of a strip, with the block of exactly that many rows.
template <typename T, int NV, int MR>
DGR_INLINE void axpy_tail(int64_t rows, int64_t K, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb, T* O,
                          int64_t ldo, const T* bias, bool acc) {
  if constexpr (MR > 0) {
    if (rows < MR) return axpy_tail<T, NV, MR - 1>(rows, K, A, am, ak, B, ldb, O, ldo, bias, acc);
    axpy_block<T, MR, NV>(K, A, am, ak, B, ldb, O, ldo, bias, acc);
  }
}

template <typename T, int NV>
DGR_INLINE void axpy_strip(int64_t M, int64_t K, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb, T* O,
                           int64_t ldo, const T* bias, bool acc) {
  constexpr int MR = kAxpyRows;
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    axpy_block<T, MR, NV>(K, A + m * am, am, ak, B, ldb, O + m * ldo, ldo, bias ? bias + m : nullptr, acc);
  axpy_tail<T, NV, MR - 1>(M - m, K, A + m * am, am, ak, B, ldb, O + m * ldo, ldo, bias ? bias + m : nullptr, acc);
}

// O[m][j] (+)= sum_k A(m, k) B[k][j]: the output's rows are contiguous along the GEMM's free dimension j.
// Column strips outer, so that a strip of B stays in L1 while every row block passes over it.
template <typename T>
DGR_INLINE void axpy(int64_t M, int64_t K, int64_t N, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb,
                     T* O, int64_t ldo, const T* bias, bool acc) {
  constexpr int64_t L = kLanes<T>, NV = kAxpyVecs;
  int64_t j = 0;
  for (; j + NV * L <= N; j += NV * L) axpy_strip<T, NV>(M, K, A, am, ak, B + j, ldb, O + j, ldo, bias, acc);
  for (; j + L <= N; j += L) axpy_strip<T, 1>(M, K, A, am, ak, B + j, ldb, O + j, ldo, bias, acc);
  for (; j < N; ++j) axpy_strip<T, 0>(M, K, A, am, ak, B + j, ldb, O + j, ldo, bias, acc);
}

// O[i][j] = (acc ? O[i][j] : bias[i] or 0) + sum_k A[i*lda + k] B[j*ldb + k] for i < MR, j < NR.
template <typename T, int MR, int NR>
DGR_INLINE void dot_block(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* O, int64_t ldo,
                          const T* bias, bool acc) {
  constexpr int64_t L = kLanes<T>;
  Vec<T> c[MR * NR];
  for (int i = 0; i < MR * NR; ++i) c[i] = Vec<T>{};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    Vec<T> b[NR];
    for (int j = 0; j < NR; ++j) b[j] = vload(B + j * ldb + k);
    for (int i = 0; i < MR; ++i) {
      const Vec<T> a = vload(A + i * lda + k);
      for (int j = 0; j < NR; ++j) c[i * NR + j] += a * b[j];
    }
  }
  T s[MR * NR];
  hsums<T>(c, MR * NR, s);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      T t = s[i * NR + j];
      for (int64_t kk = k; kk < K; ++kk) t += A[i * lda + kk] * B[j * ldb + kk];
      T* o = O + i * ldo + j;
      *o = (acc ? *o : bias ? bias[i] : T(0)) + t;
    }
}

template <typename T, int NR, int MR>
DGR_INLINE void dot_tail(int64_t rows, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* O, int64_t ldo,
                         const T* bias, bool acc) {
  if constexpr (MR > 0) {
    if (rows < MR) return dot_tail<T, NR, MR - 1>(rows, K, A, lda, B, ldb, O, ldo, bias, acc);
    dot_block<T, MR, NR>(K, A, lda, B, ldb, O, ldo, bias, acc);
  }
}

template <typename T, int NR>
DGR_INLINE void dot_strip(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* O, int64_t ldo,
                          const T* bias, bool acc) {
  constexpr int MR = kDotRows;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) dot_block<T, MR, NR>(K, A + m * lda, lda, B, ldb, O + m * ldo, ldo, bias ? bias + m : nullptr, acc);
  dot_tail<T, NR, MR - 1>(M - m, K, A + m * lda, lda, B, ldb, O + m * ldo, ldo, bias ? bias + m : nullptr, acc);
}

// The last columns < NR of the output.
template <typename T, int NR>
DGR_INLINE void dot_cols(int64_t cols, int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* O,
                         int64_t ldo, const T* bias, bool acc) {
  if constexpr (NR > 0) {
    if (cols < NR) return dot_cols<T, NR - 1>(cols, M, K, A, lda, B, ldb, O, ldo, bias, acc);
    dot_strip<T, NR>(M, K, A, lda, B, ldb, O, ldo, bias, acc);
  }
}

// O[m][n] (+)= sum_k A[m][k] B[n][k]: both operands contiguous along the contraction k.
template <typename T>
DGR_INLINE void dot(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* O,
                    int64_t ldo, const T* bias, bool acc) {
  constexpr int NR = kDotCols;
  int64_t n = 0;
  for (; n + NR <= N; n += NR) dot_strip<T, NR>(M, K, A, lda, B + n * ldb, ldb, O + n, ldo, bias, acc);
  dot_cols<T, NR - 1>(N - n, M, K, A, lda, B + n * ldb, ldb, O + n, ldo, bias, acc);
}

// ---------------------------------------------------------------------------------------------------------------
// Residuals, one function per loss for both passes, on the task's columns of a tile: s[c*ld + n] for c < nc holds
// the logits and becomes r; u (backward only, nullptr in the forward) holds u = 2 (Gt_W z + Gt_b) and becomes H u.
// y: the task's target rows (one row of class indices for ce), om: its omega row. Whole vectors: the lanes past the
// tile's last row hold s = u = y = omega = 0 and give r = H u = 0.

template <typename T>
DGR_INLINE void ce_columns(T* s, T* u, int64_t ld, int64_t nc, const T* y, const T* om, int64_t width) {
  using V = Vec<T>;
  for (int64_t j = 0; j < width; j += kLanes<T>) {
    V m = vload(s + j);
    for (int64_t c = 1; c < nc; ++c) {
      const V x = vload(s + c * ld + j);
      m = x > m ? x : m;
    }
    V sum = V{};
    for (int64_t c = 0; c < nc; ++c) {
      const V e = vexp(vload(s + c * ld + j) - m);
      vstore(s + c * ld + j, e);
      sum += e;
    }
    const V inv = T(1) / sum, w = vload(om + j), cls = vload(y + j);
    if (u) {
      V pu = V{};
      for (int64_t c = 0; c < nc; ++c) pu += vload(s + c * ld + j) * vload(u + c * ld + j);
      pu *= inv;
      for (int64_t c = 0; c < nc; ++c) {
        const V p = vload(s + c * ld + j) * inv;
        vstore(u + c * ld + j, w * p * (vload(u + c * ld + j) - pu));
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      const V p = vload(s + c * ld + j) * inv;
      vstore(s + c * ld + j, w * (cls == T(c) ? p - T(1) : p));
    }
  }
}

template <typename T>
DGR_INLINE void bce_columns(T* s, T* u, int64_t ld, int64_t nc, const T* y, const T* om, int64_t width) {
  using V = Vec<T>;
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t j = 0; j < width; j += kLanes<T>) {
      const V q = T(1) / (T(1) + vexp(-vload(s + c * ld + j))), w = vload(om + j);
      if (u) vstore(u + c * ld + j, w * q * (T(1) - q) * vload(u + c * ld + j));
      vstore(s + c * ld + j, w * (q - vload(y + c * ld + j)));
    }
}

template <typename T>
DGR_INLINE void mse_columns(T* s, T* u, int64_t ld, int64_t nc, const T* y, const T* om, int64_t width) {
  using V = Vec<T>;
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t j = 0; j < width; j += kLanes<T>) {
      const V w2 = T(2) * vload(om + j);
      if (u) vstore(u + c * ld + j, w2 * vload(u + c * ld + j));
      vstore(s + c * ld + j, w2 * (vload(s + c * ld + j) - vload(y + c * ld + j)));
    }
}

// sign(0) = 0 as autograd's; H = 0, so an l1 task has no u rows.
template <typename T>
DGR_INLINE void l1_columns(T* s, int64_t ld, int64_t nc, const T* y, const T* om, int64_t width) {
  using V = Vec<T>;
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t j = 0; j < width; j += kLanes<T>) {
      const V d = vload(s + c * ld + j) - vload(y + c * ld + j), w = vload(om + j);
      vstore(s + c * ld + j, d > T(0) ? w : d < T(0) ? -w : V{});
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tiles.

// Per-thread buffers. The z and dz tiles are allocated only where they are used: a tile of wide features is large
// (1.2 MiB at D = 2048), and a vector's zero-filling would touch all of it.
template <typename T>
struct Workspace {
  Buffer<T> z;   // the tile of z, where it cannot be read in place
  Buffer<T> rh;  // [M1][ld]: s then r; (backward) u then H u below
  Buffer<T> yo;  // [Cy + tasks][ld]: the tile's targets and omega
  Buffer<T> dz;  // (backward) the tile of dz, where it cannot be written in place

  Workspace(const Problem<T>& pr, bool forward)
      : z(reads_z_in_place(pr) ? 0 : tile_size(pr)),
        rh(pr.M1 * pr.ld),
        yo((pr.Cy + pr.tasks) * pr.ld),
        dz(forward || writes_dz_in_place(pr) ? 0 : tile_size(pr)) {}
  static int64_t tile_size(const Problem<T>& pr) { return pr.rows ? pr.tile * pr.ldd : pr.D * pr.ld; }
};

template <typename T>
DGR_INLINE int64_t whole_vectors(int64_t n) {
  return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

// Rows m0 .. M1 of [s; u] = A1 z + bias1 for the tile's rows, into those rows of out[M1][ld]; lanes n .. whole
// vectors are zeroed (see the residuals).
template <typename T>
DGR_INLINE void project(const Problem<T>& pr, int64_t m0, const T* z, int64_t ldz, int64_t n, T* out) {
  const int64_t M = pr.M1 - m0;
  const T *A = pr.A1 + m0 * pr.ldd, *bias = pr.bias1 + m0;
  out += m0 * pr.ld;
  if (pr.rows)
    dot(M, n, pr.D, A, pr.ldd, z, ldz, out, pr.ld, bias, false);
  else
    axpy(M, pr.D, n, A, pr.ldd, int64_t(1), z, ldz, out, pr.ld, bias, false);
  const int64_t width = whole_vectors<T>(n);
  for (int64_t c = 0; c < M; ++c)
    for (int64_t j = n; j < width; ++j) out[c * pr.ld + j] = T(0);
}

// The tile's logits, rows 0 .. C of s[.][ld], into the stash (store, the forward: every column) or back from it
// (lanes n .. whole vectors zeroed, as project leaves them): logit k of the tile's row i (row p0 + i of image b) is
// where dz3 holds channel k of that row, k < C <= D, k = col_src[c] for the kernels' column c.
template <typename T>
DGR_INLINE void stash_logits(const Problem<T>& pr, int64_t b, int64_t p0, int64_t n, T* s, bool store) {
  T* base = pr.stash + b * pr.ob + p0 * pr.op;
  if (store) return copy_block(s, pr.ld, int64_t(1), base, pr.od, pr.op, pr.C, n);
  const int64_t width = whole_vectors<T>(n);
  for (int64_t c = 0; c < pr.C; ++c) {
    copy_block(static_cast<const T*>(base) + pr.col_src[c] * pr.od, int64_t(0), pr.op, s + c * pr.ld, int64_t(0),
               int64_t(1), int64_t(1), n);
    for (int64_t j = n; j < width; ++j) s[c * pr.ld + j] = T(0);
  }
}

// Gathers n values src[i * stride], converted, into dst (the inner loop of the in-place target reads).
template <typename S, typename T>
DGR_INLINE void gather(const S* src, int64_t stride, int64_t n, T* dst) {
  if (stride == 1)
    for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i]);
  else
    for (int64_t i = 0; i < n; ++i) dst[i] = T(src[i * stride]);
}

// omega of one task for the tile of rows p0 .. p0 + n of image b, and for ce its class indices (as T) into cls_out;
// with a tally (the forward), the task's entries are updated. Branch-free over the rows, so that GCC vectorises it
// for unit strides (the common case, given its own copy of the loop); a bad class index is located afterwards.
template <typename T>
DGR_INLINE void stage_validity(const Problem<T>& pr, const Source<T>& src, int64_t b, int64_t p0, int64_t n, T* om,
                               T* cls_out, int64_t* tally) {
  const bool* m = src.mask ? src.mask + b * src.vb + p0 * src.vp : nullptr;
  const int64_t* cls = src.cls ? src.cls + b * src.sb + p0 * src.sp : nullptr;
  const uint64_t classes = uint64_t(src.classes);  // unsigned: a negative index compares as too large
  int64_t valid_rows = 0, bad = 0;
  const auto rows = [&](int64_t sp, int64_t vp) {
    for (int64_t i = 0; i < n; ++i) {
      int64_t valid = !m || m[i * vp];
      if (cls) {
        const int64_t c = cls[i * sp];
        cls_out[i] = T(c);
        valid &= int64_t(c != src.ignore);
        bad |= valid & int64_t(uint64_t(c) >= classes);
      }
      om[i] = valid ? src.scale : T(0);
      valid_rows += valid;
    }
  };
  if ((!cls || src.sp == 1) && (!m || src.vp == 1))
    rows(1, 1);
  else
    rows(src.sp, src.vp);
  if (!tally) return;
  tally[kCount] += valid_rows;
  if (!bad || tally[kBadRow] >= 0) return;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = cls[i * src.sp];
    if ((!m || m[i * src.vp]) && c != src.ignore && uint64_t(c) >= classes) {
      tally[kBadRow] = b * pr.P + p0 + i;
      tally[kBadClass] = c;
      return;
    }
  }
}

// r (and H u, when the backward passes its u rows) of every task, in place, for the tile of rows p0 .. p0 + n of
// image b. The tile's targets and omega are staged in yo first, as rows ([Cy + tasks][ld]), from the task sources.
// tally: the forward's block tally ([tasks][kTally]), nullptr in the backward.
template <typename T>
DGR_INLINE void residuals(const Problem<T>& pr, int64_t b, int64_t p0, int64_t n, T* s, T* u, T* yo, int64_t* tally) {
  const int64_t ld = pr.ld, width = whole_vectors<T>(n), cols = pr.Cy + pr.tasks;
  for (int64_t t = 0; t < pr.tasks; ++t) {
    const Source<T>& src = pr.src[t];
    T* yt = yo + pr.y0[t] * ld;
    if (!src.cls) {
      const T* y = src.y + b * src.sb + p0 * src.sp;
      for (int64_t c = 0; c < pr.y0[t + 1] - pr.y0[t]; ++c) gather(y + c * src.sc, src.sp, n, yt + c * ld);
    }
    stage_validity(pr, src, b, p0, n, yo + (pr.Cy + t) * ld, yt, tally ? tally + t * kTally : nullptr);
  }
  for (int64_t k = 0; k < cols; ++k)
    for (int64_t i = n; i < width; ++i) yo[k * ld + i] = T(0);
  for (int64_t t = 0; t < pr.tasks; ++t) {
    T* st = s + pr.c0[t] * ld;
    T* ut = u && pr.h0[t] >= 0 ? u + pr.h0[t] * ld : nullptr;
    const T* yt = yo + pr.y0[t] * ld;
    const T* om = yo + (pr.Cy + t) * ld;
    const int64_t nc = pr.c0[t + 1] - pr.c0[t];
    switch (pr.loss[t]) {
      case kCe: ce_columns(st, ut, ld, nc, yt, om, width); break;
      case kBce: bce_columns(st, ut, ld, nc, yt, om, width); break;
      case kMse: mse_columns(st, ut, ld, nc, yt, om, width); break;
      default: l1_columns(st, ld, nc, yt, om, width); break;
    }
  }
}

// Tile t (rows p0 .. p0 + n of image b) and its z, read in place or staged; its residuals r in ws.rh, and in the
// backward its u rows below them, turned into H u.
template <typename T>
struct Tile {
  int64_t b, p0, n, ldz;
  const T* z;
};

// tally: the forward's block tally (see residuals); nullptr in the backward.
template <typename T>
DGR_INLINE Tile<T> start_tile(const Problem<T>& pr, const void* z, int64_t t, Workspace<T>& ws, int64_t* tally) {
  Tile<T> tl;
  tl.b = t / pr.tiles_per_image;
  tl.p0 = (t % pr.tiles_per_image) * pr.tile;
  tl.n = std::min(pr.tile, pr.P - tl.p0);
  tl.z = tile_z(pr, z, tl.b, tl.p0, tl.n, ws.z.data(), &tl.ldz);
  T* rh = ws.rh.data();
  const bool forward = tally != nullptr, stashed = pr.stash && !forward;
  // With a stash, the backward projects the u rows only: its s rows are the forward's logits.
  if (stashed) stash_logits(pr, tl.b, tl.p0, tl.n, rh, false);
  project(pr, stashed ? pr.C : 0, tl.z, tl.ldz, tl.n, rh);
  if (pr.stash && forward) stash_logits(pr, tl.b, tl.p0, tl.n, rh, true);
  residuals(pr, tl.b, tl.p0, tl.n, rh, forward ? static_cast<T*>(nullptr) : rh + pr.C * pr.ld, ws.yo.data(), tally);
  return tl;
}

// Forward over blocks [blk0, blk1): block k sums tiles [k * per_block, (k + 1) * per_block) into
// parts[k] = (G_W [C][ldd], G_b [C]), with omega = valid, and tallies their rows into tallies[k] ([tasks][kTally]).
template <typename T>
void forward_blocks(const Problem<T>& pr, const void* z, int64_t per_block, int64_t blk0, int64_t blk1, T* parts,
                    int64_t* tallies) {
  Workspace<T> ws(pr, true);
  const int64_t C = pr.C, D = pr.D, L = kLanes<T>;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    T* G = parts + blk * partial_slot(pr);
    T* Gb = G + C * pr.ldd;
    std::fill(G, Gb + C, T(0));
    int64_t* tally = tallies + blk * pr.tasks * kTally;
    for (int64_t t = 0; t < pr.tasks; ++t) {
      tally[t * kTally + kCount] = 0;
      tally[t * kTally + kBadRow] = -1;
    }
    const int64_t last = std::min(pr.tiles, (blk + 1) * per_block);
    for (int64_t t = blk * per_block; t < last; ++t) {
      const Tile<T> tl = start_tile(pr, z, t, ws, tally);
      const int64_t n = tl.n, ldz = tl.ldz;
      const T *zt = tl.z, *r = ws.rh.data();
      if (pr.rows)
        axpy(C, n, D, r, pr.ld, int64_t(1), zt, ldz, G, pr.ldd, static_cast<const T*>(nullptr), true);
      else
        dot(C, D, n, r, pr.ld, zt, ldz, G, pr.ldd, static_cast<const T*>(nullptr), true);
      const int64_t width = whole_vectors<T>(n);
      for (int64_t c = 0; c < C; ++c) {
        Vec<T> acc{};
        for (int64_t j = 0; j < width; j += L) acc += vload(r + c * pr.ld + j);
        Gb[c] += hsum<T>(acc);
      }
    }
  }
}

// Backward over tiles [t0, t1): dz for each tile's rows.
template <typename T>
void backward_tiles(const Problem<T>& pr, const void* z, int64_t t0, int64_t t1, void* dz) {
  Workspace<T> ws(pr, false);
  const int64_t D = pr.D;
  for (int64_t t = t0; t < t1; ++t) {
    const Tile<T> tl = start_tile(pr, z, t, ws, static_cast<int64_t*>(nullptr));
    const int64_t n = tl.n, ldz = tl.ldz;
    const T *zt = tl.z, *rh = ws.rh.data();
    const int64_t offset = tl.b * pr.ob + tl.p0 * pr.op;
    const bool direct = writes_dz_in_place(pr);
    T* dzt = direct ? static_cast<T*>(dz) + offset : ws.dz.data();
    const int64_t ldo = direct ? (pr.rows ? pr.op : pr.od) : (pr.rows ? pr.ldd : pr.ld);
    if (pr.rows)
      axpy(n, pr.M1, D, rh, int64_t(1), pr.ld, pr.A2, pr.ldd, dzt, ldo, static_cast<const T*>(nullptr), false);
    else
      axpy(D, pr.M1, n, pr.A2, int64_t(1), pr.ldd, rh, pr.ld, dzt, ldo, static_cast<const T*>(nullptr), false);
    if (!direct) store_tile(pr, dzt, ldo, n, dz, offset);
  }
}

#endif  // DGR_PENALTY_KERNELS
