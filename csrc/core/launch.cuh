// Host-side launch planning shared by the row kernels (one row of a [rows, cols] matrix per
// row group of threads). Only included by .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/device_math.cuh"
#include "core/dtype.h"

namespace unsloth_ext {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Multiprocessor count of the current device, cached per device.
int sm_count();

// How a row of `cols` elements is split over threads. vpt > 0: each thread keeps vpt vectors of
// the row in registers (the row is read once). vpt == 0: the row is streamed twice through the
// cache, for rows too long to keep in registers.
struct RowPlan {
  int vec;             // elements per vector access
  int vpt;             // vectors per thread, 1 or 4, or 0 for streaming
  int threads_x;       // threads per row (a multiple of 32)
  int rows_per_block;  // row groups per block
};

// Short rows get one vector per thread and several rows per block of `block_threads`; longer
// rows four vectors per thread, up to `max_threads_x` threads (the kernel's register budget);
// longer still are streamed by `max_threads_x` threads.
inline RowPlan plan_rows(int64_t cols, int vec, int block_threads, int max_threads_x) {
  const int64_t n_vec = ceil_div(cols, vec);
  const int64_t tx1 = ceil_div(n_vec, 32) * 32;
  const auto groups = [&](int64_t tx) {
    const int64_t g = block_threads / tx;
    return static_cast<int>(g < 1 ? 1 : (g > kMaxRowGroups ? kMaxRowGroups : g));
  };
  if (tx1 <= 128) return {vec, 1, static_cast<int>(tx1), groups(tx1)};
  const int64_t tx4 = ceil_div(n_vec, 4 * 32) * 32;
  if (tx4 <= max_threads_x) return {vec, 4, static_cast<int>(tx4), groups(tx4)};
  return {vec, 0, max_threads_x, 1};
}

// Calls f(integral_constant<VEC>, integral_constant<VPT>) for the plan; VEC is 1 or kMaxVec.
template <int kMaxVec, typename F>
void dispatch_row_plan(const RowPlan& plan, F&& f) {
  auto with_vpt = [&](auto vec) {
    switch (plan.vpt) {
      case 1: f(vec, std::integral_constant<int, 1>{}); return;
      case 4: f(vec, std::integral_constant<int, 4>{}); return;
      default: f(vec, std::integral_constant<int, 0>{}); return;
    }
  };
  if (plan.vec == 1) {
    with_vpt(std::integral_constant<int, 1>{});
  } else {
    with_vpt(std::integral_constant<int, kMaxVec>{});
  }
}

// Lets `kernel` take more than the default 48 KB of dynamic shared memory.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
  }
}

// Blocks of `kernel` that fit on the whole device at once with the given block shape.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, size_t dynamic_smem) {
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem);
  return static_cast<int64_t>(sm_count()) * (per_sm > 0 ? per_sm : 1);
}

// out[c] = sum_r partial[r, c], summed in a fixed order (deterministic).
template <typename A, typename W>
__global__ void column_sum_kernel(const A* __restrict__ partial, int64_t rows, int64_t cols,
                                  W* __restrict__ out) {
  __shared__ A part[8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A acc = 0;
  if (c < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += 8) acc += partial[r * cols + c];
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    A total = 0;
#pragma unroll
    for (int r = 0; r < 8; ++r) total += part[r][threadIdx.x];
    out[c] = convert<W>(total);
  }
}

template <typename A, typename W>
void launch_column_sum(const A* partial, int64_t rows, int64_t cols, W* out, cudaStream_t stream) {
  column_sum_kernel<A, W><<<static_cast<unsigned>(ceil_div(cols, 32)), dim3(32, 8), 0, stream>>>(
      partial, rows, cols, out);
}

}  // namespace unsloth_ext
