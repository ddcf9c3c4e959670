// Hopper (sm_90+) bulk asynchronous copies from global to shared memory, completing on an
// mbarrier, and cluster barrier arrivals. On older archs these compile to a trap: hosts launch
// kernels using them only on sm_90 and newer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/launch.cuh"

namespace unsloth_ext {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define UNSLOTH_EXT_BULK_COPY 1
#endif

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#ifdef UNSLOTH_EXT_BULK_COPY
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(arrivals)
               : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#else
  __trap();
#endif
}

// One arrival that also announces `bytes` of copies completing on the barrier.
__device__ __forceinline__ void mbarrier_arrive_expect(uint64_t* bar, uint32_t bytes) {
#ifdef UNSLOTH_EXT_BULK_COPY
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#ifdef UNSLOTH_EXT_BULK_COPY
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; "
        "selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
  }
#else
  __trap();
#endif
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes,
                                                    uint64_t* bar) {
#ifdef UNSLOTH_EXT_BULK_COPY
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_address(dst)),
      "l"(src), "r"(bytes), "r"(smem_address(bar))
      : "memory");
#else
  __trap();
#endif
}

// An arrival on the cluster barrier that orders no memory by itself. A thread whose shared-memory
// writes peers read after the barrier calls release_shared_to_cluster() before it arrives.
__device__ __forceinline__ void cluster_arrive_relaxed() {
#ifdef UNSLOTH_EXT_BULK_COPY
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#else
  __trap();
#endif
}

// Orders this thread's earlier shared-memory writes before its later arrivals, for the cluster's
// threads that wait on the barrier. Unlike a full release (the default arrival's), it does not wait
// for the thread's global stores to complete.
__device__ __forceinline__ void release_shared_to_cluster() {
#ifdef UNSLOTH_EXT_BULK_COPY
  asm volatile("fence.release.sync_restrict::shared::cta.cluster;" ::: "memory");
#else
  __trap();
#endif
}

// True when `kernel` was compiled for sm_90 or newer for the current device, so its bulk copies
// are real: false on older GPUs, and for code JIT-compiled from an older arch's PTX.
template <typename Kernel>
bool bulk_copy_compiled(Kernel kernel) {
  return kernel_ptx_version(reinterpret_cast<const void*>(kernel)) >= 90;
}

}  // namespace unsloth_ext
