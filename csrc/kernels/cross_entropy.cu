// Cross-entropy over rows of logits with an online logsumexp in fp32 (fp64 for fp64 logits):
// one read of a row gives its max and sum of exponentials, whatever the vocabulary size.
//
// Row kernels (every arch): one row group of threads per row. Threads walk the row in aligned
// 16-byte vectors with several loads in flight each; the few elements before the row's first and
// after its last 16-byte boundary go one at a time, so odd vocabulary sizes (32001) still
// vectorize. The forward reads a row once; the backward reads it and writes the gradient; the
// fused forward+backward reads it twice.
//
// Cluster kernel (sm_90+, the fused forward+backward on aligned rows): the CTAs of one cluster
// hold one row in registers, a slice each, and exchange their (max, sum) through distributed
// shared memory, so each logit is read once and each gradient written once.
#include "kernels/cross_entropy.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <limits>

#include "core/device_math.cuh"
#include "core/launch.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define UNSLOTH_EXT_CLUSTERS 1
#endif

namespace unsloth_ext {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowMinBlocks = 2;
constexpr int kRowUnroll = 4;
// Cluster kernel: each thread holds kClusterVpt vectors of its CTA's slice of the row.
constexpr int kClusterVpt = 4;
constexpr int kClusterMaxSize = 8;  // the portable cluster size
constexpr int kClusterMaxThreads = 1024;
// CTAs small enough for two per SM, in different phases (loading, exchanging, storing).
constexpr int kClusterTargetThreads = 512;
// Shorter rows go to the row kernels, which pack several rows into one block.
constexpr int64_t kClusterMinVectors = 1024;

template <typename A>
__device__ __forceinline__ A exp_acc(A x) {
  if constexpr (std::is_same_v<A, double>) {
    return exp(x);
  } else {
    return __expf(x);
  }
}

template <typename A>
__device__ __forceinline__ A log_acc(A x) {
  if constexpr (std::is_same_v<A, double>) {
    return log(x);
  } else {
    return logf(x);
  }
}

template <typename A>
__device__ __forceinline__ A tanh_acc(A x) {
  if constexpr (std::is_same_v<A, double>) {
    return tanh(x);
  } else {
    return tanhf(x);
  }
}

template <typename A>
__device__ __forceinline__ A nan_acc() {
  return std::numeric_limits<A>::quiet_NaN();
}

// z = f(x) and dz/dx (see CrossEntropyRows). f increases, so the largest z of a set of logits is
// f of the largest x.
template <typename A>
struct LogitMap {
  A scale;
  A cap;
  A scale_over_cap;

  __device__ explicit LogitMap(const CrossEntropyRows& in)
      : scale(A(in.logit_scale)),
        cap(A(in.softcap)),
        scale_over_cap(in.softcap > 0 ? A(in.logit_scale / in.softcap) : A(0)) {}

  __device__ __forceinline__ A z(A x) const {
    return cap > 0 ? cap * tanh_acc(x * scale_over_cap) : scale * x;
  }

  // Calls g(k, z_k, dz_k/dx_k) for k in [0, N), with the softcap test out of the loop.
  template <int N, typename G>
  __device__ __forceinline__ void each(const A (&x)[N], G&& g) const {
    if (cap > 0) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A t = tanh_acc(x[k] * scale_over_cap);
        g(k, cap * t, scale * (A(1) - t * t));
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) g(k, scale * x[k], scale);
    }
  }
};

struct RowLabel {
  bool ignored;
  bool invalid;   // outside [0, vocab_size) and not ignore_index
  int64_t col;    // the label's column in this window, -1 when elsewhere
};

__device__ __forceinline__ RowLabel row_label(const CrossEntropyRows& in, int64_t row) {
  const int64_t y = in.labels[row];
  RowLabel label;
  label.ignored = y == in.ignore_index;
  label.invalid = !label.ignored && (y < 0 || y >= in.vocab_size);
  const int64_t col = y - in.vocab_start;
  label.col = !label.ignored && !label.invalid && col >= 0 && col < in.cols ? col : -1;
  return label;
}

