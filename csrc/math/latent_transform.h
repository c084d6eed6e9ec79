// latent_transform: the per-position arithmetic, shared by the CPU and CUDA kernels.
//
//   y_0 = r,   y_l = (v_l v_l^T + s_l I) y_{l-1} = v_l a_l + s_l y_{l-1},   a_l = <v_l, y_{l-1}>
//
// Backward, with g = dL/dy_l walking from l = L down to 1:
//   dL/dv_l     = g a_l + <g, v_l> y_{l-1}
//   dL/ds_l     = <g, y_{l-1}>
//   dL/dy_{l-1} = v_l <g, v_l> + s_l g
//
// The routines work on one position (one row of length D). `lanes` says which coordinates
// this thread owns and how partial dot products combine: on the CPU one thread owns all of
// them (lanes.sum is the identity); on the GPU the 32 lanes of a warp share them and sum with
// shuffles. Each thread only ever touches its own coordinates of `y` and `scratch`, so no
// synchronisation is needed beyond the sums.
#pragma once

#include <cstdint>

#include "common.h"

namespace softmix::math {

// The per-coordinate steps, in one place for the row routines below and the CUDA kernels that
// keep a row in registers:
//   forward:   y_l[d] = v_l[d] a_l + s_l y_{l-1}[d]
//   backward:  dL/dv_l[d] = g[d] a_l + <g, v_l> y_{l-1}[d],  dL/dy_{l-1}[d] = v_l[d] <g, v_l> + s_l g[d]
template <typename acc_t>
SOFTMIX_HD acc_t layer_output(acc_t v_d, acc_t a, acc_t s_l, acc_t y_d) {
  return v_d * a + s_l * y_d;
}

template <typename acc_t>
SOFTMIX_HD acc_t layer_grad_v(acc_t g_d, acc_t a, acc_t gv, acc_t y_prev_d) {
  return g_d * a + gv * y_prev_d;
}

template <typename acc_t>
SOFTMIX_HD acc_t layer_grad_input(acc_t v_d, acc_t gv, acc_t s_l, acc_t g_d) {
  return v_d * gv + s_l * g_d;
}

// One row: r (D), v (L rows of D, `layer_stride` apart), s_l = s[l * s_layer_stride] (kept in
// the accumulation type, so a float32 scale stays exact next to half-precision features).
// `y` is scratch of D accumulators; the result is written to `out` (D).
template <typename scalar_t, typename acc_t, typename Lanes>
SOFTMIX_HD void latent_transform_row(const scalar_t* r, const scalar_t* v, int64_t layer_stride,
                                     const acc_t* s, int64_t s_layer_stride, int64_t L, int64_t D,
                                     acc_t* y, scalar_t* out, const Lanes& lanes) {
  for (int64_t d = lanes.first(); d < D; d += lanes.step()) y[d] = static_cast<acc_t>(r[d]);
  for (int64_t l = 0; l < L; ++l) {
    const scalar_t* v_l = v + l * layer_stride;
    const acc_t s_l = s[l * s_layer_stride];
    acc_t a = 0;
    SOFTMIX_SIMD_SUM(a)
    for (int64_t d = lanes.first(); d < D; d += lanes.step()) a += static_cast<acc_t>(v_l[d]) * y[d];
    a = lanes.sum(a);
    for (int64_t d = lanes.first(); d < D; d += lanes.step())
      y[d] = layer_output(static_cast<acc_t>(v_l[d]), a, s_l, y[d]);
  }
  for (int64_t d = lanes.first(); d < D; d += lanes.step()) out[d] = static_cast<scalar_t>(y[d]);
}

// The backward of one row. `scratch` holds (L + 1) * D accumulators: y_0 .. y_{L-1}, then g.
// Writes grad_r (D), grad_v (L rows, `layer_stride` apart) and grad_s[l * grad_s_layer_stride]
// (one value per layer for this position; the caller sums over positions when s is shared).
template <typename scalar_t, typename acc_t, typename Lanes>
SOFTMIX_HD void latent_transform_backward_row(const scalar_t* grad_y, const scalar_t* r, const scalar_t* v,
                                              int64_t layer_stride, const acc_t* s, int64_t s_layer_stride,
                                              int64_t L, int64_t D, acc_t* scratch, scalar_t* grad_r,
                                              scalar_t* grad_v, acc_t* grad_s, int64_t grad_s_layer_stride,
                                              const Lanes& lanes) {
  acc_t* g = scratch + L * D;

  // Recompute the forward, keeping every input y_{l-1} of layer l (y_0 = r).
  for (int64_t d = lanes.first(); d < D; d += lanes.step()) scratch[d] = static_cast<acc_t>(r[d]);
  for (int64_t l = 0; l + 1 < L; ++l) {
    const scalar_t* v_l = v + l * layer_stride;
    const acc_t s_l = s[l * s_layer_stride];
    const acc_t* y_prev = scratch + l * D;
    acc_t* y_next = scratch + (l + 1) * D;
    acc_t a = 0;
    SOFTMIX_SIMD_SUM(a)
    for (int64_t d = lanes.first(); d < D; d += lanes.step()) a += static_cast<acc_t>(v_l[d]) * y_prev[d];
    a = lanes.sum(a);
    for (int64_t d = lanes.first(); d < D; d += lanes.step())
      y_next[d] = layer_output(static_cast<acc_t>(v_l[d]), a, s_l, y_prev[d]);
  }

  for (int64_t d = lanes.first(); d < D; d += lanes.step()) g[d] = static_cast<acc_t>(grad_y[d]);
  for (int64_t l = L - 1; l >= 0; --l) {
    const scalar_t* v_l = v + l * layer_stride;
    const acc_t s_l = s[l * s_layer_stride];
    const acc_t* y_prev = scratch + l * D;
    acc_t a = 0, gv = 0, gy = 0;
    SOFTMIX_SIMD_SUM(a, gv, gy)
    for (int64_t d = lanes.first(); d < D; d += lanes.step()) {
      const acc_t v_d = static_cast<acc_t>(v_l[d]);
      a += v_d * y_prev[d];
      gv += g[d] * v_d;
      gy += g[d] * y_prev[d];
    }
    a = lanes.sum(a);
    gv = lanes.sum(gv);
    gy = lanes.sum(gy);

    scalar_t* grad_v_l = grad_v + l * layer_stride;
    for (int64_t d = lanes.first(); d < D; d += lanes.step()) {
      const acc_t v_d = static_cast<acc_t>(v_l[d]);
      grad_v_l[d] = static_cast<scalar_t>(layer_grad_v(g[d], a, gv, y_prev[d]));
      g[d] = layer_grad_input(v_d, gv, s_l, g[d]);
    }
    if (lanes.is_leader()) grad_s[l * grad_s_layer_stride] = gy;
  }
  for (int64_t d = lanes.first(); d < D; d += lanes.step()) grad_r[d] = static_cast<scalar_t>(g[d]);
}

}  // namespace softmix::math
