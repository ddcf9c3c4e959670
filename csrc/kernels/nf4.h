// NF4 (bitsandbytes' 4-bit NormalFloat) launch interface: plain pointers and sizes, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace unsloth_ext {

// Entries of the double-quantized absmax covered by one second-level scale (bitsandbytes' fixed
// nested blocksize).
constexpr int kNF4AbsmaxBlock = 256;
// The GEMV handles at most this many rows of x.
constexpr int kNF4GemvMaxRows = 16;
// The GEMV reads each row of the weight in slabs of this many values (32 packed bytes), or, for a
// few rows of x and K a multiple, in spans of two slabs.
constexpr int kNF4GemvSlab = 64;
constexpr int kNF4GemvSpan = 2 * kNF4GemvSlab;
// The GEMV addresses the weight in 32-bit units of 16 values.
constexpr int64_t kNF4GemvMaxValues = int64_t{1} << 36;

// A weight of `numel` values in bitsandbytes' NF4 layout: value i is nibble i of `packed` (two per
// byte, the even index in the high nibble), scaled by the absmax of its block of
// 2^log2_blocksize values. The absmax is fp32, or double-quantized: a uint8 code per block,
// decoded as code2[code] * absmax2[block / kNF4AbsmaxBlock] + offset (two roundings, as
// bitsandbytes computes it).
struct NF4View {
  const uint8_t* packed;  // numel / 2 bytes
  const void* absmax;     // float[n_blocks], or uint8[n_blocks] when absmax2 != nullptr
  const float* absmax2;   // [ceil(n_blocks / kNF4AbsmaxBlock)] or nullptr
  const float* code2;     // [256] when absmax2 != nullptr
  float offset;
  int64_t numel;
  int log2_blocksize;  // 5..12; numel is a multiple of the blocksize
};

struct NF4DequantParams {
  NF4View w;
  void* out;  // [numel / cols, cols], rows out_row_stride apart, 16-byte aligned
  int64_t cols;            // values per row: numel for one array, else a multiple of 8 below 2^31
  int64_t out_row_stride;  // cols, or a larger multiple of 8
  DType out_dtype;  // bf16 or fp16
};

// y[M, N] = x[M, K] @ W[N, K]^T (+ lora_scale * (x @ A[r, K]^T) @ B[N, r]^T), fp32 accumulation.
struct NF4GemvParams {
  NF4View w;        // numel = n * k; blocksize >= kNF4GemvSlab; packed 16-byte aligned
  const void* x;      // [m, k] contiguous, 16-byte aligned
  void* y;            // [m, n] contiguous
  int64_t m;          // 1..kNF4GemvMaxRows
  int64_t n;
  int64_t k;          // a multiple of kNF4GemvSlab
  DType dtype;        // x and y: bf16 or fp16
  const void* lora_a;  // [rank, k] contiguous, 16-byte aligned, dtype or fp32; nullptr: no LoRA
  const void* lora_b;  // [n, rank] contiguous, dtype or fp32
  float* lora_xa;      // [m, rank] fp32 workspace: lora_scale * x @ A^T
  int64_t rank;
  float lora_scale;
  DType lora_a_dtype;
  DType lora_b_dtype;
};

void nf4_dequantize_launch(const NF4DequantParams& p, cudaStream_t stream);

void nf4_gemv_launch(const NF4GemvParams& p, cudaStream_t stream);

}  // namespace unsloth_ext
