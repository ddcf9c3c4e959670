#include "core/launch.cuh"

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace unsloth_ext {
namespace {

// A device attribute, cached per thread for the last device asked about (no locking; one query
// per device switch).
int device_attribute(cudaDeviceAttr attr, int& cached_device, int& cached_value) {
  int device = 0;
  cudaGetDevice(&device);
  if (device != cached_device) {
    cudaDeviceGetAttribute(&cached_value, attr, device);
    cached_device = device;
  }
  return cached_value;
}

}  // namespace

int sm_count() {
  thread_local int device = -1, value = 0;
  return device_attribute(cudaDevAttrMultiProcessorCount, device, value);
}

int64_t prepare_blocks(const void* kernel, int threads, size_t dynamic_smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int64_t> blocks;
  static std::map<std::pair<const void*, int>, size_t> allowed_smem;
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, threads, dynamic_smem);
  if (const auto it = blocks.find(key); it != blocks.end()) return it->second;
  // Only ever raised: a launch cached earlier may need more than this one.
  size_t& allowed = allowed_smem[{kernel, device}];
  if (dynamic_smem > 32 * 1024 && dynamic_smem > allowed) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(dynamic_smem));
    allowed = dynamic_smem;
  }
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem);
  const int64_t total = static_cast<int64_t>(sm_count()) * std::max(per_sm, 1);
  blocks.emplace(key, total);
  return total;
}

int kernel_ptx_version(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> versions;
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  if (const auto it = versions.find(key); it != versions.end()) return it->second;
  cudaFuncAttributes attr{};
  int version = 0;
  if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) {
    version = attr.ptxVersion;
  } else {
    cudaGetLastError();  // a failed query is not an error of the caller
  }
  versions.emplace(key, version);
  return version;
}

}  // namespace unsloth_ext
