// Host-side launch planning shared by the row kernels (one row of a [rows, cols] matrix per
// row group of threads). Only included by .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "core/device_math.cuh"
#include "core/dtype.h"

namespace unsloth_ext {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Multiprocessor count of the current device, cached per device.
int sm_count();

// Dynamic shared memory a block may opt into on the current device, cached per device.
size_t max_dynamic_smem();

// How rows of `cols` elements are split over a block: threads_x threads per row (a multiple of
// 32, enough for `unroll` vectors each) and rows_per_block row groups.
struct RowPlan {
  int vec;
  int threads_x;
  int rows_per_block;
};

inline RowPlan plan_rows(int64_t cols, int vec, int block_threads, int unroll) {
  const int64_t want = ceil_div(ceil_div(cols, vec), 32 * unroll) * 32;
  const int tx = static_cast<int>(want < block_threads ? want : block_threads);
  const int groups = block_threads / tx;
  return {vec, tx, groups < kMaxRowGroups ? groups : kMaxRowGroups};
}

// kVec16<T> when every pointer is 16-byte aligned and cols and every row stride are multiples
// of it, else 1.
template <typename T>
int vector_width(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides,
                 int64_t cols) {
  constexpr int kVec = kVec16<T>;
  if (cols % kVec != 0) return 1;
  for (const void* ptr : ptrs) {
    if (!aligned16(ptr)) return 1;
  }
  for (int64_t stride : strides) {
    if (stride % kVec != 0) return 1;
  }
  return kVec;
}

// Calls f(true_type{}) or f(false_type{}) as b is: a runtime choice of a kernel's bool template
// argument.
template <typename F>
void dispatch_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(integral_constant<VEC>) with VEC 1 or kVec.
template <int kVec, typename F>
void dispatch_vec(int vec, F&& f) {
  if (vec == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, kVec>{});
  }
}

// Calls f(TypeTag<T>, TypeTag<W>, TypeTag<O>) for the supported (activation, parameter, output)
// dtypes of the norm kernels: W and O each T itself, or fp32 beside 16-bit T.
template <typename F>
void dispatch_norm_types(DType x, DType w, DType o, F&& f) {
  dispatch_float(x, [&](auto t) {
    using T = typename decltype(t)::type;
    dispatch_same_or_f32<T>(w, [&](auto wt) {
      dispatch_same_or_f32<T>(o, [&](auto ot) { f(t, wt, ot); });
    });
  });
}

// Lets `kernel` take `dynamic_smem` bytes of dynamic shared memory beside its static shared
// memory (past the 48 KB that need an opt-in) and returns how many of its blocks of `threads`
// threads fit on the whole current device at once. Cached per (kernel, device, shape): the
// driver's queries cost about as much as a small kernel.
int64_t prepare_blocks(const void* kernel, int threads, size_t dynamic_smem);

template <typename Kernel>
int64_t prepare_blocks(Kernel kernel, int threads, size_t dynamic_smem) {
  return prepare_blocks(reinterpret_cast<const void*>(kernel), threads, dynamic_smem);
}

// The cluster counterpart of prepare_blocks, for clusters of `cluster_size` CTAs that take all
// of the SM's shared memory the carveout allows: how many clusters fit on the current device at
// once, or 0 when it cannot launch them. Cached the same way.
int64_t prepare_clusters(const void* kernel, int threads, size_t dynamic_smem, int cluster_size);

// A launch for cudaLaunchKernelEx with one launch attribute (numAttrs 0 leaves it off). Not
// copyable: config.attrs points at the attribute inside.
struct AttributeLaunch {
  cudaLaunchAttribute attribute{};
  cudaLaunchConfig_t config{};
  AttributeLaunch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream);
  AttributeLaunch(const AttributeLaunch&) = delete;
  AttributeLaunch& operator=(const AttributeLaunch&) = delete;
};

// A launch of `clusters` 1-D clusters of `cluster_size` blocks.
struct ClusterLaunch : AttributeLaunch {
  ClusterLaunch(int64_t clusters, int cluster_size, int threads, size_t dynamic_smem,
                cudaStream_t stream);
};

// A launch that may start while the kernel ahead of it on the stream finishes (see
// allow_dependent_launch); an ordinary launch before sm_90.
struct DependentLaunch : AttributeLaunch {
  DependentLaunch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream);
};

// The PTX version `kernel` was compiled from for the current device (90: sm_90), or 0 when it
// has no code for it. Cached per (kernel, device).
int kernel_ptx_version(const void* kernel);

// Programmatic dependent launch (sm_90+; elsewhere these do nothing): a kernel launched with the
// programmatic stream serialization attribute may start before the kernel ahead of it on the
// stream has finished, once all that kernel's blocks have called allow_dependent_launch() or
// exited; it calls wait_for_prior_grid() before it reads anything that kernel wrote.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Column sums of one or two [rows, cols] slabs stored back to back in `partial`:
// out0[c] = sum_r slab0[r, c] and, with out1, out1[c] = sum_r slab1[r, c] (blockIdx.y picks the
// slab: one launch, as a second costs about as much as the sums). A block owns 32 columns; its
// kColumnSumLanes threads per column each add every kColumnSumLanes-th row, four loads in flight
// at a time, and one thread per column then adds their sums. The order is fixed (deterministic).
// It is launched as a dependent of the kernel that writes the slabs, so that its launch overlaps
// that kernel's end.
constexpr int kColumnSumLanes = 32;

template <typename A, typename W>
__global__ void __launch_bounds__(32 * kColumnSumLanes)
column_sums_kernel(const A* __restrict__ partial, int64_t rows, int64_t cols,
                   W* __restrict__ out0, W* __restrict__ out1) {
  constexpr int kUnroll = 4;
  __shared__ A part[kColumnSumLanes][33];
  wait_for_prior_grid();
  const A* slab = partial + blockIdx.y * rows * cols;
  W* out = blockIdx.y == 0 ? out0 : out1;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A acc = 0;
  if (c < cols) {
    int64_t r = threadIdx.y;
    for (; r + (kUnroll - 1) * kColumnSumLanes < rows; r += kUnroll * kColumnSumLanes) {
      A v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = slab[(r + u * kColumnSumLanes) * cols + c];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) acc += v[u];
    }
    for (; r < rows; r += kColumnSumLanes) acc += slab[r * cols + c];
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    A total = 0;
#pragma unroll
    for (int r = 0; r < kColumnSumLanes; ++r) total += part[r][threadIdx.x];
    out[c] = convert<W>(total);
  }
}

template <typename A, typename W>
void launch_column_sums(const A* partial, int64_t rows, int64_t cols, W* out0, W* out1,
                        cudaStream_t stream) {
  const DependentLaunch launch(dim3(static_cast<unsigned>(ceil_div(cols, 32)), out1 ? 2 : 1),
                               dim3(32, kColumnSumLanes), 0, stream);
  cudaLaunchKernelEx(&launch.config, column_sums_kernel<A, W>, partial, rows, cols, out0, out1);
}

}  // namespace unsloth_ext
