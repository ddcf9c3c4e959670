#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <cstdint>

#include "core/tensor_checks.h"
#include "kernels/cross_entropy.h"
#include "ops/ops.h"

namespace unsloth_ext {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

c10::IntArrayRef leading_sizes(const at::Tensor& logits) {
  return logits.sizes().slice(0, logits.dim() - 1);
}

void check_logits_and_labels(const at::Tensor& logits, const at::Tensor& labels) {
  check_cuda(logits, "logits");
  check_same_device(labels, logits, "labels", "logits");
  check_nonempty(logits, "logits");
  to_dtype(logits, "logits");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels has dtype ", labels.scalar_type(),
                   "; expected int64 class indices");
  TORCH_CHECK_VALUE(labels.sizes() == leading_sizes(logits), "labels has shape ", labels.sizes(),
                    ", expected ", leading_sizes(logits), " (the leading dimensions of logits)");
}

void check_settings(int64_t vocab_start, int64_t vocab_size, int64_t cols, double logit_scale,
                    double softcap, double label_smoothing) {
  TORCH_CHECK_VALUE(vocab_start >= 0 && vocab_size >= vocab_start + cols, "logits columns [",
                    vocab_start, ", ", vocab_start + cols, ") are not inside a vocabulary of ",
                    vocab_size, " classes");
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0, "logit_scale is ", logit_scale,
                    "; expected a positive number");
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, "softcap is ", softcap,
                    "; expected 0 (off) or a positive number");
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, "label_smoothing is ",
                    label_smoothing, "; expected a number in [0, 1]");
}

// A per-row vector beside the labels: same shape, the accumulator dtype of logits.
at::Tensor check_row_vector(const at::Tensor& t, const char* name, const at::Tensor& logits,
                            const at::Tensor& labels) {
  check_same_device(t, logits, name, "logits");
  TORCH_CHECK_VALUE(t.sizes() == labels.sizes(), name, " has shape ", t.sizes(),
                    ", expected the shape of labels ", labels.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == acc_scalar_type(logits), name, " has dtype ",
                   t.scalar_type(), ", expected ", acc_scalar_type(logits));
  return t.contiguous();
}

// Logits seen as rows, kept in place: in-place ops must not write to a copy.
Rows rows_in_place(const at::Tensor& logits) {
  Rows rows = as_rows(logits);
  TORCH_CHECK_VALUE(rows.tensor.is_same(logits), "logits (shape ", logits.sizes(), ", strides ",
                    logits.strides(),
                    ") is overwritten in place, so its rows must be at one constant stride with "
                    "contiguous elements");
  return rows;
}

CrossEntropyRows make_rows(const Rows& rows, const at::Tensor& labels, int64_t vocab_start,
                           int64_t vocab_size, int64_t ignore_index, double logit_scale,
                           double softcap, double label_smoothing) {
  CrossEntropyRows in{};
  in.logits = rows.tensor.data_ptr();
  in.labels = labels.data_ptr<int64_t>();
  in.rows = rows.rows;
  in.cols = rows.cols;
  in.row_stride = rows.row_stride;
  in.vocab_start = vocab_start;
  in.vocab_size = vocab_size;
  in.ignore_index = ignore_index;
  in.logit_scale = logit_scale;
  in.softcap = softcap;
  in.label_smoothing = label_smoothing;
  in.dtype = to_dtype(rows.tensor, "logits");
  return in;
}