// A running logsumexp over some elements: max m, sum s of exp(z - m), and the sum of z (for label
// smoothing). m starts at the lowest finite value so that rows of -inf logits never give
// -inf - -inf.
template <typename A>
struct LseState {
  A m;
  A s;
  A zsum;

  __device__ static LseState empty() { return {std::numeric_limits<A>::lowest(), A(0), A(0)}; }

  // Commutative bit for bit, so every thread of a butterfly ends with the same state.
  __device__ __forceinline__ void merge(const LseState& o) {
    const A mm = max(m, o.m);
    s = s * exp_acc(m - mm) + o.s * exp_acc(o.m - mm);
    m = mm;
    zsum += o.zsum;
  }

  template <int N>
  __device__ __forceinline__ void add(const A (&x)[N], const LogitMap<A>& f, bool smoothing) {
    A xmax = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) xmax = max(xmax, x[k]);
    const A zmax = f.z(xmax);
    if (zmax > m) {
      s *= exp_acc(m - zmax);
      m = zmax;
    }
    f.each(x, [&](int, A z, A) {
      s += exp_acc(z - m);
      if (smoothing) zsum += z;
    });
  }

  __device__ __forceinline__ A lse() const { return m + log_acc(s); }
};

template <typename A>
__device__ __forceinline__ LseState<A> warp_merge(LseState<A> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    st.merge({__shfl_xor_sync(0xffffffffu, st.m, offset),
              __shfl_xor_sync(0xffffffffu, st.s, offset),
              __shfl_xor_sync(0xffffffffu, st.zsum, offset)});
  }
  return st;
}

// Merge over the threads of one row group (see row_group_sum); every thread gets the result.
template <typename A>
__device__ LseState<A> row_group_merge(LseState<A> st, LseState<A>* scratch) {
  st = warp_merge(st);
  const int warps = blockDim.x / 32;
  if (warps == 1) return st;
  LseState<A>* s = scratch + threadIdx.y * 32;
  if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = st;
  row_group_sync();
  LseState<A> total = s[0];
  for (int w = 1; w < warps; ++w) total.merge(s[w]);
  row_group_sync();  // the scratch is reused by the group's next row
  return total;
}

template <typename V>
struct VecLen;
template <typename T, int N>
struct VecLen<Vec<T, N>> {
  static constexpr int value = N;
};

// Rows are held as 32-bit words while loads are in flight (two 16-bit elements per register) and
// turned into a Vec only where they are used.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> from_words(const uint4& words) {
  static_assert(sizeof(Vec<T, N>) == sizeof(uint4));
  Vec<T, N> v;
  memcpy(&v, &words, sizeof(words));
  return v;
}

// A row cut at its 16-byte boundaries: `head` elements, n_vec aligned vectors of VEC, then the
// rest. Scalar i < head + tail is column scalar_col(i).
template <typename T, int VEC>
struct RowSplit {
  int64_t head;
  int64_t n_vec;
  int64_t body_end;
  int64_t n_scalar;

  __device__ RowSplit(const T* row, int64_t cols) {
    const auto misalign =
        static_cast<int64_t>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % VEC);
    head = misalign == 0 ? 0 : min(static_cast<int64_t>(VEC) - misalign, cols);
    n_vec = (cols - head) / VEC;
    body_end = head + n_vec * VEC;
    n_scalar = head + cols - body_end;
  }

  __device__ __forceinline__ int64_t scalar_col(int64_t i) const {
    return i < head ? i : body_end + (i - head);
  }
};

// Calls f(Vec<T, N>, col) over a row group's row, covering columns col..col+N-1 each time:
// aligned vectors (N = VEC) kRowUnroll loads in flight per thread, and the unaligned ends (N = 1).
template <int VEC, typename T, typename F>
__device__ __forceinline__ void visit_row(const T* row, int64_t cols, F&& f) {
  const RowSplit<T, VEC> split(row, cols);
  for (int64_t i = threadIdx.x; i < split.n_scalar; i += blockDim.x) {
    const int64_t col = split.scalar_col(i);
    f(Vec<T, 1>{{row[col]}}, col);
  }
  const T* body = row + split.head;
  for (int64_t base = threadIdx.x; base < split.n_vec;
       base += static_cast<int64_t>(kRowUnroll) * blockDim.x) {
    uint4 words[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t j = base + u * blockDim.x;
      if (j < split.n_vec) words[u] = *reinterpret_cast<const uint4*>(body + j * VEC);
    }
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t j = base + u * blockDim.x;
      if (j < split.n_vec) f(from_words<T, VEC>(words[u]), split.head + j * VEC);
    }
  }
}

