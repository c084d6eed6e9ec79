// mc_loss on CUDA. Each example's K values are split into chunks, one warp per chunk, so the
// grid fills the GPU whatever B is:
//   forward:  partial sums of squared errors per (example, sample, chunk), then one warp per
//             example adds them in a fixed order into the (M, B) errors and takes the loss;
//   backward: one thread per example computes its M coefficients dloss/de_m from the errors
//             the forward returned, then an elementwise pass writes the gradients.
// Both passes over pred stream 16-byte packs when the rows allow. log_weights (M, B), null
// without them, is read beside the errors at the same stride.
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

// Each warp takes one chunk of kChunkValues consecutive values of one example, kValuesPerLane
// per lane (as packs of kWidth): enough chunks to fill the GPU at any batch size, and enough
// independent loads per lane to keep the memory busy.
constexpr int64_t kValuesPerLane = 16;
constexpr int64_t kChunkValues = kWarpSize * kValuesPerLane;

int64_t chunks_per_example(int64_t K) { return (K + kChunkValues - 1) / kChunkValues; }

// Where a warp's work item `item` = b * chunks + c lies: values [begin, end) of example b.
struct Chunk {
  int64_t b, c, begin, end;
};

__device__ __forceinline__ Chunk chunk_of(int64_t item, int64_t chunks, int64_t K) {
  const int64_t b = item / chunks, c = item % chunks;
  const int64_t begin = c * kChunkValues;
  return {b, c, begin, begin + kChunkValues < K ? begin + kChunkValues : K};
}

// partials[(b * M + m) * chunks + c] = sum over chunk c of (pred[m, b, k] - target[b, k])^2.
template <typename scalar_t, typename acc_t, int kWidth>
__global__ void squared_error_partials_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                                              int64_t M, int64_t B, int64_t K, int64_t chunks,
                                              acc_t* __restrict__ partials) {
  constexpr int kPacksPerLane = kValuesPerLane / kWidth;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t item = first_warp(); item < B * chunks; item += warp_count()) {
    const Chunk chunk = chunk_of(item, chunks, K);
    const scalar_t* target_b = target + chunk.b * K;
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* pred_mb = pred + (m * B + chunk.b) * K;
      acc_t partial = 0;
#pragma unroll
      for (int i = 0; i < kPacksPerLane; ++i) {
        const int64_t k = chunk.begin + (i * kWarpSize + lane) * kWidth;
        if (k < chunk.end) {  // K is a multiple of kWidth: the pack lies inside the row
          const auto p = load_pack<scalar_t, kWidth>(pred_mb + k), t = load_pack<scalar_t, kWidth>(target_b + k);
#pragma unroll
          for (int j = 0; j < kWidth; ++j) partial += math::squared_difference<acc_t>(p.value[j], t.value[j]);
        }
      }
      partial = warp_sum(partial);
      if (lane == 0) partials[(chunk.b * M + m) * chunks + chunk.c] = partial;
    }
  }
}

// One warp per example: errors[m, b] = (sum of its chunks' partials) / K, in a fixed order
// (deterministic, unlike atomics), then the loss from the M errors.
template <typename acc_t>
__global__ void mc_loss_from_partials_kernel(const acc_t* __restrict__ partials, int64_t chunks,
                                             const acc_t* __restrict__ weight, const acc_t* __restrict__ log_weights,
                                             int64_t M, int64_t B, int64_t K, math::Bound bound, acc_t T,
                                             acc_t* __restrict__ errors, acc_t* __restrict__ loss) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t b = first_warp(); b < B; b += warp_count()) {
    for (int64_t m = 0; m < M; ++m) {
      const acc_t* row = partials + (b * M + m) * chunks;
      acc_t total = 0;
      for (int64_t c = lane; c < chunks; c += kWarpSize) total += row[c];
      total = warp_sum(total);
      if (lane == 0) errors[m * B + b] = total / static_cast<acc_t>(K);
    }
    if (lane == 0) {
      loss[b] = math::loss_from_errors(errors + b, log_weights ? log_weights + b : nullptr, B, M, weight[b], bound, T);
    }
  }
}

// One thread per example: coef[b * M + m] = upstream * dloss/de_m, and the gradients of the
// weight and log-weights.
template <typename acc_t>
__global__ void mc_loss_coefficients_kernel(const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ weight,
                                            const acc_t* __restrict__ errors, const acc_t* __restrict__ log_weights,
                                            int64_t M, int64_t B, math::Bound bound, acc_t T,
                                            acc_t* __restrict__ coef, acc_t* __restrict__ grad_weight,
                                            acc_t* __restrict__ grad_log_weights) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad_weight[b] = math::loss_gradients(errors + b, log_weights ? log_weights + b : nullptr, B, M, weight[b], bound,
                                          T, grad_loss[b], coef + b * M,
                                          grad_log_weights ? grad_log_weights + b : nullptr);
  }
}

