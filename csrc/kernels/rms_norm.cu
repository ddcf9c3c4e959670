// RMSNorm forward and backward. One row group of threads per row; the row stays in registers
// (vpt > 0) or, for very long rows, is streamed twice through the cache (vpt == 0).
#include "kernels/rms_norm.h"

#include "core/device_math.cuh"
#include "core/launch.cuh"

namespace unsloth_ext {
namespace {

constexpr int kFwdBlockThreads = 256;
constexpr int kFwdMaxThreads = 1024;
// The backward keeps x, dy and the dW partials of its columns in registers: fewer threads per
// block leave each thread the registers for that.
constexpr int kBwdBlockThreads = 512;
constexpr int kBwdMaxThreads = 512;

// Output element of one normalized value xhat (fp32/fp64) with weight w.
template <typename T, typename O, typename A>
__device__ __forceinline__ O norm_out(A xhat, A w, bool gemma) {
  // Llama rounds the normalized row to x's dtype before the weight product; Gemma scales by
  // (1 + w) in fp32 and rounds once.
  return gemma ? convert<O>(xhat * (A(1) + w)) : convert<O>(round_through<T>(xhat) * w);
}

template <typename T, typename W, typename O, int VEC, int VPT>
__global__ void __launch_bounds__(kFwdMaxThreads)
rms_norm_fwd_kernel(const RMSNormFwdParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[kMaxRowGroups * 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;
  const int64_t n_vec = p.cols / VEC;
  const T* x = static_cast<const T*>(p.x) + (valid ? row : 0) * p.x_row_stride;
  const W* w = static_cast<const W*>(p.weight);
  O* y = static_cast<O*>(p.y) + (valid ? row : 0) * p.cols;

  A sumsq = 0;
  if constexpr (VPT > 0) {
    // x and w are loaded together, so the weight read overlaps the row reduction.
    Vec<T, VEC> xv[VPT];
    Vec<W, VEC> wv[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
      if (valid && j < n_vec) {
        xv[i] = load_vec<T, VEC>(x + j * VEC);
        wv[i] = load_vec<W, VEC>(w + j * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A a = convert<A>(xv[i].v[k]);
          sumsq += a * a;
        }
      }
    }
    const A rstd = rsqrt_acc(row_group_sum(sumsq, scratch) / A(p.cols) + A(p.eps));
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
      if (valid && j < n_vec) {
        Vec<O, VEC> yv;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          yv.v[k] = norm_out<T, O>(convert<A>(xv[i].v[k]) * rstd, convert<A>(wv[i].v[k]), p.gemma);
        }
        store_vec<O, VEC>(y + j * VEC, yv);
      }
    }
    if (valid && threadIdx.x == 0) static_cast<A*>(p.rstd)[row] = rstd;
  } else {
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(x + j * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A a = convert<A>(xv.v[k]);
        sumsq += a * a;
      }
    }
    const A rstd = rsqrt_acc(row_group_sum(sumsq, scratch) / A(p.cols) + A(p.eps));
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
      const Vec<T, VEC> xv = load_vec<T, VEC>(x + j * VEC);
      const Vec<W, VEC> wv = load_vec<W, VEC>(w + j * VEC);
      Vec<O, VEC> yv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        yv.v[k] = norm_out<T, O>(convert<A>(xv.v[k]) * rstd, convert<A>(wv.v[k]), p.gemma);
      }
      store_vec<O, VEC>(y + j * VEC, yv);
    }
    if (threadIdx.x == 0) static_cast<A*>(p.rstd)[row] = rstd;
  }
}

