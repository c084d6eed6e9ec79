// The operator schemas (declared once, for every device) and the Python module softmix._C.
// Importing softmix._C runs the static registrations in this library: the schemas below,
// the CPU kernels in cpu/ and, in CUDA builds, the kernels in cuda/.
#include <pybind11/pybind11.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(softmix, m) {
  // Fake (meta) kernels are registered from this Python module; autograd in autograd.cpp.
  m.set_python_module("softmix.ops");
  m.def("latent_transform(Tensor r, Tensor v, Tensor s) -> Tensor");
  m.def("latent_transform_backward(Tensor grad_y, Tensor r, Tensor v, Tensor s) -> (Tensor, Tensor, Tensor)");
  // log_weights (M, B): log pi_m of a weighted mixture, normalised over m (None: 1/M each).
  m.def(
      "mc_loss(Tensor pred, Tensor target, Tensor weight, str bound=\"jensen\", float temperature=1.0,"
      " Tensor? log_weights=None) -> Tensor");
  // mc_loss is this op's first output; the second, the (M, B) per-sample errors, is what the
  // backward needs, so it reads pred once instead of recomputing them.
  m.def(
      "mc_loss_with_errors(Tensor pred, Tensor target, Tensor weight, str bound=\"jensen\", float temperature=1.0,"
      " Tensor? log_weights=None) -> (Tensor loss, Tensor errors)");
  // The backward ops skip the gradient of the target / noise unless asked (need_grad_*):
  // usually a constant, and a full-size write. Skipped, it comes back as an empty (0,) tensor;
  // so does the gradient of log_weights (small, but absent without them).
  m.def(
      "mc_loss_backward(Tensor grad_loss, Tensor pred, Tensor target, Tensor weight, Tensor errors, str bound,"
      " float temperature, bool need_grad_target, Tensor? log_weights=None, bool need_grad_log_weights=False)"
      " -> (Tensor grad_pred, Tensor grad_target, Tensor grad_weight, Tensor grad_log_weights)");
  // seed: the noise drawn in the kernel, a pure function of (seed, element index); see
  // math/normal_noise.h. Without noise and seed the step has no noise (its mean).
  m.def(
      "denoise_step(Tensor x_t, Tensor model_output, Tensor alpha_bar_t, Tensor alpha_bar_prev, Tensor? noise=None,"
      " float eta=1.0, str prediction_type=\"epsilon\", float? clip_sample=None, int? seed=None) -> (Tensor, Tensor)");
  m.def(
      "denoise_step_backward(Tensor grad_x_prev, Tensor grad_x0, Tensor x_t, Tensor model_output,"
      " Tensor alpha_bar_t, Tensor alpha_bar_prev, float eta, str prediction_type, float? clip_sample,"
      " bool need_grad_noise) -> (Tensor, Tensor, Tensor)");
}

// mc_loss decomposes into mc_loss_with_errors on every device (and under autograd, which is
// registered for mc_loss_with_errors).
TORCH_LIBRARY_IMPL(softmix, CompositeImplicitAutograd, m) {
  m.impl("mc_loss", [](const at::Tensor& pred, const at::Tensor& target, const at::Tensor& weight,
                       c10::string_view bound, double temperature, const std::optional<at::Tensor>& log_weights) {
    static const auto with_errors = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("softmix::mc_loss_with_errors", "")
                                        .typed<std::tuple<at::Tensor, at::Tensor>(
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            c10::string_view, double, const std::optional<at::Tensor>&)>();
    return std::get<0>(with_errors.call(pred, target, weight, bound, temperature, log_weights));
  });
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "softmix's compiled operators; importing this module registers torch.ops.softmix.*";
  m.def("cuda_kernels_built", [] { return static_cast<bool>(SOFTMIX_WITH_CUDA); },
        "Whether this build carries the CUDA kernels.");
}
