// LayerNorm and RMSNorm (with an optional fused residual add). One row group of threads per row;
// several independent vector loads per thread in flight; the later passes re-read the row,
// which the first left in L1 (cheaper than holding it in registers: more warps fit per SM, and
// more warps keep more memory requests in flight). The two share one backward: LayerNorm's
// formula with the mean term dropped is RMSNorm's, plus the residual's gradient.
#include "kernels/norms.h"

#include "core/bulk_copy.cuh"
#include "core/device_math.cuh"
#include "core/launch.cuh"

namespace unsloth_ext {
namespace {

constexpr int kFwdThreads = 512;
constexpr int kFwdMinBlocks = 4;
constexpr int kFwdUnroll = 2;
constexpr int kBwdThreads = 512;
constexpr int kBwdMinBlocks = 2;
constexpr int kBwdUnroll = 2;
// The Hopper backward: rows of x and dy (and dres) staged in shared memory by bulk copies, three
// stages deep (two rows in flight behind the one being worked on); the weight and the dW/db
// partials of a thread's columns (kBulkMaxVpt vectors at most) in registers. Both passes read
// the row from its stage, which is refilled after pass 2. (Holding the row in registers between
// the passes, to refill its stage earlier, measured slower on the H200: LayerNorm's backward 109
// against 99 us, its partials then spilling.)
constexpr int kBulkThreads = 256;
constexpr int kBulkMaxVpt = 4;
constexpr int kBulkStages = 3;
// Blocks per SM the register budget must allow (four: 64 registers a thread, three: 80, two:
// 128), as many as a thread's partials (dW, and db for LayerNorm) and row vectors leave room
// for: fewer blocks keep too few rows in flight.
template <int VPT>
constexpr int kBulkMinBlocks = VPT == 1 ? 4 : VPT == 2 ? 3 : 2;
// Above this, the backward's per-block partials live in the global workspace (L2) instead of
// shared memory.
constexpr size_t kMaxPartialSmem = 96 * 1024;

// The row's mean and variance from one read of it: its sum and sum of squares (kFwdUnroll loads
// in flight per thread). That variance, E[x^2] - mean^2, loses bits to cancellation when the mean
// is large beside the spread: while mean^2 <= kOnePassMeanRatio * variance, E[x^2] is at most
// kOnePassMeanRatio + 1 times the variance, and at most three bits are lost. Other rows (far from
// zero mean, or constant) take a second pass over the row (hitting L1), the corrected two-pass
// algorithm: with d = x - mean, the mean moves by mean(d) and the variance is
// mean(d^2) - mean(d)^2, both as exact as the deviations. A last pass writes y.
constexpr float kOnePassMeanRatio = 7.0f;

// Calls f(j, vector j) for each of a thread's vectors j of a row after pass 1. kHeld: pass 1 took
// them all in one round, and `held` still has them; otherwise load(j) reads them again (hitting
// L1), one at a time, which keeps registers (and so occupancy) for pass 1.
template <bool kHeld, typename V, int U, typename Load, typename F>
__device__ __forceinline__ void each_row_vec(const V (&held)[U], int64_t n_vec, Load&& load,
                                             F&& f) {
  if constexpr (kHeld) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = threadIdx.x + u * blockDim.x;
      if (j < n_vec) f(j, held[u]);
    }
  } else {
#pragma unroll 1
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) f(j, load(j));
  }
}

