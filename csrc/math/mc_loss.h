// mc_loss: the per-example arithmetic, shared by the CPU and CUDA kernels.
//
// For one example b with M Monte Carlo predictions of K = prod(S) values each, and mixture
// weights pi_m = exp(lw_m) from the optional log-weights (normalised over m by the caller;
// without them pi_m = 1 / M):
//   e_m  = (1/K) sum_k (pred[m, k] - target[k])^2
//   jensen:      loss = w sum_m pi_m e_m
//   logmeanexp:  loss = -T log sum_m pi_m exp(-w e_m / T) = -T logsumexp_m(x_m),
//                with the logits x_m = lw_m - w e_m / T
//
// Backward, with p = softmax_m(x) for logmeanexp:
//   dloss/de_m   = w pi_m             (jensen)      | w p_m            (logmeanexp)
//   dloss/dw     = sum_m pi_m e_m     (jensen)      | sum_m p_m e_m    (logmeanexp)
//   dloss/dlw_m  = w pi_m e_m         (jensen)      | -T p_m           (logmeanexp)
//   dloss/dpred[m, k]  = dloss/de_m * 2 (pred[m, k] - target[k]) / K
//   dloss/dtarget[k]   = -sum_m dloss/dpred[m, k]
// A component of weight 0 (lw_m = -inf) adds nothing to the loss and gets zero gradients. An
// example whose components all have weight 0 (or infinite errors) has the bound's own value,
// logmeanexp = -T log 0 = +inf (jensen: 0), and zero gradients: no component to move.
// Without log-weights the uniform 1/M is a division by M (jensen) or a log M taken out of the
// log-sum-exp (logmeanexp): the operations, in the order, the op had before it took log-weights.
//
// The row routines take `lanes` (see latent_transform.h): the CPU kernel runs them with one
// thread per example. The CUDA kernels split an example's K over many warps, so they build on
// the per-value terms and the per-example loss_from_errors / loss_gradients. The forward
// returns the errors e (M, B) beside the loss so that the backward is a single pass over pred.
// The log-weights (M, B), when given, are laid out like the errors: an example's column of
// both is read at the same `stride`.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace softmix::math {

enum class Bound : int64_t { kJensen = 0, kLogMeanExp = 1 };

// The per-value terms: (pred - target)^2, summed into e_m, and its share of dloss/dpred,
// coef * 2 (pred - target) / K with coef = dloss/de_m and two_over_k = 2 / K.
template <typename acc_t, typename scalar_t>
SOFTMIX_HD acc_t squared_difference(scalar_t pred, scalar_t target) {
  const acc_t diff = static_cast<acc_t>(pred) - static_cast<acc_t>(target);
  return diff * diff;
}

template <typename acc_t>
SOFTMIX_HD acc_t squared_error_gradient(acc_t coef, acc_t two_over_k, acc_t pred, acc_t target) {
  return coef * two_over_k * (pred - target);
}

// err[m * err_stride] = mean_k (pred[m * sample_stride + k] - target[k])^2, for m < M.
// (err_stride is B: the errors of all examples form an (M, B) tensor, like pred's leading dims.)
template <typename scalar_t, typename acc_t, typename Lanes>
SOFTMIX_HD void squared_errors(const scalar_t* pred, int64_t sample_stride, const scalar_t* target, int64_t M,
                               int64_t K, acc_t* err, int64_t err_stride, const Lanes& lanes) {
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* pred_m = pred + m * sample_stride;
    acc_t partial = 0;
    SOFTMIX_SIMD_SUM(partial)
    for (int64_t k = lanes.first(); k < K; k += lanes.step()) {
      partial += squared_difference<acc_t>(pred_m[k], target[k]);
    }
    const acc_t total = lanes.sum(partial);
    if (lanes.is_leader()) err[m * err_stride] = total / static_cast<acc_t>(K);
  }
  lanes.sync();
}

// The mixture weight of sample m up to a factor common to all m: exp(lw_m), or 1 without
// log-weights; weight_normaliser is the sum of these factors (1 when normalised, else M).
template <typename acc_t>
SOFTMIX_HD acc_t unnormalised_weight(const acc_t* log_w, int64_t stride, int64_t m) {
  return log_w != nullptr ? exp(log_w[m * stride]) : acc_t(1);
}

