#include "checks.h"

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace softmix {
namespace {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_same_device(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  for (const NamedTensor& t : tensors) {
    TORCH_CHECK(t.second->device() == first.second->device(), op, ": all tensors must be on one device; ",
                first.first, " is on ", first.second->device(), " but ", t.first, " is on ", t.second->device());
  }
}

void check_same_dtype(const char* op, const NamedTensor& a, const NamedTensor& b) {
  TORCH_CHECK(a.second->scalar_type() == b.second->scalar_type(), op, ": ", b.first, " must have the dtype of ",
              a.first, " (", a.second->scalar_type(), "), got ", b.second->scalar_type());
}

void check_per_sample(const char* op, const char* name, const at::Tensor& t, int64_t B, const char* batch_of,
                      at::IntArrayRef batch_shape) {
  check_float(op, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape (B,) = (", B, ",) matching ",
              batch_of, " ", batch_shape, ", got ", t.sizes());
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor gradient_like(const at::Tensor& like, bool needed) {
  return needed ? at::empty_like(like) : at::empty({0}, like.options());
}

// ---- latent_transform ------------------------------------------------------------------

LatentTransformSizes check_latent_transform(const at::Tensor& r, const at::Tensor& v, const at::Tensor& s) {
  constexpr const char* op = "latent_transform";
  check_same_device(op, {{"r", &r}, {"v", &v}, {"s", &s}});
  check_float(op, "r", r);
  check_float(op, "v", v);
  check_float(op, "s", s);
  check_same_dtype(op, {"r", &r}, {"v", &v});
  TORCH_CHECK(r.dim() == 2, op, ": r must have shape (N, D), got ", r.sizes());
  const int64_t N = r.size(0), D = r.size(1);
  TORCH_CHECK(v.dim() == 3 && v.size(1) == N && v.size(2) == D, op, ": v must have shape (L, N, D) with (N, D) = ",
              r.sizes(), " from r, got ", v.sizes());
  const int64_t L = v.size(0);
  TORCH_CHECK(L >= 1, op, ": v must hold at least one layer (L >= 1), got ", v.sizes());
  const bool per_layer = s.dim() == 1 && s.size(0) == L;
  const bool per_position = s.dim() == 2 && s.size(0) == L && s.size(1) == N;
  TORCH_CHECK(per_layer || per_position, op, ": s must have shape (L,) = (", L, ",) or (L, N) = (", L, ", ", N,
              ") to match v ", v.sizes(), ", got ", s.sizes());
  return {L, N, D, per_position};
}

void check_latent_transform_grad(const at::Tensor& grad_y, const at::Tensor& r) {
  constexpr const char* op = "latent_transform_backward";
  check_same_device(op, {{"r", &r}, {"grad_y", &grad_y}});
  TORCH_CHECK(grad_y.sizes() == r.sizes(), op, ": grad_y must have the shape of r ", r.sizes(), ", got ",
              grad_y.sizes());
  check_float(op, "grad_y", grad_y);
}

// ---- mc_loss ---------------------------------------------------------------------------

math::Bound parse_bound(std::string_view bound) {
  if (bound == "jensen") return math::Bound::kJensen;
  if (bound == "logmeanexp") return math::Bound::kLogMeanExp;
  TORCH_CHECK_VALUE(false, "mc_loss: unknown bound '", bound, "'; expected 'jensen' or 'logmeanexp'");
}

McLossSizes check_mc_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                          double temperature, const std::optional<at::Tensor>& log_weights) {
  constexpr const char* op = "mc_loss";
  check_same_device(op, {{"pred", &pred}, {"target", &target}, {"weight", &weight}});
  check_float(op, "pred", pred);
  check_float(op, "target", target);
  check_same_dtype(op, {"pred", &pred}, {"target", &target});
  TORCH_CHECK(pred.dim() >= 2, op, ": pred must have shape (M, B, *S), got ", pred.sizes());
  TORCH_CHECK(pred.sizes().slice(1) == target.sizes(), op, ": target must have shape (B, *S) = ",
              pred.sizes().slice(1), " matching pred (M, B, *S) = ", pred.sizes(), ", got ", target.sizes());
  const int64_t M = pred.size(0), B = pred.size(1);
  check_per_sample(op, "weight", weight, B, "pred", pred.sizes());
  TORCH_CHECK(M >= 1, op, ": pred must hold at least one Monte Carlo sample (M >= 1), got ", pred.sizes());
  const int64_t K = B == 0 ? 0 : target.numel() / B;
  TORCH_CHECK(B == 0 || K >= 1, op, ": each example must have at least one value, got pred ", pred.sizes());
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), op,
                    ": temperature must be a positive finite number, got ", temperature);
  if (log_weights.has_value()) {
    check_same_device(op, {{"pred", &pred}, {"log_weights", &*log_weights}});
    // The kernels read log_weights as they are: in the dtype the loss is computed in.
    const at::ScalarType loss_dtype = accumulate_type(pred.scalar_type());
    TORCH_CHECK(log_weights->scalar_type() == loss_dtype, op, ": log_weights must have the loss dtype ", loss_dtype,
                " (float32 for float32, float16 and bfloat16 pred; float64 for float64 pred), got ",
                log_weights->scalar_type(), " with pred of ", pred.scalar_type());
    TORCH_CHECK(log_weights->dim() == 2 && log_weights->size(0) == M && log_weights->size(1) == B, op,
                ": log_weights must have shape (M, B) = (", M, ", ", B, ") matching pred (M, B, *S) = ",
                pred.sizes(), ", got ", log_weights->sizes());
  }
  return {M, B, K};
}