template <typename T, typename W, int VEC, bool kHeld>
__global__ void __launch_bounds__(kFwdThreads, kFwdMinBlocks)
layer_norm_fwd_kernel(const LayerNormFwdParams p) {
  using A = acc_t<T>;
  __shared__ A sums_scratch[2 * kMaxRowGroups * 32];
  __shared__ A devs_scratch[2 * kMaxRowGroups * 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.rows) return;  // the whole row group: its barriers are its own
  const int64_t n_vec = p.cols / VEC;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const W* w = static_cast<const W*>(p.weight);
  const W* b = static_cast<const W*>(p.bias);
  T* y = static_cast<T*>(p.y) + row * p.cols;
  const A inv_cols = A(1) / A(p.cols);

  A sums[2] = {0, 0};  // of x, of x^2
  Vec<T, VEC> xv[kFwdUnroll];
  for (int64_t base = threadIdx.x; base < n_vec; base += kFwdUnroll * blockDim.x) {
#pragma unroll
    for (int u = 0; u < kFwdUnroll; ++u) {
      const int64_t j = base + u * blockDim.x;
      if (j < n_vec) xv[u] = load_vec<T, VEC>(x + j * VEC);
    }
#pragma unroll
    for (int u = 0; u < kFwdUnroll; ++u) {
      if (base + u * blockDim.x < n_vec) {
        A xf[VEC];
        to_acc(xv[u], xf);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          sums[0] += xf[k];
          sums[1] += xf[k] * xf[k];
        }
      }
    }
  }
  const auto each_vec = [&](auto&& f) {
    each_row_vec<kHeld>(xv, n_vec, [&](int64_t j) { return load_vec<T, VEC>(x + j * VEC); }, f);
  };
  row_group_sums_once(sums, sums_scratch);
  A mean = sums[0] * inv_cols;
  A var = max(sums[1] * inv_cols - mean * mean, A(0));
  if (mean * mean > A(kOnePassMeanRatio) * var) {  // the same in every thread of the group
    A devs[2] = {0, 0};  // of d, of d^2
    each_vec([&](int64_t, const Vec<T, VEC>& v) {
      A xf[VEC];
      to_acc(v, xf);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A d = xf[k] - mean;
        devs[0] += d;
        devs[1] += d * d;
      }
    });
    row_group_sums_once(devs, devs_scratch);
    const A shift = devs[0] * inv_cols;
    mean += shift;
    var = max(devs[1] * inv_cols - shift * shift, A(0));
  }
  const A rstd = rsqrt_acc(var + A(p.eps));
  if (threadIdx.x == 0) {
    static_cast<A*>(p.mean)[row] = mean;
    static_cast<A*>(p.rstd)[row] = rstd;
  }
  each_vec([&](int64_t j, const Vec<T, VEC>& v) {
    A xf[VEC], wf[VEC], bf[VEC] = {}, out[VEC];
    to_acc(v, xf);
    to_acc(load_vec<W, VEC>(w + j * VEC), wf);
    if (b != nullptr) to_acc(load_vec<W, VEC>(b + j * VEC), bf);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = (xf[k] - mean) * rstd * wf[k] + bf[k];
    store_vec<T, VEC>(y + j * VEC, from_acc<T>(out));
  });
}

// x + r rounded to T, as PyTorch adds two tensors of T (in the accumulator type, one rounding).
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> add_rounded(const Vec<T, VEC>& x, const Vec<T, VEC>& r) {
  acc_t<T> xf[VEC], rf[VEC];
  to_acc(x, xf);
  to_acc(r, rf);
#pragma unroll
  for (int k = 0; k < VEC; ++k) xf[k] += rf[k];
  return from_acc<T>(xf);
}

// kResidual: s = x + residual (written to residual_out), else s = x. Pass 1 keeps U vector
// loads in flight per step: two of x without a residual, one each of x and the residual with.
template <typename T, typename W, typename O, int VEC, bool kResidual, bool kHeld>
__global__ void __launch_bounds__(kFwdThreads, kFwdMinBlocks)
rms_norm_fwd_kernel(const RMSNormFwdParams p) {
  using A = acc_t<T>;
  constexpr int U = kResidual ? 1 : kFwdUnroll;
  __shared__ A scratch[kMaxRowGroups * 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;
  const int64_t n_vec = p.cols / VEC;
  const T* x = static_cast<const T*>(p.x) + (valid ? row : 0) * p.x_row_stride;
  const T* r = kResidual
      ? static_cast<const T*>(p.residual) + (valid ? row : 0) * p.residual_row_stride
      : nullptr;
  const W* w = static_cast<const W*>(p.weight);
  O* y = static_cast<O*>(p.y) + (valid ? row : 0) * p.y_row_stride;
  const auto sum_at = [&](int64_t j) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + j * VEC);
    if constexpr (kResidual) {
      return add_rounded(xv, load_vec<T, VEC>(r + j * VEC));
    } else {
      return xv;
    }
  };

  A sumsq = 0;
  Vec<T, VEC> s[U];
  for (int64_t base = threadIdx.x; valid && base < n_vec; base += U * blockDim.x) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (base + u * blockDim.x < n_vec) s[u] = sum_at(base + u * blockDim.x);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = base + u * blockDim.x;
      if (j < n_vec) {
        if constexpr (kResidual) {
          store_vec<T, VEC>(static_cast<T*>(p.residual_out) + row * p.cols + j * VEC, s[u]);
        }
        A a[VEC];
        to_acc(s[u], a);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sumsq += a[k] * a[k];
      }
    }
  }
  const A rstd = rsqrt_acc(row_group_sum(sumsq, scratch) / A(p.cols) + A(p.eps));
  if (!valid) return;
  if (threadIdx.x == 0) static_cast<A*>(p.rstd)[row] = rstd;
  each_row_vec<kHeld>(s, n_vec, sum_at, [&](int64_t j, const Vec<T, VEC>& v) {
    A sh[VEC], wf[VEC], out[VEC];
    to_acc(v, sh);
    to_acc(load_vec<W, VEC>(w + j * VEC), wf);
#pragma unroll
    for (int k = 0; k < VEC; ++k) sh[k] *= rstd;
    if (p.gemma) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = sh[k] * (A(1) + wf[k]);
    } else {
      // Llama rounds the normalized row to x's dtype before the weight product.
      round_through<T>(sh);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = sh[k] * wf[k];
    }
    store_vec<O, VEC>(y + j * VEC, from_acc<O>(out));
  });
}