template <int VEC, typename T>
__device__ void fill_row(T* row, int64_t cols, T value) {
  const RowSplit<T, VEC> split(row, cols);
  for (int64_t i = threadIdx.x; i < split.n_scalar; i += blockDim.x) {
    row[split.scalar_col(i)] = value;
  }
  Vec<T, VEC> v;
#pragma unroll
  for (int k = 0; k < VEC; ++k) v.v[k] = value;
  for (int64_t j = threadIdx.x; j < split.n_vec; j += blockDim.x) {
    store_vec<T, VEC>(row + split.head + j * VEC, v);
  }
}

// What the gradient of one row needs: d/dx of g_lse * lse + g_target * target is
// (g_lse * exp(z - lse) + g_smooth + g_label [col = label]) * dz/dx.
template <typename A>
struct RowGrad {
  A lse;
  A g_lse;
  A g_smooth;  // g_target * label_smoothing / vocab_size
  A g_label;   // g_target * (1 - label_smoothing)
  int64_t label_col;

  __device__ RowGrad(const CrossEntropyRows& in, A lse_, A g_lse_, A g_target, int64_t label_col_)
      : lse(lse_),
        g_lse(g_lse_),
        g_smooth(g_target * A(in.label_smoothing) / A(in.vocab_size)),
        g_label(g_target * (A(1) - A(in.label_smoothing))),
        label_col(label_col_) {}

  template <typename T, int N>
  __device__ __forceinline__ Vec<T, N> of(const Vec<T, N>& v, int64_t col,
                                          const LogitMap<A>& f) const {
    A x[N], out[N];
    to_acc(v, x);
    const int64_t label_k = label_col - col;
    f.each(x, [&](int k, A z, A dz) {
      A g = g_lse * exp_acc(z - lse) + g_smooth;
      if (k == label_k) g += g_label;
      out[k] = g * dz;
    });
    return from_acc<T>(out);
  }
};

