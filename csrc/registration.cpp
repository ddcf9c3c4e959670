// The one registration point: every op's schema, and its CUDA implementation.
#include <Python.h>
#include <torch/library.h>

#include "ops/ops.h"

TORCH_LIBRARY(unsloth_ext, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps, bool gemma) -> (Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, bool gemma) "
      "-> (Tensor grad_x, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(unsloth_ext, CUDA, m) {
  m.impl("rms_norm_fwd", &unsloth_ext::rms_norm_fwd);
  m.impl("rms_norm_bwd", &unsloth_ext::rms_norm_bwd);
}

// `import unsloth_ext._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "unsloth_ext CUDA kernels", -1,
                                   nullptr};
  return PyModule_Create(&module_def);
}