// Per element of one row: g = dy * w_eff, xhat = x * rstd, dx = rstd * (g - xhat * mean(g * xhat)).
// Each block also sums dy * xhat over the rows it visits into its own row of dw_partial.
template <typename T, typename W, typename O, int VEC, int VPT>
__global__ void __launch_bounds__(kBwdMaxThreads)
rms_norm_bwd_kernel(const RMSNormBwdParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[kMaxRowGroups * 32];
  extern __shared__ unsigned char dw_smem_bytes[];
  const int64_t n_vec = p.cols / VEC;
  const W* w = static_cast<const W*>(p.weight);
  const A* rstd_in = static_cast<const A*>(p.rstd);
  A* partial = static_cast<A*>(p.dw_partial) + static_cast<int64_t>(blockIdx.x) * p.cols;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const A w_shift = p.gemma ? A(1) : A(0);
  const A inv_cols = A(1) / A(p.cols);

  if constexpr (VPT > 0) {
    // x and dy stay in registers; each row group sums dy * xhat for its columns into its own
    // slice of shared memory (each thread only ever touches its own columns there).
    A* dw_group = reinterpret_cast<A*>(dw_smem_bytes) + threadIdx.y * p.cols;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
      if (j < n_vec) {
        Vec<A, VEC> zero;
#pragma unroll
        for (int k = 0; k < VEC; ++k) zero.v[k] = 0;
        store_vec<A, VEC>(dw_group + j * VEC, zero);
      }
    }
    for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < p.rows;
         row0 += row_step) {
      const int64_t row = row0 + threadIdx.y;
      const bool valid = row < p.rows;
      const T* x = static_cast<const T*>(p.x) + (valid ? row : 0) * p.x_row_stride;
      const O* dy = static_cast<const O*>(p.dy) + (valid ? row : 0) * p.dy_row_stride;
      T* dx = static_cast<T*>(p.dx) + (valid ? row : 0) * p.cols;
      const A rstd = valid ? rstd_in[row] : A(0);
      Vec<T, VEC> xv[VPT];
      Vec<O, VEC> gv[VPT];
      A dot = 0;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
        if (valid && j < n_vec) {
          xv[i] = load_vec<T, VEC>(x + j * VEC);
          gv[i] = load_vec<O, VEC>(dy + j * VEC);
          const Vec<W, VEC> wv = load_vec<W, VEC>(w + j * VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A g = convert<A>(gv[i].v[k]) * (convert<A>(wv.v[k]) + w_shift);
            dot += g * convert<A>(xv[i].v[k]) * rstd;
          }
        }
      }
      const A mean_dot = row_group_sum(dot, scratch) * inv_cols;
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int64_t j = static_cast<int64_t>(i) * blockDim.x + threadIdx.x;
        if (valid && j < n_vec) {
          const Vec<W, VEC> wv = load_vec<W, VEC>(w + j * VEC);
          Vec<A, VEC> dw = load_vec<A, VEC>(dw_group + j * VEC);
          Vec<T, VEC> dxv;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A dyk = convert<A>(gv[i].v[k]);
            const A xhat = convert<A>(xv[i].v[k]) * rstd;
            const A g = dyk * (convert<A>(wv.v[k]) + w_shift);
            dxv.v[k] = convert<T>(rstd * (g - xhat * mean_dot));
            dw.v[k] += dyk * (p.gemma ? xhat : round_through<T>(xhat));
          }
          store_vec<T, VEC>(dx + j * VEC, dxv);
          store_vec<A, VEC>(dw_group + j * VEC, dw);
        }
      }
    }
    // The groups' slices are added in a fixed order (deterministic dW).
    __syncthreads();
    const A* dw_all = reinterpret_cast<const A*>(dw_smem_bytes);
    const int threads = blockDim.x * blockDim.y;
    for (int64_t c = threadIdx.y * blockDim.x + threadIdx.x; c < p.cols; c += threads) {
      A total = 0;
      for (int g = 0; g < static_cast<int>(blockDim.y); ++g) total += dw_all[g * p.cols + c];
      partial[c] = total;
    }
  } else {
    // Streaming: one row group per block; this thread owns the same columns of `partial` in
    // every row it visits, so the read-modify-write below needs no synchronisation.
    for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) partial[j * VEC + k] = 0;
    }
    for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
      const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
      const O* dy = static_cast<const O*>(p.dy) + row * p.dy_row_stride;
      T* dx = static_cast<T*>(p.dx) + row * p.cols;
      const A rstd = rstd_in[row];
      A dot = 0;
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + j * VEC);
        const Vec<O, VEC> gv = load_vec<O, VEC>(dy + j * VEC);
        const Vec<W, VEC> wv = load_vec<W, VEC>(w + j * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A g = convert<A>(gv.v[k]) * (convert<A>(wv.v[k]) + w_shift);
          dot += g * convert<A>(xv.v[k]) * rstd;
        }
      }
      const A mean_dot = row_group_sum(dot, scratch) * inv_cols;
      for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) {
        const Vec<T, VEC> xv = load_vec<T, VEC>(x + j * VEC);
        const Vec<O, VEC> gv = load_vec<O, VEC>(dy + j * VEC);
        const Vec<W, VEC> wv = load_vec<W, VEC>(w + j * VEC);
        Vec<T, VEC> dxv;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A dyk = convert<A>(gv.v[k]);
          const A xhat = convert<A>(xv.v[k]) * rstd;
          const A g = dyk * (convert<A>(wv.v[k]) + w_shift);
          dxv.v[k] = convert<T>(rstd * (g - xhat * mean_dot));
          partial[j * VEC + k] += dyk * (p.gemma ? xhat : round_through<T>(xhat));
        }
        store_vec<T, VEC>(dx + j * VEC, dxv);
      }
    }
  }
}

