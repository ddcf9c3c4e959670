// RMSNorm launch interface: plain pointers and sizes, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace unsloth_ext {

// y = norm(x) * w (Llama: the normalized row is rounded to x's dtype first, as transformers does)
// or norm(x) * (1 + w) (Gemma), one row of `cols` elements at a time.
struct RMSNormFwdParams {
  const void* x;
  const void* weight;
  void* y;     // [rows, cols], contiguous
  void* rstd;  // [rows], accumulator dtype (fp32, or fp64 for fp64 x)
  int64_t rows;
  int64_t cols;
  int64_t x_row_stride;
  double eps;
  bool gemma;
  DType x_dtype;
  DType w_dtype;
  DType y_dtype;
};

struct RMSNormBwdParams {
  const void* dy;
  const void* x;
  const void* weight;
  const void* rstd;
  void* dx;          // [rows, cols], contiguous, x's dtype
  void* dw;          // [cols], weight's dtype
  void* dw_partial;  // [rms_norm_bwd_partial_rows(), cols], accumulator dtype
  int64_t rows;
  int64_t cols;
  int64_t dy_row_stride;
  int64_t x_row_stride;
  bool gemma;
  DType x_dtype;
  DType w_dtype;
  DType dy_dtype;
};

void rms_norm_fwd_launch(const RMSNormFwdParams& p, cudaStream_t stream);

// Rows of the fp32 workspace that holds per-block partial sums of dW.
int64_t rms_norm_bwd_partial_rows(const RMSNormBwdParams& p);

void rms_norm_bwd_launch(const RMSNormBwdParams& p, cudaStream_t stream);

}  // namespace unsloth_ext
