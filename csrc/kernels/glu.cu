// SwiGLU and GEGLU, forward and backward: elementwise over the rows of e and g.
//
// A few 16-byte vectors of each operand per thread, in a grid that covers the whole tensor once:
// every thread has all its loads in flight before any math, and a finished block makes room for
// the next, so the SM always holds loads of many vectors while others compute. (A persistent grid
// that staged each thread's next vectors in shared memory ran up to 10% slower.) The columns past
// a row's last whole vector go to the thread just past it; operands that are not 16-byte aligned
// take single elements.
#include "kernels/glu.h"

#include <algorithm>
#include <climits>
#include <type_traits>

#include "core/device_math.cuh"
#include "core/launch.cuh"

namespace unsloth_ext {
namespace {

// On the H200 (bf16, [16384, 14336]) 128 threads of 4 items each ran best overall: 2 items per
// thread cost GEGLU's erf forward 12% (402 against 358 us), and 256 or 64 threads were no faster.
constexpr int kThreads = 128;
constexpr int kItems = 4;  // items a thread loads before any math
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
// computes through round(act(e)) * g in e's dtype. kStoreH: also h = round(act(e)) * g, computed
// as GluFwdOp computes it.
template <typename T_, GluActivation ACT, bool kStoreH>
struct GluBwdOp {
  using T = T_;
  using A = acc_t<T>;
  using Params = GluBwdParams;
  static constexpr int kIn = 3;  // grad_h, e, g
  static constexpr int kOut = kStoreH ? 3 : 2;  // grad_e, grad_g (, h)

