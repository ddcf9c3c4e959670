#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "core/tensor_checks.h"
#include "kernels/nf4.h"
#include "ops/ops.h"

namespace unsloth_ext {
namespace {

bool aligned_to(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

// t itself when its data is `bytes`-aligned, else an aligned copy (kernels use vector accesses).
at::Tensor with_alignment(const at::Tensor& t, int64_t bytes) {
  return aligned_to(t, bytes) ? t : t.clone();
}

void check_16bit(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
                   " has dtype ", t.scalar_type(), "; expected bfloat16 or float16");
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " is not contiguous (strides ", t.strides(), ")");
}

// The NF4 state of a weight of `numel` values, checked, as kernel pointers. `packed` must already
// be aligned as the kernel needs.
NF4View nf4_view(const at::Tensor& packed, const at::Tensor& absmax,
                 const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                 double offset, int64_t blocksize, int64_t numel, const at::Tensor& ref,
                 const char* ref_name) {
  check_same_device(packed, ref, "packed", ref_name);
  check_same_device(absmax, ref, "absmax", ref_name);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed has dtype ", packed.scalar_type(),
                   "; expected uint8 (two NF4 codes per byte)");
  check_contiguous(packed, "packed");
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                    "blocksize is ", blocksize, "; expected a power of two from 32 to 4096");
  TORCH_CHECK_VALUE(numel > 0 && numel % blocksize == 0, "the weight has ", numel,
                    " values; expected a positive multiple of blocksize ", blocksize);
  TORCH_CHECK_VALUE(packed.numel() * 2 == numel, "packed has ", packed.numel(),
                    " bytes; expected ", numel / 2, " (two codes per byte for ", numel,
                    " values)");
  const int64_t n_blocks = numel / blocksize;
  TORCH_CHECK_VALUE(absmax.numel() == n_blocks, "absmax has ", absmax.numel(),
                    " entries; expected ", n_blocks, " (one per block of ", blocksize,
                    " values)");
  check_contiguous(absmax, "absmax");
  TORCH_CHECK_VALUE(std::isfinite(offset), "offset is ", offset, "; expected a finite number");
  NF4View w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.absmax = absmax.data_ptr();
  w.numel = numel;
  w.offset = static_cast<float>(offset);
  w.log2_blocksize = 0;
  while ((int64_t{1} << w.log2_blocksize) < blocksize) ++w.log2_blocksize;
  if (absmax.scalar_type() == at::kFloat) {
    TORCH_CHECK_VALUE(!absmax2.has_value() && !code2.has_value(),
                      "absmax2 and code2 are given but absmax is float32; they belong to a "
                      "double-quantized (uint8) absmax");
    return w;
  }
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte, "absmax has dtype ", absmax.scalar_type(),
                   "; expected float32, or uint8 codes of a double-quantized absmax");
  TORCH_CHECK_VALUE(absmax2.has_value() && code2.has_value(),
                    "absmax is uint8 (double-quantized) but absmax2 or code2 is missing");
  const int64_t n_groups = (n_blocks + kNF4AbsmaxBlock - 1) / kNF4AbsmaxBlock;
  for (const auto& [t, name, expected] :
       {std::tuple{&*absmax2, "absmax2", n_groups}, std::tuple{&*code2, "code2", int64_t{256}}}) {
    check_same_device(*t, ref, name, ref_name);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " has dtype ", t->scalar_type(),
                     "; expected float32");
    TORCH_CHECK_VALUE(t->numel() == expected, name, " has ", t->numel(), " entries; expected ",
                      expected);
    check_contiguous(*t, name);
  }
  w.absmax2 = absmax2->data_ptr<float>();
  w.code2 = code2->data_ptr<float>();
  return w;
}

}  // namespace

void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                    const std::optional<at::Tensor>& absmax2,
                    const std::optional<at::Tensor>& code2, double offset, int64_t blocksize,
                    at::Tensor& out) {
  NvtxRange range("unsloth_ext::nf4_dequantize");
  check_cuda(out, "out");
  check_nonempty(out, "out");
  check_16bit(out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor pk = with_alignment(packed, 4);
  NF4DequantParams p{};
  p.w = nf4_view(pk, absmax, absmax2, code2, offset, blocksize, out.numel(), out, "out");
  p.out_dtype = to_dtype(out, "out");
  // The kernel writes 16-byte vectors of 8 values along rows that lie at a stride: other
  // buffers (unaligned, or other strides) are filled through a contiguous aligned one.
  const int64_t cols = out.dim() > 0 ? out.size(-1) : 1;
  const bool row_strided = out.dim() == 2 && out.stride(1) == 1 && out.stride(0) >= cols &&
                           out.stride(0) % 8 == 0 && cols % 8 == 0 && cols <= INT32_MAX;
  const bool direct = aligned_to(out, 16) && (out.is_contiguous() || row_strided);
  at::Tensor dst = direct ? out : at::empty(out.sizes(), out.options());
  p.cols = row_strided && direct ? cols : dst.numel();
  p.out_row_stride = row_strided && direct ? out.stride(0) : dst.numel();
  p.out = dst.data_ptr();
  nf4_dequantize_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!direct) out.copy_(dst);
}