// The merged logsumexp state of a row group's row.
template <typename T, typename A>
__device__ LseState<A> row_stats(const T* x, int64_t cols, const LogitMap<A>& f, bool smoothing,
                                 LseState<A>* scratch) {
  LseState<A> st = LseState<A>::empty();
  visit_row<kVec16<T>>(x, cols, [&](const auto& v, int64_t) {
    A a[VecLen<std::decay_t<decltype(v)>>::value];
    to_acc(v, a);
    st.add(a, f, smoothing);
  });
  return row_group_merge(st, scratch);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
cross_entropy_fwd_kernel(const CrossEntropyFwdParams p) {
  using A = acc_t<T>;
  __shared__ LseState<A> scratch[kMaxRowGroups * 32];
  const CrossEntropyRows& in = p.in;
  const LogitMap<A> f(in);
  const bool smoothing = in.label_smoothing > 0;
  const A eps = A(in.label_smoothing);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < in.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const RowLabel label = row_label(in, row);
    A lse = label.invalid ? nan_acc<A>() : A(0);
    A target = lse;
    if (!label.ignored && !label.invalid) {
      const T* x = static_cast<const T*>(in.logits) + row * in.row_stride;
      const LseState<A> st = row_stats(x, in.cols, f, smoothing, scratch);
      if (threadIdx.x != 0) continue;
      lse = st.lse();
      target = eps / A(in.vocab_size) * st.zsum;
      if (label.col >= 0) target += (A(1) - eps) * f.z(convert<A>(x[label.col]));
    }
    if (threadIdx.x == 0) {
      static_cast<A*>(p.lse)[row] = lse;
      static_cast<A*>(p.target)[row] = target;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
cross_entropy_bwd_kernel(const CrossEntropyBwdParams p) {
  using A = acc_t<T>;
  const CrossEntropyRows& in = p.in;
  const LogitMap<A> f(in);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < in.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const RowLabel label = row_label(in, row);
    T* grad = static_cast<T*>(p.grad_logits) + row * in.row_stride;
    if (label.ignored || label.invalid) {
      fill_row<kVec16<T>>(grad, in.cols, convert<T>(label.ignored ? A(0) : nan_acc<A>()));
      continue;
    }
    const RowGrad<A> rg(in, static_cast<const A*>(p.lse)[row],
                        static_cast<const A*>(p.grad_lse)[row],
                        static_cast<const A*>(p.grad_target)[row], label.col);
    const T* x = static_cast<const T*>(in.logits) + row * in.row_stride;
    visit_row<kVec16<T>>(x, in.cols, [&](const auto& v, int64_t col) {
      constexpr int N = VecLen<std::decay_t<decltype(v)>>::value;
      store_vec<T, N>(grad + col, rg.of(v, col, f));
    });
  }
}

// The fused forward+backward for any row: the row is read once for its statistics and again for
// its gradient.
template <typename T>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
cross_entropy_fused_rows_kernel(const CrossEntropyFusedParams p) {
  using A = acc_t<T>;
  __shared__ LseState<A> scratch[kMaxRowGroups * 32];
  const CrossEntropyRows& in = p.in;
  const LogitMap<A> f(in);
  const bool smoothing = in.label_smoothing > 0;
  const A eps = A(in.label_smoothing);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < in.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const RowLabel label = row_label(in, row);
    T* grad = static_cast<T*>(p.grad_logits) + row * in.row_stride;
    A loss = label.invalid ? nan_acc<A>() : A(0);
    if (label.ignored || label.invalid) {
      fill_row<kVec16<T>>(grad, in.cols, convert<T>(loss));
    } else {
      const T* x = static_cast<const T*>(in.logits) + row * in.row_stride;
      const A x_label = convert<A>(x[label.col]);
      const LseState<A> st = row_stats(x, in.cols, f, smoothing, scratch);
      // Every thread has read the row before any gradient overwrites it (grad may be x).
      row_group_sync();
      const A lse = st.lse();
      loss = lse - (A(1) - eps) * f.z(x_label) - eps / A(in.vocab_size) * st.zsum;
      const A scale = static_cast<const A*>(p.grad_scale)[row];
      const RowGrad<A> rg(in, lse, scale, -scale, label.col);  // loss = lse - target
      visit_row<kVec16<T>>(x, in.cols, [&](const auto& v, int64_t col) {
        constexpr int N = VecLen<std::decay_t<decltype(v)>>::value;
        store_vec<T, N>(grad + col, rg.of(v, col, f));
      });
    }
    if (threadIdx.x == 0) static_cast<A*>(p.loss)[row] = loss;
  }
}

// The fused forward+backward on sm_90+: blockIdx.x / cluster size is the row, and CTA `rank` of
// the cluster holds its slice of per_cta vectors in registers, thread i vectors i, i + blockDim.x,
// ... of the slice. The CTAs merge their logsumexp states through distributed shared memory,
// every warp in the same order, so every CTA uses the same lse.
template <typename T>
__global__ void __launch_bounds__(kClusterMaxThreads, 1)
cross_entropy_fused_cluster_kernel(const CrossEntropyFusedParams p) {
#ifdef UNSLOTH_EXT_CLUSTERS
  using A = float;
  constexpr int VEC = kVec16<T>;
  namespace cg = cooperative_groups;
  __shared__ LseState<A> warp_states[32];
  __shared__ LseState<A> cta_state;
  const auto cluster = cg::this_cluster();
  const int size = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int lane = threadIdx.x % 32;
  const CrossEntropyRows& in = p.in;
  const int64_t row = blockIdx.x / size;
  const int64_t n_vec = in.cols / VEC;
  const int per_cta = static_cast<int>((n_vec + size - 1) / size);
  const int64_t first_col = static_cast<int64_t>(rank) * per_cta * VEC;
  // Vectors in this CTA's slice (none for the last CTAs of a short row).
  const int count =
      static_cast<int>(max(min(n_vec - first_col / VEC, int64_t{per_cta}), int64_t{0}));
  const RowLabel label = row_label(in, row);
  const T* x_row = static_cast<const T*>(in.logits) + row * in.row_stride;
  const T* x = x_row + first_col;
  T* grad = static_cast<T*>(p.grad_logits) + row * in.row_stride + first_col;
  float* loss = static_cast<float*>(p.loss);

  // The label is the same for every CTA of the cluster, so none waits at a barrier alone.
  if (label.ignored || label.invalid) {
    Vec<T, VEC> fill;
    const T value = convert<T>(label.ignored ? A(0) : nan_acc<A>());
#pragma unroll
    for (int k = 0; k < VEC; ++k) fill.v[k] = value;
    for (int j = threadIdx.x; j < count; j += blockDim.x) store_vec<T, VEC>(grad + j * VEC, fill);
    if (rank == 0 && threadIdx.x == 0) loss[row] = label.ignored ? A(0) : nan_acc<A>();
    return;
  }

  uint4 words[kClusterVpt];
#pragma unroll
  for (int i = 0; i < kClusterVpt; ++i) {
    const int j = i * blockDim.x + threadIdx.x;
    if (j < count) words[i] = *reinterpret_cast<const uint4*>(x + j * VEC);
  }
  // Read before the cluster barrier, after which the label's column may hold its gradient.
  const A x_label = rank == 0 && threadIdx.x == 0 ? convert<A>(x_row[label.col]) : A(0);

  // The slice is in registers: its max first, then one exponential per element.
  const LogitMap<A> f(in);
  const bool smoothing = in.label_smoothing > 0;
  LseState<A> st = LseState<A>::empty();
  if (static_cast<int>(threadIdx.x) < count) {
    A xmax = -std::numeric_limits<A>::infinity();
#pragma unroll
    for (int i = 0; i < kClusterVpt; ++i) {
      if (static_cast<int>(i * blockDim.x + threadIdx.x) < count) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xmax = max(xmax, convert<A>(from_words<T, VEC>(words[i]).v[k]));
        }
      }
    }
    st.m = max(f.z(xmax), st.m);
#pragma unroll
    for (int i = 0; i < kClusterVpt; ++i) {
      if (static_cast<int>(i * blockDim.x + threadIdx.x) < count) {
        A a[VEC];
        to_acc(from_words<T, VEC>(words[i]), a);
        f.each(a, [&](int, A z, A) {
          st.s += exp_acc(z - st.m);
          if (smoothing) st.zsum += z;
        });
      }
    }
  }
  st = warp_merge(st);
  if (lane == 0) warp_states[threadIdx.x / 32] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    LseState<A> total = warp_states[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total.merge(warp_states[w]);
    cta_state = total;
  }
  cluster.sync();
  LseState<A> row_state = LseState<A>::empty();
  if (lane < size) row_state = *cluster.map_shared_rank(&cta_state, lane);
  row_state = warp_merge(row_state);
  cluster.barrier_arrive();  // done reading the other CTAs' shared memory

  const A lse = row_state.lse();
  const A eps = A(in.label_smoothing);
  const A scale = static_cast<const A*>(p.grad_scale)[row];
  // Columns counted from the slice's start.
  const RowGrad<A> rg(in, lse, scale, -scale, label.col - first_col);
