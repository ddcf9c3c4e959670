#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/tensor_checks.h"
#include "kernels/rope.h"
#include "ops/ops.h"

namespace unsloth_ext {
namespace {

// The stride of dimension d, or 0 where its size is 1: any stride is valid there, and a stray
// one would needlessly rule out vector access.
int64_t stride_or_zero(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

RopeTensor rope_tensor(const at::Tensor& t) {
  return {t.data_ptr(),          t.size(2),           stride_or_zero(t, 0),
          stride_or_zero(t, 1),  stride_or_zero(t, 2), stride_or_zero(t, 3)};
}

void check_rotated(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " has shape ", t.sizes(),
                    "; expected 4 dimensions [batch, seq, heads, head_dim]");
  check_nonempty(t, name);
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " has elements that share memory (an expanded tensor?); it is rotated in "
                    "place, so every element needs its own memory");
}

// Both ops: checks, then one launch over q and k. q_name/k_name name the arguments in errors.
void rope_rotate(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& position_ids, bool inverse, const char* q_name,
                 const char* k_name) {
  check_cuda(q, q_name);
  check_same_device(k, q, k_name, q_name);
  check_same_device(cos, q, "cos", q_name);
  check_same_device(sin, q, "sin", q_name);
  check_same_device(position_ids, q, "position_ids", q_name);
  check_rotated(q, q_name);
  check_rotated(k, k_name);
  const DType x_dtype = to_dtype(q, q_name);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), k_name, " has dtype ", k.scalar_type(),
                   " but ", q_name, " has dtype ", q.scalar_type(), "; expected the same dtype");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1), k_name, " has shape ",
                    k.sizes(), "; expected the batch and sequence sizes of ", q_name, " (",
                    q.size(0), ", ", q.size(1), ")");
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), k_name, " has head_dim ", k.size(3), " but ", q_name,
                    " has head_dim ", q.size(3));
  const at::MemOverlapStatus overlap = at::get_overlap_status(q, k);
  TORCH_CHECK_VALUE(
      overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, q_name,
      " and ", k_name, " share memory; both are rotated in place, so they must not overlap");

  TORCH_CHECK_VALUE(cos.dim() == 2, "cos has shape ", cos.sizes(),
                    "; expected [max_positions, rotary_dim]");
  check_nonempty(cos, "cos");
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "sin has shape ", sin.sizes(),
                    ", expected the shape of cos ", cos.sizes());
  const int64_t rotary_dim = cos.size(1);
  TORCH_CHECK_VALUE(rotary_dim % 2 == 0, "rotary_dim (the last size of cos) is ", rotary_dim,
                    "; expected an even number (dims pair up across its two halves)");
  TORCH_CHECK_VALUE(rotary_dim <= q.size(3), "rotary_dim (the last size of cos) is ", rotary_dim,
                    "; expected at most head_dim ", q.size(3));
  TORCH_CHECK_VALUE(rotary_dim <= kRopeMaxRotaryDim, "rotary_dim is ", rotary_dim,
                    "; the CUDA kernel handles at most ", kRopeMaxRotaryDim);
  TORCH_CHECK_TYPE(sin.scalar_type() == cos.scalar_type(), "sin has dtype ", sin.scalar_type(),
                   " but cos has dtype ", cos.scalar_type(), "; expected the same dtype");
  const bool same = cos.scalar_type() == q.scalar_type();
  const bool fp32_beside_16bit = cos.scalar_type() == at::kFloat &&
                                 (q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16);
  TORCH_CHECK_TYPE(same || fp32_beside_16bit, "cos has dtype ", cos.scalar_type(), " but ", q_name,
                   " has dtype ", q.scalar_type(),
                   "; expected the same dtype, or float32 with 16-bit ", q_name);

  const auto pos_type = position_ids.scalar_type();
  TORCH_CHECK_TYPE(pos_type == at::kLong || pos_type == at::kInt, "position_ids has dtype ",
                   pos_type, "; expected int64 or int32");
  TORCH_CHECK_VALUE(position_ids.dim() == 2 && position_ids.size(1) == q.size(1) &&
                        (position_ids.size(0) == q.size(0) || position_ids.size(0) == 1),
                    "position_ids has shape ", position_ids.sizes(), "; expected [", q.size(0),
                    ", ", q.size(1), "] or [1, ", q.size(1), "] (batch and sequence of ", q_name,
                    ")");

  const c10::cuda::CUDAGuard guard(q.device());
  // The cache is only read: a copy gives its rows unit stride where they lack it.
  const at::Tensor c = cos.stride(1) == 1 ? cos : cos.contiguous();
  const at::Tensor s = sin.stride(1) == 1 ? sin : sin.contiguous();

  RopeParams p{};
  p.q = rope_tensor(q);
  p.k = rope_tensor(k);
  p.cos = c.data_ptr();
  p.sin = s.data_ptr();
  p.positions = position_ids.data_ptr();
  p.batch = q.size(0);
  p.seq = q.size(1);
  p.rotary_dim = rotary_dim;
  p.cache_rows = c.size(0);
  p.cos_row_stride = c.stride(0);
  p.sin_row_stride = s.stride(0);
  p.pos_stride_b = stride_or_zero(position_ids, 0);
  p.pos_stride_s = position_ids.stride(1);
  p.positions_int64 = pos_type == at::kLong;
  p.inverse = inverse;
  p.x_dtype = x_dtype;
  p.cache_dtype = to_dtype(c, "cos");
  rope_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void rope_fwd(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
              const at::Tensor& position_ids) {
  NvtxRange range("unsloth_ext::rope_fwd");
  rope_rotate(q, k, cos, sin, position_ids, /*inverse=*/false, "q", "k");
}

void rope_bwd(at::Tensor& grad_q, at::Tensor& grad_k, const at::Tensor& cos,
              const at::Tensor& sin, const at::Tensor& position_ids) {
  NvtxRange range("unsloth_ext::rope_bwd");
  rope_rotate(grad_q, grad_k, cos, sin, position_ids, /*inverse=*/true, "grad_q", "grad_k");
}

}  // namespace unsloth_ext
