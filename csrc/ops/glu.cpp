#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>

#include "core/tensor_checks.h"
#include "kernels/glu.h"
#include "ops/ops.h"

namespace unsloth_ext {
namespace {

GluActivation gelu_activation(c10::string_view approximate) {
  if (approximate == "none") return GluActivation::kGeluErf;
  TORCH_CHECK_VALUE(approximate == "tanh", "approximate is '", approximate,
                    "'; expected 'none' or 'tanh'");
  return GluActivation::kGeluTanh;
}

void check_glu_inputs(const at::Tensor& e, const at::Tensor& g) {
  check_cuda(e, "e");
  check_same_device(g, e, "g", "e");
  check_nonempty(e, "e");
  to_dtype(e, "e");
  TORCH_CHECK_VALUE(g.sizes() == e.sizes(), "g has shape ", g.sizes(), ", expected the shape of e ",
                    e.sizes());
  TORCH_CHECK_TYPE(g.scalar_type() == e.scalar_type(), "g has dtype ", g.scalar_type(),
                   ", expected the dtype of e (", e.scalar_type(), ")");
}

void check_grad_h(const at::Tensor& grad_h, const at::Tensor& e) {
  check_same_device(grad_h, e, "grad_h", "e");
  TORCH_CHECK_VALUE(grad_h.sizes() == e.sizes(), "grad_h has shape ", grad_h.sizes(),
                    ", expected the shape of e ", e.sizes());
  TORCH_CHECK_TYPE(grad_h.scalar_type() == e.scalar_type(), "grad_h has dtype ",
                   grad_h.scalar_type(), ", expected the dtype of e (", e.scalar_type(), ")");
}

// The in-place backward overwrites e and g: each must be writable element by element and share
// no memory with the other operands. Views whose overlap ATen cannot decide (the two strided
// halves of one buffer, say) are accepted, as ATen's own in-place ops accept them.
void check_writable(const at::Tensor& t, const char* name, const at::Tensor& other,
                    const char* other_name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " has elements that share memory (an expanded view?); the in-place backward "
                    "writes every element of it");
  const at::MemOverlapStatus status = at::get_overlap_status(t, other);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                    name, " and ", other_name, " share memory; the in-place backward overwrites ",
                    name, ", expected separate buffers");
}

// Operands as rows of their last dimension; the rows of e decide the shape. When every operand's
// rows are back to back, the whole tensor is one row (the kernels then ignore row strides): one
// walk over all elements, no per-row remainder.
struct GluShape {
  int64_t rows;
  int64_t cols;
};

GluShape glu_shape(const Rows& e, std::initializer_list<const Rows*> operands) {
  for (const Rows* r : operands) {
    if (r->row_stride != r->cols) return {e.rows, e.cols};
  }
  return {1, e.rows * e.cols};
}