#pragma unroll
  for (int i = 0; i < kClusterVpt; ++i) {
    const int j = i * blockDim.x + threadIdx.x;
    if (j < count) {
      store_vec<T, VEC>(grad + j * VEC, rg.of(from_words<T, VEC>(words[i]), j * VEC, f));
    }
  }
  if (rank == 0 && threadIdx.x == 0) {
    loss[row] = lse - (A(1) - eps) * f.z(x_label) - eps / A(in.vocab_size) * row_state.zsum;
  }
  cluster.barrier_wait();  // keep this CTA's shared memory until every CTA has read it
#else
  __trap();
#endif
}

// Launches a row kernel: one row group per row, several rows per block for short rows.
template <typename T, typename Params>
void launch_rows(void (*kernel)(Params), const Params& p, cudaStream_t stream) {
  const RowPlan plan = plan_rows(p.in.cols, kVec16<T>, kRowThreads, kRowUnroll);
  const dim3 block(plan.threads_x, plan.rows_per_block);
  const int64_t blocks = ceil_div(p.in.rows, plan.rows_per_block);
  kernel<<<static_cast<unsigned>(std::min<int64_t>(blocks, INT_MAX)), block, 0, stream>>>(p);
}

// Whether the current device launches clusters and has `kernel` compiled for sm_90+ (a binary
// whose newest code for this GPU is PTX of an older arch leaves the cluster kernel a trap).
// Cached per thread for the last device asked about.
template <typename T>
bool cluster_kernel_usable() {
  thread_local int cached_device = -1;
  thread_local bool usable = false;
  int device = 0;
  cudaGetDevice(&device);
  if (device != cached_device) {
    int clusters = 0;
    cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, device);
    cudaFuncAttributes attr{};
    const bool found =
        cudaFuncGetAttributes(&attr, cross_entropy_fused_cluster_kernel<T>) == cudaSuccess;
    if (!found) cudaGetLastError();  // a failed query is not an error of the op
    usable = clusters != 0 && found && attr.ptxVersion >= 90;
    cached_device = device;
  }
  return usable;
}

