// Device-side conversions, vector memory access and reductions shared by every kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/dtype.h"

namespace unsloth_ext {

template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else if constexpr (std::is_same_v<From, __nv_bfloat16>) {
    return static_cast<To>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<From, __half>) {
    return static_cast<To>(__half2float(x));
  } else if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

// Rounds an accumulator value through storage type T and back (what a cast to T then to fp32 does).
template <typename T, typename A>
__device__ __forceinline__ A round_through(A x) {
  return convert<A>(convert<T>(x));
}

template <typename A>
__device__ __forceinline__ A rsqrt_acc(A x) {
  if constexpr (std::is_same_v<A, double>) {
    return 1.0 / sqrt(x);
  } else {
    return rsqrtf(x);
  }
}

// N elements of T moved as one access (16 bytes at most per instruction).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A block holds up to kMaxRowGroups row groups (threads sharing threadIdx.y, blockDim.x a
// multiple of 32). Each group synchronises on its own named barrier (ids 1..kMaxRowGroups; 0 is
// __syncthreads), so groups of one block run their rows independently.
constexpr int kMaxRowGroups = 8;

__device__ __forceinline__ void row_group_sync() {
  asm volatile("bar.sync %0, %1;" ::"r"(threadIdx.y + 1), "r"(blockDim.x) : "memory");
}

// Sum over the threads of one row group. `scratch` holds 32 accumulators per row group. Every
// thread of the group must call it.
template <typename A>
__device__ __forceinline__ A row_group_sum(A v, A* scratch) {
  v = warp_sum(v);
  const int warps = blockDim.x / 32;
  if (warps == 1) return v;
  A* s = scratch + threadIdx.y * 32;
  if (threadIdx.x % 32 == 0) s[threadIdx.x / 32] = v;
  row_group_sync();
  A total = 0;
  for (int w = 0; w < warps; ++w) total += s[w];
  row_group_sync();
  return total;
}

}  // namespace unsloth_ext
