// SwiGLU and GEGLU, forward and backward: elementwise over the rows of e and g.
//
// The math (an erf or exps per element, more in the backward) takes a large share of the time the
// memory traffic takes, so loads must stay in flight while a thread computes. Each thread streams
// its 16-byte vectors through kStages slots of shared memory with asynchronous copies: kStages - 1
// vectors per operand are in flight during the math on one, without holding registers for them
// (the register budget goes to occupancy instead). A thread only reads the slots it filled, so no
// block-wide synchronisation is needed. Columns past a row's last whole vector, and operands that
// are not 16-byte aligned, take a plain loop one element at a time.
#include "kernels/glu.h"

#include <algorithm>
#include <type_traits>

#include "core/device_math.cuh"
#include "core/launch.cuh"

namespace unsloth_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocks = 4;      // 64 registers per thread at most: 32 warps per SM
constexpr int kStages = 3;         // vectors per operand a thread has in shared memory or in flight
constexpr int kScalarUnroll = 4;   // elements per operand a thread loads at once on the scalar path
constexpr int64_t kMaxGridY = 65535;

// PyTorch's GELU constants.
constexpr double kSqrt1_2 = 0.70710678118654752440;      // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2 pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kKappa = 0.044715;

// CUDA's accurate math functions (at most 2 ulp of error in fp32), not the approximate intrinsics.
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float erf_acc(float x) { return erff(x); }
__device__ __forceinline__ double erf_acc(double x) { return erf(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

// 1 / (1 + exp(-x)). In fp32 __fdividef (2 ulp) is branch-free: for a denominator past 2^126 it
// returns 0 where the IEEE division would take its slow path for a result below 2^-126.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

template <typename A>
struct ActGrad {
  A act;   // act(x)
  A grad;  // d act / dx
};

// PyTorch's formulas for silu and gelu and their derivatives, in the accumulator type. The
// forward uses .act alone (the compiler drops the rest), so both directions see the same act.
template <GluActivation ACT, typename A>
__device__ __forceinline__ ActGrad<A> activation(A x) {
  if constexpr (ACT == GluActivation::kSilu) {
    const A s = sigmoid(x);
    return {x * s, s * (A(1) + x * (A(1) - s))};
  } else if constexpr (ACT == GluActivation::kGeluErf) {
    const A cdf = A(0.5) * (A(1) + erf_acc(x * A(kSqrt1_2)));
    return {x * cdf, cdf + x * (exp_acc(A(-0.5) * x * x) * A(kInvSqrt2Pi))};
  } else {
    const A x_sq = x * x;
    const A t = tanh_acc(A(kSqrt2OverPi) * (x + A(kKappa) * (x_sq * x)));
    const A half_x = A(0.5) * x;
    return {half_x * (A(1) + t), A(0.5) * (A(1) + t) + half_x * (A(1) - t * t) *
                                                           A(kSqrt2OverPi) *
                                                           (A(1) + A(3 * kKappa) * x_sq)};
  }
}

// h = round(act(e)) * g: transformers rounds act(e) to e's dtype before the product.
template <typename T_, GluActivation ACT>
struct GluFwdOp {
  using T = T_;
  using A = acc_t<T>;
  using Params = GluFwdParams;
  static constexpr int kIn = 2;  // e, g
  static constexpr int kOut = 1;  // h

  __device__ static void row_pointers(const Params& p, int64_t row, const T* (&in)[kIn],
                                      T* (&out)[kOut]) {
    in[0] = static_cast<const T*>(p.e) + row * p.e_row_stride;
    in[1] = static_cast<const T*>(p.g) + row * p.g_row_stride;
    out[0] = static_cast<T*>(p.h) + row * p.h_row_stride;
  }

  template <int VEC>
  __device__ static void apply(const A (&x)[kIn][VEC], A (&y)[kOut][VEC]) {
    A act[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) act[k] = activation<ACT>(x[0][k]).act;
    round_through<T>(act);
#pragma unroll
    for (int k = 0; k < VEC; ++k) y[0][k] = act[k] * x[1][k];
  }
};

// grad_g = grad_h * round(act(e)), grad_e = round(grad_h * g) * act'(e): the values autograd
// computes through round(act(e)) * g in e's dtype.
template <typename T_, GluActivation ACT>
struct GluBwdOp {
  using T = T_;
  using A = acc_t<T>;
  using Params = GluBwdParams;
  static constexpr int kIn = 3;  // grad_h, e, g
  static constexpr int kOut = 2;  // grad_e, grad_g

  __device__ static void row_pointers(const Params& p, int64_t row, const T* (&in)[kIn],
                                      T* (&out)[kOut]) {
    in[0] = static_cast<const T*>(p.grad_h) + row * p.grad_h_row_stride;
    in[1] = static_cast<const T*>(p.e) + row * p.e_row_stride;
    in[2] = static_cast<const T*>(p.g) + row * p.g_row_stride;
    out[0] = static_cast<T*>(p.grad_e) + row * p.grad_e_row_stride;
    out[1] = static_cast<T*>(p.grad_g) + row * p.grad_g_row_stride;
  }

  template <int VEC>
  __device__ static void apply(const A (&x)[kIn][VEC], A (&y)[kOut][VEC]) {
    A act[VEC], grad[VEC], grad_act[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const ActGrad<A> ag = activation<ACT>(x[1][k]);
      act[k] = ag.act;
      grad[k] = ag.grad;
      grad_act[k] = x[0][k] * x[2][k];
    }
    round_through<T>(act);
    round_through<T>(grad_act);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      y[0][k] = grad_act[k] * grad[k];
      y[1][k] = x[0][k] * act[k];
    }
  }
};

// Asynchronous 16-byte copy from global to shared memory (sm_80+), completed per commit group.
// The "memory" clobbers keep the compiler from moving shared-memory reads across them.
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem)
               : "memory");
}