at::Tensor glu_fwd(const at::Tensor& e, const at::Tensor& g, GluActivation act) {
  check_glu_inputs(e, g);
  const c10::cuda::CUDAGuard guard(e.device());
  const Rows er = as_rows(e);
  const Rows gr = as_rows(g);
  at::Tensor h = at::empty(e.sizes(), e.options());
  const Rows hr{h, er.rows, er.cols, er.cols};
  const GluShape shape = glu_shape(er, {&er, &gr, &hr});

  GluFwdParams p{};
  p.e = er.tensor.data_ptr();
  p.g = gr.tensor.data_ptr();
  p.h = h.data_ptr();
  p.rows = shape.rows;
  p.cols = shape.cols;
  p.e_row_stride = er.row_stride;
  p.g_row_stride = gr.row_stride;
  p.h_row_stride = hr.row_stride;
  p.act = act;
  p.dtype = to_dtype(e, "e");
  glu_fwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

// The backward over row views; grad_e and grad_g may be the rows of e and g themselves, and hr
// (nullptr: h not written) those of grad_h.
void glu_bwd(const Rows& dhr, const Rows& er, const Rows& gr, const Rows& der, const Rows& dgr,
             const Rows* hr, GluActivation act) {
  const GluShape shape = hr == nullptr ? glu_shape(er, {&dhr, &er, &gr, &der, &dgr})
                                       : glu_shape(er, {&dhr, &er, &gr, &der, &dgr, hr});
  GluBwdParams p{};
  p.grad_h = dhr.tensor.data_ptr();
  p.e = er.tensor.data_ptr();
  p.g = gr.tensor.data_ptr();
  p.grad_e = der.tensor.data_ptr();
  p.grad_g = dgr.tensor.data_ptr();
  p.h = hr == nullptr ? nullptr : hr->tensor.data_ptr();
  p.rows = shape.rows;
  p.cols = shape.cols;
  p.grad_h_row_stride = dhr.row_stride;
  p.e_row_stride = er.row_stride;
  p.g_row_stride = gr.row_stride;
  p.grad_e_row_stride = der.row_stride;
  p.grad_g_row_stride = dgr.row_stride;
  p.h_row_stride = hr == nullptr ? 0 : hr->row_stride;
  p.act = act;
  p.dtype = to_dtype(er.tensor, "e");
  glu_bwd_launch(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_out(const at::Tensor& grad_h, const at::Tensor& e,
                                               const at::Tensor& g, GluActivation act) {
  check_glu_inputs(e, g);
  check_grad_h(grad_h, e);
  const c10::cuda::CUDAGuard guard(e.device());
  const Rows er = as_rows(e);
  at::Tensor grad_e = at::empty(e.sizes(), e.options());
  at::Tensor grad_g = at::empty(g.sizes(), g.options());
  glu_bwd(as_rows(grad_h), er, as_rows(g), Rows{grad_e, er.rows, er.cols, er.cols},
          Rows{grad_g, er.rows, er.cols, er.cols}, nullptr, act);
  return {grad_e, grad_g};
}

// An operand without a row layout is computed in a contiguous copy, then copied back. store_h:
// grad_h receives h.
void glu_bwd_inplace(at::Tensor& grad_h, at::Tensor& e, at::Tensor& g, bool store_h,
                     GluActivation act) {
  check_glu_inputs(e, g);
  check_grad_h(grad_h, e);
  check_writable(e, "e", g, "g");
  check_writable(g, "g", e, "e");
  check_writable(e, "e", grad_h, "grad_h");
  check_writable(g, "g", grad_h, "grad_h");
  if (store_h) TORCH_CHECK_VALUE(at::has_internal_overlap(grad_h) != at::MemOverlap::Yes,
                                 "grad_h has elements that share memory (an expanded view?); "
                                 "with store_h the in-place backward writes h into it");
  const c10::cuda::CUDAGuard guard(e.device());
  const Rows dhr = as_rows(grad_h);
  const Rows er = as_rows(e);
  const Rows gr = as_rows(g);
  glu_bwd(dhr, er, gr, er, gr, store_h ? &dhr : nullptr, act);
  if (!er.tensor.is_same(e)) e.copy_(er.tensor);
  if (!gr.tensor.is_same(g)) g.copy_(gr.tensor);
  if (store_h && !dhr.tensor.is_same(grad_h)) grad_h.copy_(dhr.tensor);
}

}  // namespace

at::Tensor swiglu_fwd(const at::Tensor& e, const at::Tensor& g) {
  NvtxRange range("unsloth_ext::swiglu_fwd");
  return glu_fwd(e, g, GluActivation::kSilu);
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_h, const at::Tensor& e,
                                              const at::Tensor& g) {
  NvtxRange range("unsloth_ext::swiglu_bwd");
  return glu_bwd_out(grad_h, e, g, GluActivation::kSilu);
}

void swiglu_bwd_(at::Tensor& grad_h, at::Tensor& e, at::Tensor& g, bool store_h) {
  NvtxRange range("unsloth_ext::swiglu_bwd_");
  glu_bwd_inplace(grad_h, e, g, store_h, GluActivation::kSilu);
}

at::Tensor geglu_fwd(const at::Tensor& e, const at::Tensor& g, c10::string_view approximate) {
  NvtxRange range("unsloth_ext::geglu_fwd");
  return glu_fwd(e, g, gelu_activation(approximate));
}

std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& grad_h, const at::Tensor& e,
                                             const at::Tensor& g, c10::string_view approximate) {
  NvtxRange range("unsloth_ext::geglu_bwd");
  return glu_bwd_out(grad_h, e, g, gelu_activation(approximate));
}

void geglu_bwd_(at::Tensor& grad_h, at::Tensor& e, at::Tensor& g, c10::string_view approximate,
                bool store_h) {
  NvtxRange range("unsloth_ext::geglu_bwd_");
  glu_bwd_inplace(grad_h, e, g, store_h, gelu_activation(approximate));
}

}  // namespace unsloth_ext
