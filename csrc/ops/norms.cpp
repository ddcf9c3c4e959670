#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "core/tensor_checks.h"
#include "kernels/norms.h"
#include "ops/ops.h"

namespace unsloth_ext {
namespace {

void check_activation(const at::Tensor& x, const char* name) {
  check_cuda(x, name);
  check_nonempty(x, name);
  to_dtype(x, name);
}

// A per-column parameter of x: [hidden], on x's device, x's dtype or fp32 beside 16-bit x.
void check_param(const at::Tensor& param, const at::Tensor& x, const char* name,
                 const char* x_name) {
  check_same_device(param, x, name, x_name);
  to_dtype(param, name);
  TORCH_CHECK_VALUE(param.dim() == 1 && param.size(0) == x.size(-1), name, " has shape ",
                    param.sizes(), ", expected [", x.size(-1), "] (the hidden size of ", x_name,
                    ")");
  const bool same = param.scalar_type() == x.scalar_type();
  const bool x_16bit = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const bool fp32_beside_16bit = param.scalar_type() == at::kFloat && x_16bit;
  TORCH_CHECK_TYPE(same || fp32_beside_16bit, name, " has dtype ", param.scalar_type(), " but ",
                   x_name, " has dtype ", x.scalar_type(),
                   "; expected the same dtype, or float32 with 16-bit ", x_name);
}

// A tensor shaped and typed like x (a gradient or a residual of it).
void check_like(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype, const char* name,
                const char* x_name) {
  check_same_device(t, x, name, x_name);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, " has shape ", t.sizes(),
                    ", expected the shape of ", x_name, " ", x.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ",
                   dtype);
}

// A per-row statistic of x saved by the forward (mean, rstd).
void check_row_stat(const at::Tensor& stat, const at::Tensor& x, const char* name,
                    const char* x_name) {
  check_same_device(stat, x, name, x_name);
  TORCH_CHECK_VALUE(stat.numel() * x.size(-1) == x.numel(), name, " has ", stat.numel(),
                    " elements, expected one per row of ", x_name, " (", x.numel() / x.size(-1),
                    ")");
  TORCH_CHECK_TYPE(stat.scalar_type() == acc_scalar_type(x), name, " has dtype ",
                   stat.scalar_type(), ", expected ", acc_scalar_type(x));
}

void check_eps(double eps) {
  TORCH_CHECK_VALUE(eps >= 0, "eps is ", eps, "; expected a non-negative number");
}

// Output dtype of the RMSNorm forward: Llama multiplies a rounded x by w (type promotion), Gemma
// casts back to x's dtype.
at::ScalarType rms_norm_out_dtype(const at::Tensor& x, const at::Tensor& weight, bool gemma) {
  return gemma ? x.scalar_type() : c10::promoteTypes(x.scalar_type(), weight.scalar_type());
}

at::Tensor acc_rows_like(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_scalar_type(x)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  NvtxRange range("unsloth_ext::layer_norm_fwd");
  check_activation(x, "x");
  check_param(weight, x, "weight", "x");
  if (bias.has_value()) {
    check_param(*bias, x, "bias", "x");
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "bias has dtype ",
                     bias->scalar_type(), ", expected the weight's dtype ", weight.scalar_type());
  }
  check_eps(eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const Rows xr = as_rows(x);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = acc_rows_like(x);
  at::Tensor rstd = acc_rows_like(x);

  LayerNormFwdParams p{};
  p.x = xr.tensor.data_ptr();
  p.weight = w.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.mean = mean.data_ptr();
  p.rstd = rstd.data_ptr();
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.x_row_stride = xr.row_stride;
  p.eps = eps;
  p.x_dtype = to_dtype(x, "x");
  p.w_dtype = to_dtype(w, "weight");
  layer_norm_fwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias) {
  NvtxRange range("unsloth_ext::layer_norm_bwd");
  check_activation(x, "x");
  check_param(weight, x, "weight", "x");
  check_like(grad_y, x, x.scalar_type(), "grad_y", "x");
  check_row_stat(mean, x, "mean", "x");
  check_row_stat(rstd, x, "rstd", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Rows xr = as_rows(x);
  const Rows dyr = as_rows(grad_y);
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = mean.contiguous();
  const at::Tensor r = rstd.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = at::empty({xr.cols}, weight.options());
  std::optional<at::Tensor> db;
  if (has_bias) db = at::empty({xr.cols}, weight.options());

  NormBwdParams p{};
  p.dy = dyr.tensor.data_ptr();
  p.x = xr.tensor.data_ptr();
  p.weight = w.data_ptr();
  p.mean = m.data_ptr();
  p.rstd = r.data_ptr();
  p.dx = dx.data_ptr();
  p.dw = dw.data_ptr();
  p.db = has_bias ? db->data_ptr() : nullptr;
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.dy_row_stride = dyr.row_stride;
  p.x_row_stride = xr.row_stride;
  p.x_dtype = to_dtype(x, "x");
  p.w_dtype = to_dtype(w, "weight");
  p.dy_dtype = to_dtype(grad_y, "grad_y");
  at::Tensor partial = at::empty({norm_bwd_partial_rows(NormKind::kLayerNorm, p), xr.cols},
                                 x.options().dtype(acc_scalar_type(x)));
  p.partial = partial.data_ptr();
  norm_bwd_launch(NormKind::kLayerNorm, p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw, db};
}

namespace {

// RMSNorm of x, or of x + residual (also returned, undefined without a residual). y's rows are
// followed by y_pad columns of its allocation that nothing writes (room for a caller's own
// columns, see rms_norm_fwd's schema).
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
    double eps, bool gemma, int64_t y_pad) {
  check_activation(x, "x");
  if (residual.has_value()) check_like(*residual, x, x.scalar_type(), "residual", "x");
  check_param(weight, x, "weight", "x");
  check_eps(eps);
  TORCH_CHECK_VALUE(y_pad >= 0, "y_pad is ", y_pad, "; expected a non-negative number");
  const c10::cuda::CUDAGuard guard(x.device());
  const Rows xr = as_rows(x);
  const Rows rr = residual.has_value() ? as_rows(*residual) : Rows{at::Tensor(), xr.rows, xr.cols, 0};
  const at::Tensor w = weight.contiguous();
  std::vector<int64_t> padded = x.sizes().vec();
  padded.back() += y_pad;
  const at::Tensor y = at::empty(padded, x.options().dtype(rms_norm_out_dtype(x, weight, gemma)))
                           .narrow(-1, 0, xr.cols);
  at::Tensor residual_out = residual.has_value() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor rstd = acc_rows_like(x);

  RMSNormFwdParams p{};
  p.x = xr.tensor.data_ptr();
  p.residual = rr.tensor.defined() ? rr.tensor.data_ptr() : nullptr;
  p.weight = w.data_ptr();
  p.y = y.data_ptr();
  p.residual_out = residual_out.defined() ? residual_out.data_ptr() : nullptr;
  p.rstd = rstd.data_ptr();
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.x_row_stride = xr.row_stride;
  p.residual_row_stride = rr.row_stride;
  p.y_row_stride = xr.cols + y_pad;
  p.eps = eps;
  p.gemma = gemma;
  p.x_dtype = to_dtype(x, "x");
  p.w_dtype = to_dtype(w, "weight");
  p.y_dtype = to_dtype(y, "y");
  rms_norm_fwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, residual_out, rstd};
}

// The RMSNorm backward for s (x, or the residual sum), plus dres when given.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& dres, const at::Tensor& s,
    const at::Tensor& weight, const at::Tensor& rstd, bool gemma, const char* s_name,
    const char* dres_name) {
  check_activation(s, s_name);
  check_param(weight, s, "weight", s_name);
  check_like(grad_y, s, rms_norm_out_dtype(s, weight, gemma), "grad_y", s_name);
  if (dres.has_value()) check_like(*dres, s, s.scalar_type(), dres_name, s_name);
  check_row_stat(rstd, s, "rstd", s_name);
  const c10::cuda::CUDAGuard guard(s.device());
  const Rows sr = as_rows(s);
  const Rows dyr = as_rows(grad_y);
  // Without dres, its tensor stays undefined and the kernels add nothing.
  const Rows dr = dres.has_value() ? as_rows(*dres) : Rows{at::Tensor(), sr.rows, sr.cols, sr.cols};
  const at::Tensor w = weight.contiguous();
  const at::Tensor r = rstd.contiguous();
  at::Tensor dx = at::empty(s.sizes(), s.options());
  at::Tensor dw = at::empty({sr.cols}, weight.options());

  NormBwdParams p{};
  p.dy = dyr.tensor.data_ptr();
  p.x = sr.tensor.data_ptr();
  p.weight = w.data_ptr();
  p.rstd = r.data_ptr();
  p.dres = dr.tensor.defined() ? dr.tensor.data_ptr() : nullptr;
  p.dx = dx.data_ptr();
  p.dw = dw.data_ptr();
  p.rows = sr.rows;
  p.cols = sr.cols;
  p.dy_row_stride = dyr.row_stride;
  p.x_row_stride = sr.row_stride;
  p.dres_row_stride = dr.row_stride;
  p.gemma = gemma;
  p.x_dtype = to_dtype(s, s_name);
  p.w_dtype = to_dtype(w, "weight");
  p.dy_dtype = to_dtype(grad_y, "grad_y");
  at::Tensor partial = at::empty({norm_bwd_partial_rows(NormKind::kRMSNorm, p), sr.cols},
                                 s.options().dtype(acc_scalar_type(s)));
  p.partial = partial.data_ptr();
  norm_bwd_launch(NormKind::kRMSNorm, p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, dw};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, bool gemma, int64_t y_pad) {
  NvtxRange range("unsloth_ext::rms_norm_fwd");
  auto [y, residual_out, rstd] = rms_norm_forward(x, std::nullopt, weight, eps, gemma, y_pad);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                bool gemma) {
  NvtxRange range("unsloth_ext::rms_norm_bwd");
  return rms_norm_backward(grad_y, std::nullopt, x, weight, rstd, gemma, "x", "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x,
                                                                const at::Tensor& residual,
                                                                const at::Tensor& weight,
                                                                double eps, bool gemma,
                                                                int64_t y_pad) {
  NvtxRange range("unsloth_ext::add_rms_norm_fwd");
  return rms_norm_forward(x, residual, weight, eps, gemma, y_pad);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const at::Tensor& weight, const at::Tensor& rstd, bool gemma) {
  NvtxRange range("unsloth_ext::add_rms_norm_bwd");
  return rms_norm_backward(grad_y, grad_residual_out, residual_out, weight, rstd, gemma,
                           "residual_out", "grad_residual_out");
}

}  // namespace unsloth_ext
