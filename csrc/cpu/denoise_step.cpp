// denoise_step on the CPU: the step's constants once per sample, then a flat loop over
// the sample's values that the compiler vectorises.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <type_traits>

#include "checks.h"
#include "cpu/serial_lanes.h"
#include "math/denoise_step.h"

namespace softmix::cpu {
namespace {

// The loop both passes share: parallel over samples, the step's constants once per sample,
// then element(c, k) for each of the sample's values in a loop the compiler vectorises.
template <typename acc_t, typename Element>
void for_each_step_element(const DenoiseStepSizes& n, const acc_t* a_t, const acc_t* a_prev, double eta,
                           math::PredictionType type, const Element& element) {
  at::parallel_for(0, n.B, grain_for(n.K), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto c = math::step_coefficients<acc_t>(a_t[b], a_prev[b], static_cast<acc_t>(eta), type);
      const int64_t offset = b * n.K;
      SOFTMIX_SIMD
      for (int64_t k = offset; k < offset + n.K; ++k) element(c, k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> denoise_step(const at::Tensor& x_t_in, const at::Tensor& model_output_in,
                                                const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                                const std::optional<at::Tensor>& noise_in, double eta,
                                                std::string_view prediction_type, std::optional<double> clip_sample) {
  const DenoiseStepSizes n =
      check_denoise_step(x_t_in, model_output_in, alpha_bar_t, alpha_bar_prev, noise_in, eta, clip_sample);
  const math::PredictionType type = parse_prediction_type(prediction_type);
  const at::ScalarType acc_type = accumulate_type(x_t_in.scalar_type());
  const at::Tensor x_t = x_t_in.contiguous(), model_output = model_output_in.contiguous();
  const at::Tensor a_t = alpha_bar_t.to(acc_type).contiguous(), a_prev = alpha_bar_prev.to(acc_type).contiguous();
  const std::optional<at::Tensor> noise =
      noise_in.has_value() ? std::optional<at::Tensor>(noise_in->contiguous()) : std::nullopt;
  at::Tensor x_prev = at::empty_like(x_t), x0 = at::empty_like(x_t);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "denoise_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *x_ptr = x_t.const_data_ptr<scalar_t>(), *m_ptr = model_output.const_data_ptr<scalar_t>();
    const scalar_t* noise_ptr = noise.has_value() ? noise->const_data_ptr<scalar_t>() : nullptr;
    const acc_t *a_ptr = a_t.const_data_ptr<acc_t>(), *a_prev_ptr = a_prev.const_data_ptr<acc_t>();
    scalar_t *x_prev_ptr = x_prev.mutable_data_ptr<scalar_t>(), *x0_ptr = x0.mutable_data_ptr<scalar_t>();
    const bool clip = clip_sample.has_value();
    const acc_t clip_bound = static_cast<acc_t>(clip_sample.value_or(0));
    for_each_step_element(n, a_ptr, a_prev_ptr, eta, type, [&](const auto& c, int64_t k) {
      const acc_t noise_k = noise_ptr ? static_cast<acc_t>(noise_ptr[k]) : acc_t(0);
      acc_t prev, x0_k;
      math::step_element(c, static_cast<acc_t>(x_ptr[k]), static_cast<acc_t>(m_ptr[k]), noise_k, clip, clip_bound,
                         prev, x0_k);
      x_prev_ptr[k] = static_cast<scalar_t>(prev);
      x0_ptr[k] = static_cast<scalar_t>(x0_k);
    });
  });
  return {x_prev, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_step_backward(
    const at::Tensor& grad_x_prev_in, const at::Tensor& grad_x0_in, const at::Tensor& x_t_in,
    const at::Tensor& model_output_in, const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev, double eta,
    std::string_view prediction_type, std::optional<double> clip_sample, bool need_grad_noise) {
  const DenoiseStepSizes n =
      check_denoise_step(x_t_in, model_output_in, alpha_bar_t, alpha_bar_prev, std::nullopt, eta, clip_sample);
  check_denoise_step_grads(grad_x_prev_in, grad_x0_in, x_t_in);
  const math::PredictionType type = parse_prediction_type(prediction_type);
  const at::ScalarType dtype = x_t_in.scalar_type(), acc_type = accumulate_type(dtype);
  const at::Tensor x_t = x_t_in.contiguous(), model_output = model_output_in.contiguous();
  const at::Tensor grad_x_prev = grad_x_prev_in.to(dtype).contiguous(), grad_x0 = grad_x0_in.to(dtype).contiguous();
  const at::Tensor a_t = alpha_bar_t.to(acc_type).contiguous(), a_prev = alpha_bar_prev.to(acc_type).contiguous();
  at::Tensor grad_x = at::empty_like(x_t), grad_model = at::empty_like(x_t);
  at::Tensor grad_noise = gradient_like(x_t, need_grad_noise);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "denoise_step_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *x_ptr = x_t.const_data_ptr<scalar_t>(), *m_ptr = model_output.const_data_ptr<scalar_t>(),
                   *g_prev_ptr = grad_x_prev.const_data_ptr<scalar_t>(), *g_x0_ptr = grad_x0.const_data_ptr<scalar_t>();
    const acc_t *a_ptr = a_t.const_data_ptr<acc_t>(), *a_prev_ptr = a_prev.const_data_ptr<acc_t>();
    scalar_t *grad_x_ptr = grad_x.mutable_data_ptr<scalar_t>(), *grad_m_ptr = grad_model.mutable_data_ptr<scalar_t>(),
             *grad_n_ptr = need_grad_noise ? grad_noise.mutable_data_ptr<scalar_t>() : nullptr;
    const bool clip = clip_sample.has_value();
    const acc_t clip_bound = static_cast<acc_t>(clip_sample.value_or(0));
    // the grad_noise store is a template choice: a conditional store leaves the loop scalar
    auto run = [&](auto write_noise) {
      for_each_step_element(n, a_ptr, a_prev_ptr, eta, type, [&](const auto& c, int64_t k) {
        acc_t gx, gm, gn;
        math::step_element_backward(c, static_cast<acc_t>(x_ptr[k]), static_cast<acc_t>(m_ptr[k]), clip, clip_bound,
                                    static_cast<acc_t>(g_prev_ptr[k]), static_cast<acc_t>(g_x0_ptr[k]), gx, gm, gn);
        grad_x_ptr[k] = static_cast<scalar_t>(gx);
        grad_m_ptr[k] = static_cast<scalar_t>(gm);
        if constexpr (decltype(write_noise)::value) grad_n_ptr[k] = static_cast<scalar_t>(gn);
      });
    };
    if (need_grad_noise) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {grad_x, grad_model, grad_noise};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CPU, m) {
  m.impl("denoise_step", &denoise_step);
  m.impl("denoise_step_backward", &denoise_step_backward);
}

}  // namespace softmix::cpu