template <typename T>
int vector_width(const void* const* ptrs, int n_ptrs, const int64_t* strides, int n_strides,
                 int64_t cols) {
  constexpr int kVec = kVec16<T>;
  if (cols % kVec != 0) return 1;
  for (int i = 0; i < n_ptrs; ++i) {
    if (!aligned16(ptrs[i])) return 1;
  }
  for (int i = 0; i < n_strides; ++i) {
    if (strides[i] % kVec != 0) return 1;
  }
  return kVec;
}

template <typename T, typename W, typename O>
void fwd_typed(const RMSNormFwdParams& p, cudaStream_t stream) {
  const void* ptrs[] = {p.x, p.weight, p.y};
  const int vec = vector_width<T>(ptrs, 3, &p.x_row_stride, 1, p.cols);
  const RowPlan plan = plan_rows(p.cols, vec, kFwdBlockThreads, kFwdMaxThreads);
  dispatch_row_plan<kVec16<T>>(plan, [&](auto vec_c, auto vpt_c) {
    const dim3 block(plan.threads_x, plan.rows_per_block);
    const auto grid = static_cast<unsigned>(ceil_div(p.rows, plan.rows_per_block));
    rms_norm_fwd_kernel<T, W, O, vec_c.value, vpt_c.value><<<grid, block, 0, stream>>>(p);
  });
}

// One launch shape for the backward, shared by the workspace query and the launch.
struct BwdShape {
  RowPlan plan;
  int64_t grid;
  size_t smem;
};

template <typename T, typename W, typename O>
BwdShape bwd_shape(const RMSNormBwdParams& p) {
  const void* ptrs[] = {p.x, p.dy, p.weight, p.dx};
  const int64_t strides[] = {p.x_row_stride, p.dy_row_stride};
  const int vec = vector_width<T>(ptrs, 4, strides, 2, p.cols);
  const RowPlan plan = plan_rows(p.cols, vec, kBwdBlockThreads, kBwdMaxThreads);
  const size_t smem = plan.vpt > 0 ? plan.rows_per_block * p.cols * sizeof(acc_t<T>) : 0;
  int64_t resident = 0;
  dispatch_row_plan<kVec16<T>>(plan, [&](auto vec_c, auto vpt_c) {
    const auto kernel = rms_norm_bwd_kernel<T, W, O, vec_c.value, vpt_c.value>;
    allow_dynamic_smem(kernel, smem);
    resident = resident_blocks(kernel, plan.threads_x * plan.rows_per_block, smem);
  });
  const int64_t needed = ceil_div(p.rows, plan.rows_per_block);
  return {plan, needed < resident ? needed : resident, smem};
}

template <typename T, typename W, typename O>
void bwd_typed(const RMSNormBwdParams& p, cudaStream_t stream) {
  const BwdShape shape = bwd_shape<T, W, O>(p);
  dispatch_row_plan<kVec16<T>>(shape.plan, [&](auto vec_c, auto vpt_c) {
    const auto kernel = rms_norm_bwd_kernel<T, W, O, vec_c.value, vpt_c.value>;
    allow_dynamic_smem(kernel, shape.smem);
    const dim3 block(shape.plan.threads_x, shape.plan.rows_per_block);
    kernel<<<static_cast<unsigned>(shape.grid), block, shape.smem, stream>>>(p);
  });
  launch_column_sum(static_cast<const acc_t<T>*>(p.dw_partial), shape.grid, p.cols,
                    static_cast<W*>(p.dw), stream);
}

// Calls f(TypeTag<T>, TypeTag<W>, TypeTag<O>) for the supported (x, weight, output) dtypes.
template <typename F>
void dispatch_norm_types(DType x, DType w, DType o, F&& f) {
  dispatch_float(x, [&](auto t) {
    using T = typename decltype(t)::type;
    dispatch_same_or_f32<T>(w, [&](auto wt) {
      dispatch_same_or_f32<T>(o, [&](auto ot) { f(t, wt, ot); });
    });
  });
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
