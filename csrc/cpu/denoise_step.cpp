// denoise_step on the CPU: the step's constants once per sample, then a flat loop over
// the sample's values that the compiler vectorises; the noise given, or drawn here from a seed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>

#include "checks.h"
#include "cpu/serial_lanes.h"
#include "math/denoise_step.h"
#include "math/normal_noise.h"

namespace softmix::cpu {
namespace {

// Noise drawn in the kernel (a seed given) is made a chunk at a time, in L1 beside the step:
// the chunk's Philox words in a scalar loop (its 64-bit products vectorise poorly: slower
// than scalar with AVX2), then Box-Muller over the chunk in a loop that vectorises, built
// for AVX2 + FMA and for the baseline, picked at load time.
constexpr int64_t kNoiseChunk = 2048;  // values

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SOFTMIX_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define SOFTMIX_CPU_CLONES
#endif

SOFTMIX_CPU_CLONES void box_muller_all(const uint32_t* words, int64_t pairs, float* normals) {
  SOFTMIX_SIMD
  for (int64_t j = 0; j < pairs; ++j) {
    math::box_muller(words[2 * j], words[2 * j + 1], normals[2 * j], normals[2 * j + 1]);
  }
}

struct NoiseChunk {
  alignas(64) uint32_t words[kNoiseChunk + 8];
  alignas(64) float normals[kNoiseChunk + 8];
  int64_t first;  // the element whose noise is normals[0]: the first of its Philox block

  // Draws the noise of elements [k0, k1), k1 - k0 <= kNoiseChunk: whole Philox blocks from
  // the one holding k0, so noise(k) = normals[k - first] whatever the chunking.
  void draw(uint64_t seed, int64_t k0, int64_t k1) {
    const int64_t block0 = k0 / 4, blocks = (k1 - 1) / 4 - block0 + 1;
    first = 4 * block0;
    for (int64_t j = 0; j < blocks; ++j) {
      const math::PhiloxWords r = math::philox4x32_10(static_cast<uint64_t>(block0 + j), seed);
      words[4 * j] = r.w0;
      words[4 * j + 1] = r.w1;
      words[4 * j + 2] = r.w2;
      words[4 * j + 3] = r.w3;
    }
    box_muller_all(words, 2 * blocks, normals);
  }
};

// The loop both passes share: parallel over samples, the step's constants once per sample,
// then element(c, k, noise_k) for each of the sample's values, a chunk at a time, in a loop
// the compiler vectorises. With kDrawsNoise, noise_k is drawn here from `seed`; otherwise 0
// (and the element reads its noise, if any, itself).
template <bool kDrawsNoise, typename acc_t, typename Element>
void for_each_step_element(const DenoiseStepSizes& n, const acc_t* a_t, const acc_t* a_prev, double eta,
                           math::PredictionType type, uint64_t seed, const Element& element) {
  at::parallel_for(0, n.B, grain_for(n.K), [&](int64_t begin, int64_t end) {
    std::unique_ptr<NoiseChunk> noise = kDrawsNoise ? std::make_unique<NoiseChunk>() : nullptr;
    for (int64_t b = begin; b < end; ++b) {
      const auto c = math::step_coefficients<acc_t>(a_t[b], a_prev[b], static_cast<acc_t>(eta), type);
      for (int64_t k0 = b * n.K; k0 < (b + 1) * n.K; k0 += kNoiseChunk) {
        const int64_t k1 = std::min(k0 + kNoiseChunk, (b + 1) * n.K);
        if constexpr (kDrawsNoise) {
          noise->draw(seed, k0, k1);
          const float* normals = noise->normals + (k0 - noise->first);  // noise of k0 on
          SOFTMIX_SIMD
          for (int64_t k = k0; k < k1; ++k) element(c, k, static_cast<acc_t>(normals[k - k0]));
        } else {
          SOFTMIX_SIMD
          for (int64_t k = k0; k < k1; ++k) element(c, k, acc_t(0));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> denoise_step(const at::Tensor& x_t_in, const at::Tensor& model_output_in,
                                                const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                                const std::optional<at::Tensor>& noise_in, double eta,
                                                std::string_view prediction_type, std::optional<double> clip_sample,
                                                std::optional<int64_t> seed) {
  const DenoiseStepSizes n =
      check_denoise_step(x_t_in, model_output_in, alpha_bar_t, alpha_bar_prev, noise_in, eta, clip_sample, seed);
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
    const auto element = [&](const auto& c, int64_t k, acc_t drawn_noise) {
      const acc_t noise_k = noise_ptr ? static_cast<acc_t>(noise_ptr[k]) : drawn_noise;
      acc_t prev, x0_k;
      math::step_element(c, static_cast<acc_t>(x_ptr[k]), static_cast<acc_t>(m_ptr[k]), noise_k, clip, clip_bound,
                         prev, x0_k);
      x_prev_ptr[k] = static_cast<scalar_t>(prev);
      x0_ptr[k] = static_cast<scalar_t>(x0_k);
    };
    if (seed.has_value()) {
      for_each_step_element<true>(n, a_ptr, a_prev_ptr, eta, type, static_cast<uint64_t>(*seed), element);
    } else {
      for_each_step_element<false>(n, a_ptr, a_prev_ptr, eta, type, 0, element);
    }
  });
  return {x_prev, x0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> denoise_step_backward(
    const at::Tensor& grad_x_prev_in, const at::Tensor& grad_x0_in, const at::Tensor& x_t_in,
    const at::Tensor& model_output_in, const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev, double eta,
    std::string_view prediction_type, std::optional<double> clip_sample, bool need_grad_noise) {
  const DenoiseStepSizes n =
      check_denoise_step(x_t_in, model_output_in, alpha_bar_t, alpha_bar_prev, std::nullopt, eta, clip_sample,
                         std::nullopt);
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
      for_each_step_element<false>(n, a_ptr, a_prev_ptr, eta, type, 0, [&](const auto& c, int64_t k, acc_t) {
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
