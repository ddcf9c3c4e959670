// Host entries of every op: argument checks, device guard, launch on the current stream.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace unsloth_ext {

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                double eps, bool gemma, int64_t y_pad);
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& rstd,
                                                bool gemma);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps);
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool has_bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x,
                                                                const at::Tensor& residual,
                                                                const at::Tensor& weight,
                                                                double eps, bool gemma,
                                                                int64_t y_pad);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_bwd(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& residual_out, const at::Tensor& weight, const at::Tensor& rstd, bool gemma);
void rope_fwd(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
              const at::Tensor& position_ids);
void rope_bwd(at::Tensor& grad_q, at::Tensor& grad_k, const at::Tensor& cos,
              const at::Tensor& sin, const at::Tensor& position_ids);
at::Tensor swiglu_fwd(const at::Tensor& e, const at::Tensor& g);
std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad_h, const at::Tensor& e,
                                              const at::Tensor& g);
void swiglu_bwd_(at::Tensor& grad_h, at::Tensor& e, at::Tensor& g, bool store_h);
at::Tensor geglu_fwd(const at::Tensor& e, const at::Tensor& g, c10::string_view approximate);
std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& grad_h, const at::Tensor& e,
                                             const at::Tensor& g, c10::string_view approximate);
void geglu_bwd_(at::Tensor& grad_h, at::Tensor& e, at::Tensor& g, c10::string_view approximate,
                bool store_h);
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits,
                                                     const at::Tensor& labels, int64_t vocab_start,
                                                     int64_t vocab_size, int64_t ignore_index,
                                                     double logit_scale, double softcap,
                                                     double label_smoothing);
at::Tensor cross_entropy_bwd(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                             const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t vocab_start, int64_t vocab_size,
                             int64_t ignore_index, double logit_scale, double softcap,
                             double label_smoothing);
void cross_entropy_bwd_(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                        at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                        int64_t vocab_start, int64_t vocab_size, int64_t ignore_index,
                        double logit_scale, double softcap, double label_smoothing);
at::Tensor cross_entropy_fwd_bwd_(at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& grad_scale, int64_t ignore_index,
                                  double logit_scale, double softcap, double label_smoothing);
void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                    const std::optional<at::Tensor>& absmax2,
                    const std::optional<at::Tensor>& code2, double offset, int64_t blocksize,
                    at::Tensor& out);
at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                    const std::optional<at::Tensor>& absmax2,
                    const std::optional<at::Tensor>& code2, double offset, int64_t blocksize,
                    int64_t out_features, const std::optional<at::Tensor>& lora_a,
                    const std::optional<at::Tensor>& lora_b, double lora_scale);

}  // namespace unsloth_ext