void check_mc_loss_grad(const at::Tensor& grad_loss, const at::Tensor& errors, const McLossSizes& sizes,
                        const at::Tensor& pred, const std::optional<at::Tensor>& log_weights,
                        bool need_grad_log_weights) {
  constexpr const char* op = "mc_loss_backward";
  check_same_device(op, {{"pred", &pred}, {"grad_loss", &grad_loss}, {"errors", &errors}});
  check_per_sample(op, "grad_loss", grad_loss, sizes.B, "pred", pred.sizes());
  check_float(op, "errors", errors);
  TORCH_CHECK(errors.dim() == 2 && errors.size(0) == sizes.M && errors.size(1) == sizes.B, op,
              ": errors must have shape (M, B) = (", sizes.M, ", ", sizes.B, ") matching pred ", pred.sizes(),
              ", got ", errors.sizes());
  TORCH_CHECK_VALUE(log_weights.has_value() || !need_grad_log_weights, op,
                    ": need_grad_log_weights is set but no log_weights were given");
}

// ---- denoise_step ----------------------------------------------------------------------

math::PredictionType parse_prediction_type(std::string_view prediction_type) {
  if (prediction_type == "epsilon") return math::PredictionType::kEpsilon;
  if (prediction_type == "v_prediction") return math::PredictionType::kVPrediction;
  if (prediction_type == "sample") return math::PredictionType::kSample;
  TORCH_CHECK_VALUE(false, "denoise_step: unknown prediction_type '", prediction_type,
                    "'; expected 'epsilon', 'v_prediction' or 'sample'");
}

DenoiseStepSizes check_denoise_step(const at::Tensor& x_t, const at::Tensor& model_output,
                                    const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev,
                                    const std::optional<at::Tensor>& noise, double eta,
                                    std::optional<double> clip_sample, std::optional<int64_t> seed) {
  constexpr const char* op = "denoise_step";
  TORCH_CHECK_VALUE(!(noise.has_value() && seed.has_value()), op,
                    ": pass noise or seed (to draw the noise in the kernel), not both");
  check_same_device(op, {{"x_t", &x_t}, {"model_output", &model_output}, {"alpha_bar_t", &alpha_bar_t},
                         {"alpha_bar_prev", &alpha_bar_prev}});
  check_float(op, "x_t", x_t);
  check_float(op, "model_output", model_output);
  check_same_dtype(op, {"x_t", &x_t}, {"model_output", &model_output});
  TORCH_CHECK(x_t.dim() >= 1, op, ": x_t must have shape (B, *S), got ", x_t.sizes());
  TORCH_CHECK(model_output.sizes() == x_t.sizes(), op, ": model_output must have the shape of x_t ", x_t.sizes(),
              ", got ", model_output.sizes());
  const int64_t B = x_t.size(0);
  check_per_sample(op, "alpha_bar_t", alpha_bar_t, B, "x_t", x_t.sizes());
  check_per_sample(op, "alpha_bar_prev", alpha_bar_prev, B, "x_t", x_t.sizes());
  if (noise.has_value()) {
    check_same_device(op, {{"x_t", &x_t}, {"noise", &*noise}});
    check_same_dtype(op, {"x_t", &x_t}, {"noise", &*noise});
    TORCH_CHECK(noise->sizes() == x_t.sizes(), op, ": noise must have the shape of x_t ", x_t.sizes(), ", got ",
                noise->sizes());
  }
  TORCH_CHECK_VALUE(eta >= 0 && std::isfinite(eta), op, ": eta must be a finite number >= 0, got ", eta);
  TORCH_CHECK_VALUE(!clip_sample.has_value() || (*clip_sample > 0 && !std::isnan(*clip_sample)), op,
                    ": clip_sample must be positive (or None), got ", clip_sample.value_or(0));
  // The schedule's values: checked where that costs no device synchronisation.
  if (x_t.device().is_cpu() && B > 0) {
    const at::Tensor a = alpha_bar_t.to(at::kDouble), a_prev = alpha_bar_prev.to(at::kDouble);
    TORCH_CHECK_VALUE(((a > 0) & (a < 1)).all().item<bool>(), op,
                      ": alpha_bar_t must lie in (0, 1), got values from ", a.min().item<double>(), " to ",
                      a.max().item<double>());
    TORCH_CHECK_VALUE(((a_prev >= a) & (a_prev <= 1)).all().item<bool>(), op,
                      ": alpha_bar_prev must lie in [alpha_bar_t, 1] (the previous step is less noisy)");
  }
  return {B, B == 0 ? 0 : x_t.numel() / B};
}

void check_denoise_step_grads(const at::Tensor& grad_x_prev, const at::Tensor& grad_x0, const at::Tensor& x_t) {
  constexpr const char* op = "denoise_step_backward";
  check_same_device(op, {{"x_t", &x_t}, {"grad_x_prev", &grad_x_prev}, {"grad_x0", &grad_x0}});
  TORCH_CHECK(grad_x_prev.sizes() == x_t.sizes() && grad_x0.sizes() == x_t.sizes(), op,
              ": grad_x_prev and grad_x0 must have the shape of x_t ", x_t.sizes(), ", got ", grad_x_prev.sizes(),
              " and ", grad_x0.sizes());
}

}  // namespace softmix
