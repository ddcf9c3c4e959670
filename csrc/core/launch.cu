#include "core/launch.cuh"

namespace unsloth_ext {

int sm_count() {
  // Cached per thread for the last device asked about: no locking, one query per device switch.
  thread_local int cached_device = -1;
  thread_local int cached_count = 0;
  int device = 0;
  cudaGetDevice(&device);
  if (device != cached_device) {
    cudaDeviceGetAttribute(&cached_count, cudaDevAttrMultiProcessorCount, device);
    cached_device = device;
  }
  return cached_count;
}

}  // namespace unsloth_ext
