// Element types the kernels handle, and compile-time dispatch over them. Free of torch headers
// so that .cu files compile quickly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>
#include <type_traits>

namespace unsloth_ext {

enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename T>
constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <> constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
template <> constexpr DType dtype_of<double>() { return DType::kFloat64; }

template <typename T>
constexpr bool is_16bit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Accumulator type: fp32 for every storage type except fp64 (kept for fp64 gradcheck).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// Calls f(TypeTag<T>{}) for the storage type named by d.
template <typename F>
void dispatch_float(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kFloat16: f(TypeTag<__half>{}); return;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::kFloat64: f(TypeTag<double>{}); return;
  }
  throw std::invalid_argument("unsupported dtype");
}

// Calls f(TypeTag<U>{}) where U is T itself or, for 16-bit T only, float. Used for parameters
// kept in fp32 beside 16-bit activations (and outputs promoted to fp32 by them).
template <typename T, typename F>
void dispatch_same_or_f32(DType d, F&& f) {
  if (d == dtype_of<T>()) {
    f(TypeTag<T>{});
    return;
  }
  if constexpr (is_16bit<T>) {
    if (d == DType::kFloat32) {
      f(TypeTag<float>{});
      return;
    }
  }
  throw std::invalid_argument(std::string("dtype ") + dtype_name(d) + " cannot pair with " +
                              dtype_name(dtype_of<T>()));
}

}  // namespace unsloth_ext
