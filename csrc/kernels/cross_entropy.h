// Cross-entropy launch interface: plain pointers and sizes, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace unsloth_ext {

// Rows of logits and their labels. Column c of a row is class vocab_start + c of a vocabulary of
// vocab_size classes (the whole vocabulary, or one window of it). Per element the loss sees
// z = logit_scale * x, or with softcap > 0, z = softcap * tanh(logit_scale * x / softcap).
// Per row, with eps = label_smoothing and y the label:
//   lse = log(sum_c exp(z_c)) over the row's columns,
//   target = (1 - eps) * z_y [y in this window] + eps / vocab_size * sum_c z_c,
// and over the whole vocabulary the loss is lse - target. A row whose label is ignore_index has
// lse = target = 0 and zero gradient; a label outside [0, vocab_size) gives NaN for its row.
struct CrossEntropyRows {
  const void* logits;     // [rows, cols] at row_stride, elements contiguous
  const int64_t* labels;  // [rows]
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t vocab_start;
  int64_t vocab_size;
  int64_t ignore_index;
  double logit_scale;  // > 0
  double softcap;      // 0: off
  double label_smoothing;
  DType dtype;
};

// Accumulator-dtype outputs (fp32, or fp64 for fp64 logits), one per row.
struct CrossEntropyFwdParams {
  CrossEntropyRows in;
  void* lse;
  void* target;
};

// grad_logits = (grad_lse * softmax(z) + grad_target * d(target)/dz) * dz/dx, with softmax taken
// against the given lse: the vector-Jacobian product of (lse, target). grad_logits is laid out as
// logits: the same row stride and the same 16-byte alignment (it may be logits itself).
struct CrossEntropyBwdParams {
  CrossEntropyRows in;
  const void* grad_lse;     // [rows], accumulator dtype
  const void* grad_target;  // [rows], accumulator dtype
  const void* lse;          // [rows], accumulator dtype
  void* grad_logits;
};

// One pass over whole rows (vocab_start 0, vocab_size cols): loss = lse - target per row, and
// grad_logits = grad_scale * d(loss)/dx (laid out as in CrossEntropyBwdParams).
struct CrossEntropyFusedParams {
  CrossEntropyRows in;
  const void* grad_scale;  // [rows], accumulator dtype
  void* loss;              // [rows], accumulator dtype
  void* grad_logits;
};

void cross_entropy_fwd_launch(const CrossEntropyFwdParams& p, cudaStream_t stream);
void cross_entropy_bwd_launch(const CrossEntropyBwdParams& p, cudaStream_t stream);
void cross_entropy_fwd_bwd_launch(const CrossEntropyFusedParams& p, cudaStream_t stream);

}  // namespace unsloth_ext
