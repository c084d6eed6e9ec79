// denoise_step: the per-element arithmetic, shared by the CPU and CUDA kernels.
//
// One backward step from x_t (cumulative alpha a) to x_prev (cumulative alpha a'), for a
// prediction m of the model, as in DDIM (Song et al., eq. 12) with eta scaling the noise:
//
//   x0     = (x_t - sqrt(1 - a) m) / sqrt(a)        epsilon
//          = sqrt(a) x_t - sqrt(1 - a) m             v_prediction
//          = m                                       sample
//   x0     = clip(x0, -c, c)                         when clip_sample = c is given
//   eps    = (x_t - sqrt(a) x0) / sqrt(1 - a)        re-derived from the (clipped) x0
//   sigma  = eta sqrt((1 - a') / (1 - a) (1 - a / a'))
//   x_prev = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma noise
//
// eta = 1 is DDPM's ancestral step with the "fixed_small" posterior variance; eta = 0 is DDIM.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace softmix::math {

enum class PredictionType : int64_t { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

// The per-sample constants of one step; computed once per sample (row).
template <typename acc_t>
struct StepCoefficients {
  acc_t x0_from_x;       // x0 = x0_from_x * x_t + x0_from_model * m (before clipping)
  acc_t x0_from_model;
  acc_t sqrt_a;          // sqrt(a)
  acc_t inv_sqrt_1ma;    // 1 / sqrt(1 - a)
  acc_t sqrt_a_prev;     // sqrt(a')
  acc_t direction;       // sqrt(1 - a' - sigma^2), the weight of eps
  acc_t sigma;           // the weight of the noise
};

template <typename acc_t>
SOFTMIX_HD StepCoefficients<acc_t> step_coefficients(acc_t a, acc_t a_prev, acc_t eta, PredictionType type) {
  StepCoefficients<acc_t> c;
  c.sqrt_a = sqrt(a);
  const acc_t sqrt_1ma = sqrt(acc_t(1) - a);
  c.inv_sqrt_1ma = acc_t(1) / sqrt_1ma;
  c.sqrt_a_prev = sqrt(a_prev);
  switch (type) {
    case PredictionType::kEpsilon:
      c.x0_from_x = acc_t(1) / c.sqrt_a;
      c.x0_from_model = -sqrt_1ma / c.sqrt_a;
      break;
    case PredictionType::kVPrediction:
      c.x0_from_x = c.sqrt_a;
      c.x0_from_model = -sqrt_1ma;
      break;
    default:  // kSample
      c.x0_from_x = acc_t(0);
      c.x0_from_model = acc_t(1);
  }
  const acc_t variance = (acc_t(1) - a_prev) / (acc_t(1) - a) * (acc_t(1) - a / a_prev);
  c.sigma = eta * sqrt(variance > acc_t(0) ? variance : acc_t(0));
  const acc_t direction_sq = acc_t(1) - a_prev - c.sigma * c.sigma;  // >= 0 up to rounding
  c.direction = sqrt(direction_sq > acc_t(0) ? direction_sq : acc_t(0));
  return c;
}

template <typename acc_t>
SOFTMIX_HD acc_t clip_value(acc_t x, bool clip, acc_t bound) {
  if (!clip) return x;
  return x < -bound ? -bound : (x > bound ? bound : x);
}

// Forward of one element: writes x_prev and the (clipped) x0.
template <typename acc_t>
SOFTMIX_HD void step_element(const StepCoefficients<acc_t>& c, acc_t x, acc_t model, acc_t noise, bool clip,
                             acc_t clip_bound, acc_t& x_prev, acc_t& x0) {
  x0 = clip_value(c.x0_from_x * x + c.x0_from_model * model, clip, clip_bound);
  const acc_t eps = (x - c.sqrt_a * x0) * c.inv_sqrt_1ma;
  x_prev = c.sqrt_a_prev * x0 + c.direction * eps + c.sigma * noise;
}

// Backward of one element, given g_prev = dL/dx_prev and g_x0 = dL/dx0 (the returned x0).
// x_prev = (sqrt(a') - direction sqrt(a) / sqrt(1 - a)) x0 + direction / sqrt(1 - a) x_t + sigma n,
// and clip passes the gradient where -c <= x0 <= c (as torch.clamp does).
template <typename acc_t>
SOFTMIX_HD void step_element_backward(const StepCoefficients<acc_t>& c, acc_t x, acc_t model, bool clip,
                                      acc_t clip_bound, acc_t g_prev, acc_t g_x0, acc_t& grad_x,
                                      acc_t& grad_model, acc_t& grad_noise) {
  const acc_t x0_raw = c.x0_from_x * x + c.x0_from_model * model;
  // A 0/1 factor rather than a branch: whether x0 was clipped is data-dependent, and a
  // mispredicted branch per element costs more than the multiply (and blocks vectorising).
  const acc_t passes = clip ? static_cast<acc_t>((x0_raw >= -clip_bound) & (x0_raw <= clip_bound)) : acc_t(1);
  const acc_t eps_weight = c.direction * c.inv_sqrt_1ma;
  const acc_t g_x0_total = g_x0 + g_prev * (c.sqrt_a_prev - eps_weight * c.sqrt_a);
  const acc_t g_x0_raw = passes * g_x0_total;
  grad_x = g_prev * eps_weight + g_x0_raw * c.x0_from_x;
  grad_model = g_x0_raw * c.x0_from_model;
  grad_noise = g_prev * c.sigma;
}

}  // namespace softmix::math
