// RMSNorm forward and backward. One row group of threads per row. Each pass over a row reads it
// with several independent vector loads per thread in flight; the second pass re-reads the row,
// which the first pass left in L1 (cheaper than holding it in registers: more warps fit per SM,
// and more warps keep more memory requests in flight).
#include "kernels/rms_norm.h"

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
// The Hopper backward: rows of x and dy staged in shared memory by bulk copies kBulkStages deep;
// x, dy and the dW partials of a thread's columns (kBulkMaxVpt vectors at most) in registers.
constexpr int kBulkThreads = 256;
constexpr int kBulkMinBlocks = 2;
constexpr int kBulkStages = 2;
constexpr int kBulkMaxVpt = 4;
// Above this, the backward's per-block dW partials live in the global workspace (L2) instead of
// shared memory.
constexpr size_t kMaxDwSmem = 96 * 1024;

template <typename T, typename W, typename O, int VEC>
__global__ void __launch_bounds__(kFwdThreads, kFwdMinBlocks)
rms_norm_fwd_kernel(const RMSNormFwdParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[kMaxRowGroups * 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;
  const int64_t n_vec = p.cols / VEC;
  const int64_t stride = static_cast<int64_t>(kFwdUnroll) * blockDim.x;
  const T* x = static_cast<const T*>(p.x) + (valid ? row : 0) * p.x_row_stride;
  const W* w = static_cast<const W*>(p.weight);
  O* y = static_cast<O*>(p.y) + (valid ? row : 0) * p.cols;

  A sumsq = 0;
  for (int64_t base = threadIdx.x; valid && base < n_vec; base += stride) {
    Vec<T, VEC> xv[kFwdUnroll];
#pragma unroll
    for (int u = 0; u < kFwdUnroll; ++u) {
      const int64_t j = base + u * blockDim.x;
      if (j < n_vec) xv[u] = load_vec<T, VEC>(x + j * VEC);
    }
#pragma unroll
    for (int u = 0; u < kFwdUnroll; ++u) {
      if (base + u * blockDim.x < n_vec) {
        A a[VEC];
        to_acc(xv[u], a);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sumsq += a[k] * a[k];
      }
    }
  }
  const A rstd = rsqrt_acc(row_group_sum(sumsq, scratch) / A(p.cols) + A(p.eps));
  if (!valid) return;
  if (threadIdx.x == 0) static_cast<A*>(p.rstd)[row] = rstd;
  // The second pass hits L1: one vector at a time keeps registers (and so occupancy) for pass 1.
#pragma unroll 1
  for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
    A xh[VEC], wf[VEC], out[VEC];
    to_acc(load_vec<T, VEC>(x + j * VEC), xh);
    to_acc(load_vec<W, VEC>(w + j * VEC), wf);
#pragma unroll
    for (int k = 0; k < VEC; ++k) xh[k] *= rstd;
    if (p.gemma) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = xh[k] * (A(1) + wf[k]);
    } else {
      // Llama rounds the normalized row to x's dtype before the weight product.
      round_through<T>(xh);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = xh[k] * wf[k];
    }
    store_vec<O, VEC>(y + j * VEC, from_acc<O>(out));
  }
}