// The backward (formulas in norms.h). Per row: pass 1 sums g * (x - mean) (and g for
// LayerNorm) over the row group; pass 2 writes dx and adds dy * xhat (and dy) for the thread's
// columns into its group's accumulator rows: slices of shared memory, or with partial_in_smem
// false (one row group per block) the block's rows of the workspace. Each thread touches only
// its own columns there, so no synchronisation is needed until the groups are summed.
template <NormKind K, typename T, typename W, typename O, int VEC>
__global__ void __launch_bounds__(kBwdThreads, kBwdMinBlocks)
norm_bwd_kernel(const NormBwdParams p, bool partial_in_smem) {
  constexpr bool kLayer = K == NormKind::kLayerNorm;
  using A = acc_t<T>;
  __shared__ A scratch[kMaxRowGroups * 32];
  extern __shared__ unsigned char partial_smem_bytes[];
  A* smem = reinterpret_cast<A*>(partial_smem_bytes);
  const bool has_db = kLayer && p.db != nullptr;
  const int64_t slice = (has_db ? 2 : 1) * p.cols;  // a group's [dw | db] accumulators
  A* dw_partial = static_cast<A*>(p.partial) + static_cast<int64_t>(blockIdx.x) * p.cols;
  A* db_partial = dw_partial + static_cast<int64_t>(gridDim.x) * p.cols;
  A* dw_acc = partial_in_smem ? smem + threadIdx.y * slice : dw_partial;
  A* db_acc = partial_in_smem ? dw_acc + p.cols : db_partial;
  const int64_t n_vec = p.cols / VEC;
  const int64_t stride = static_cast<int64_t>(kBwdUnroll) * blockDim.x;
  const W* w = static_cast<const W*>(p.weight);
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const A w_shift = !kLayer && p.gemma ? A(1) : A(0);
  const bool round_xhat = !kLayer && !p.gemma;
  const A inv_cols = A(1) / A(p.cols);

  for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
    A zero[VEC] = {};
    store_vec<A, VEC>(dw_acc + j * VEC, from_acc<A>(zero));
    if (has_db) store_vec<A, VEC>(db_acc + j * VEC, from_acc<A>(zero));
  }
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < p.rows;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < p.rows;
    const T* x = static_cast<const T*>(p.x) + (valid ? row : 0) * p.x_row_stride;
    const O* dy = static_cast<const O*>(p.dy) + (valid ? row : 0) * p.dy_row_stride;
    T* dx = static_cast<T*>(p.dx) + (valid ? row : 0) * p.cols;
    const A rstd = valid ? rstd_in[row] : A(0);
    const A mean = kLayer && valid ? mean_in[row] : A(0);

    A dot = 0, gsum = 0;
    for (int64_t base = threadIdx.x; valid && base < n_vec; base += stride) {
      Vec<T, VEC> xv[kBwdUnroll] = {};  // zeroed: a maybe-unloaded vector is otherwise spilled
      Vec<O, VEC> gv[kBwdUnroll] = {};
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {
        const int64_t j = base + u * blockDim.x;
        if (j < n_vec) {
          xv[u] = load_vec<T, VEC>(x + j * VEC);
          gv[u] = load_vec<O, VEC>(dy + j * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {
        const int64_t j = base + u * blockDim.x;
        if (j < n_vec) {
          A xf[VEC], g[VEC], wf[VEC];
          to_acc(xv[u], xf);
          to_acc(gv[u], g);
          to_acc(load_vec<W, VEC>(w + j * VEC), wf);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            g[k] *= wf[k] + w_shift;
            dot += g[k] * (xf[k] - mean);
            if (kLayer) gsum += g[k];
          }
        }
      }
    }
    const A c_x = rstd * rstd * rstd * row_group_sum(dot, scratch) * inv_cols;
    const A c_g = kLayer ? rstd * row_group_sum(gsum, scratch) * inv_cols : A(0);
#pragma unroll 1
    for (int64_t j = threadIdx.x; valid && j < n_vec; j += blockDim.x) {
      A xf[VEC], dyf[VEC], wf[VEC], out[VEC], xhat[VEC];
      to_acc(load_vec<T, VEC>(x + j * VEC), xf);
      to_acc(load_vec<O, VEC>(dy + j * VEC), dyf);
      to_acc(load_vec<W, VEC>(w + j * VEC), wf);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out[k] = rstd * dyf[k] * (wf[k] + w_shift) - c_g - c_x * (xf[k] - mean);
        xhat[k] = (xf[k] - mean) * rstd;
      }
      if (!kLayer && p.dres != nullptr) {
        const T* dres = static_cast<const T*>(p.dres) + row * p.dres_row_stride;
        A rf[VEC];
        to_acc(load_vec<T, VEC>(dres + j * VEC), rf);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] += rf[k];
      }
      store_vec<T, VEC>(dx + j * VEC, from_acc<T>(out));
      if (round_xhat) round_through<T>(xhat);
      Vec<A, VEC> dw = load_vec<A, VEC>(dw_acc + j * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dw.v[k] += dyf[k] * xhat[k];
      store_vec<A, VEC>(dw_acc + j * VEC, dw);
      if (has_db) {
        Vec<A, VEC> db = load_vec<A, VEC>(db_acc + j * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) db.v[k] += dyf[k];
        store_vec<A, VEC>(db_acc + j * VEC, db);
      }
    }
  }
  if (!partial_in_smem) return;
  // The groups' slices are added in a fixed order (deterministic dW and db).
  __syncthreads();
  const int threads = blockDim.x * blockDim.y;
  for (int64_t c = threadIdx.y * blockDim.x + threadIdx.x; c < slice; c += threads) {
    A total = 0;
    for (int g = 0; g < static_cast<int>(blockDim.y); ++g) total += smem[g * slice + c];
    *(c < p.cols ? dw_partial + c : db_partial + (c - p.cols)) = total;
  }
}