__device__ __forceinline__ void copy_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Waits until at most `pending` of this thread's most recent commit groups are incomplete.
template <int pending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
}

// A thread's walk over the [rows, n] items (vectors or elements) of the operands: columns
// blockIdx.x * blockDim.x + threadIdx.x + k * step of row blockIdx.y, then of row
// blockIdx.y + gridDim.y, and so on. Valid while row < rows.
struct Walk {
  int64_t row;
  int64_t col;

  __device__ __forceinline__ void next(int64_t first_col, int64_t step, int64_t n) {
    col += step;
    if (col >= n) {
      col = first_col;
      row += gridDim.y;
    }
  }
};

// Op over the first n_vec 16-byte vectors of every row. Slot (stage s, operand i) of thread t is
// vector (s * kIn + i) * blockDim.x + t of `slots`: a warp reads 512 consecutive bytes.
template <typename Op>
__device__ __forceinline__ void vector_pass(const typename Op::Params& p, int64_t n_vec,
                                            unsigned char* slots) {
  using T = typename Op::T;
  using A = typename Op::A;
  constexpr int VEC = kVec16<T>;
  using V = Vec<T, VEC>;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (first >= n_vec) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  V* const mine = reinterpret_cast<V*>(slots) + threadIdx.x;
  const auto slot = [&](int stage, int i) { return mine + (stage * Op::kIn + i) * blockDim.x; };

  Walk fetch{blockIdx.y, first};
  // Every call commits a group, empty past the end, so that a wait counts groups uniformly.
  const auto prefetch = [&](int stage) {
    if (fetch.row < p.rows) {
      const T* in[Op::kIn];
      T* out[Op::kOut];
      Op::row_pointers(p, fetch.row, in, out);
#pragma unroll
      for (int i = 0; i < Op::kIn; ++i) copy16_async(slot(stage, i), in[i] + fetch.col * VEC);
    }
    copy_async_commit();
    fetch.next(first, step, n_vec);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) prefetch(s);

  // `fetch` runs kStages - 1 items ahead of `work` on the same walk, so every copy issued is
  // waited for and consumed before the loop ends.
  int stage = 0;
  for (Walk work = {blockIdx.y, first}; work.row < p.rows; work.next(first, step, n_vec)) {
    prefetch(stage == 0 ? kStages - 1 : stage - 1);
    copy_async_wait<kStages - 1>();
    A x[Op::kIn][VEC], y[Op::kOut][VEC];
#pragma unroll
    for (int i = 0; i < Op::kIn; ++i) to_acc(load_vec<T, VEC>(reinterpret_cast<const T*>(slot(stage, i))), x[i]);
    Op::apply(x, y);
    const T* in[Op::kIn];
    T* out[Op::kOut];
    Op::row_pointers(p, work.row, in, out);
#pragma unroll
    for (int o = 0; o < Op::kOut; ++o) store_vec<T, VEC>(out[o] + work.col * VEC, from_acc<T>(y[o]));
    stage = stage == kStages - 1 ? 0 : stage + 1;
  }
}

// Op over columns [first_col, cols) of every row, one element at a time, kScalarUnroll elements
// per operand loaded before any math.
template <typename Op>
__device__ __forceinline__ void scalar_pass(const typename Op::Params& p, int64_t first_col) {
  using T = typename Op::T;
  using A = typename Op::A;
  const int64_t n = p.cols - first_col;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kScalarUnroll;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const T* in[Op::kIn];
    T* out[Op::kOut];
    Op::row_pointers(p, row, in, out);
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kScalarUnroll +
                        threadIdx.x;
         base < n; base += stride) {
      T v[kScalarUnroll][Op::kIn];
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u) {
        const int64_t c = first_col + base + u * blockDim.x;
        if (c < p.cols) {
#pragma unroll
          for (int i = 0; i < Op::kIn; ++i) v[u][i] = in[i][c];
        }
      }
