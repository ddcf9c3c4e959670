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

// Compute capability major version of the current device, cached per device.
int compute_major() {
  thread_local int device = -1, value = 0;
  return device_attribute(cudaDevAttrComputeCapabilityMajor, device, value);
}

}  // namespace

int sm_count() {
  thread_local int device = -1, value = 0;
  return device_attribute(cudaDevAttrMultiProcessorCount, device, value);
}

size_t max_dynamic_smem() {
  thread_local int device = -1, value = 0;
  return static_cast<size_t>(
      device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, value));
}

namespace {

// Launch queries cached per kernel and device (and block shape), under one lock.
struct LaunchCache {
  std::mutex mutex;
  std::map<std::tuple<const void*, int, int, size_t, int>, int64_t> resident;
  std::map<std::pair<const void*, int>, size_t> allowed_smem;
  std::map<std::pair<const void*, int>, int> ptx_version;

  // Raises the kernel's dynamic shared memory limit to `bytes` where the opt-in is needed; only
  // ever raised, as a launch cached earlier may need more than this one.
  void allow_smem(const void* kernel, int device, size_t bytes) {
    size_t& allowed = allowed_smem[{kernel, device}];
    if (bytes > 32 * 1024 && bytes > allowed) {
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes));
      allowed = bytes;
    }
  }
};

LaunchCache& launch_cache() {
  static LaunchCache cache;
  return cache;
}

}  // namespace

int64_t prepare_blocks(const void* kernel, int threads, size_t dynamic_smem) {
  LaunchCache& cache = launch_cache();
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto key = std::make_tuple(kernel, device, threads, dynamic_smem, 0);
  if (const auto it = cache.resident.find(key); it != cache.resident.end()) return it->second;
  cache.allow_smem(kernel, device, dynamic_smem);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem);
  const int64_t total = static_cast<int64_t>(sm_count()) * std::max(per_sm, 1);
  cache.resident.emplace(key, total);
  return total;
}

int64_t prepare_clusters(const void* kernel, int threads, size_t dynamic_smem, int cluster_size) {
  LaunchCache& cache = launch_cache();
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto key = std::make_tuple(kernel, device, threads, dynamic_smem, cluster_size);
  if (const auto it = cache.resident.find(key); it != cache.resident.end()) return it->second;
  int64_t total = 0;
  int supported = 0;
  cudaDeviceGetAttribute(&supported, cudaDevAttrClusterLaunch, device);
  if (supported != 0) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                         cudaSharedmemCarveoutMaxShared);
    cache.allow_smem(kernel, device, dynamic_smem);
    const ClusterLaunch one(1, cluster_size, threads, dynamic_smem, nullptr);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &one.config) == cudaSuccess) {
      total = clusters;
    } else {
      cudaGetLastError();  // a failed query is not an error of the caller
    }
  }
  cache.resident.emplace(key, total);
  return total;
}

AttributeLaunch::AttributeLaunch(dim3 grid, dim3 block, size_t dynamic_smem,
                                 cudaStream_t stream) {
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = dynamic_smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
}

ClusterLaunch::ClusterLaunch(int64_t clusters, int cluster_size, int threads,
                             size_t dynamic_smem, cudaStream_t stream)
    : AttributeLaunch(dim3(static_cast<unsigned>(clusters * cluster_size)),
                      dim3(static_cast<unsigned>(threads)), dynamic_smem, stream) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster_size);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
}

DependentLaunch::DependentLaunch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream)
    : AttributeLaunch(grid, block, dynamic_smem, stream) {
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.numAttrs = compute_major() >= 9 ? 1 : 0;
}

int kernel_ptx_version(const void* kernel) {
  LaunchCache& cache = launch_cache();
  int device = 0;
  cudaGetDevice(&device);
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto key = std::make_pair(kernel, device);
  if (const auto it = cache.ptx_version.find(key); it != cache.ptx_version.end()) {
    return it->second;
  }
  cudaFuncAttributes attr{};
  int version = 0;
  if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess) {
    version = attr.ptxVersion;
  } else {
    cudaGetLastError();  // a failed query is not an error of the caller
  }
  cache.ptx_version.emplace(key, version);
  return version;
}

}  // namespace unsloth_ext