// The backward on Hopper, for aligned rows of at most kBulkThreads * kBulkMaxVpt vectors. One
// row group per block walks rows blockIdx.x, blockIdx.x + gridDim.x, ...; thread 0 keeps the
// next rows of x, dy (and dres) in flight as bulk copies. The formulas of norms.h as written: pass
// 1 sums g * xhat, where norm_bwd_kernel sums g * (x - mean) and scales by rstd after (on the
// H200 the RMSNorm backward measured 115.2 us this way, 117.4 us that way). kDres (RMSNorm with
// dres) is a compile-time choice, so the loops carry no test of it.
//
// Two walks over the rows. Passes apart (LayerNorm): each row runs pass 1, a barrier that
// publishes its sums, pass 2, and a barrier that frees its stage. Pipelined (RMSNorm): one loop
// over a thread's vectors runs pass 2 of a row and pass 1 of the next, so a row costs one barrier,
// which both publishes the next row's sums and frees this row's stage, and the dx stores spread
// over the row's time. On the H200 ([16384, 4096] bf16, same tensors, kernel time) the pipelined
// walk took RMSNorm from 109.5 to 99.0 us, left add+RMSNorm at 132 us, and took LayerNorm, whose
// fused loop carries the mean, the sum of g and db too, from 102.5 to 105.8 us.
template <NormKind K, typename T, typename W, typename O, int VPT, bool kDres>
__global__ void __launch_bounds__(kBulkThreads, kBulkMinBlocks<VPT>)
norm_bwd_bulk_kernel(const NormBwdParams p) {
  constexpr bool kLayer = K == NormKind::kLayerNorm;
  static_assert(!(kLayer && kDres), "dres is RMSNorm's");
  using A = acc_t<T>;
  constexpr int VEC = kVec16<T>;
  extern __shared__ __align__(128) unsigned char stage_bytes[];
  __shared__ uint64_t full[kBulkStages];
  __shared__ A red[2][2][32];  // [row parity][dot, gsum][warp]
  const int64_t n_vec = p.cols / VEC;
  const bool has_db = kLayer && p.db != nullptr;
  const uint32_t x_bytes = static_cast<uint32_t>(p.cols * sizeof(T));
  const uint32_t dy_bytes = static_cast<uint32_t>(p.cols * sizeof(O));
  const uint32_t dres_bytes = kDres ? x_bytes : 0;
  T* x_stage = reinterpret_cast<T*>(stage_bytes);
  O* dy_stage = reinterpret_cast<O*>(stage_bytes + kBulkStages * x_bytes);
  T* dres_stage = reinterpret_cast<T*>(stage_bytes + kBulkStages * (x_bytes + dy_bytes));
  const A* mean_in = static_cast<const A*>(p.mean);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const A w_shift = !kLayer && p.gemma ? A(1) : A(0);
  const bool round_xhat = !kLayer && !p.gemma;
  const A inv_cols = A(1) / A(p.cols);
  const int warps = blockDim.x / 32;

  // Thread 0 only: row `row` into stage s.
  const auto fetch = [&](int s, int64_t row) {
    mbarrier_arrive_expect(&full[s], x_bytes + dy_bytes + dres_bytes);
    bulk_copy_to_shared(x_stage + s * p.cols, static_cast<const T*>(p.x) + row * p.x_row_stride,
                        x_bytes, &full[s]);
    bulk_copy_to_shared(dy_stage + s * p.cols,
                        static_cast<const O*>(p.dy) + row * p.dy_row_stride, dy_bytes, &full[s]);
    if constexpr (kDres) {
      bulk_copy_to_shared(dres_stage + s * p.cols,
                          static_cast<const T*>(p.dres) + row * p.dres_row_stride, dres_bytes,
                          &full[s]);
    }
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s) mbarrier_init(&full[s], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s) {
      const int64_t row = blockIdx.x + static_cast<int64_t>(s) * gridDim.x;
      if (row < p.rows) fetch(s, row);
    }
  }

  Vec<W, VEC> wv[VPT];
  A dw[VPT][VEC], db[kLayer ? VPT : 1][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
    if (j < n_vec) wv[i] = load_vec<W, VEC>(static_cast<const W*>(p.weight) + j * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dw[i][k] = 0;
      if constexpr (kLayer) db[i][k] = 0;
    }
  }

  // A row's statistics and, once pass 1 is summed, its coefficients.
  struct RowState {
    int64_t row;
    int stage;
    A mean, rstd, c_xhat, c_g;
  };
  // Waits for the row's stage and reads its statistics.
  const auto begin_row = [&](int64_t row, int iter) {
    RowState r{row, iter % kBulkStages, A(0), rstd_in[row], A(0), A(0)};
    if constexpr (kLayer) r.mean = mean_in[row];
    mbarrier_wait(&full[r.stage], (iter / kBulkStages) & 1);
    return r;
  };
  // Pass 1 over vector i of row r: adds g * xhat (and g) into dot (and gsum).
  const auto pass1 = [&](const RowState& r, int i, A& dot, A& gsum) {
    const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
    if (j >= n_vec) return;
    A xf[VEC], g[VEC], wf[VEC];
    to_acc(load_vec<T, VEC>(x_stage + r.stage * p.cols + j * VEC), xf);
    to_acc(load_vec<O, VEC>(dy_stage + r.stage * p.cols + j * VEC), g);
    to_acc(wv[i], wf);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      g[k] *= wf[k] + w_shift;
      dot += g[k] * ((xf[k] - r.mean) * r.rstd);
      if (kLayer) gsum += g[k];
    }
  };
  // The block's sums of pass 1 through red[parity] (a barrier, which the caller provides, between
  // publish and finish; the pipelined walk alternates parities so that a fast warp's next publish
  // cannot overwrite sums a slow warp has yet to read).
  const auto publish = [&](A dot, A gsum, int parity) {
    dot = warp_sum(dot);
    if (kLayer) gsum = warp_sum(gsum);
    if (threadIdx.x % 32 == 0) {
      red[parity][0][threadIdx.x / 32] = dot;
      red[parity][1][threadIdx.x / 32] = gsum;
    }
  };
  const auto finish = [&](RowState& r, int parity) {
    A dot_total = 0, gsum_total = 0;
    for (int w = 0; w < warps; ++w) {
      dot_total += red[parity][0][w];
      gsum_total += red[parity][1][w];
    }
    r.c_xhat = r.rstd * dot_total * inv_cols;
    r.c_g = kLayer ? r.rstd * gsum_total * inv_cols : A(0);
  };
  // Pass 2 over vector i of row r: writes dx and adds the dW (and db) terms.
  const auto pass2 = [&](const RowState& r, int i) {
    const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
    if (j >= n_vec) return;
    A xf[VEC], dyf[VEC], wf[VEC], out[VEC], xhat[VEC];
    to_acc(load_vec<T, VEC>(x_stage + r.stage * p.cols + j * VEC), xf);
    to_acc(load_vec<O, VEC>(dy_stage + r.stage * p.cols + j * VEC), dyf);
    to_acc(wv[i], wf);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      xhat[k] = (xf[k] - r.mean) * r.rstd;
      out[k] = r.rstd * dyf[k] * (wf[k] + w_shift) - r.c_g - r.c_xhat * xhat[k];
    }
    if constexpr (kDres) {
      A rf[VEC];
      to_acc(load_vec<T, VEC>(dres_stage + r.stage * p.cols + j * VEC), rf);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] += rf[k];
    }
    store_vec<T, VEC>(static_cast<T*>(p.dx) + r.row * p.cols + j * VEC, from_acc<T>(out));
    if (round_xhat) round_through<T>(xhat);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dw[i][k] += dyf[k] * xhat[k];
      if constexpr (kLayer) db[i][k] += dyf[k];
    }
  };

  // Pass 1 of row r alone, through red[0], and its coefficients.
  const auto pass1_alone = [&](RowState& r) {
    A dot = 0, gsum = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) pass1(r, i, dot, gsum);
    publish(dot, gsum, 0);
    __syncthreads();
    finish(r, 0);
  };
  // After a barrier that ends every thread's use of row r's stage: thread 0 brings the row
  // kBulkStages rows on into it.
  const auto refill = [&](const RowState& r) {
    const int64_t row = r.row + static_cast<int64_t>(kBulkStages) * gridDim.x;
    if (threadIdx.x == 0 && row < p.rows) fetch(r.stage, row);
  };

  if constexpr (kLayer) {
    int iter = 0;
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, ++iter) {
      RowState cur = begin_row(row, iter);
      pass1_alone(cur);
#pragma unroll
      for (int i = 0; i < VPT; ++i) pass2(cur, i);
      __syncthreads();  // every thread is done with red and with the row's stage
      refill(cur);
    }
  } else if (blockIdx.x < p.rows) {
    int iter = 0;
    RowState cur = begin_row(blockIdx.x, 0);
    pass1_alone(cur);
    for (;; ++iter) {
      const int64_t next_row = cur.row + gridDim.x;
      const bool has_next = next_row < p.rows;  // the same in the whole block
      RowState next{};
      if (has_next) next = begin_row(next_row, iter + 1);
      A dot = 0, gsum = 0;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        pass2(cur, i);
        if (has_next) pass1(next, i, dot, gsum);
      }
      const int parity = (iter + 1) % 2;
      if (has_next) publish(dot, gsum, parity);
      __syncthreads();  // the next row's sums are in; every thread is done with cur's stage
      refill(cur);
      if (!has_next) break;
      finish(next, parity);
      cur = next;
    }
  }
  allow_dependent_launch();  // the column sums may launch (they wait for these stores)
  A* dw_partial = static_cast<A*>(p.partial) + static_cast<int64_t>(blockIdx.x) * p.cols;
  A* db_partial = dw_partial + static_cast<int64_t>(gridDim.x) * p.cols;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
    if (j < n_vec) {
      store_vec<A, VEC>(dw_partial + j * VEC, from_acc<A>(dw[i]));
      if constexpr (kLayer) {
        if (has_db) store_vec<A, VEC>(db_partial + j * VEC, from_acc<A>(db[i]));
      }
    }
  }
}

