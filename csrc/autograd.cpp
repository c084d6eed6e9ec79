// Autograd for the fused ops, registered in C++ for every device (the Autograd key): each
// forward saves what its fused backward op reads, and the backward calls that op.
//
// These formulas were Python functions (torch.library.register_autograd) until the first
// GPU sessions: there, a forward+backward call cost the host about 0.2 ms of Python and
// pytree handling, as much as the kernels themselves at the benchmark's sizes
// (benchmarks/results/ops-profile-NVIDIA-H200.md). torch.compile traces these C++ functions
// like the Python ones: the forward and backward ops land in its graphs, and the fake
// kernels of softmix/ops.py give their shapes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace softmix::autograd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed dispatcher handle of softmix::<name>, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> softmix_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor if_needed(bool needed, const at::Tensor& grad) { return needed ? grad : at::Tensor(); }

// ---- latent_transform(r, v, s) -> y -------------------------------------------------------

struct LatentTransform : public torch::autograd::Function<LatentTransform> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& r, const at::Tensor& v, const at::Tensor& s) {
    static const auto op = softmix_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
        "softmix::latent_transform");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({r, v, s});
    return op.call(r, v, s);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        softmix_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&)>(
            "softmix::latent_transform_backward");
    const auto saved = ctx->get_saved_variables();
    const auto [grad_r, grad_v, grad_s] = op.call(grads[0], saved[0], saved[1], saved[2]);
    return {if_needed(ctx->needs_input_grad(0), grad_r), if_needed(ctx->needs_input_grad(1), grad_v),
            if_needed(ctx->needs_input_grad(2), grad_s)};
  }
};

// ---- mc_loss_with_errors(pred, target, weight, bound, temperature, log_weights?) ----------
// -> (loss, errors); errors (M, B) is not differentiable: the backward reads it instead of
// recomputing it from pred.

struct McLoss : public torch::autograd::Function<McLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& weight, c10::string_view bound, double temperature,
                               const std::optional<at::Tensor>& log_weights) {
    static const auto op = softmix_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, double,
        const std::optional<at::Tensor>&)>("softmix::mc_loss_with_errors");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, errors] = op.call(pred, target, weight, bound, temperature, log_weights);
    ctx->save_for_backward({pred, target, weight, errors, log_weights.value_or(at::Tensor())});
    ctx->mark_non_differentiable({errors});
    ctx->saved_data["bound"] = std::string(bound);
    ctx->saved_data["temperature"] = temperature;
    return {loss, errors};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = softmix_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        c10::string_view, double, bool, const std::optional<at::Tensor>&, bool)>("softmix::mc_loss_backward");
    const auto saved = ctx->get_saved_variables();
    const bool has_log_weights = saved[4].defined();  // saved undefined without log_weights
    // edges: pred 0, target 1, weight 2, and log_weights 3 when given
    const bool need_target = ctx->needs_input_grad(1);
    const bool need_log_weights = has_log_weights && ctx->needs_input_grad(3);
    const std::optional<at::Tensor> log_weights = has_log_weights ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    const auto [grad_pred, grad_target, grad_weight, grad_log_weights] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["bound"].toStringRef(),
                ctx->saved_data["temperature"].toDouble(), need_target, log_weights, need_log_weights);
    return {if_needed(ctx->needs_input_grad(0), grad_pred), if_needed(need_target, grad_target),
            if_needed(ctx->needs_input_grad(2), grad_weight), at::Tensor(), at::Tensor(),
            if_needed(need_log_weights, grad_log_weights)};
  }
};

// ---- denoise_step(x_t, model_output, alpha_bar_t, alpha_bar_prev, noise?, eta,
//                   prediction_type, clip_sample?, seed?) -> (x_prev, x0) ---------------------
// Differentiable in x_t, model_output and a given noise; not in the schedule.

struct DenoiseStep : public torch::autograd::Function<DenoiseStep> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_t, const at::Tensor& model_output,
                               const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                               const std::optional<at::Tensor>& noise, double eta, c10::string_view prediction_type,
                               std::optional<double> clip_sample, std::optional<int64_t> seed) {
    static const auto op = softmix_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
        double, c10::string_view, std::optional<double>, std::optional<int64_t>)>("softmix::denoise_step");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [x_prev, x0] = op.call(x_t, model_output, alpha_bar_t, alpha_bar_prev, noise, eta, prediction_type,
                                clip_sample, seed);
    ctx->save_for_backward({x_t, model_output, alpha_bar_t, alpha_bar_prev});
    ctx->saved_data["eta"] = eta;
    ctx->saved_data["prediction_type"] = std::string(prediction_type);
    ctx->saved_data["clip_sample"] = clip_sample;
    ctx->saved_data["has_noise"] = noise.has_value() && noise->defined();
    return {x_prev, x0};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = softmix_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, double, c10::string_view, std::optional<double>, bool)>("softmix::denoise_step_backward");
    const auto saved = ctx->get_saved_variables();
    // edges: x_t 0, model_output 1, alpha_bar_t 2, alpha_bar_prev 3, and noise 4 when given
    const bool need_noise = ctx->saved_data["has_noise"].toBool() && ctx->needs_input_grad(4);
    const c10::IValue& clip = ctx->saved_data["clip_sample"];
    const auto [grad_x_t, grad_model_output, grad_noise] =
        op.call(grads[0], grads[1], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["eta"].toDouble(),
                ctx->saved_data["prediction_type"].toStringRef(),
                clip.isNone() ? std::nullopt : std::optional<double>(clip.toDouble()), need_noise);
    return {if_needed(ctx->needs_input_grad(0), grad_x_t),
            if_needed(ctx->needs_input_grad(1), grad_model_output),
            at::Tensor(),  // the schedule is not differentiated through
            at::Tensor(),
            if_needed(need_noise, grad_noise),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};  // seed
  }
};

std::tuple<at::Tensor, at::Tensor> mc_loss_with_errors(const at::Tensor& pred, const at::Tensor& target,
                                                       const at::Tensor& weight, c10::string_view bound,
                                                       double temperature,
                                                       const std::optional<at::Tensor>& log_weights) {
  const auto out = McLoss::apply(pred, target, weight, bound, temperature, log_weights);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> denoise_step(const at::Tensor& x_t, const at::Tensor& model_output,
                                                const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                                const std::optional<at::Tensor>& noise, double eta,
                                                c10::string_view prediction_type, std::optional<double> clip_sample,
                                                std::optional<int64_t> seed) {
  const auto out = DenoiseStep::apply(x_t, model_output, alpha_bar_t, alpha_bar_prev, noise, eta, prediction_type,
                                      clip_sample, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, Autograd, m) {
  m.impl("latent_transform", [](const at::Tensor& r, const at::Tensor& v, const at::Tensor& s) {
    return LatentTransform::apply(r, v, s);
  });
  m.impl("mc_loss_with_errors", &mc_loss_with_errors);
  m.impl("denoise_step", &denoise_step);
}

}  // namespace softmix::autograd
