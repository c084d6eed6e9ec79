// mc_loss on the CPU: one example at a time, examples in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string_view>
#include <vector>

#include "checks.h"
#include "cpu/serial_lanes.h"
#include "math/mc_loss.h"

namespace softmix::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> mc_loss_with_errors(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                       const at::Tensor& weight_in, std::string_view bound_name,
                                                       double temperature) {
  const McLossSizes n = check_mc_loss(pred_in, target_in, weight_in, temperature);
  const math::Bound bound = parse_bound(bound_name);
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous();
  at::Tensor loss = at::empty({n.B}, pred.options().dtype(acc_type));
  at::Tensor errors = at::empty({n.M, n.B}, loss.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pred_ptr = pred.const_data_ptr<scalar_t>(), *target_ptr = target.const_data_ptr<scalar_t>();
    const acc_t* weight_ptr = weight.const_data_ptr<acc_t>();
    acc_t *loss_ptr = loss.mutable_data_ptr<acc_t>(), *errors_ptr = errors.mutable_data_ptr<acc_t>();
    const acc_t T = static_cast<acc_t>(temperature);
    at::parallel_for(0, n.B, grain_for(n.M * n.K), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        math::squared_errors(pred_ptr + b * n.K, n.B * n.K, target_ptr + b * n.K, n.M, n.K, errors_ptr + b, n.B,
                             SerialLanes{});
        loss_ptr[b] = math::loss_from_errors(errors_ptr + b, n.B, n.M, weight_ptr[b], bound, T);
      }
    });
  });
  return {loss, errors};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mc_loss_backward(const at::Tensor& grad_loss_in,
                                                                const at::Tensor& pred_in,
                                                                const at::Tensor& target_in,
                                                                const at::Tensor& weight_in,
                                                                const at::Tensor& errors_in,
                                                                std::string_view bound_name, double temperature,
                                                                bool need_grad_target) {
  const McLossSizes n = check_mc_loss(pred_in, target_in, weight_in, temperature);
  check_mc_loss_grad(grad_loss_in, errors_in, n, pred_in);
  const math::Bound bound = parse_bound(bound_name);
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous(), grad_loss = grad_loss_in.to(acc_type).contiguous();
  const at::Tensor errors = errors_in.to(acc_type).contiguous();
  at::Tensor grad_pred = at::empty_like(pred), grad_target = gradient_like(target, need_grad_target);
  at::Tensor grad_weight = at::empty({n.B}, weight.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pred_ptr = pred.const_data_ptr<scalar_t>(), *target_ptr = target.const_data_ptr<scalar_t>();
    const acc_t *weight_ptr = weight.const_data_ptr<acc_t>(), *grad_loss_ptr = grad_loss.const_data_ptr<acc_t>(),
                *errors_ptr = errors.const_data_ptr<acc_t>();
    scalar_t *grad_pred_ptr = grad_pred.mutable_data_ptr<scalar_t>(),
             *grad_target_ptr = need_grad_target ? grad_target.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* grad_weight_ptr = grad_weight.mutable_data_ptr<acc_t>();
    const acc_t T = static_cast<acc_t>(temperature);
    at::parallel_for(0, n.B, grain_for(n.M * n.K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> coef(n.M);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * n.K;
        const acc_t upstream = grad_loss_ptr[b];
        grad_weight_ptr[b] =
            upstream * math::loss_gradients(errors_ptr + b, n.B, n.M, weight_ptr[b], bound, T, coef.data());
        for (acc_t& c : coef) c *= upstream;
        math::squared_error_backward_dispatch(pred_ptr + offset, n.B * n.K, target_ptr + offset, n.M, n.K,
                                              coef.data(), grad_pred_ptr + offset,
                                              grad_target_ptr ? grad_target_ptr + offset : nullptr, SerialLanes{});
      }
    });
  });
  return {grad_pred, grad_target, grad_weight.to(weight_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CPU, m) {
  m.impl("mc_loss_with_errors", &mc_loss_with_errors);
  m.impl("mc_loss_backward", &mc_loss_backward);
}

}  // namespace softmix::cpu