// Calls f(vpt_c, dres_c): the bulk kernel's vectors per thread and kDres as constants.
template <NormKind K, typename F>
void dispatch_bulk(int vpt, bool dres, F&& f) {
  const auto with_vpt = [&](auto dres_c) {
    switch (vpt) {
      case 1: f(std::integral_constant<int, 1>{}, dres_c); return;
      case 2: f(std::integral_constant<int, 2>{}, dres_c); return;
      default: f(std::integral_constant<int, kBulkMaxVpt>{}, dres_c); return;
    }
  };
  if constexpr (K == NormKind::kRMSNorm) {
    if (dres) return with_vpt(std::true_type{});
  }
  with_vpt(std::false_type{});
}

// Calls f(TypeTag<T>, TypeTag<W>, TypeTag<O>) for the (activation, parameter, output) dtypes the
// hosts produce: W is T or fp32 beside 16-bit T; O is T, or fp32 beside a fp32 W (Llama's
// promotion). kLayerNorm's output always has x's dtype.
template <NormKind K, typename F>
void dispatch_types(DType x, DType w, DType o, F&& f) {
  dispatch_float(x, [&](auto t) {
    using T = typename decltype(t)::type;
    dispatch_same_or_f32<T>(w, [&](auto wt) {
      using W = typename decltype(wt)::type;
      if constexpr (K == NormKind::kLayerNorm || std::is_same_v<W, T>) {
        if (o != x) throw std::invalid_argument("the output must have x's dtype here");
        f(t, wt, t);
      } else {
        dispatch_same_or_f32<T>(o, [&](auto ot) { f(t, wt, ot); });
      }
    });
  });
}

