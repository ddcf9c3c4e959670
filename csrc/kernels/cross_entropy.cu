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
// stage one row in shared memory, a slice each, and exchange their (max, sum) through
// distributed shared memory, so each logit is read once and each gradient written once.
#include "kernels/cross_entropy.h"

#include <cooperative_groups.h>

#include <algorithm>
#include <climits>
#include <limits>

#include "core/bulk_copy.cuh"
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
// Cluster kernel: a cluster of up to kClusterMaxSize CTAs per row, each staging a slice of about
// kClusterSliceBytes and giving each thread about kClusterVpt vectors of it. Every warp pays a
// fixed cost per row (merges, barriers), so fewer warps with more vectors each run faster: on the
// H200 at V = 128256, 16 vectors per thread took 1163 us, 8 took 1200 us. (A persistent grid,
// each cluster walking rows with the next ones' copies in flight, took 1330 us.)
constexpr int kClusterMaxSize = 8;  // the portable cluster size
static_assert((kClusterMaxSize & (kClusterMaxSize - 1)) == 0, "merged by a butterfly");
constexpr int kClusterMaxThreads = 1024;
constexpr int kClusterVpt = 16;
constexpr int64_t kClusterSliceBytes = 32 * 1024;
// Longer rows (whose slices would not fit in shared memory) go to the row kernels.
constexpr size_t kClusterMaxSmem = 192 * 1024;
// Shorter rows go to the row kernels, which pack several rows into one block.
constexpr int64_t kClusterMinVectors = 1024;

constexpr double kLog2e = 1.4426950408889634;