// Elementwise once the coefficients are known: grad_pred[m, b, k] and grad_target[b, k]
// (= -sum_m grad_pred[m, b, k]; not written when null), chunked like the forward.
template <typename scalar_t, typename acc_t, int kWidth>
__global__ void squared_error_backward_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                                              const acc_t* __restrict__ coef, int64_t M, int64_t B, int64_t K,
                                              int64_t chunks, scalar_t* __restrict__ grad_pred,
                                              scalar_t* __restrict__ grad_target) {
  using ScalarPack = Pack<scalar_t, kWidth>;
  constexpr int kPacksPerLane = kValuesPerLane / kWidth;
  const int lane = threadIdx.x % kWarpSize;
  const acc_t two_over_k = acc_t(2) / static_cast<acc_t>(K);
  for (int64_t item = first_warp(); item < B * chunks; item += warp_count()) {
    const Chunk chunk = chunk_of(item, chunks, K);
    const acc_t* coef_b = coef + chunk.b * M;
#pragma unroll
    for (int i = 0; i < kPacksPerLane; ++i) {
      const int64_t k = chunk.begin + (i * kWarpSize + lane) * kWidth;
      if (k >= chunk.end) break;
      const int64_t bk = chunk.b * K + k;
      const ScalarPack t = load_pack<scalar_t, kWidth>(target + bk);
      acc_t g_target[kWidth] = {};
      for (int64_t m = 0; m < M; ++m) {
        const ScalarPack p = load_pack<scalar_t, kWidth>(pred + m * B * K + bk);
        const acc_t c = coef_b[m];
        ScalarPack g;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const acc_t g_j = math::squared_error_gradient(c, two_over_k, static_cast<acc_t>(p.value[j]),
                                                         static_cast<acc_t>(t.value[j]));
          g.value[j] = static_cast<scalar_t>(g_j);
          g_target[j] -= g_j;
        }
        store_pack(grad_pred + m * B * K + bk, g);
      }
      if (grad_target != nullptr) {
        ScalarPack g;
#pragma unroll
        for (int j = 0; j < kWidth; ++j) g.value[j] = static_cast<scalar_t>(g_target[j]);
        store_pack(grad_target + bk, g);
      }
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

  const int64_t chunks = chunks_per_example(n.K);
  at::Tensor partials = at::empty({n.B, n.M, chunks}, loss.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pred_ptr = pred.const_data_ptr<scalar_t>(), *target_ptr = target.const_data_ptr<scalar_t>();
    with_packs<kPackWidth<scalar_t>>(
        n.K,
        [&](auto width) {
          squared_error_partials_kernel<scalar_t, acc_t, decltype(width)::value>
              <<<blocks_for(n.B * chunks, kWarpsPerBlock), kThreadsPerBlock, 0, stream>>>(
                  pred_ptr, target_ptr, n.M, n.B, n.K, chunks, partials.mutable_data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        pred_ptr, target_ptr);
    mc_loss_from_partials_kernel<acc_t><<<blocks_for(n.B, kWarpsPerBlock), kThreadsPerBlock, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), chunks, weight.const_data_ptr<acc_t>(),
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
    at::Tensor coef = at::empty({n.B, n.M}, weight.options());  // dloss/de_m, scaled by grad_loss
    const int64_t chunks = chunks_per_example(n.K);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "mc_loss_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      mc_loss_coefficients_kernel<acc_t><<<blocks_for(n.B, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
          grad_loss.const_data_ptr<acc_t>(), weight.const_data_ptr<acc_t>(), errors.const_data_ptr<acc_t>(),
          log_weights.defined() ? log_weights.const_data_ptr<acc_t>() : nullptr, n.M, n.B, bound,
          static_cast<acc_t>(temperature), coef.mutable_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(),
          need_grad_log_weights ? grad_log_weights.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const scalar_t *pred_ptr = pred.const_data_ptr<scalar_t>(), *target_ptr = target.const_data_ptr<scalar_t>();
      scalar_t *grad_pred_ptr = grad_pred.mutable_data_ptr<scalar_t>(),
               *grad_target_ptr = need_grad_target ? grad_target.mutable_data_ptr<scalar_t>() : nullptr;
      with_packs<kPackWidth<scalar_t>>(
          n.K,
          [&](auto width) {
            squared_error_backward_kernel<scalar_t, acc_t, decltype(width)::value>
                <<<blocks_for(n.B * chunks, kWarpsPerBlock), kThreadsPerBlock, 0, stream>>>(
                    pred_ptr, target_ptr, coef.const_data_ptr<acc_t>(), n.M, n.B, n.K, chunks, grad_pred_ptr,
                    grad_target_ptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          },
          pred_ptr, target_ptr, grad_pred_ptr, grad_target_ptr);
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