// Whether a row group's threads take all their vectors in one round of `unroll` loads each (see
// each_row_vec).
bool held_in_one_round(const RowPlan& plan, int64_t cols, int unroll) {
  return ceil_div(cols / plan.vec, plan.threads_x) <= unroll;
}

template <typename T, typename W>
void layer_norm_fwd_typed(const LayerNormFwdParams& p, cudaStream_t stream) {
  const int vec = vector_width<T>({p.x, p.weight, p.bias, p.y}, {p.x_row_stride}, p.cols);
  const RowPlan plan = plan_rows(p.cols, vec, kFwdThreads, kFwdUnroll);
  const dim3 block(plan.threads_x, plan.rows_per_block);
  const auto grid = static_cast<unsigned>(ceil_div(p.rows, plan.rows_per_block));
  dispatch_vec<kVec16<T>>(vec, [&](auto vec_c) {
    dispatch_flag(held_in_one_round(plan, p.cols, kFwdUnroll), [&](auto held) {
      layer_norm_fwd_kernel<T, W, vec_c.value, held.value><<<grid, block, 0, stream>>>(p);
    });
  });
}

template <typename T, typename W, typename O>
void rms_norm_fwd_typed(const RMSNormFwdParams& p, cudaStream_t stream) {
  const bool residual = p.residual != nullptr;
  const int unroll = residual ? 1 : kFwdUnroll;
  const int vec = vector_width<T>({p.x, p.residual, p.weight, p.y, p.residual_out},
                                  {p.x_row_stride, p.residual_row_stride, p.y_row_stride}, p.cols);
  const RowPlan plan = plan_rows(p.cols, vec, kFwdThreads, unroll);
  const dim3 block(plan.threads_x, plan.rows_per_block);
  const auto grid = static_cast<unsigned>(ceil_div(p.rows, plan.rows_per_block));
  dispatch_vec<kVec16<T>>(vec, [&](auto vec_c) {
    dispatch_flag(residual, [&](auto res) {
      dispatch_flag(held_in_one_round(plan, p.cols, unroll), [&](auto held) {
        rms_norm_fwd_kernel<T, W, O, vec_c.value, res.value, held.value>
            <<<grid, block, 0, stream>>>(p);
      });
    });
  });
}