// Writes the gradient of the rows of `rows` into grad (laid out like them; it may be them).
void launch_bwd(const at::Tensor& grad_lse, const at::Tensor& grad_target, const Rows& rows,
                void* grad, const at::Tensor& logits, const at::Tensor& labels,
                const at::Tensor& lse, int64_t vocab_start, int64_t vocab_size,
                int64_t ignore_index, double logit_scale, double softcap,
                double label_smoothing) {
  check_settings(vocab_start, vocab_size, rows.cols, logit_scale, softcap, label_smoothing);
  const at::Tensor g_lse = check_row_vector(grad_lse, "grad_lse", logits, labels);
  const at::Tensor g_target = check_row_vector(grad_target, "grad_target", logits, labels);
  const at::Tensor lse_rows = check_row_vector(lse, "lse", logits, labels);
  const at::Tensor y = labels.contiguous();
  CrossEntropyBwdParams p{};
  p.in = make_rows(rows, y, vocab_start, vocab_size, ignore_index, logit_scale, softcap,
                   label_smoothing);
  p.grad_lse = g_lse.data_ptr();
  p.grad_target = g_target.data_ptr();
  p.lse = lse_rows.data_ptr();
  p.grad_logits = grad;
  cross_entropy_bwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& labels, int64_t vocab_start,
                                                     int64_t vocab_size, int64_t ignore_index,
                                                     double logit_scale, double softcap,
                                                     double label_smoothing) {
  NvtxRange range("unsloth_ext::cross_entropy_fwd");
  check_logits_and_labels(logits, labels);
  check_settings(vocab_start, vocab_size, logits.size(-1), logit_scale, softcap, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Rows rows = as_rows(logits);
  const at::Tensor y = labels.contiguous();
  const auto acc = logits.options().dtype(acc_scalar_type(logits));
  at::Tensor lse = at::empty(labels.sizes(), acc);
  at::Tensor target = at::empty(labels.sizes(), acc);

  CrossEntropyFwdParams p{};
  p.in = make_rows(rows, y, vocab_start, vocab_size, ignore_index, logit_scale, softcap,
                   label_smoothing);
  p.lse = lse.data_ptr();
  p.target = target.data_ptr();
  cross_entropy_fwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lse, target};
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                             const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t vocab_start, int64_t vocab_size,
                             int64_t ignore_index, double logit_scale, double softcap,
                             double label_smoothing) {
  NvtxRange range("unsloth_ext::cross_entropy_bwd");
  check_logits_and_labels(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  // The gradient is written with the rows' layout and 16-byte alignment: give it contiguous,
  // aligned rows to copy.
  Rows rows = as_rows(logits);
  if (rows.row_stride != rows.cols || !aligned16(rows.tensor.data_ptr())) {
    rows = as_rows(logits.clone(at::MemoryFormat::Contiguous));
  }
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  launch_bwd(grad_lse, grad_target, rows, grad.data_ptr(), logits, labels, lse, vocab_start,
             vocab_size, ignore_index, logit_scale, softcap, label_smoothing);
  return grad;
}

void cross_entropy_bwd_(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                        at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                        int64_t vocab_start, int64_t vocab_size, int64_t ignore_index,
                        double logit_scale, double softcap, double label_smoothing) {
  NvtxRange range("unsloth_ext::cross_entropy_bwd_");
  check_logits_and_labels(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Rows rows = rows_in_place(logits);
  launch_bwd(grad_lse, grad_target, rows, rows.tensor.data_ptr(), logits, labels, lse,
             vocab_start, vocab_size, ignore_index, logit_scale, softcap, label_smoothing);
}

at::Tensor cross_entropy_fwd_bwd_(at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& grad_scale, int64_t ignore_index,
                                  double logit_scale, double softcap, double label_smoothing) {
  NvtxRange range("unsloth_ext::cross_entropy_fwd_bwd_");
  check_logits_and_labels(logits, labels);
  check_settings(0, logits.size(-1), logits.size(-1), logit_scale, softcap, label_smoothing);
  const at::Tensor scale = check_row_vector(grad_scale, "grad_scale", logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Rows rows = rows_in_place(logits);
  const at::Tensor y = labels.contiguous();
  at::Tensor loss = at::empty(labels.sizes(), logits.options().dtype(acc_scalar_type(logits)));

  CrossEntropyFusedParams p{};
  p.in = make_rows(rows, y, 0, rows.cols, ignore_index, logit_scale, softcap, label_smoothing);
  p.grad_scale = scale.data_ptr();
  p.loss = loss.data_ptr();
  p.grad_logits = rows.tensor.data_ptr();
  cross_entropy_fwd_bwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

}  // namespace unsloth_ext
