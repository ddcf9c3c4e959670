// Gated activations (SwiGLU, GEGLU) launch interface: plain pointers and sizes, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace unsloth_ext {

// act in h = act(e) * g.
enum class GluActivation : int { kSilu, kGeluErf, kGeluTanh };

// Every operand is [rows, cols] with its own row stride (elements); elements within a row are
// contiguous. All operands share one dtype.
struct GluFwdParams {
  const void* e;
  const void* g;
  void* h;
  int64_t rows;
  int64_t cols;
  int64_t e_row_stride;
  int64_t g_row_stride;
  int64_t h_row_stride;
  GluActivation act;
  DType dtype;
};

// grad_e, grad_g and h may be e, g and grad_h themselves (the in-place backward): each element is
// read before it is written, by the same thread. h (nullptr: not written) receives the forward's
// output act(e) * g, the same values the forward writes.
struct GluBwdParams {
  const void* grad_h;
  const void* e;
  const void* g;
  void* grad_e;
  void* grad_g;
  void* h;
  int64_t rows;
  int64_t cols;
  int64_t grad_h_row_stride;
  int64_t e_row_stride;
  int64_t g_row_stride;
  int64_t grad_e_row_stride;
  int64_t grad_g_row_stride;
  int64_t h_row_stride;
  GluActivation act;
  DType dtype;
};

void glu_fwd_launch(const GluFwdParams& p, cudaStream_t stream);

void glu_bwd_launch(const GluBwdParams& p, cudaStream_t stream);

}  // namespace unsloth_ext