// One launch shape for the backward, shared by the workspace query and the launch.
struct BwdShape {
  RowPlan plan;
  int bulk_vpt;  // > 0: the Hopper bulk-copy kernel with this many vectors per thread
  int64_t grid;
  size_t smem;
};

template <NormKind K, typename T, typename W, typename O>
BwdShape bwd_shape(const NormBwdParams& p) {
  using A = acc_t<T>;
  const int vec = vector_width<T>({p.x, p.dy, p.dres, p.weight, p.dx},
                                  {p.x_row_stride, p.dy_row_stride, p.dres_row_stride}, p.cols);
  const int64_t n_vec = ceil_div(p.cols, vec);
  if (vec > 1 && n_vec <= kBulkThreads * kBulkMaxVpt) {
    const int vpt = n_vec <= kBulkThreads ? 1 : (n_vec <= 2 * kBulkThreads ? 2 : 4);
    const int tx = static_cast<int>(ceil_div(n_vec, 32 * vpt) * 32);
    const size_t row_bytes = p.cols * (sizeof(T) + sizeof(O) + (p.dres ? sizeof(T) : 0));
    const size_t smem = kBulkStages * row_bytes;
    int64_t resident = 0;
    dispatch_bulk<K>(vpt, p.dres != nullptr, [&](auto vpt_c, auto dres_c) {
      const auto kernel = norm_bwd_bulk_kernel<K, T, W, O, vpt_c.value, dres_c.value>;
      if (bulk_copy_compiled(kernel)) {
        resident = prepare_blocks(kernel, tx, smem);
      }
    });
    if (resident > 0) {
      return {{vec, tx, 1}, vpt, p.rows < resident ? p.rows : resident, smem};
    }
  }
  const size_t slice = (p.db != nullptr ? 2 : 1) * p.cols * sizeof(A);
  RowPlan plan = plan_rows(p.cols, vec, kBwdThreads, kBwdUnroll);
  size_t smem = plan.rows_per_block * slice;
  if (smem > kMaxPartialSmem) {
    plan.rows_per_block = 1;
    smem = slice <= kMaxPartialSmem ? slice : 0;
  }
  int64_t resident = 0;
  dispatch_vec<kVec16<T>>(vec, [&](auto vec_c) {
    const auto kernel = norm_bwd_kernel<K, T, W, O, vec_c.value>;
    resident = prepare_blocks(kernel, plan.threads_x * plan.rows_per_block, smem);
  });
  const int64_t needed = ceil_div(p.rows, plan.rows_per_block);
  return {plan, 0, needed < resident ? needed : resident, smem};
}

