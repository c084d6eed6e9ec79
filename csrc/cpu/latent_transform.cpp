// latent_transform on the CPU: one row (position) at a time, rows in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/serial_lanes.h"
#include "math/latent_transform.h"

namespace softmix::cpu {
namespace {

at::Tensor latent_transform(const at::Tensor& r_in, const at::Tensor& v_in, const at::Tensor& s_in) {
  const LatentTransformSizes n = check_latent_transform(r_in, v_in, s_in);
  const at::Tensor r = r_in.contiguous(), v = v_in.contiguous();
  const at::Tensor s = s_in.to(accumulate_type(r.scalar_type())).contiguous();
  at::Tensor out = at::empty_like(r);
  const int64_t s_layer_stride = n.per_position_s ? n.N : 1, s_row_stride = n.per_position_s ? 1 : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "latent_transform_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *r_ptr = r.const_data_ptr<scalar_t>(), *v_ptr = v.const_data_ptr<scalar_t>();
    const acc_t* s_ptr = s.const_data_ptr<acc_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n.N, grain_for(n.L * n.D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> y(n.D);
      for (int64_t row = begin; row < end; ++row) {
        math::latent_transform_row(r_ptr + row * n.D, v_ptr + row * n.D, n.N * n.D, s_ptr + row * s_row_stride,
                                   s_layer_stride, n.L, n.D, y.data(), out_ptr + row * n.D, SerialLanes{});
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_transform_backward(const at::Tensor& grad_y_in,
                                                                         const at::Tensor& r_in,
                                                                         const at::Tensor& v_in,
                                                                         const at::Tensor& s_in) {
  const LatentTransformSizes n = check_latent_transform(r_in, v_in, s_in);
  check_latent_transform_grad(grad_y_in, r_in);
  const at::Tensor r = r_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_y = grad_y_in.to(r.scalar_type()).contiguous();
  const at::Tensor s = s_in.to(accumulate_type(r.scalar_type())).contiguous();
  at::Tensor grad_r = at::empty_like(r), grad_v = at::empty_like(v);
  // dL/ds per layer and position, accumulated in float; summed over positions below when s is shared.
  at::Tensor grad_s_rows = at::empty({n.L, n.N}, r.options().dtype(accumulate_type(r.scalar_type())));
  const int64_t s_layer_stride = n.per_position_s ? n.N : 1, s_row_stride = n.per_position_s ? 1 : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "latent_transform_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *g_ptr = grad_y.const_data_ptr<scalar_t>(), *r_ptr = r.const_data_ptr<scalar_t>(),
                   *v_ptr = v.const_data_ptr<scalar_t>();
    const acc_t* s_ptr = s.const_data_ptr<acc_t>();
    scalar_t *grad_r_ptr = grad_r.mutable_data_ptr<scalar_t>(), *grad_v_ptr = grad_v.mutable_data_ptr<scalar_t>();
    acc_t* grad_s_ptr = grad_s_rows.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n.N, grain_for(3 * n.L * n.D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch((n.L + 1) * n.D);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t offset = row * n.D;
        math::latent_transform_backward_row(g_ptr + offset, r_ptr + offset, v_ptr + offset, n.N * n.D,
                                            s_ptr + row * s_row_stride, s_layer_stride, n.L, n.D, scratch.data(),
                                            grad_r_ptr + offset, grad_v_ptr + offset, grad_s_ptr + row, n.N,
                                            SerialLanes{});
      }
    });
  });
  at::Tensor grad_s = n.per_position_s ? grad_s_rows : grad_s_rows.sum(1);
  return {grad_r, grad_v, grad_s.to(s_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CPU, m) {
  m.impl("latent_transform", &latent_transform);
  m.impl("latent_transform_backward", &latent_transform_backward);
}

}  // namespace softmix::cpu