#pragma unroll
      for (int u = 0; u < kScalarUnroll; ++u) {
        const int64_t c = first_col + base + u * blockDim.x;
        if (c < p.cols) {
          A x[Op::kIn][1], y[Op::kOut][1];
#pragma unroll
          for (int i = 0; i < Op::kIn; ++i) x[i][0] = convert<A>(v[u][i]);
          Op::apply(x, y);
#pragma unroll
          for (int o = 0; o < Op::kOut; ++o) out[o][c] = convert<T>(y[o][0]);
        }
      }
    }
  }
}

// The first vec_cols columns of every row as 16-byte vectors (vec_cols is 0 when the operands
// are not aligned for them), the rest one element at a time.
template <typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
glu_kernel(const typename Op::Params p, int64_t vec_cols) {
  extern __shared__ __align__(16) unsigned char slots[];
  vector_pass<Op>(p, vec_cols / kVec16<typename Op::T>, slots);
  scalar_pass<Op>(p, vec_cols);
}

// Whether 16-byte vectors may be used: every pointer aligned, and every row stride a whole
// number of vectors (irrelevant for a single row).
bool vectorizable(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides,
                  int64_t rows, int vec) {
  for (const void* ptr : ptrs) {
    if (!aligned16(ptr)) return false;
  }
  for (int64_t stride : strides) {
    if (rows > 1 && stride % vec != 0) return false;
  }
  return true;
}

// A grid of about one wave of resident blocks: blockIdx.x over the columns of a row (no more
// blocks than its vectors need), blockIdx.y over rows.
template <typename Op>
void launch(const typename Op::Params& p, bool vectorize, cudaStream_t stream) {
  constexpr int VEC = kVec16<typename Op::T>;
  const int64_t vec_cols = vectorize ? p.cols - p.cols % VEC : 0;
  const size_t smem = vec_cols > 0 ? kStages * Op::kIn * kThreads * 16 : 0;
  const auto kernel = glu_kernel<Op>;
  const int64_t resident = prepare_blocks(kernel, kThreads, smem);
  const int64_t x_blocks = std::max(ceil_div(vec_cols / VEC, kThreads),
                                    ceil_div(p.cols - vec_cols, kThreads * kScalarUnroll));
  const int64_t grid_x = std::min(x_blocks, resident);
  const int64_t grid_y = std::min({p.rows, ceil_div(resident, grid_x), kMaxGridY});
  kernel<<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), kThreads, smem,
           stream>>>(p, vec_cols);
}

// Calls f(TypeTag<T>, integral_constant<GluActivation, ACT>) for the dtype and activation.
template <typename F>
void dispatch_glu(DType dtype, GluActivation act, F&& f) {
  dispatch_float(dtype, [&](auto t) {
    switch (act) {
      case GluActivation::kSilu:
        f(t, std::integral_constant<GluActivation, GluActivation::kSilu>{});
        return;
      case GluActivation::kGeluErf:
        f(t, std::integral_constant<GluActivation, GluActivation::kGeluErf>{});
        return;
      case GluActivation::kGeluTanh:
        f(t, std::integral_constant<GluActivation, GluActivation::kGeluTanh>{});
        return;
    }
  });
}

}  // namespace

void glu_fwd_launch(const GluFwdParams& p, cudaStream_t stream) {
  dispatch_glu(p.dtype, p.act, [&](auto t, auto act) {
    using T = typename decltype(t)::type;
    const bool vec = vectorizable({p.e, p.g, p.h}, {p.e_row_stride, p.g_row_stride, p.h_row_stride},
                                  p.rows, kVec16<T>);
    launch<GluFwdOp<T, act.value>>(p, vec, stream);
  });
}

void glu_bwd_launch(const GluBwdParams& p, cudaStream_t stream) {
  dispatch_glu(p.dtype, p.act, [&](auto t, auto act) {
    using T = typename decltype(t)::type;
    const bool vec = vectorizable(
        {p.grad_h, p.e, p.g, p.grad_e, p.grad_g},
        {p.grad_h_row_stride, p.e_row_stride, p.g_row_stride, p.grad_e_row_stride,
         p.grad_g_row_stride},
        p.rows, kVec16<T>);
    launch<GluBwdOp<T, act.value>>(p, vec, stream);
  });
}

}  // namespace unsloth_ext
