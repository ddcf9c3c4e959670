// Device-side conversions, vector memory access and reductions shared by every kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

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

// A Vec held as 16-byte words: an array of Vecs of 16-bit elements that lives across loop
// iterations can end up in 16-bit register pieces, moved one by one; words stay whole.
template <typename T, int N>
struct VecWords {
  static_assert(sizeof(Vec<T, N>) % 16 == 0, "whole 16-byte words");
  uint4 w[sizeof(Vec<T, N>) / 16];

  __device__ __forceinline__ Vec<T, N> vec() const {
    Vec<T, N> v;
    memcpy(&v, w, sizeof(v));
    return v;
  }
};

template <typename T, int N>
__device__ __forceinline__ VecWords<T, N> load_words(const T* p) {
  VecWords<T, N> out;
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(out.w) / 16); ++i) {
    out.w[i] = reinterpret_cast<const uint4*>(p)[i];
  }
  return out;
}

// Vectors move as whole 16/8/4-byte words: through the struct, the compiler may split a 16-byte
// access of 16-bit elements into 2- and 4-byte pieces.
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  Vec<T, N> v;
  constexpr int bytes = sizeof(Vec<T, N>);
  if constexpr (bytes % 16 == 0) {
    v = load_words<T, N>(p).vec();
  } else if constexpr (bytes == 8) {
    const uint2 word = *reinterpret_cast<const uint2*>(p);
    memcpy(&v, &word, 8);
  } else if constexpr (bytes == 4) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(p);
    memcpy(&v, &word, 4);
  } else {
    v = *reinterpret_cast<const Vec<T, N>*>(p);
  }
  return v;
}

// kStreaming (16-byte multiples, global memory only): st.global.cs, for data written once and
// read only after the whole of it is written (evict-first in L2).
template <typename T, int N, bool kStreaming = false>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  constexpr int bytes = sizeof(Vec<T, N>);
  static_assert(!kStreaming || bytes % 16 == 0, "streaming stores move whole 16-byte words");
  if constexpr (bytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < bytes / 16; ++i) {
      uint4 word;
      memcpy(&word, reinterpret_cast<const char*>(&v) + 16 * i, 16);
      uint4* dst = reinterpret_cast<uint4*>(p) + i;
      // One 16-byte store: a plain uint4 assignment may still be split into four.
      if constexpr (kStreaming) {
        asm volatile("st.global.cs.v4.b32 [%0], {%1, %2, %3, %4};"
                     ::"l"(dst), "r"(word.x), "r"(word.y), "r"(word.z), "r"(word.w)
                     : "memory");
      } else {
        asm volatile("st.v4.b32 [%0], {%1, %2, %3, %4};"
                     ::"l"(dst), "r"(word.x), "r"(word.y), "r"(word.z), "r"(word.w)
                     : "memory");
      }
    }
  } else if constexpr (bytes == 8) {
    uint2 word;
    memcpy(&word, &v, 8);
    *reinterpret_cast<uint2*>(p) = word;
  } else if constexpr (bytes == 4) {
    uint32_t word;
    memcpy(&word, &v, 4);
    *reinterpret_cast<uint32_t*>(p) = word;
  } else {
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  }
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / sizeof(T);

// A vector of storage values to accumulator values. bf16 widens two values per 32-bit word (its
// bits are a float's high half), which keeps the vector two values per register.
template <typename A, typename T, int N>
__device__ __forceinline__ void to_acc(const Vec<T, N>& v, A (&out)[N]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && std::is_same_v<A, float> && N % 2 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      uint32_t word;
      memcpy(&word, &v.v[k], sizeof(word));
      out[k] = __uint_as_float(word << 16);
      out[k + 1] = __uint_as_float(word & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = convert<A>(v.v[k]);
  }
}

// Accumulator values to a vector of storage values; 16-bit types convert in pairs (one packed
// conversion instruction for two values).
template <typename T, typename A, int N>
__device__ __forceinline__ Vec<T, N> from_acc(const A (&in)[N]) {
  Vec<T, N> out;
  if constexpr (std::is_same_v<T, __nv_bfloat16> && std::is_same_v<A, float> && N % 2 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      const __nv_bfloat162 pair = __float22bfloat162_rn(make_float2(in[k], in[k + 1]));
      out.v[k] = pair.x;
      out.v[k + 1] = pair.y;
    }
  } else if constexpr (std::is_same_v<T, __half> && std::is_same_v<A, float> && N % 2 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      const __half2 pair = __float22half2_rn(make_float2(in[k], in[k + 1]));
      out.v[k] = pair.x;
      out.v[k + 1] = pair.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out.v[k] = convert<T>(in[k]);
  }
  return out;
}

// Rounds accumulator values through storage type T in place (a cast to T and back).
template <typename T, typename A, int N>
__device__ __forceinline__ void round_through(A (&v)[N]) {
  if constexpr (!std::is_same_v<T, A>) to_acc(from_acc<T>(v), v);
}

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

// Sums over the threads of one row group of each of v's N values (one barrier for all), through
// `scratch` (N * 32 accumulators per row group), which may be written again only after the
// group's next barrier. Every thread of the group must call it, and gets the sums in v.
template <int N, typename A>
__device__ __forceinline__ void row_group_sums_once(A (&v)[N], A* scratch) {
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum(v[n]);
  const int warps = blockDim.x / 32;
  if (warps == 1) return;
  A* s = scratch + threadIdx.y * N * 32;
  if (threadIdx.x % 32 == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) s[n * 32 + threadIdx.x / 32] = v[n];
  }
  row_group_sync();
  // Every warp adds the warps' sums by the same butterfly: the same result in every thread.
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum(lane < warps ? s[n * 32 + lane] : A(0));
}

// The sum of one value over the row group (32 accumulators per row group in `scratch`), after
// which the scratch may be written again at once.
template <typename A>
__device__ __forceinline__ A row_group_sum(A v, A* scratch) {
  A sums[1] = {v};
  row_group_sums_once(sums, scratch);
  if (blockDim.x > 32) row_group_sync();
  return sums[0];
}

}  // namespace unsloth_ext
