// The one registration point: every op's schema, and its CUDA implementation.
#include <Python.h>
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(unsloth_ext, m) {
  // y_pad: y's rows lie that many columns apart beyond its width, in one allocation (room the
  // caller may fill with columns of its own, e.g. to widen a matrix product's K).
  m.def(
      "rms_norm_fwd(Tensor x, Tensor weight, float eps, bool gemma, int y_pad=0) "
      "-> (Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool gemma) "
      "-> (Tensor grad_x, Tensor grad_weight)");
  m.def(
      "rope_fwd(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, Tensor position_ids) -> ()");
  m.def(
      "rope_bwd(Tensor(a!) grad_q, Tensor(b!) grad_k, Tensor cos, Tensor sin, "
      "Tensor position_ids) -> ()");
  m.def("swiglu_fwd(Tensor e, Tensor g) -> Tensor h");
  m.def("swiglu_bwd(Tensor grad_h, Tensor e, Tensor g) -> (Tensor grad_e, Tensor grad_g)");
  m.def(
      "swiglu_bwd_(Tensor(c!) grad_h, Tensor(a!) e, Tensor(b!) g, bool store_h=False) -> ()");
  m.def("geglu_fwd(Tensor e, Tensor g, str approximate) -> Tensor h");
  m.def(
      "geglu_bwd(Tensor grad_h, Tensor e, Tensor g, str approximate) "
      "-> (Tensor grad_e, Tensor grad_g)");
  m.def(
      "geglu_bwd_(Tensor(c!) grad_h, Tensor(a!) e, Tensor(b!) g, str approximate, "
      "bool store_h=False) -> ()");
  m.def(
      "layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps) "
      "-> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor rstd, "
      "bool has_bias) -> (Tensor grad_x, Tensor grad_weight, Tensor? grad_bias)");
  m.def(
      "add_rms_norm_fwd(Tensor x, Tensor residual, Tensor weight, float eps, bool gemma, "
      "int y_pad=0) -> (Tensor y, Tensor residual_out, Tensor rstd)");
  m.def(
      "add_rms_norm_bwd(Tensor grad_y, Tensor? grad_residual_out, Tensor residual_out, "
      "Tensor weight, Tensor rstd, bool gemma) -> (Tensor grad_x, Tensor grad_weight)");
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor labels, int vocab_start, int vocab_size, "
      "int ignore_index, float logit_scale, float softcap, float label_smoothing) "
      "-> (Tensor lse, Tensor target)");
  m.def(
      "cross_entropy_bwd(Tensor grad_lse, Tensor grad_target, Tensor logits, Tensor labels, "
      "Tensor lse, int vocab_start, int vocab_size, int ignore_index, float logit_scale, "
      "float softcap, float label_smoothing) -> Tensor grad_logits");
  m.def(
      "cross_entropy_bwd_(Tensor grad_lse, Tensor grad_target, Tensor(a!) logits, Tensor labels, "
      "Tensor lse, int vocab_start, int vocab_size, int ignore_index, float logit_scale, "
      "float softcap, float label_smoothing) -> ()");
  m.def(
      "cross_entropy_fwd_bwd_(Tensor(a!) logits, Tensor labels, Tensor grad_scale, "
      "int ignore_index, float logit_scale, float softcap, float label_smoothing) -> Tensor loss");
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, float offset, "
      "int blocksize, Tensor(a!) out) -> ()");
  m.def(
      "nf4_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor? absmax2, Tensor? code2, "
      "float offset, int blocksize, int out_features, Tensor? lora_a, Tensor? lora_b, "
      "float lora_scale) -> Tensor y");
}

TORCH_LIBRARY_IMPL(unsloth_ext, CUDA, m) {
  m.impl("rms_norm_fwd", &unsloth_ext::rms_norm_fwd);
  m.impl("rms_norm_bwd", &unsloth_ext::rms_norm_bwd);
  m.impl("rope_fwd", &unsloth_ext::rope_fwd);
  m.impl("rope_bwd", &unsloth_ext::rope_bwd);
  m.impl("swiglu_fwd", &unsloth_ext::swiglu_fwd);
  m.impl("swiglu_bwd", &unsloth_ext::swiglu_bwd);
  m.impl("swiglu_bwd_", &unsloth_ext::swiglu_bwd_);
  m.impl("geglu_fwd", &unsloth_ext::geglu_fwd);
  m.impl("geglu_bwd", &unsloth_ext::geglu_bwd);
  m.impl("geglu_bwd_", &unsloth_ext::geglu_bwd_);
  m.impl("layer_norm_fwd", &unsloth_ext::layer_norm_fwd);
  m.impl("layer_norm_bwd", &unsloth_ext::layer_norm_bwd);
  m.impl("add_rms_norm_fwd", &unsloth_ext::add_rms_norm_fwd);
  m.impl("add_rms_norm_bwd", &unsloth_ext::add_rms_norm_bwd);
  m.impl("cross_entropy_fwd", &unsloth_ext::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &unsloth_ext::cross_entropy_bwd);
  m.impl("cross_entropy_bwd_", &unsloth_ext::cross_entropy_bwd_);
  m.impl("cross_entropy_fwd_bwd_", &unsloth_ext::cross_entropy_fwd_bwd_);
  m.impl("nf4_dequantize", &unsloth_ext::nf4_dequantize);
  m.impl("nf4_gemv", &unsloth_ext::nf4_gemv);
}

// `import unsloth_ext._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "unsloth_ext CUDA kernels", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