// Per element of a row: g = dy * w_eff, xhat = x * rstd, and with S = sum(g * x),
// dx = rstd * g - rstd^3 * S / cols * x. Each row group adds dy * xhat (Llama: xhat rounded to x's
// dtype) for its columns into its accumulator row: a slice of shared memory, or with
// dw_in_smem false (one row group per block) the block's row of dw_partial. Each thread touches
// only its own columns there, so no synchronisation is needed until the groups are summed.
template <typename T, typename W, typename O, int VEC>
__global__ void __launch_bounds__(kBwdThreads, kBwdMinBlocks)
rms_norm_bwd_kernel(const RMSNormBwdParams p, bool dw_in_smem) {
  using A = acc_t<T>;
  __shared__ A scratch[kMaxRowGroups * 32];
  extern __shared__ unsigned char dw_smem_bytes[];
  A* dw_smem = reinterpret_cast<A*>(dw_smem_bytes);
  A* partial = static_cast<A*>(p.dw_partial) + static_cast<int64_t>(blockIdx.x) * p.cols;
  A* acc = dw_in_smem ? dw_smem + threadIdx.y * p.cols : partial;
  const int64_t n_vec = p.cols / VEC;
  const int64_t stride = static_cast<int64_t>(kBwdUnroll) * blockDim.x;
  const W* w = static_cast<const W*>(p.weight);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const A w_shift = p.gemma ? A(1) : A(0);
  const A inv_cols = A(1) / A(p.cols);

  for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
    A zero[VEC] = {};
    store_vec<A, VEC>(acc + j * VEC, from_acc<A>(zero));
  }
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < p.rows;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < p.rows;
    const T* x = static_cast<const T*>(p.x) + (valid ? row : 0) * p.x_row_stride;
    const O* dy = static_cast<const O*>(p.dy) + (valid ? row : 0) * p.dy_row_stride;
    T* dx = static_cast<T*>(p.dx) + (valid ? row : 0) * p.cols;
    const A rstd = valid ? rstd_in[row] : A(0);

    A dot = 0;
    for (int64_t base = threadIdx.x; valid && base < n_vec; base += stride) {
      Vec<T, VEC> xv[kBwdUnroll];
      Vec<O, VEC> gv[kBwdUnroll];
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
          for (int k = 0; k < VEC; ++k) dot += g[k] * (wf[k] + w_shift) * xf[k];
        }
      }
    }
    const A c = rstd * rstd * rstd * row_group_sum(dot, scratch) * inv_cols;
#pragma unroll 1
    for (int64_t j = threadIdx.x; valid && j < n_vec; j += blockDim.x) {
      A xf[VEC], dyf[VEC], wf[VEC], out[VEC], xhat[VEC];
      to_acc(load_vec<T, VEC>(x + j * VEC), xf);
      to_acc(load_vec<O, VEC>(dy + j * VEC), dyf);
      to_acc(load_vec<W, VEC>(w + j * VEC), wf);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out[k] = rstd * dyf[k] * (wf[k] + w_shift) - c * xf[k];
        xhat[k] = xf[k] * rstd;
      }
      store_vec<T, VEC>(dx + j * VEC, from_acc<T>(out));
      if (!p.gemma) round_through<T>(xhat);
      Vec<A, VEC> dw = load_vec<A, VEC>(acc + j * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dw.v[k] += dyf[k] * xhat[k];
      store_vec<A, VEC>(acc + j * VEC, dw);
    }
  }
  if (!dw_in_smem) return;
  // The groups' slices are added in a fixed order (deterministic dW).
  __syncthreads();
  const int threads = blockDim.x * blockDim.y;
  for (int64_t c = threadIdx.y * blockDim.x + threadIdx.x; c < p.cols; c += threads) {
    A total = 0;
    for (int g = 0; g < static_cast<int>(blockDim.y); ++g) total += dw_smem[g * p.cols + c];
    partial[c] = total;
  }
}

