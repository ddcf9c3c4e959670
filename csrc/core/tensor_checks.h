// Argument checks and conversions shared by the host entries (.cpp files, torch headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include <nvtx3/nvToolsExt.h>

#include "core/dtype.h"

namespace unsloth_ext {

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, " has dtype ", t.scalar_type(),
                       "; expected bfloat16, float16, float32 or float64");
  }
}

// The accumulator dtype for inputs of dtype t: fp64 for fp64, else fp32.
inline at::ScalarType acc_scalar_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " is on ", t.device(), "; this kernel needs a CUDA tensor");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

inline void check_nonempty(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.numel() > 0, name, " is empty (shape ", t.sizes(), ")");
}

// A tensor seen as rows of its last dimension: rows at a constant stride, elements contiguous.
struct Rows {
  at::Tensor tensor;  // the input, or a contiguous copy when its layout has no such view
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
};

inline Rows as_rows(const at::Tensor& t) {
  const int64_t cols = t.size(-1);
  const int64_t rows = t.numel() / cols;
  // Find the one stride that steps between consecutive rows, ignoring size-1 dimensions.
  bool ok = t.stride(-1) == 1 || cols == 1;
  int64_t row_stride = cols;
  int64_t expected = -1;
  for (int64_t d = t.dim() - 2; ok && d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (expected < 0) {
      row_stride = t.stride(d);
      ok = row_stride >= cols;
    } else {
      ok = t.stride(d) == expected;
    }
    expected = t.stride(d) * t.size(d);
  }
  if (ok) return {t, rows, cols, row_stride};
  return {t.contiguous(), rows, cols, cols};
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// One NVTX range per op call, on when UNSLOTH_EXT_NVTX=1 at first use.
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) : active_(enabled()) {
    if (active_) nvtxRangePushA(name);
  }
  ~NvtxRange() {
    if (active_) nvtxRangePop();
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("UNSLOTH_EXT_NVTX");
      return v != nullptr && std::strcmp(v, "1") == 0;
    }();
    return on;
  }
  bool active_;
};

}  // namespace unsloth_ext
