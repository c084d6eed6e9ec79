// Argument validation shared by the CPU and CUDA entry points, so that both devices
// reject bad input with the same message. Every message starts with the operator's name
// and names the argument and the shapes involved.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "math/denoise_step.h"
#include "math/mc_loss.h"

namespace softmix {

struct LatentTransformSizes {
  int64_t L, N, D;
  bool per_position_s;  // s is (L, N) rather than (L,)
};

struct McLossSizes {
  int64_t M, B, K;  // samples, examples, values per example
};

struct DenoiseStepSizes {
  int64_t B, K;  // samples, values per sample
};

LatentTransformSizes check_latent_transform(const at::Tensor& r, const at::Tensor& v, const at::Tensor& s);
void check_latent_transform_grad(const at::Tensor& grad_y, const at::Tensor& r);

math::Bound parse_bound(std::string_view bound);
McLossSizes check_mc_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                          double temperature, const std::optional<at::Tensor>& log_weights);
void check_mc_loss_grad(const at::Tensor& grad_loss, const at::Tensor& errors, const McLossSizes& sizes,
                        const at::Tensor& pred, const std::optional<at::Tensor>& log_weights,
                        bool need_grad_log_weights);

math::PredictionType parse_prediction_type(std::string_view prediction_type);
DenoiseStepSizes check_denoise_step(const at::Tensor& x_t, const at::Tensor& model_output,
                                    const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                    const std::optional<at::Tensor>& noise, double eta,
                                    std::optional<double> clip_sample, std::optional<int64_t> seed);
void check_denoise_step_grads(const at::Tensor& grad_x_prev, const at::Tensor& grad_x0, const at::Tensor& x_t);

// The float dtype in which a kernel accumulates values of `dtype` (float for half types).
at::ScalarType accumulate_type(at::ScalarType dtype);

// A backward kernel's optional output: like `like` when the gradient is needed, else an
// empty (0,) tensor that the kernel does not write (its data pointer is then null).
at::Tensor gradient_like(const at::Tensor& like, bool needed);

}  // namespace softmix
