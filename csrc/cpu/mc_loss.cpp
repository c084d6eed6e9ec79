// mc_loss on the CPU: one example at a time, examples in parallel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <vector>

#include "checks.h"
#include "cpu/serial_lanes.h"
#include "math/mc_loss.h"

namespace softmix::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> mc_loss_with_errors(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                       const at::Tensor& weight_in, std::string_view bound_name,
                                                       double temperature,
                                                       const std::optional<at::Tensor>& log_weights_in) {
  const McLossSizes n = check_mc_loss(pred_in, target_in, weight_in, temperature, log_weights_in);
  const math::Bound bound = parse_bound(bound_name);
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous();
  const at::Tensor log_weights = log_weights_in ? log_weights_in->contiguous() : at::Tensor();  // undefined: 1/M each
  at::Tensor loss = at::empty({n.B}, pred.options().dtype(acc_type));
  at::Tensor errors = at::empty({n.M, n.B}, loss.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pred_ptr = pred.const_data_ptr<scalar_t>(), *target_ptr = target.const_data_ptr<scalar_t>();
    const acc_t *weight_ptr = weight.const_data_ptr<acc_t>(),
                *log_weights_ptr = log_weights.defined() ? log_weights.const_data_ptr<acc_t>() : nullptr;
    acc_t *loss_ptr = loss.mutable_data_ptr<acc_t>(), *errors_ptr = errors.mutable_data_ptr<acc_t>();
    const acc_t T = static_cast<acc_t>(temperature);
    at::parallel_for(0, n.B, grain_for(n.M * n.K), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        math::squared_errors(pred_ptr + b * n.K, n.B * n.K, target_ptr + b * n.K, n.M, n.K, errors_ptr + b, n.B,
                             SerialLanes{});
        loss_ptr[b] = math::loss_from_errors(errors_ptr + b, log_weights_ptr ? log_weights_ptr + b : nullptr, n.B,
                                             n.M, weight_ptr[b], bound, T);
      }
    });
  });
  return {loss, errors};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mc_loss_backward(
    const at::Tensor& grad_loss_in, const at::Tensor& pred_in, const at::Tensor& target_in,
    const at::Tensor& weight_in, const at::Tensor& errors_in, std::string_view bound_name, double temperature,
    bool need_grad_target, const std::optional<at::Tensor>& log_weights_in, bool need_grad_log_weights) {
  const McLossSizes n = check_mc_loss(pred_in, target_in, weight_in, temperature, log_weights_in);
  check_mc_loss_grad(grad_loss_in, errors_in, n, pred_in, log_weights_in, need_grad_log_weights);
  const math::Bound bound = parse_bound(bound_name);
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous(), grad_loss = grad_loss_in.to(acc_type).contiguous();
  const at::Tensor errors = errors_in.to(acc_type).contiguous();
  const at::Tensor log_weights = log_weights_in ? log_weights_in->contiguous() : at::Tensor();  // undefined: 1/M each
  at::Tensor grad_pred = at::empty_like(pred), grad_target = gradient_like(target, need_grad_target);
  at::Tensor grad_weight = at::empty({n.B}, weight.options());
  // (M, B) like errors, in the loss dtype that log_weights has
  at::Tensor grad_log_weights = gradient_like(errors, need_grad_log_weights);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pred_ptr = pred.const_data_ptr<scalar_t>(), *target_ptr = target.const_data_ptr<scalar_t>();
    const acc_t *weight_ptr = weight.const_data_ptr<acc_t>(), *grad_loss_ptr = grad_loss.const_data_ptr<acc_t>(),
                *errors_ptr = errors.const_data_ptr<acc_t>(),
                *log_weights_ptr = log_weights.defined() ? log_weights.const_data_ptr<acc_t>() : nullptr;
    scalar_t *grad_pred_ptr = grad_pred.mutable_data_ptr<scalar_t>(),
             *grad_target_ptr = need_grad_target ? grad_target.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t *grad_weight_ptr = grad_weight.mutable_data_ptr<acc_t>(),
          *grad_log_weights_ptr = need_grad_log_weights ? grad_log_weights.mutable_data_ptr<acc_t>() : nullptr;
    const acc_t T = static_cast<acc_t>(temperature);
    at::parallel_for(0, n.B, grain_for(n.M * n.K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> coef(n.M);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t offset = b * n.K;
        grad_weight_ptr[b] = math::loss_gradients(
            errors_ptr + b, log_weights_ptr ? log_weights_ptr + b : nullptr, n.B, n.M, weight_ptr[b], bound, T,
            grad_loss_ptr[b], coef.data(), grad_log_weights_ptr ? grad_log_weights_ptr + b : nullptr);
        math::squared_error_backward_dispatch(pred_ptr + offset, n.B * n.K, target_ptr + offset, n.M, n.K,
                                              coef.data(), grad_pred_ptr + offset,
                                              grad_target_ptr ? grad_target_ptr + offset : nullptr, SerialLanes{});
      }
    });
  });
  return {grad_pred, grad_target, grad_weight.to(weight_in.scalar_type()), grad_log_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CPU, m) {
  m.impl("mc_loss_with_errors", &mc_loss_with_errors);
  m.impl("mc_loss_backward", &mc_loss_backward);
}

}  // namespace softmix::cpu