  __device__ static void row_pointers(const Params& p, int64_t row, const T* (&in)[kIn],
                                      T* (&out)[kOut]) {
    in[0] = static_cast<const T*>(p.grad_h) + row * p.grad_h_row_stride;
    in[1] = static_cast<const T*>(p.e) + row * p.e_row_stride;
    in[2] = static_cast<const T*>(p.g) + row * p.g_row_stride;
    out[0] = static_cast<T*>(p.grad_e) + row * p.grad_e_row_stride;
    out[1] = static_cast<T*>(p.grad_g) + row * p.grad_g_row_stride;
    if constexpr (kStoreH) out[2] = static_cast<T*>(p.h) + row * p.h_row_stride;
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
      if constexpr (kStoreH) y[2][k] = act[k] * x[2][k];
    }
  }
};

// Op on one element of each operand at column c.
template <typename Op>
__device__ __forceinline__ void apply_scalar(const typename Op::T* const (&in)[Op::kIn],
                                             typename Op::T* const (&out)[Op::kOut], int64_t c) {
  using A = typename Op::A;
  A x[Op::kIn][1], y[Op::kOut][1];
#pragma unroll
  for (int i = 0; i < Op::kIn; ++i) x[i][0] = convert<A>(in[i][c]);
  Op::apply(x, y);
#pragma unroll
  for (int o = 0; o < Op::kOut; ++o) out[o][c] = convert<typename Op::T>(y[o][0]);
}

// kItems items per thread: thread t of block (x, y) takes items (x * kItems + u) * blockDim.x + t
// of row y, u < kItems (the loops run once unless the grid is capped), and loads them all before
// any math. kVector: items are the row's 16-byte vectors, and the item just past the last one
// covers the columns past the last whole vector; otherwise items are single elements.
template <typename Op, bool kVector>
__global__ void __launch_bounds__(kThreads)
glu_kernel(const typename Op::Params p, int64_t items, int64_t x_blocks) {
  using T = typename Op::T;
  using A = typename Op::A;
  constexpr int VEC = kVec16<T>;
  using V = Vec<T, VEC>;
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    const T* in[Op::kIn];
    T* out[Op::kOut];
    Op::row_pointers(p, row, in, out);
    for (int64_t x = blockIdx.x; x < x_blocks; x += gridDim.x) {
      const int64_t first = x * kItems * blockDim.x + threadIdx.x;
      if constexpr (kVector) {
        V v[kItems][Op::kIn];
#pragma unroll
        for (int u = 0; u < kItems; ++u) {
          const int64_t item = first + u * blockDim.x;
          if (item < items) {
#pragma unroll
            for (int i = 0; i < Op::kIn; ++i) v[u][i] = load_vec<T, VEC>(in[i] + item * VEC);
          }
        }
#pragma unroll
        for (int u = 0; u < kItems; ++u) {
          const int64_t item = first + u * blockDim.x;
          if (item < items) {
            A a[Op::kIn][VEC], y[Op::kOut][VEC];
#pragma unroll
            for (int i = 0; i < Op::kIn; ++i) to_acc(v[u][i], a[i]);
            Op::apply(a, y);
#pragma unroll
            for (int o = 0; o < Op::kOut; ++o) {
              store_vec<T, VEC>(out[o] + item * VEC, from_acc<T>(y[o]));
            }
          } else if (item == items) {
            for (int64_t c = items * VEC; c < p.cols; ++c) apply_scalar<Op>(in, out, c);
          }
        }
      } else {
#pragma unroll
        for (int u = 0; u < kItems; ++u) {
          const int64_t item = first + u * blockDim.x;
          if (item < items) apply_scalar<Op>(in, out, item);
        }
      }
    }
  }
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

// Launches Op over p: blockIdx.x over the items of a row, blockIdx.y over rows. Rows that lie back
// to back in every operand go as one row, so short rows still fill whole blocks; 16-byte vectors
// are used where every pointer and row stride allows them.
template <typename Op>
void launch(typename Op::Params p, std::initializer_list<const void*> ptrs,
            std::initializer_list<int64_t> strides, cudaStream_t stream) {
  constexpr int VEC = kVec16<typename Op::T>;
  if (std::all_of(strides.begin(), strides.end(), [&](int64_t s) { return s == p.cols; })) {
    p.cols *= p.rows;
    p.rows = std::min<int64_t>(p.rows, 1);
  }
  const bool vectorize = vectorizable(ptrs, strides, p.rows, VEC);
  const int64_t vectors = p.cols / VEC;
  // Vectorized rows have one more item for their tail when cols is not a multiple of VEC.
  const int64_t items = vectorize ? vectors : p.cols;
  const int64_t row_items = vectorize ? vectors + (p.cols % VEC != 0) : p.cols;
  const int64_t x_blocks = ceil_div(row_items, kThreads * kItems);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(x_blocks, INT_MAX)),
                  static_cast<unsigned>(std::min(p.rows, kMaxGridY)));
  dispatch_flag(vectorize, [&](auto vec) {
    glu_kernel<Op, vec.value><<<grid, kThreads, 0, stream>>>(p, items, x_blocks);
  });
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
    launch<GluFwdOp<typename decltype(t)::type, act.value>>(
        p, {p.e, p.g, p.h}, {p.e_row_stride, p.g_row_stride, p.h_row_stride}, stream);
  });
}

void glu_bwd_launch(const GluBwdParams& p, cudaStream_t stream) {
  // Without h, its place in the layout checks repeats grad_h's, which changes none of them.
  const void* h = p.h != nullptr ? p.h : p.grad_h;
  const int64_t h_row_stride = p.h != nullptr ? p.h_row_stride : p.grad_h_row_stride;
  dispatch_glu(p.dtype, p.act, [&](auto t, auto act) {
    dispatch_flag(p.h != nullptr, [&](auto store_h) {
      launch<GluBwdOp<typename decltype(t)::type, act.value, store_h.value>>(
          p, {p.grad_h, p.e, p.g, p.grad_e, p.grad_g, h},
          {p.grad_h_row_stride, p.e_row_stride, p.g_row_stride, p.grad_e_row_stride,
           p.grad_g_row_stride, h_row_stride},
          stream);
    });
  });
}

}  // namespace unsloth_ext
