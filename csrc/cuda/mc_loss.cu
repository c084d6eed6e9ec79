// mc_loss on CUDA: one block per example, examples strided over the grid. The block sums
// each sample's squared error; its M errors (and, in the backward, their weights) sit in a
// small global workspace written by the leader thread and read by all after a barrier.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>

#include "checks.h"
#include "cuda/lanes.cuh"
#include "math/mc_loss.h"

namespace softmix::cuda {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void mc_loss_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                               const acc_t* __restrict__ weight, int64_t M, int64_t B, int64_t K, math::Bound bound,
                               acc_t T, acc_t* __restrict__ workspace, acc_t* __restrict__ loss) {
  __shared__ acc_t reduce_buffer[kThreadsPerBlock / kWarpSize];
  const BlockLanes<acc_t> lanes{reduce_buffer};
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t* err = workspace + b * M;
    math::squared_errors(pred + b * K, B * K, target + b * K, M, K, err, lanes);
    if (lanes.is_leader()) loss[b] = math::loss_from_errors(err, M, weight[b], bound, T);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mc_loss_backward_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ pred,
                                        const scalar_t* __restrict__ target, const acc_t* __restrict__ weight,
                                        int64_t M, int64_t B, int64_t K, math::Bound bound, acc_t T,
                                        acc_t* __restrict__ workspace, scalar_t* __restrict__ grad_pred,
                                        scalar_t* __restrict__ grad_target, acc_t* __restrict__ grad_weight) {
  __shared__ acc_t reduce_buffer[kThreadsPerBlock / kWarpSize];
  const BlockLanes<acc_t> lanes{reduce_buffer};
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    acc_t* err = workspace + b * 2 * M;
    acc_t* coef = err + M;
    math::squared_errors(pred + b * K, B * K, target + b * K, M, K, err, lanes);
    if (lanes.is_leader()) {
      const acc_t upstream = grad_loss[b];
      grad_weight[b] = upstream * math::loss_gradients(err, M, weight[b], bound, T, coef);
      for (int64_t m = 0; m < M; ++m) coef[m] *= upstream;
    }
    lanes.sync();
    math::squared_error_backward(pred + b * K, B * K, target + b * K, M, K, coef, grad_pred + b * K,
                                 grad_target + b * K, lanes);
  }
}

at::Tensor mc_loss(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& weight_in,
                   std::string_view bound_name, double temperature) {
  const McLossSizes n = check_mc_loss(pred_in, target_in, weight_in, temperature);
  const math::Bound bound = parse_bound(bound_name);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous();
  at::Tensor loss = at::empty({n.B}, pred.options().dtype(acc_type));
  if (n.B == 0) return loss;
  at::Tensor workspace = at::empty({n.B * n.M}, loss.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mc_loss_kernel<scalar_t, acc_t><<<blocks_for(n.B, 1), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), weight.const_data_ptr<acc_t>(), n.M, n.B,
        n.K, bound, static_cast<acc_t>(temperature), workspace.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mc_loss_backward(const at::Tensor& grad_loss_in,
                                                                const at::Tensor& pred_in,
                                                                const at::Tensor& target_in,
                                                                const at::Tensor& weight_in,
                                                                std::string_view bound_name, double temperature) {
  const McLossSizes n = check_mc_loss(pred_in, target_in, weight_in, temperature);
  check_mc_loss_grad(grad_loss_in, n.B, pred_in);
  const math::Bound bound = parse_bound(bound_name);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::ScalarType acc_type = accumulate_type(pred_in.scalar_type());
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const at::Tensor weight = weight_in.to(acc_type).contiguous(), grad_loss = grad_loss_in.to(acc_type).contiguous();
  at::Tensor grad_pred = at::empty_like(pred), grad_target = at::empty_like(target);
  at::Tensor grad_weight = at::empty({n.B}, weight.options());

  if (n.B > 0) {
    at::Tensor workspace = at::empty({n.B * 2 * n.M}, weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      mc_loss_backward_kernel<scalar_t, acc_t>
          <<<blocks_for(n.B, 1), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
              grad_loss.const_data_ptr<acc_t>(), pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
              weight.const_data_ptr<acc_t>(), n.M, n.B, n.K, bound, static_cast<acc_t>(temperature),
              workspace.mutable_data_ptr<acc_t>(), grad_pred.mutable_data_ptr<scalar_t>(),
              grad_target.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_pred, grad_target, grad_weight.to(weight_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CUDA, m) {
  m.impl("mc_loss", &mc_loss);
  m.impl("mc_loss_backward", &mc_loss_backward);
}

}  // namespace softmix::cuda