// The backward on Hopper, for aligned rows of at most kBulkThreads * kBulkMaxVpt vectors. One
// row group per block walks rows blockIdx.x, blockIdx.x + gridDim.x, ...; thread 0 keeps the
// next kBulkStages rows of x and dy in flight as bulk copies. Same math as rms_norm_bwd_kernel.
template <typename T, typename W, typename O, int VPT>
__global__ void __launch_bounds__(kBulkThreads, kBulkMinBlocks)
rms_norm_bwd_bulk_kernel(const RMSNormBwdParams p) {
  using A = acc_t<T>;
  constexpr int VEC = kVec16<T>;
  extern __shared__ __align__(128) unsigned char stage_bytes[];
  __shared__ uint64_t full[kBulkStages];
  __shared__ A red[32];
  const int64_t n_vec = p.cols / VEC;
  const uint32_t x_bytes = static_cast<uint32_t>(p.cols * sizeof(T));
  const uint32_t dy_bytes = static_cast<uint32_t>(p.cols * sizeof(O));
  T* x_stage = reinterpret_cast<T*>(stage_bytes);
  O* dy_stage = reinterpret_cast<O*>(stage_bytes + kBulkStages * x_bytes);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  const A w_shift = p.gemma ? A(1) : A(0);
  const A inv_cols = A(1) / A(p.cols);
  const int warps = blockDim.x / 32;

  const auto fetch = [&](int s, int64_t row) {
    mbarrier_arrive_expect(&full[s], x_bytes + dy_bytes);
    bulk_copy_to_shared(x_stage + s * p.cols, static_cast<const T*>(p.x) + row * p.x_row_stride,
                        x_bytes, &full[s]);
    bulk_copy_to_shared(dy_stage + s * p.cols,
                        static_cast<const O*>(p.dy) + row * p.dy_row_stride, dy_bytes, &full[s]);
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
  A dw[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
    if (j < n_vec) wv[i] = load_vec<W, VEC>(static_cast<const W*>(p.weight) + j * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = 0;
  }
  int iter = 0;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, ++iter) {
    const int s = iter % kBulkStages;
    const A rstd = rstd_in[row];
    mbarrier_wait(&full[s], (iter / kBulkStages) & 1);
    Vec<T, VEC> xv[VPT];
    Vec<O, VEC> gv[VPT];
    A dot = 0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
      if (j < n_vec) {
        xv[i] = load_vec<T, VEC>(x_stage + s * p.cols + j * VEC);
        gv[i] = load_vec<O, VEC>(dy_stage + s * p.cols + j * VEC);
        A xf[VEC], g[VEC], wf[VEC];
        to_acc(xv[i], xf);
        to_acc(gv[i], g);
        to_acc(wv[i], wf);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += g[k] * (wf[k] + w_shift) * xf[k];
      }
    }
    dot = warp_sum(dot);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = dot;
    __syncthreads();  // every thread has read stage s: refill it with the row after next
    if (threadIdx.x == 0) {
      const int64_t next = row + static_cast<int64_t>(kBulkStages) * gridDim.x;
      if (next < p.rows) fetch(s, next);
    }
    A total = 0;
    for (int w = 0; w < warps; ++w) total += red[w];
    __syncthreads();
    const A c = rstd * rstd * rstd * total * inv_cols;
    T* dx = static_cast<T*>(p.dx) + row * p.cols;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
      if (j < n_vec) {
        A xf[VEC], dyf[VEC], wf[VEC], out[VEC], xhat[VEC];
        to_acc(xv[i], xf);
        to_acc(gv[i], dyf);
        to_acc(wv[i], wf);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out[k] = rstd * dyf[k] * (wf[k] + w_shift) - c * xf[k];
          xhat[k] = xf[k] * rstd;
        }
        store_vec<T, VEC>(dx + j * VEC, from_acc<T>(out));
        if (!p.gemma) round_through<T>(xhat);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dw[i][k] += dyf[k] * xhat[k];
      }
    }
  }
  A* partial = static_cast<A*>(p.dw_partial) + static_cast<int64_t>(blockIdx.x) * p.cols;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
    if (j < n_vec) store_vec<A, VEC>(partial + j * VEC, from_acc<A>(dw[i]));
  }
}

template <typename F>
void dispatch_bulk_vpt(int vpt, F&& f) {
  switch (vpt) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    default: f(std::integral_constant<int, kBulkMaxVpt>{}); return;
  }
}

template <typename T, typename W, typename O>
void fwd_typed(const RMSNormFwdParams& p, cudaStream_t stream) {
  const int vec = vector_width<T>({p.x, p.weight, p.y}, {p.x_row_stride}, p.cols);
  const RowPlan plan = plan_rows(p.cols, vec, kFwdThreads, kFwdUnroll);
  dispatch_vec<kVec16<T>>(vec, [&](auto vec_c) {
    const dim3 block(plan.threads_x, plan.rows_per_block);
    const auto grid = static_cast<unsigned>(ceil_div(p.rows, plan.rows_per_block));
    rms_norm_fwd_kernel<T, W, O, vec_c.value><<<grid, block, 0, stream>>>(p);
  });
}

// One launch shape for the backward, shared by the workspace query and the launch.
struct BwdShape {
  RowPlan plan;
  int bulk_vpt;  // > 0: the Hopper bulk-copy kernel with this many vectors per thread
  int64_t grid;
  size_t smem;
};

