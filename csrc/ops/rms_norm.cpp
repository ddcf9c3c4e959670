#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/tensor_checks.h"
#include "kernels/rms_norm.h"
#include "ops/ops.h"

namespace unsloth_ext {
namespace {

// Output dtype of the forward: Llama multiplies a rounded x by w (type promotion), Gemma casts
// back to x's dtype.
at::ScalarType rms_norm_out_dtype(const at::Tensor& x, const at::Tensor& weight, bool gemma) {
  return gemma ? x.scalar_type() : c10::promoteTypes(x.scalar_type(), weight.scalar_type());
}

void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  check_same_device(weight, x, "weight", "x");
  check_nonempty(x, "x");
  to_dtype(x, "x");
  to_dtype(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight has shape ",
                    weight.sizes(), ", expected [", x.size(-1), "] (the hidden size of x)");
  const bool same = weight.scalar_type() == x.scalar_type();
  const bool fp32_beside_16bit = weight.scalar_type() == at::kFloat &&
                                 (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
  TORCH_CHECK_TYPE(same || fp32_beside_16bit, "weight has dtype ", weight.scalar_type(),
                   " but x has dtype ", x.scalar_type(),
                   "; expected the same dtype, or float32 weight with 16-bit x");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, bool gemma) {
  NvtxRange range("unsloth_ext::rms_norm_fwd");
  check_rms_norm_inputs(x, weight);
  TORCH_CHECK_VALUE(eps >= 0, "eps is ", eps, "; expected a non-negative number");
  const c10::cuda::CUDAGuard guard(x.device());
  const Rows xr = as_rows(x);
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(rms_norm_out_dtype(x, weight, gemma)));
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_scalar_type(x)));

  RMSNormFwdParams p{};
  p.x = xr.tensor.data_ptr();
  p.weight = w.data_ptr();
  p.y = y.data_ptr();
  p.rstd = rstd.data_ptr();
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.x_row_stride = xr.row_stride;
  p.eps = eps;
  p.gemma = gemma;
  p.x_dtype = to_dtype(x, "x");
  p.w_dtype = to_dtype(w, "weight");
  p.y_dtype = to_dtype(y, "y");
  rms_norm_fwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                bool gemma) {
  NvtxRange range("unsloth_ext::rms_norm_bwd");
  check_rms_norm_inputs(x, weight);
  check_same_device(grad_y, x, "grad_y", "x");
  check_same_device(rstd, x, "rstd", "x");
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y has shape ", grad_y.sizes(),
                    ", expected the shape of x ", x.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == rms_norm_out_dtype(x, weight, gemma), "grad_y has dtype ",
                   grad_y.scalar_type(), ", expected the forward output's dtype ",
                   rms_norm_out_dtype(x, weight, gemma));
  TORCH_CHECK_VALUE(rstd.numel() * x.size(-1) == x.numel(), "rstd has ", rstd.numel(),
                    " elements, expected one per row of x (", x.numel() / x.size(-1), ")");
  TORCH_CHECK_TYPE(rstd.scalar_type() == acc_scalar_type(x), "rstd has dtype ", rstd.scalar_type(),
                   ", expected ", acc_scalar_type(x));
  const c10::cuda::CUDAGuard guard(x.device());
  const Rows xr = as_rows(x);
  const Rows dyr = as_rows(grad_y);
  const at::Tensor w = weight.contiguous();
  const at::Tensor r = rstd.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::empty({xr.cols}, weight.options());

  RMSNormBwdParams p{};
  p.dy = dyr.tensor.data_ptr();
  p.x = xr.tensor.data_ptr();
  p.weight = w.data_ptr();
  p.rstd = r.data_ptr();
  p.dx = dx.data_ptr();
  p.dw = dw.data_ptr();
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.dy_row_stride = dyr.row_stride;
  p.x_row_stride = xr.row_stride;
  p.gemma = gemma;
  p.x_dtype = to_dtype(x, "x");
  p.w_dtype = to_dtype(w, "weight");
  p.dy_dtype = to_dtype(grad_y, "grad_y");
  at::Tensor partial =
      at::empty({rms_norm_bwd_partial_rows(p), xr.cols}, x.options().dtype(acc_scalar_type(x)));
  p.dw_partial = partial.data_ptr();
  rms_norm_bwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw};
}

}  // namespace unsloth_ext