// 2^x: in fp32 the hardware approximation, with results below 2^-126 flushed to zero (they add
// nothing to a sum that holds 1, and round to zero gradients).
template <typename A>
__device__ __forceinline__ A exp2_acc(A x) {
  if constexpr (std::is_same_v<A, double>) {
    return exp2(x);
  } else {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
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

// a * b rounded on its own, never fused into a following add.
template <typename A>
__device__ __forceinline__ A mul_rn(A a, A b) {
  if constexpr (std::is_same_v<A, double>) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
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

// z = f(x) and dz/dx (see CrossEntropyRows), with the softcap on or off at compile time so that
// the kernels' loops carry no test of it. f increases, so the largest z of a set of logits is f of
// the largest x. The kernels take exp(z - c) as 2^(z log2(e) - c log2(e)); without a softcap,
// z log2(e) is x * scale_log2e.
template <typename A, bool kCap>
struct LogitMap {
  static constexpr bool kSoftcap = kCap;
  A scale;
  A scale_log2e;
  A cap;
  A scale_over_cap;

  __device__ explicit LogitMap(const CrossEntropyRows& in)
      : scale(A(in.logit_scale)),
        scale_log2e(A(in.logit_scale * kLog2e)),
        cap(A(in.softcap)),
        scale_over_cap(in.softcap > 0 ? A(in.logit_scale / in.softcap) : A(0)) {}

  __device__ __forceinline__ A z(A x) const {
    if constexpr (kCap) {
      return cap * tanh_acc(x * scale_over_cap);
    } else {
      return scale * x;
    }
  }

  // z log2(e), rounded as LseState::add rounds it for each element.
  __device__ __forceinline__ A t(A x) const {
    return kCap ? mul_rn(z(x), A(kLog2e)) : mul_rn(x, scale_log2e);
  }

  // Calls g(k, z_k, dz_k/dx_k) for k in [0, N).
  template <int N, typename G>
  __device__ __forceinline__ void each(const A (&x)[N], G&& g) const {
    if constexpr (kCap) {
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

// Calls body(f) with the LogitMap of `in`.
template <typename A, typename Body>
__device__ __forceinline__ void with_logit_map(const CrossEntropyRows& in, Body&& body) {
  if (in.softcap > 0) {
    body(LogitMap<A, true>(in));
  } else {
    body(LogitMap<A, false>(in));
  }
}

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

// Label smoothing's weights: eps on the smoothed target, eps / vocab_size on each class.
template <typename A>
struct Smoothing {
  A eps;
  A per_class;

  __device__ explicit Smoothing(const CrossEntropyRows& in)
      : eps(A(in.label_smoothing)), per_class(A(in.label_smoothing / in.vocab_size)) {}

  __device__ __forceinline__ bool on() const { return eps > 0; }
};

// A running logsumexp over some elements: max m of z, sum s of exp(z - m), and the sum of z (for
// label smoothing). The sum is taken in base 2 as s = sum of 2^(t - t_max), where t = z log2(e)
// is rounded the same way for every element (LogitMap::t), so the max element adds exactly 1.
// m and t_max start at the lowest finite value so that rows of -inf logits never give -inf - -inf.
template <typename A>
struct alignas(4 * sizeof(A)) LseState {
  A m;
  A t_max;
  A s;
  A zsum;

  __device__ static LseState empty() {
    constexpr A lowest = std::numeric_limits<A>::lowest();
    return {lowest, lowest, A(0), A(0)};
  }

  // Commutative bit for bit, so every thread of a butterfly ends with the same state.
  __device__ __forceinline__ void merge(const LseState& o) {
    const A tt = max(t_max, o.t_max);
    s = s * exp2_acc(t_max - tt) + o.s * exp2_acc(o.t_max - tt);
    m = max(m, o.m);
    t_max = tt;
    zsum += o.zsum;
  }

  template <int N, typename Map>
  __device__ __forceinline__ void add(const A (&x)[N], const Map& f, bool smoothing) {
    A xmax = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) xmax = max(xmax, x[k]);
    m = max(m, f.z(xmax));
    const A tt = max(t_max, f.t(xmax));
    s *= exp2_acc(t_max - tt);
    t_max = tt;
    if constexpr (Map::kSoftcap) {
      f.each(x, [&](int, A z, A) {
        s += exp2_acc(mul_rn(z, A(kLog2e)) - tt);
        if (smoothing) zsum += z;
      });
      return;
    }
#pragma unroll
    for (int k = 0; k < N; ++k) s += exp2_acc(mul_rn(x[k], f.scale_log2e) - tt);
    if (smoothing) {
      A sum = 0;
#pragma unroll
      for (int k = 0; k < N; ++k) sum += x[k];
      zsum += f.scale * sum;
    }
  }

  __device__ __forceinline__ A lse() const { return m + log_acc(s); }
};

// Merges the states of each group of kLanes lanes; every lane of a group gets its group's result.
template <int kLanes = 32, typename A>
__device__ __forceinline__ LseState<A> warp_merge(LseState<A> st) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    st.merge({__shfl_xor_sync(0xffffffffu, st.m, offset),
              __shfl_xor_sync(0xffffffffu, st.t_max, offset),
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
    VecWords<T, VEC> words[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t j = base + u * blockDim.x;
      if (j < split.n_vec) words[u] = load_words<T, VEC>(body + j * VEC);
    }
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      const int64_t j = base + u * blockDim.x;
      if (j < split.n_vec) f(words[u].vec(), split.head + j * VEC);
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
  A lse_log2e;  // lse * log2(e)
  A g_lse;
  A g_smooth;  // g_target * label_smoothing / vocab_size
  A g_label;   // g_target * (1 - label_smoothing)
  int64_t label_col;

  __device__ RowGrad(const Smoothing<A>& smooth, A lse, A g_lse_, A g_target, int64_t label_col_)
      : lse_log2e(lse * A(kLog2e)),
        g_lse(g_lse_),
        g_smooth(g_target * smooth.per_class),
        g_label(g_target * (A(1) - smooth.eps)),
        label_col(label_col_) {}

  template <typename T, int N, typename Map>
  __device__ __forceinline__ Vec<T, N> of(const Vec<T, N>& v, int64_t col, const Map& f) const {
    A x[N], out[N];
    to_acc(v, x);
    const int64_t label_k = label_col - col;
    const bool has_label = label_k >= 0 && label_k < N;
    if constexpr (Map::kSoftcap) {
      f.each(x, [&](int k, A z, A dz) {
        A g = g_lse * exp2_acc(z * A(kLog2e) - lse_log2e) + g_smooth;
        if (has_label && k == label_k) g += g_label;
        out[k] = g * dz;
      });
    } else {
      // dz/dx = scale: out = (g_lse * scale) * exp(z - lse) + g_smooth * scale.
      const A a = g_lse * f.scale;
      const A b = g_smooth * f.scale;
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = a * exp2_acc(x[k] * f.scale_log2e - lse_log2e) + b;
      if (has_label) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          if (k == label_k) out[k] += g_label * f.scale;
        }
      }
    }
    return from_acc<T>(out);
  }
};

// A row's loss, lse - target, from its label's z and its sum of z (for label smoothing).
template <typename A>
__device__ __forceinline__ A row_loss(const Smoothing<A>& smooth, A lse, A z_label, A zsum) {
  return lse - (A(1) - smooth.eps) * z_label - smooth.per_class * zsum;
}

// Writes the gradient of a row group's row x into grad (which may be x itself).
template <typename T, typename A, typename Map>
__device__ void write_row_grad(T* grad, const T* x, int64_t cols, const RowGrad<A>& rg,
                               const Map& f) {
  visit_row<kVec16<T>>(x, cols, [&](const auto& v, int64_t col) {
    constexpr int N = VecLen<std::decay_t<decltype(v)>>::value;
    store_vec<T, N>(grad + col, rg.of(v, col, f));
  });
}

// The merged logsumexp state of a row group's row.
template <typename T, typename A, typename Map>
__device__ LseState<A> row_stats(const T* x, int64_t cols, const Map& f, bool smoothing,
                                 LseState<A>* scratch) {
  LseState<A> st = LseState<A>::empty();
  visit_row<kVec16<T>>(x, cols, [&](const auto& v, int64_t) {
    A a[VecLen<std::decay_t<decltype(v)>>::value];
    to_acc(v, a);
    st.add(a, f, smoothing);
  });
  return row_group_merge(st, scratch);
}

template <typename T, typename Map>
__device__ void fwd_rows(const CrossEntropyFwdParams& p, const Map& f,
                         LseState<acc_t<T>>* scratch) {
  using A = acc_t<T>;
  const CrossEntropyRows& in = p.in;
  const Smoothing<A> smooth(in);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < in.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const RowLabel label = row_label(in, row);
    A lse = label.invalid ? nan_acc<A>() : A(0);
    A target = lse;
    if (!label.ignored && !label.invalid) {
      const T* x = static_cast<const T*>(in.logits) + row * in.row_stride;
      const LseState<A> st = row_stats(x, in.cols, f, smooth.on(), scratch);
      if (threadIdx.x != 0) continue;
      lse = st.lse();
      target = smooth.per_class * st.zsum;
      if (label.col >= 0) target += (A(1) - smooth.eps) * f.z(convert<A>(x[label.col]));
    }
    if (threadIdx.x == 0) {
      static_cast<A*>(p.lse)[row] = lse;
      static_cast<A*>(p.target)[row] = target;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
cross_entropy_fwd_kernel(const CrossEntropyFwdParams p) {
  __shared__ LseState<acc_t<T>> scratch[kMaxRowGroups * 32];
  with_logit_map<acc_t<T>>(p.in, [&](const auto& f) { fwd_rows<T>(p, f, scratch); });
}

template <typename T, typename Map>
__device__ void bwd_rows(const CrossEntropyBwdParams& p, const Map& f) {
  using A = acc_t<T>;
  const CrossEntropyRows& in = p.in;
  const Smoothing<A> smooth(in);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < in.rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const RowLabel label = row_label(in, row);
    T* grad = static_cast<T*>(p.grad_logits) + row * in.row_stride;
    if (label.ignored || label.invalid) {
      fill_row<kVec16<T>>(grad, in.cols, convert<T>(label.ignored ? A(0) : nan_acc<A>()));
      continue;
    }
    const RowGrad<A> rg(smooth, static_cast<const A*>(p.lse)[row],
                        static_cast<const A*>(p.grad_lse)[row],
                        static_cast<const A*>(p.grad_target)[row], label.col);
    write_row_grad(grad, static_cast<const T*>(in.logits) + row * in.row_stride, in.cols, rg, f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
cross_entropy_bwd_kernel(const CrossEntropyBwdParams p) {
  with_logit_map<acc_t<T>>(p.in, [&](const auto& f) { bwd_rows<T>(p, f); });
}

// The fused forward+backward for any row: the row is read once for its statistics and again for
// its gradient.
template <typename T, typename Map>
__device__ void fused_rows(const CrossEntropyFusedParams& p, const Map& f,
                           LseState<acc_t<T>>* scratch) {
  using A = acc_t<T>;
  const CrossEntropyRows& in = p.in;
  const Smoothing<A> smooth(in);
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
      const LseState<A> st = row_stats(x, in.cols, f, smooth.on(), scratch);
      // Every thread has read the row before any gradient overwrites it (grad may be x).
      row_group_sync();
      const A lse = st.lse();
      loss = row_loss(smooth, lse, f.z(x_label), st.zsum);
      const A scale = static_cast<const A*>(p.grad_scale)[row];
      const RowGrad<A> rg(smooth, lse, scale, -scale, label.col);  // loss = lse - target
      write_row_grad(grad, x, in.cols, rg, f);
    }
    if (threadIdx.x == 0) static_cast<A*>(p.loss)[row] = loss;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks)
cross_entropy_fused_rows_kernel(const CrossEntropyFusedParams p) {
  __shared__ LseState<acc_t<T>> scratch[kMaxRowGroups * 32];
  with_logit_map<acc_t<T>>(p.in, [&](const auto& f) { fused_rows<T>(p, f, scratch); });
}

// The fused forward+backward on sm_90+: one cluster per row, CTA `rank` owning the slice of
// per_cta vectors from column rank * per_cta * VEC. Thread 0 stages the slice in shared memory with
// one bulk copy; the CTA takes the slice's logsumexp state and publishes it, and after a cluster
// barrier every CTA merges all CTAs' states (in the same order: all use the same lse) and writes
// its slice's gradient from the stage. The grid holds every row's cluster: while some CTAs of an
// SM wait on their copy or their peers, others stream theirs. Every CTA of a cluster sees the same
// label, so all take the same branches and barriers.
#ifdef UNSLOTH_EXT_CLUSTERS
template <typename T, typename Map>
__device__ void fused_cluster(const CrossEntropyFusedParams& p, int per_cta, const Map& f) {
  using A = float;
  constexpr int VEC = kVec16<T>;
  namespace cg = cooperative_groups;
  extern __shared__ __align__(128) unsigned char stage_bytes[];
  __shared__ uint64_t full;
  __shared__ LseState<A> warp_states[32];
  __shared__ LseState<A> cta_state;
  const auto cluster = cg::this_cluster();
  const int size = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int lane = threadIdx.x % 32;
  const int warps = static_cast<int>(blockDim.x / 32);
  const CrossEntropyRows& in = p.in;
  const int64_t row = blockIdx.x / size;
  const int64_t n_vec = in.cols / VEC;
  const int64_t first_col = static_cast<int64_t>(rank) * per_cta * VEC;
  // Vectors in this CTA's slice (none for the last CTAs of a short row).
  const int count =
      static_cast<int>(max(min(n_vec - first_col / VEC, int64_t{per_cta}), int64_t{0}));
  const T* x = reinterpret_cast<const T*>(stage_bytes);
  const RowLabel label = row_label(in, row);
  const bool has_loss = !label.ignored && !label.invalid;
  const Smoothing<A> smooth(in);

  if (threadIdx.x == 0 && has_loss) {
    const auto slice_bytes = static_cast<uint32_t>(count) * 16;
    mbarrier_init(&full, 1);
    mbarrier_arrive_expect(&full, slice_bytes);
    if (count > 0) {
      bulk_copy_to_shared(stage_bytes,
                          static_cast<const T*>(in.logits) + row * in.row_stride + first_col,
                          slice_bytes, &full);
    }
  }
  __syncthreads();  // the barrier is initialized
  LseState<A> st = LseState<A>::empty();
  if (has_loss) {
    mbarrier_wait(&full, 0);
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
      A a[VEC];
      to_acc(load_vec<T, VEC>(x + j * VEC), a);
      st.add(a, f, smooth.on());
    }
  }
  st = warp_merge(st);
  if (lane == 0) warp_states[threadIdx.x / 32] = st;
  __syncthreads();
  if (threadIdx.x < 32) {
    st = warp_merge(lane < warps ? warp_states[lane] : LseState<A>::empty());
    if (threadIdx.x == 0) {
      cta_state = st;
      release_shared_to_cluster();  // the arrival releases only the state, not earlier stores
    }
  }
  cluster_arrive_relaxed();
  cluster.barrier_wait();  // every CTA has published its state
  // Each group of kClusterMaxSize lanes merges the CTAs' states (a warp holds 32 / size copies).
  LseState<A> row_state = LseState<A>::empty();
  const int peer = lane % kClusterMaxSize;
  if (peer < size) row_state = *cluster.map_shared_rank(&cta_state, peer);
  row_state = warp_merge<kClusterMaxSize>(row_state);

  float* loss = static_cast<float*>(p.loss);
  T* grad = static_cast<T*>(p.grad_logits) + row * in.row_stride + first_col;
  if (!has_loss) {
    fill_row<VEC>(grad, int64_t{count} * VEC, convert<T>(label.ignored ? A(0) : nan_acc<A>()));
    if (rank == 0 && threadIdx.x == 0) loss[row] = label.ignored ? A(0) : nan_acc<A>();
  } else {
    const int64_t label_k = label.col - first_col;  // the label's column in the slice
    const A lse = row_state.lse();
    const A scale = static_cast<const A*>(p.grad_scale)[row];
    const RowGrad<A> rg(smooth, lse, scale, -scale, label_k);  // loss = lse - target
    for (int j = threadIdx.x; j < count; j += blockDim.x) {
      store_vec<T, VEC>(grad + j * VEC, rg.of(load_vec<T, VEC>(x + j * VEC), j * VEC, f));
    }
    if (threadIdx.x == 0 && label_k >= 0 && label_k < count * VEC) {
      loss[row] = row_loss(smooth, lse, f.z(convert<A>(x[label_k])), row_state.zsum);
    }
  }
  // This CTA's shared memory must outlive the peers' reads of its state. Those reads are complete
  // before a peer arrives (their values were merged), so the arrival need not release anything,
  // nor wait for this CTA's gradient stores.
  cluster_arrive_relaxed();
  cluster.barrier_wait();
}
#endif

template <typename T>
__global__ void __launch_bounds__(kClusterMaxThreads, 1)
cross_entropy_fused_cluster_kernel(const CrossEntropyFusedParams p, int per_cta) {
#ifdef UNSLOTH_EXT_CLUSTERS
  with_logit_map<float>(p.in, [&](const auto& f) { fused_cluster<T>(p, per_cta, f); });
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

// The cluster launch of the fused forward+backward, or false when the row does not suit it
// (unaligned, too short, or too long to stage), the GPU has no clusters, or the binary's code for
// this GPU predates sm_90 (where the kernel is a trap).
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
    const int64_t row_bytes = n_vec * 16;
    const int size = static_cast<int>(
        std::min<int64_t>(ceil_div(row_bytes, kClusterSliceBytes), kClusterMaxSize));
    const int64_t per_cta = ceil_div(n_vec, size);
    const size_t smem = static_cast<size_t>(per_cta) * 16;
    if (!aligned || n_vec < kClusterMinVectors || smem > kClusterMaxSmem ||
        in.rows > INT_MAX / size) {
      return false;
    }
    const auto kernel = cross_entropy_fused_cluster_kernel<T>;
    if (!bulk_copy_compiled(kernel)) return false;
    const int threads = static_cast<int>(
        std::min<int64_t>(ceil_div(per_cta, 32 * kClusterVpt) * 32, kClusterMaxThreads));
    if (prepare_clusters(reinterpret_cast<const void*>(kernel), threads, smem, size) == 0) {
      return false;
    }
    const ClusterLaunch launch(in.rows, size, threads, smem, stream);
    cudaLaunchKernelEx(&launch.config, kernel, p, static_cast<int>(per_cta));
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
