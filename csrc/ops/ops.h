// Host entries of every op: argument checks, device guard, launch on the current stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace unsloth_ext {

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, bool gemma);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                bool gemma);

}  // namespace unsloth_ext
