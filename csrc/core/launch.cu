#include "core/launch.cuh"

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

}  // namespace unsloth_ext