at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                    const std::optional<at::Tensor>& absmax2,
                    const std::optional<at::Tensor>& code2, double offset, int64_t blocksize,
                    int64_t out_features, const std::optional<at::Tensor>& lora_a,
                    const std::optional<at::Tensor>& lora_b, double lora_scale) {
  NvtxRange range("unsloth_ext::nf4_gemv");
  check_cuda(x, "x");
  check_16bit(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kNF4GemvMaxRows,
                    "x has shape ", x.sizes(), "; expected [M, in_features] with 1 <= M <= ",
                    kNF4GemvMaxRows);
  const int64_t k = x.size(1);
  TORCH_CHECK_VALUE(k > 0 && k % kNF4GemvSlab == 0, "x has in_features ", k,
                    "; the NF4 GEMV needs a positive multiple of ", kNF4GemvSlab);
  TORCH_CHECK_VALUE(blocksize >= kNF4GemvSlab, "blocksize is ", blocksize,
                    "; the NF4 GEMV needs ", kNF4GemvSlab, " or more");
  TORCH_CHECK_VALUE(out_features >= 1, "out_features is ", out_features,
                    "; expected a positive number");
  TORCH_CHECK_VALUE(out_features <= kNF4GemvMaxValues / k, "the weight has ", out_features,
                    " x ", k, " values; the NF4 GEMV takes at most 2^36");
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(),
                    "lora_a and lora_b must be given together");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK_VALUE(at::cuda::getCurrentDeviceProperties()->major >= 8,
                    "the NF4 GEMV needs compute capability 8.0 or newer (tensor-core mma)");
  const at::Tensor pk = with_alignment(packed, 16);
  const at::Tensor xc = with_alignment(x.contiguous(), 16);
  NF4GemvParams p{};
  p.w = nf4_view(pk, absmax, absmax2, code2, offset, blocksize, out_features * k, x, "x");
  p.x = xc.data_ptr();
  p.m = x.size(0);
  p.n = out_features;
  p.k = k;
  p.dtype = to_dtype(x, "x");
  at::Tensor a, b, xa;
  if (lora_a.has_value()) {
    for (const auto& [t, name] : {std::pair{&*lora_a, "lora_a"}, std::pair{&*lora_b, "lora_b"}}) {
      check_same_device(*t, x, name, "x");
      TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type() || t->scalar_type() == at::kFloat, name,
                       " has dtype ", t->scalar_type(), "; expected ", x.scalar_type(),
                       " (the dtype of x) or float32");
    }
    const int64_t rank = lora_a->dim() == 2 ? lora_a->size(0) : 0;
    TORCH_CHECK_VALUE(rank >= 1 && lora_a->size(1) == k, "lora_a has shape ", lora_a->sizes(),
                      "; expected [rank, ", k, "]");
    TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->size(0) == out_features &&
                          lora_b->size(1) == rank,
                      "lora_b has shape ", lora_b->sizes(), "; expected [", out_features, ", ",
                      rank, "]");
    TORCH_CHECK_VALUE(std::isfinite(lora_scale), "lora_scale is ", lora_scale,
                      "; expected a finite number");
    a = with_alignment(lora_a->contiguous(), 16);
    b = lora_b->contiguous();
    xa = at::empty({p.m, rank}, x.options().dtype(at::kFloat));
    p.lora_a = a.data_ptr();
    p.lora_b = b.data_ptr();
    p.lora_xa = xa.data_ptr<float>();
    p.rank = rank;
    p.lora_scale = static_cast<float>(lora_scale);
    p.lora_a_dtype = to_dtype(a, "lora_a");
    p.lora_b_dtype = to_dtype(b, "lora_b");
  }
  at::Tensor y = at::empty({p.m, out_features}, x.options());
  p.y = y.data_ptr();
  nf4_gemv_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace unsloth_ext