template <NormKind K, typename T, typename W, typename O>
void bwd_typed(const NormBwdParams& p, cudaStream_t stream) {
  const BwdShape shape = bwd_shape<K, T, W, O>(p);
  const auto grid = static_cast<unsigned>(shape.grid);
  if (shape.bulk_vpt > 0) {
    dispatch_bulk<K>(shape.bulk_vpt, p.dres != nullptr, [&](auto vpt_c, auto dres_c) {
      norm_bwd_bulk_kernel<K, T, W, O, vpt_c.value, dres_c.value>
          <<<grid, shape.plan.threads_x, shape.smem, stream>>>(p);
    });
  } else {
    dispatch_vec<kVec16<T>>(shape.plan.vec, [&](auto vec_c) {
      const dim3 block(shape.plan.threads_x, shape.plan.rows_per_block);
      norm_bwd_kernel<K, T, W, O, vec_c.value><<<grid, block, shape.smem, stream>>>(
          p, shape.smem > 0);
    });
  }
  // dW (and db) from the workspace's per-block partial rows.
  launch_column_sums(static_cast<const acc_t<T>*>(p.partial), shape.grid, p.cols,
                     static_cast<W*>(p.dw), static_cast<W*>(p.db), stream);
}

template <typename F>
void dispatch_kind(NormKind kind, F&& f) {
  if (kind == NormKind::kLayerNorm) {
    f(std::integral_constant<NormKind, NormKind::kLayerNorm>{});
  } else {
    f(std::integral_constant<NormKind, NormKind::kRMSNorm>{});
  }
}

}  // namespace

void layer_norm_fwd_launch(const LayerNormFwdParams& p, cudaStream_t stream) {
  dispatch_types<NormKind::kLayerNorm>(p.x_dtype, p.w_dtype, p.x_dtype, [&](auto t, auto w, auto) {
    layer_norm_fwd_typed<typename decltype(t)::type, typename decltype(w)::type>(p, stream);
  });
}

void rms_norm_fwd_launch(const RMSNormFwdParams& p, cudaStream_t stream) {
  dispatch_types<NormKind::kRMSNorm>(p.x_dtype, p.w_dtype, p.y_dtype, [&](auto t, auto w, auto o) {
    rms_norm_fwd_typed<typename decltype(t)::type, typename decltype(w)::type,
                       typename decltype(o)::type>(p, stream);
  });
}

int64_t norm_bwd_partial_rows(NormKind kind, const NormBwdParams& p) {
  int64_t rows = 0;
  dispatch_kind(kind, [&](auto kind_c) {
    dispatch_types<kind_c.value>(p.x_dtype, p.w_dtype, p.dy_dtype, [&](auto t, auto w, auto o) {
      rows = bwd_shape<kind_c.value, typename decltype(t)::type, typename decltype(w)::type,
                       typename decltype(o)::type>(p)
                 .grid;
    });
  });
  return p.db != nullptr ? 2 * rows : rows;
}

void norm_bwd_launch(NormKind kind, const NormBwdParams& p, cudaStream_t stream) {
  dispatch_kind(kind, [&](auto kind_c) {
    dispatch_types<kind_c.value>(p.x_dtype, p.w_dtype, p.dy_dtype, [&](auto t, auto w, auto o) {
      bwd_typed<kind_c.value, typename decltype(t)::type, typename decltype(w)::type,
                typename decltype(o)::type>(p, stream);
    });
  });
}

}  // namespace unsloth_ext
