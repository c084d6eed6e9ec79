// The operator schemas (declared once, for every device) and the Python module softmix._C.
// Importing softmix._C runs the static registrations in this library: the schemas below,
// the CPU kernels in cpu/ and, in CUDA builds, the kernels in cuda/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(softmix, m) {
  // Fake (meta) kernels and autograd formulas are registered from this Python module.
  m.set_python_module("softmix.ops");
  m.def("latent_transform(Tensor r, Tensor v, Tensor s) -> Tensor");
  m.def("latent_transform_backward(Tensor grad_y, Tensor r, Tensor v, Tensor s) -> (Tensor, Tensor, Tensor)");
  m.def("mc_loss(Tensor pred, Tensor target, Tensor weight, str bound=\"jensen\", float temperature=1.0) -> Tensor");
  m.def(
      "mc_loss_backward(Tensor grad_loss, Tensor pred, Tensor target, Tensor weight, str bound, float temperature)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "denoise_step(Tensor x_t, Tensor model_output, Tensor alpha_bar_t, Tensor alpha_bar_prev, Tensor? noise=None,"
      " float eta=1.0, str prediction_type=\"epsilon\", float? clip_sample=None) -> (Tensor, Tensor)");
  m.def(
      "denoise_step_backward(Tensor grad_x_prev, Tensor grad_x0, Tensor x_t, Tensor model_output,"
      " Tensor alpha_bar_t, Tensor alpha_bar_prev, float eta, str prediction_type, float? clip_sample)"
      " -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "softmix's compiled operators; importing this module registers torch.ops.softmix.*";
  m.def("cuda_kernels_built", [] { return static_cast<bool>(SOFTMIX_WITH_CUDA); },
        "Whether this build carries the CUDA kernels.");
}