template <typename acc_t>
SOFTMIX_HD acc_t weight_normaliser(const acc_t* log_w, int64_t M) {
  return log_w != nullptr ? acc_t(1) : static_cast<acc_t>(M);
}

// The logit x_m = lw_m - w e_m / T of the logmeanexp bound (-w e_m / T without log-weights,
// whose log M the callers take out afterwards).
template <typename acc_t>
SOFTMIX_HD acc_t logit(const acc_t* err, const acc_t* log_w, int64_t stride, int64_t m, acc_t w, acc_t T) {
  const acc_t x = -w * err[m * stride] / T;
  return log_w != nullptr ? log_w[m * stride] + x : x;
}

// max_m x_m and its m: taken out of the log-sum-exp for stability. Finite while some lw_m is.
template <typename acc_t>
struct MaxLogit {
  acc_t value;
  int64_t index;
};

template <typename acc_t>
SOFTMIX_HD MaxLogit<acc_t> max_logit(const acc_t* err, const acc_t* log_w, int64_t stride, int64_t M, acc_t w,
                                     acc_t T) {
  MaxLogit<acc_t> largest{logit(err, log_w, stride, 0, w, T), 0};
  for (int64_t m = 1; m < M; ++m) {
    const acc_t x = logit(err, log_w, stride, m, w, T);
    if (x > largest.value) largest = {x, m};
  }
  return largest;
}

// exp(x_m - x_max), in [0, 1], exactly 1 for the largest logit, so that the sum over m is at
// least 1. Recomputed, x_m need not equal the x_max that max_logit kept: nvcc fuses the
// product inside x_m with the subtraction (an FMA, no rounding in between), and when |x| is
// ~1e11 (large errors at a small temperature) that rounding is thousands, enough to give
// exp(+1000) = inf or to lose the largest term to exp(-1000) = 0. A NaN logit stays NaN.
// The result has exp's own type: on the CPU, exp of a float is the C library's double exp, and
// a float sum of these adds each term in double before it rounds. Near-equal logits (a wide
// temperature, terms all near 1) need that: rounding each term to float first moved the
// "posterior" bound by 1% at its smallest weights (test_quality_objectives).
template <typename acc_t>
SOFTMIX_HD auto shifted_exp(const acc_t* err, const acc_t* log_w, int64_t stride, int64_t m, acc_t w, acc_t T,
                            const MaxLogit<acc_t>& largest) -> decltype(exp(acc_t(0))) {
  if (m == largest.index) return 1;
  const acc_t shifted = logit(err, log_w, stride, m, w, T) - largest.value;
  return exp(shifted > acc_t(0) ? acc_t(0) : shifted);
}

// err and log_w (null: uniform weights) hold entry m at [m * stride].
template <typename acc_t>
SOFTMIX_HD acc_t loss_from_errors(const acc_t* err, const acc_t* log_w, int64_t stride, int64_t M, acc_t w,
                                  Bound bound, acc_t T) {
  if (bound == Bound::kJensen) {
    acc_t total = 0;
    for (int64_t m = 0; m < M; ++m) total += unnormalised_weight(log_w, stride, m) * err[m * stride];
    return w * total / weight_normaliser(log_w, M);
  }
  // -T (logsumexp_m(x_m) - log normaliser), with the maximum taken out for stability.
  const MaxLogit<acc_t> largest = max_logit(err, log_w, stride, M, w, T);
  if (largest.value == -acc_t(INFINITY)) return acc_t(INFINITY);  // sum_m pi_m exp(-w e_m / T) = 0
  acc_t total = 0;
  for (int64_t m = 0; m < M; ++m) total += shifted_exp(err, log_w, stride, m, w, T, largest);
  return -T * (largest.value + log(total) - log(weight_normaliser(log_w, M)));
}

