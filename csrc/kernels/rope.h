// RoPE launch interface: plain pointers and sizes, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace unsloth_ext {

// A [batch, seq, heads, head_dim] tensor with element strides in that order.
struct RopeTensor {
  void* data;
  int64_t heads;
  int64_t stride_b;
  int64_t stride_s;
  int64_t stride_h;
  int64_t stride_d;
};

// Rotates the first rotary_dim dims of every head of q and k in place (the rotate_half pairing:
// dim i with dim i + rotary_dim / 2), token (b, s) by the cache row position_ids[b, s].
// inverse: the adjoint rotation (the backward; by -theta for any cache whose halves match).
// A position outside [0, cache_rows) turns that token's rotary dims into NaN.
struct RopeParams {
  RopeTensor q;
  RopeTensor k;
  const void* cos;  // [cache_rows, rotary_dim], unit stride within a row
  const void* sin;
  const void* positions;  // [batch or 1, seq], int32 or int64
  int64_t batch;
  int64_t seq;
  int64_t rotary_dim;  // even
  int64_t cache_rows;
  int64_t cos_row_stride;
  int64_t sin_row_stride;
  int64_t pos_stride_b;  // 0 when one row of positions serves the whole batch
  int64_t pos_stride_s;
  bool positions_int64;
  bool inverse;
  DType x_dtype;
  DType cache_dtype;
};

// The largest rotary_dim the launch handles: a token's pairs of dims fit one block of threads.
constexpr int64_t kRopeMaxRotaryDim = 512;

void rope_launch(const RopeParams& p, cudaStream_t stream);

}  // namespace unsloth_ext