template <typename T, typename W, typename O>
BwdShape bwd_shape(const RMSNormBwdParams& p) {
  using A = acc_t<T>;
  const int vec = vector_width<T>({p.x, p.dy, p.weight, p.dx}, {p.x_row_stride, p.dy_row_stride},
                                  p.cols);
  const int64_t needed_rows = p.rows;
  const int64_t n_vec = ceil_div(p.cols, vec);
  if (vec > 1 && n_vec <= kBulkThreads * kBulkMaxVpt) {
    const int vpt = n_vec <= kBulkThreads ? 1 : (n_vec <= 2 * kBulkThreads ? 2 : 4);
    const int tx = static_cast<int>(ceil_div(n_vec, 32 * vpt) * 32);
    const size_t smem = kBulkStages * p.cols * (sizeof(T) + sizeof(O));
    int64_t resident = 0;
    dispatch_bulk_vpt(vpt, [&](auto vpt_c) {
      const auto kernel = rms_norm_bwd_bulk_kernel<T, W, O, vpt_c.value>;
      if (bulk_copy_compiled(kernel)) {
        allow_dynamic_smem(kernel, smem);
        resident = resident_blocks(kernel, tx, smem);
      }
    });
    if (resident > 0) {
      return {{vec, tx, 1}, vpt, needed_rows < resident ? needed_rows : resident, smem};
    }
  }
  RowPlan plan = plan_rows(p.cols, vec, kBwdThreads, kBwdUnroll);
  size_t smem = plan.rows_per_block * p.cols * sizeof(A);
  if (smem > kMaxDwSmem) {
    plan.rows_per_block = 1;
    smem = p.cols * sizeof(A) <= kMaxDwSmem ? p.cols * sizeof(A) : 0;
  }
  int64_t resident = 0;
  dispatch_vec<kVec16<T>>(vec, [&](auto vec_c) {
    const auto kernel = rms_norm_bwd_kernel<T, W, O, vec_c.value>;
    allow_dynamic_smem(kernel, smem);
    resident = resident_blocks(kernel, plan.threads_x * plan.rows_per_block, smem);
  });
  const int64_t needed = ceil_div(p.rows, plan.rows_per_block);
  return {plan, 0, needed < resident ? needed : resident, smem};
}

template <typename T, typename W, typename O>
void bwd_typed(const RMSNormBwdParams& p, cudaStream_t stream) {
  const BwdShape shape = bwd_shape<T, W, O>(p);
  const auto grid = static_cast<unsigned>(shape.grid);
  if (shape.bulk_vpt > 0) {
    dispatch_bulk_vpt(shape.bulk_vpt, [&](auto vpt_c) {
      rms_norm_bwd_bulk_kernel<T, W, O, vpt_c.value>
          <<<grid, shape.plan.threads_x, shape.smem, stream>>>(p);
    });
  } else {
    dispatch_vec<kVec16<T>>(shape.plan.vec, [&](auto vec_c) {
      const dim3 block(shape.plan.threads_x, shape.plan.rows_per_block);
      rms_norm_bwd_kernel<T, W, O, vec_c.value><<<grid, block, shape.smem, stream>>>(
          p, shape.smem > 0);
    });
  }
  launch_column_sum(static_cast<const acc_t<T>*>(p.dw_partial), shape.grid, p.cols,
                    static_cast<W*>(p.dw), stream);
}

}  // namespace

void rms_norm_fwd_launch(const RMSNormFwdParams& p, cudaStream_t stream) {
  dispatch_norm_types(p.x_dtype, p.w_dtype, p.y_dtype, [&](auto t, auto w, auto o) {
    fwd_typed<typename decltype(t)::type, typename decltype(w)::type,
              typename decltype(o)::type>(p, stream);
  });
}

int64_t rms_norm_bwd_partial_rows(const RMSNormBwdParams& p) {
  int64_t rows = 0;
  dispatch_norm_types(p.x_dtype, p.w_dtype, p.dy_dtype, [&](auto t, auto w, auto o) {
    rows = bwd_shape<typename decltype(t)::type, typename decltype(w)::type,
                     typename decltype(o)::type>(p)
               .grid;
  });
  return rows;
}

void rms_norm_bwd_launch(const RMSNormBwdParams& p, cudaStream_t stream) {
  dispatch_norm_types(p.x_dtype, p.w_dtype, p.dy_dtype, [&](auto t, auto w, auto o) {
    bwd_typed<typename decltype(t)::type, typename decltype(w)::type,
              typename decltype(o)::type>(p, stream);
  });
}

}  // namespace unsloth_ext