// The cluster shape for a row of n_vec vectors: `size` CTAs of `threads` threads, or false when
// the row is too short, too long or unaligned for it.
template <typename T>
bool launch_fused_cluster(const CrossEntropyFusedParams& p, cudaStream_t stream) {
  constexpr int VEC = kVec16<T>;
  const CrossEntropyRows& in = p.in;
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    const int64_t n_vec = in.cols / VEC;
    const bool aligned = in.cols % VEC == 0 && in.row_stride % VEC == 0 && aligned16(in.logits) &&
                         aligned16(p.grad_logits);
    if (!aligned || n_vec < kClusterMinVectors ||
        n_vec > int64_t{kClusterMaxSize} * kClusterMaxThreads * kClusterVpt) {
      return false;
    }
    const int size = static_cast<int>(std::min<int64_t>(
        ceil_div(n_vec, int64_t{kClusterTargetThreads} * kClusterVpt), kClusterMaxSize));
    const int64_t threads = ceil_div(ceil_div(n_vec, size), 32 * kClusterVpt) * 32;
    if (in.rows > INT_MAX / size || !cluster_kernel_usable<T>()) return false;

    cudaLaunchAttribute cluster_dim{};
    cluster_dim.id = cudaLaunchAttributeClusterDimension;
    cluster_dim.val.clusterDim.x = static_cast<unsigned>(size);
    cluster_dim.val.clusterDim.y = 1;
    cluster_dim.val.clusterDim.z = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(in.rows * size));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.stream = stream;
    config.attrs = &cluster_dim;
    config.numAttrs = 1;
    cudaLaunchKernelEx(&config, cross_entropy_fused_cluster_kernel<T>, p);
    return true;
  }
}

}  // namespace

void cross_entropy_fwd_launch(const CrossEntropyFwdParams& p, cudaStream_t stream) {
  dispatch_float(p.in.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    launch_rows<T>(cross_entropy_fwd_kernel<T>, p, stream);
  });
}

void cross_entropy_bwd_launch(const CrossEntropyBwdParams& p, cudaStream_t stream) {
  dispatch_float(p.in.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    launch_rows<T>(cross_entropy_bwd_kernel<T>, p, stream);
  });
}

void cross_entropy_fwd_bwd_launch(const CrossEntropyFusedParams& p, cudaStream_t stream) {
  dispatch_float(p.in.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    if (!launch_fused_cluster<T>(p, stream)) {
      launch_rows<T>(cross_entropy_fused_rows_kernel<T>, p, stream);
    }
  });
}

}  // namespace unsloth_ext
