// mc_loss on CUDA: one block per example, examples strided over the grid. The block sums
// each sample's squared error into the (M, B) errors output; the backward reads them back
// (written by the forward) and keeps the example's M coefficients dloss/de_m in shared memory.
// log_weights (M, B), null without them, is read beside the errors at the same stride.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "checks.h"
#include "cuda/lanes.cuh"
#include "math/mc_loss.h"

namespace softmix::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void mc_loss_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                               const acc_t* __restrict__ weight, const acc_t* __restrict__ log_weights, int64_t M,
                               int64_t B, int64_t K, math::Bound bound, acc_t T, acc_t* __restrict__ errors,
                               acc_t* __restrict__ loss) {
  __shared__ acc_t reduce_buffer[kThreadsPerBlock / kWarpSize];
  const BlockLanes<acc_t> lanes{reduce_buffer};
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    math::squared_errors(pred + b * K, B * K, target + b * K, M, K, errors + b, B, lanes);
    if (lanes.is_leader()) {
      loss[b] = math::loss_from_errors(errors + b, log_weights ? log_weights + b : nullptr, B, M, weight[b], bound, T);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mc_loss_backward_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ pred,
                                        const scalar_t* __restrict__ target, const acc_t* __restrict__ weight,
                                        const acc_t* __restrict__ errors, const acc_t* __restrict__ log_weights,
                                        int64_t M, int64_t B, int64_t K, math::Bound bound, acc_t T,
                                        scalar_t* __restrict__ grad_pred, scalar_t* __restrict__ grad_target,
                                        acc_t* __restrict__ grad_weight, acc_t* __restrict__ grad_log_weights) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* coef = reinterpret_cast<acc_t*>(shared_raw);  // dloss/de_m of the current example
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    __syncthreads();  // every thread is done with the previous example's coef
    if (threadIdx.x == 0) {
      grad_weight[b] = math::loss_gradients(errors + b, log_weights ? log_weights + b : nullptr, B, M, weight[b],
                                            bound, T, grad_loss[b], coef,
                                            grad_log_weights ? grad_log_weights + b : nullptr);
    }
    __syncthreads();
    // one thread per k holds the sum over m in a register: M at run time costs nothing here
    if (grad_target != nullptr) {
      math::squared_error_backward<0, true>(pred + b * K, B * K, target + b * K, M, K, coef, grad_pred + b * K,
                                            grad_target + b * K, BlockLanes<acc_t>{nullptr});
    } else {
      math::squared_error_backward<0, false>(pred + b * K, B * K, target + b * K, M, K, coef, grad_pred + b * K,
                                             grad_target, BlockLanes<acc_t>{nullptr});
    }
  }
}

std::tuple<at::Tensor, at::Tensor> mc_loss_with_errors(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                       const at::Tensor& weight_in, std::string_view bound_name,
                                                       double temperature,
                                                       const std::optional<at::Tensor>& log_weights_in) {
  const McLossSizes n = check_mc_loss(pred_in, target_in, weight_in, temperature, log_weights_in);
  const math::Bound bound = parse_bound(bound_name);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous();
  const at::Tensor log_weights = log_weights_in ? log_weights_in->contiguous() : at::Tensor();  // undefined: 1/M each
  at::Tensor loss = at::empty({n.B}, pred.options().dtype(acc_type));
  at::Tensor errors = at::empty({n.M, n.B}, loss.options());
  if (n.B == 0) return {loss, errors};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mc_loss_kernel<scalar_t, acc_t><<<blocks_for(n.B, 1), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), weight.const_data_ptr<acc_t>(),
        log_weights.defined() ? log_weights.const_data_ptr<acc_t>() : nullptr, n.M, n.B, n.K, bound,
        static_cast<acc_t>(temperature), errors.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous(), grad_loss = grad_loss_in.to(acc_type).contiguous();
  const at::Tensor errors = errors_in.to(acc_type).contiguous();
  const at::Tensor log_weights = log_weights_in ? log_weights_in->contiguous() : at::Tensor();  // undefined: 1/M each
  at::Tensor grad_pred = at::empty_like(pred), grad_target = gradient_like(target, need_grad_target);
  at::Tensor grad_weight = at::empty({n.B}, weight.options());
  // (M, B) like errors, in the loss dtype that log_weights has
  at::Tensor grad_log_weights = gradient_like(errors, need_grad_log_weights);

  if (n.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // whole 16-byte chunks: nvcc reads coef 16 bytes at a time (LDS.128), also in the loop
      // over the last M % 4 samples, so a buffer of M floats would be read past its end
      const size_t shared_bytes = (static_cast<size_t>(n.M) * sizeof(acc_t) + 15) / 16 * 16;
      TORCH_CHECK(shared_bytes <= 48 * 1024, "mc_loss_backward: M = ", n.M,
                  " Monte Carlo samples exceed what the CUDA kernel holds in shared memory (",
                  48 * 1024 / sizeof(acc_t), ")");
      mc_loss_backward_kernel<scalar_t, acc_t>
          <<<blocks_for(n.B, 1), kThreadsPerBlock, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
              grad_loss.const_data_ptr<acc_t>(), pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
              weight.const_data_ptr<acc_t>(), errors.const_data_ptr<acc_t>(),
              log_weights.defined() ? log_weights.const_data_ptr<acc_t>() : nullptr, n.M, n.B, n.K, bound,
              static_cast<acc_t>(temperature), grad_pred.mutable_data_ptr<scalar_t>(),
              need_grad_target ? grad_target.mutable_data_ptr<scalar_t>() : nullptr,
              grad_weight.mutable_data_ptr<acc_t>(),
              need_grad_log_weights ? grad_log_weights.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_pred, grad_target, grad_weight.to(weight_in.scalar_type()), grad_log_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CUDA, m) {
  m.impl("mc_loss_with_errors", &mc_loss_with_errors);
  m.impl("mc_loss_backward", &mc_loss_backward);
}

}  // namespace softmix::cuda
