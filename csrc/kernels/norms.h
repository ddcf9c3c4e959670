// LayerNorm and RMSNorm (with an optional residual add) launch interface: plain pointers and
// sizes, no torch types. Each has a forward kernel of its own; both share one backward.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace unsloth_ext {

// y = (x - mean) * rstd * w + b over rows of `cols` elements, mean and biased variance in the
// accumulator dtype (one pass, or two for rows far from zero mean); y in x's dtype.
struct LayerNormFwdParams {
  const void* x;
  const void* weight;
  const void* bias;  // nullptr: no bias; else weight's dtype
  void* y;           // [rows, cols], contiguous
  void* mean;        // [rows], accumulator dtype (fp32, or fp64 for fp64 x)
  void* rstd;        // [rows], accumulator dtype
  int64_t rows;
  int64_t cols;
  int64_t x_row_stride;
  double eps;
  DType x_dtype;
  DType w_dtype;
};

// y = RMSNorm(s) with s = x, or with a residual s = x + residual rounded to x's dtype (also
// written out), in the Llama form w * round(norm(s)) (rounded to x's dtype before the weight
// product, as transformers does) or the Gemma form norm(s) * (1 + w).
struct RMSNormFwdParams {
  const void* x;
  const void* residual;  // x's dtype; nullptr: plain RMSNorm
  const void* weight;
  void* y;             // [rows, cols] with rows y_row_stride apart
  void* residual_out;  // [rows, cols], contiguous, x's dtype; nullptr without a residual
  void* rstd;          // [rows], accumulator dtype
  int64_t rows;
  int64_t cols;
  int64_t x_row_stride;
  int64_t residual_row_stride;
  int64_t y_row_stride;  // >= cols
  double eps;
  bool gemma;
  DType x_dtype;
  DType w_dtype;
  DType y_dtype;
};

enum class NormKind { kLayerNorm, kRMSNorm };

// The backward of both, per row of x (the residual sum s for a residual add), with
// xhat = (x - mean) * rstd (mean 0 for kRMSNorm) and g = dy * w (dy * (1 + w) for Gemma):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   kLayerNorm
//   dx = rstd * (g - xhat * mean(g * xhat)) + dres      kRMSNorm
//   dw = sum over rows of dy * xhat (Llama: xhat rounded to x's dtype), db = sum of dy.
struct NormBwdParams {
  const void* dy;
  const void* x;
  const void* weight;
  const void* mean;  // kLayerNorm: [rows], accumulator dtype
  const void* rstd;  // [rows], accumulator dtype
  const void* dres;  // kRMSNorm: gradient reaching the residual sum by its other uses; may be nullptr
  void* dx;          // [rows, cols], contiguous, x's dtype
  void* dw;          // [cols], weight's dtype
  void* db;          // kLayerNorm with a bias: [cols], weight's dtype; else nullptr
  void* partial;     // [norm_bwd_partial_rows(), cols], accumulator dtype
  int64_t rows;
  int64_t cols;
  int64_t dy_row_stride;
  int64_t x_row_stride;
  int64_t dres_row_stride;
  bool gemma;
  DType x_dtype;
  DType w_dtype;
  DType dy_dtype;
};

void layer_norm_fwd_launch(const LayerNormFwdParams& p, cudaStream_t stream);

void rms_norm_fwd_launch(const RMSNormFwdParams& p, cudaStream_t stream);

// Rows of the workspace that holds per-block partial sums of dW (and of db after them).
int64_t norm_bwd_partial_rows(NormKind kind, const NormBwdParams& p);

void norm_bwd_launch(NormKind kind, const NormBwdParams& p, cudaStream_t stream);

}  // namespace unsloth_ext
