// denoise_step on CUDA: a 2-D grid, samples along y and each sample's values along x, so a
// thread computes its sample's step constants once and then streams values, 16-byte packs of
// them when the rows allow (drawing each value's noise itself when given a seed).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "checks.h"
#include "cuda/lanes.cuh"
#include "math/denoise_step.h"
#include "math/normal_noise.h"

namespace softmix::cuda {
namespace {

constexpr int64_t kMaxGridY = 65535;

// Samples along y; along x, each sample's values in packs of `width`.
dim3 step_grid(int64_t B, int64_t K, int width) {
  const int64_t packs = K / width;
  const int64_t rows = std::min<int64_t>(B, kMaxGridY);
  const int64_t per_row = std::max<int64_t>(1, blocks_for(B * packs, kThreadsPerBlock) / rows);
  const int64_t cols = std::min<int64_t>(per_row, (packs + kThreadsPerBlock - 1) / kThreadsPerBlock);
  return dim3(static_cast<unsigned>(std::max<int64_t>(cols, 1)), static_cast<unsigned>(rows));
}

// Value k = b * K + kWidth * (pack index) + j of sample b; K is a multiple of kWidth.
template <typename scalar_t, typename acc_t, int kWidth>
__global__ void denoise_step_kernel(const scalar_t* __restrict__ x_t, const scalar_t* __restrict__ model_output,
                                    const scalar_t* __restrict__ noise, bool draws_noise, uint64_t seed,
                                    const acc_t* __restrict__ a_t, const acc_t* __restrict__ a_prev, int64_t B,
                                    int64_t K, acc_t eta,
                                    math::PredictionType type, bool clip, acc_t clip_bound,
                                    scalar_t* __restrict__ x_prev, scalar_t* __restrict__ x0) {
  using ScalarPack = Pack<scalar_t, kWidth>;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const auto c = math::step_coefficients<acc_t>(a_t[b], a_prev[b], eta, type);
    for (int64_t k = b * K + (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kWidth; k < (b + 1) * K;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x * kWidth) {
      const ScalarPack x = load_pack<scalar_t, kWidth>(x_t + k), model = load_pack<scalar_t, kWidth>(model_output + k);
      ScalarPack given;
      if (noise != nullptr) given = load_pack<scalar_t, kWidth>(noise + k);
      ScalarPack prev, x0_pack;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const acc_t noise_j = noise != nullptr ? static_cast<acc_t>(given.value[j])
                              : draws_noise   ? static_cast<acc_t>(math::normal_at(seed, static_cast<uint64_t>(k + j)))
                                              : acc_t(0);
        acc_t prev_j, x0_j;
        math::step_element(c, static_cast<acc_t>(x.value[j]), static_cast<acc_t>(model.value[j]), noise_j, clip,
                           clip_bound, prev_j, x0_j);
        prev.value[j] = static_cast<scalar_t>(prev_j);
        x0_pack.value[j] = static_cast<scalar_t>(x0_j);
      }
      store_pack(x_prev + k, prev);
      store_pack(x0 + k, x0_pack);
    }
  }
}

template <typename scalar_t, typename acc_t, int kWidth>
__global__ void denoise_step_backward_kernel(const scalar_t* __restrict__ grad_x_prev,
                                             const scalar_t* __restrict__ grad_x0, const scalar_t* __restrict__ x_t,
                                             const scalar_t* __restrict__ model_output,
                                             const acc_t* __restrict__ a_t, const acc_t* __restrict__ a_prev,
                                             int64_t B, int64_t K, acc_t eta, math::PredictionType type, bool clip,
                                             acc_t clip_bound, scalar_t* __restrict__ grad_x,
                                             scalar_t* __restrict__ grad_model, scalar_t* __restrict__ grad_noise) {
  using ScalarPack = Pack<scalar_t, kWidth>;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const auto c = math::step_coefficients<acc_t>(a_t[b], a_prev[b], eta, type);
    for (int64_t k = b * K + (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kWidth; k < (b + 1) * K;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x * kWidth) {
      const ScalarPack g_prev = load_pack<scalar_t, kWidth>(grad_x_prev + k),
                       g_x0 = load_pack<scalar_t, kWidth>(grad_x0 + k), x = load_pack<scalar_t, kWidth>(x_t + k),
                       model = load_pack<scalar_t, kWidth>(model_output + k);
      ScalarPack gx, gm, gn;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        acc_t gx_j, gm_j, gn_j;
        math::step_element_backward(c, static_cast<acc_t>(x.value[j]), static_cast<acc_t>(model.value[j]), clip,
                                    clip_bound, static_cast<acc_t>(g_prev.value[j]),
                                    static_cast<acc_t>(g_x0.value[j]), gx_j, gm_j, gn_j);
        gx.value[j] = static_cast<scalar_t>(gx_j);
        gm.value[j] = static_cast<scalar_t>(gm_j);
        gn.value[j] = static_cast<scalar_t>(gn_j);
      }
      store_pack(grad_x + k, gx);
      store_pack(grad_model + k, gm);
      if (grad_noise != nullptr) store_pack(grad_noise + k, gn);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> denoise_step(const at::Tensor& x_t_in, const at::Tensor& model_output_in,
                                                const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                                const std::optional<at::Tensor>& noise_in, double eta,
                                                std::string_view prediction_type, std::optional<double> clip_sample,
                                                std::optional<int64_t> seed) {
  const DenoiseStepSizes n =
      check_denoise_step(x_t_in, model_output_in, alpha_bar_t, alpha_bar_prev, noise_in, eta, clip_sample, seed);
  const math::PredictionType type = parse_prediction_type(prediction_type);
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  const at::ScalarType acc_type = accumulate_type(x_t_in.scalar_type());
  const at::Tensor x_t = x_t_in.contiguous(), model_output = model_output_in.contiguous();
  const at::Tensor a_t = alpha_bar_t.to(acc_type).contiguous(), a_prev = alpha_bar_prev.to(acc_type).contiguous();
  const at::Tensor noise = noise_in.has_value() ? noise_in->contiguous() : at::Tensor();
  at::Tensor x_prev = at::empty_like(x_t), x0 = at::empty_like(x_t);
  if (n.B == 0 || n.K == 0) return {x_prev, x0};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_t.scalar_type(), "denoise_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *x_t_ptr = x_t.const_data_ptr<scalar_t>(), *model_ptr = model_output.const_data_ptr<scalar_t>(),
                   *noise_ptr = noise.defined() ? noise.const_data_ptr<scalar_t>() : nullptr;
    scalar_t *x_prev_ptr = x_prev.mutable_data_ptr<scalar_t>(), *x0_ptr = x0.mutable_data_ptr<scalar_t>();
    with_packs<kPackWidth<scalar_t>>(
        n.K,
        [&](auto width) {
          constexpr int kWidth = decltype(width)::value;
          denoise_step_kernel<scalar_t, acc_t, kWidth>
              <<<step_grid(n.B, n.K, kWidth), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  x_t_ptr, model_ptr, noise_ptr, seed.has_value(), static_cast<uint64_t>(seed.value_or(0)),
                  a_t.const_data_ptr<acc_t>(), a_prev.const_data_ptr<acc_t>(), n.B, n.K, static_cast<acc_t>(eta),
                  type, clip_sample.has_value(), static_cast<acc_t>(clip_sample.value_or(0)), x_prev_ptr, x0_ptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        x_t_ptr, model_ptr, noise_ptr, x_prev_ptr, x0_ptr);
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
  const c10::cuda::CUDAGuard guard(x_t_in.device());
  const at::ScalarType dtype = x_t_in.scalar_type(), acc_type = accumulate_type(dtype);
  const at::Tensor x_t = x_t_in.contiguous(), model_output = model_output_in.contiguous();
  const at::Tensor grad_x_prev = grad_x_prev_in.to(dtype).contiguous(), grad_x0 = grad_x0_in.to(dtype).contiguous();
  const at::Tensor a_t = alpha_bar_t.to(acc_type).contiguous(), a_prev = alpha_bar_prev.to(acc_type).contiguous();
  at::Tensor grad_x = at::empty_like(x_t), grad_model = at::empty_like(x_t);
  at::Tensor grad_noise = gradient_like(x_t, need_grad_noise);
  if (n.B == 0 || n.K == 0) return {grad_x, grad_model, grad_noise};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "denoise_step_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *grad_x_prev_ptr = grad_x_prev.const_data_ptr<scalar_t>(),
                   *grad_x0_ptr = grad_x0.const_data_ptr<scalar_t>(), *x_t_ptr = x_t.const_data_ptr<scalar_t>(),
                   *model_ptr = model_output.const_data_ptr<scalar_t>();
    scalar_t *grad_x_ptr = grad_x.mutable_data_ptr<scalar_t>(),
             *grad_model_ptr = grad_model.mutable_data_ptr<scalar_t>(),
             *grad_noise_ptr = need_grad_noise ? grad_noise.mutable_data_ptr<scalar_t>() : nullptr;
    with_packs<kPackWidth<scalar_t>>(
        n.K,
        [&](auto width) {
          constexpr int kWidth = decltype(width)::value;
          denoise_step_backward_kernel<scalar_t, acc_t, kWidth>
              <<<step_grid(n.B, n.K, kWidth), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
                  grad_x_prev_ptr, grad_x0_ptr, x_t_ptr, model_ptr, a_t.const_data_ptr<acc_t>(),
                  a_prev.const_data_ptr<acc_t>(), n.B, n.K, static_cast<acc_t>(eta), type, clip_sample.has_value(),
                  static_cast<acc_t>(clip_sample.value_or(0)), grad_x_ptr, grad_model_ptr, grad_noise_ptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        grad_x_prev_ptr, grad_x0_ptr, x_t_ptr, model_ptr, grad_x_ptr, grad_model_ptr, grad_noise_ptr);
  });
  return {grad_x, grad_model, grad_noise};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CUDA, m) {
  m.impl("denoise_step", &denoise_step);
  m.impl("denoise_step_backward", &denoise_step_backward);
}

}  // namespace softmix::cuda