// The gradients of `upstream * loss`: coef[m] = upstream * dloss/de_m and, when grad_log_w is
// not null (log_w must then be given), grad_log_w[m * stride] = upstream * dloss/dlw_m;
// returns upstream * dloss/dw.
template <typename acc_t>
SOFTMIX_HD acc_t loss_gradients(const acc_t* err, const acc_t* log_w, int64_t stride, int64_t M, acc_t w,
                                Bound bound, acc_t T, acc_t upstream, acc_t* coef, acc_t* grad_log_w) {
  if (bound == Bound::kJensen) {
    const acc_t normaliser = weight_normaliser(log_w, M);
    acc_t total = 0;
    for (int64_t m = 0; m < M; ++m) {
      const acc_t pi = unnormalised_weight(log_w, stride, m), e = err[m * stride];
      coef[m] = upstream * (w * pi / normaliser);
      total += pi * e;
      if (grad_log_w != nullptr) grad_log_w[m * stride] = upstream * (w * pi * e);
    }
    return upstream * (total / normaliser);
  }
  const MaxLogit<acc_t> largest = max_logit(err, log_w, stride, M, w, T);
  if (largest.value == -acc_t(INFINITY)) {  // no component with a finite logit: p is 0 / 0, the gradients 0
    for (int64_t m = 0; m < M; ++m) {
      coef[m] = 0;
      if (grad_log_w != nullptr) grad_log_w[m * stride] = 0;
    }
    return 0;
  }
  acc_t normaliser = 0;
  for (int64_t m = 0; m < M; ++m) {
    coef[m] = shifted_exp(err, log_w, stride, m, w, T, largest);  // unnormalised p_m
    normaliser += coef[m];
  }
  acc_t grad_w = 0;
  for (int64_t m = 0; m < M; ++m) {
    const acc_t p = coef[m] / normaliser;
    grad_w += p * err[m * stride];
    coef[m] = upstream * (w * p);
    if (grad_log_w != nullptr) grad_log_w[m * stride] = upstream * (-T * p);
  }
  return upstream * grad_w;
}

// Given coef[m] = dL/de_m (already scaled by the upstream gradient), write
// grad_pred[m, k] = coef[m] * 2 (pred - target) / K and, when kWriteTarget,
// grad_target[k] = -sum_m grad_pred[m, k].
// kM > 0 fixes M at compile time (runtime_M is then ignored). gcc vectorises the loop over k
// only when the loop over m unrolls and no store is conditional: with M at run time, or an
// `if` around the grad_target store, the CPU loop stays scalar (the whole backward took twice
// as long at M = 4 on the 2-core test machine).
template <int kM, bool kWriteTarget, typename scalar_t, typename acc_t, typename Lanes>
SOFTMIX_HD void squared_error_backward(const scalar_t* pred, int64_t sample_stride, const scalar_t* target,
                                       int64_t runtime_M, int64_t K, const acc_t* coef, scalar_t* grad_pred,
                                       scalar_t* grad_target, const Lanes& lanes) {
  const int64_t M = kM > 0 ? kM : runtime_M;
  const acc_t two_over_k = acc_t(2) / static_cast<acc_t>(K);
  SOFTMIX_SIMD
  for (int64_t k = lanes.first(); k < K; k += lanes.step()) {
    const acc_t t = static_cast<acc_t>(target[k]);
    acc_t g_target = 0;
    for (int64_t m = 0; m < M; ++m) {
      const acc_t g = squared_error_gradient(coef[m], two_over_k, static_cast<acc_t>(pred[m * sample_stride + k]), t);
      grad_pred[m * sample_stride + k] = static_cast<scalar_t>(g);
      g_target -= g;
    }
    if constexpr (kWriteTarget) grad_target[k] = static_cast<scalar_t>(g_target);
  }
}

// squared_error_backward with its template arguments picked at run time: M fixed for the
// common sample counts (1, 2, 4, 8, 16; else 0: M at run time), grad_target written unless null.
template <typename scalar_t, typename acc_t, typename Lanes>
void squared_error_backward_dispatch(const scalar_t* pred, int64_t sample_stride, const scalar_t* target, int64_t M,
                                     int64_t K, const acc_t* coef, scalar_t* grad_pred, scalar_t* grad_target,
                                     const Lanes& lanes) {
  auto run = [&](auto static_M) {
    constexpr int kM = decltype(static_M)::value;
    if (grad_target != nullptr) {
      squared_error_backward<kM, true>(pred, sample_stride, target, M, K, coef, grad_pred, grad_target, lanes);
    } else {
      squared_error_backward<kM, false>(pred, sample_stride, target, M, K, coef, grad_pred, grad_target, lanes);
    }
  };
  switch (M) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 8: return run(std::integral_constant<int, 8>{});
    case 16: return run(std::integral_constant<int, 16>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

}  // namespace softmix::math
