// latent_transform on CUDA: one warp per row (position), rows strided over the grid.
// Each warp keeps its running y (and, in the backward, y_0 .. y_{L-1} and g) in float
// accumulators in shared memory; rows too long for that use a global workspace instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/lanes.cuh"
#include "math/latent_transform.h"

namespace softmix::cuda {
namespace {

constexpr int64_t kSharedBytesPerBlock = 48 * 1024;

// Where each warp's scratch of `per_row` accumulators lives, and how the grid is shaped.
struct WarpLaunch {
  int warps_per_block;
  int64_t blocks;
  size_t shared_bytes;
  bool global;  // scratch in a global workspace (rows too long for shared memory)
};

WarpLaunch plan_warp_launch(int64_t rows, int64_t per_row, size_t acc_bytes) {
  const int64_t bytes_per_warp = per_row * static_cast<int64_t>(acc_bytes);
  int warps = kThreadsPerBlock / kWarpSize;
  bool global = false;
  if (bytes_per_warp * warps > kSharedBytesPerBlock) {
    warps = static_cast<int>(std::max<int64_t>(1, kSharedBytesPerBlock / std::max<int64_t>(bytes_per_warp, 1)));
    global = bytes_per_warp > kSharedBytesPerBlock;
    if (global) warps = kThreadsPerBlock / kWarpSize;
  }
  const int64_t blocks = blocks_for(rows, warps);
  const size_t shared = global ? 0 : static_cast<size_t>(bytes_per_warp * warps);
  return {warps, blocks, shared, global};
}

template <typename acc_t>
__device__ acc_t* warp_scratch(acc_t* global_scratch, int64_t per_row) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int warp = threadIdx.x / kWarpSize;
  if (global_scratch != nullptr) return global_scratch + (blockIdx.x * (blockDim.x / kWarpSize) + warp) * per_row;
  return reinterpret_cast<acc_t*>(shared_raw) + warp * per_row;
}

template <typename scalar_t, typename acc_t>
__global__ void latent_transform_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ v,
                                        const acc_t* __restrict__ s, int64_t s_layer_stride, int64_t s_row_stride,
                                        int64_t N, int64_t L, int64_t D, acc_t* global_scratch,
                                        scalar_t* __restrict__ out) {
  acc_t* y = warp_scratch<acc_t>(global_scratch, D);
  const WarpLanes lanes{static_cast<int>(threadIdx.x % kWarpSize)};
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; row < N;
       row += gridDim.x * warps_per_block) {
    math::latent_transform_row(r + row * D, v + row * D, N * D, s + row * s_row_stride, s_layer_stride, L, D, y,
                               out + row * D, lanes);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void latent_transform_backward_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ r,
                                                 const scalar_t* __restrict__ v, const acc_t* __restrict__ s,
                                                 int64_t s_layer_stride, int64_t s_row_stride, int64_t N, int64_t L,
                                                 int64_t D, acc_t* global_scratch, scalar_t* __restrict__ grad_r,
                                                 scalar_t* __restrict__ grad_v, acc_t* __restrict__ grad_s) {
  acc_t* scratch = warp_scratch<acc_t>(global_scratch, (L + 1) * D);
  const WarpLanes lanes{static_cast<int>(threadIdx.x % kWarpSize)};
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize; row < N;
       row += gridDim.x * warps_per_block) {
    const int64_t offset = row * D;
    math::latent_transform_backward_row(grad_y + offset, r + offset, v + offset, N * D, s + row * s_row_stride,
                                        s_layer_stride, L, D, scratch, grad_r + offset, grad_v + offset,
                                        grad_s + row, N, lanes);
  }
}

at::Tensor global_workspace(const WarpLaunch& plan, int64_t per_row, const at::Tensor& like) {
  if (!plan.global) return at::Tensor();
  return at::empty({plan.blocks * plan.warps_per_block * per_row}, like.options());
}

at::Tensor latent_transform(const at::Tensor& r_in, const at::Tensor& v_in, const at::Tensor& s_in) {
  const LatentTransformSizes n = check_latent_transform(r_in, v_in, s_in);
  const c10::cuda::CUDAGuard guard(r_in.device());
  const at::Tensor r = r_in.contiguous(), v = v_in.contiguous();
  const at::Tensor s = s_in.to(accumulate_type(r.scalar_type())).contiguous();
  at::Tensor out = at::empty_like(r);
  if (n.N == 0) return out;
  const int64_t s_layer_stride = n.per_position_s ? n.N : 1, s_row_stride = n.per_position_s ? 1 : 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "latent_transform_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const WarpLaunch plan = plan_warp_launch(n.N, n.D, sizeof(acc_t));
    at::Tensor workspace = global_workspace(plan, n.D, s);
    latent_transform_kernel<scalar_t, acc_t>
        <<<plan.blocks, plan.warps_per_block * kWarpSize, plan.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
            r.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), s.const_data_ptr<acc_t>(), s_layer_stride,
            s_row_stride, n.N, n.L, n.D, plan.global ? workspace.mutable_data_ptr<acc_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_transform_backward(const at::Tensor& grad_y_in,
                                                                         const at::Tensor& r_in,
                                                                         const at::Tensor& v_in,
                                                                         const at::Tensor& s_in) {
  const LatentTransformSizes n = check_latent_transform(r_in, v_in, s_in);
  check_latent_transform_grad(grad_y_in, r_in);
  const c10::cuda::CUDAGuard guard(r_in.device());
  const at::Tensor r = r_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_y = grad_y_in.to(r.scalar_type()).contiguous();
  const at::Tensor s = s_in.to(accumulate_type(r.scalar_type())).contiguous();
  at::Tensor grad_r = at::empty_like(r), grad_v = at::empty_like(v);
  at::Tensor grad_s_rows = at::zeros({n.L, n.N}, s.options());
  const int64_t s_layer_stride = n.per_position_s ? n.N : 1, s_row_stride = n.per_position_s ? 1 : 0;

  if (n.N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "latent_transform_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t per_row = (n.L + 1) * n.D;
      const WarpLaunch plan = plan_warp_launch(n.N, per_row, sizeof(acc_t));
      at::Tensor workspace = global_workspace(plan, per_row, s);
      latent_transform_backward_kernel<scalar_t, acc_t>
          <<<plan.blocks, plan.warps_per_block * kWarpSize, plan.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
              grad_y.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
              s.const_data_ptr<acc_t>(), s_layer_stride, s_row_stride, n.N, n.L, n.D,
              plan.global ? workspace.mutable_data_ptr<acc_t>() : nullptr, grad_r.mutable_data_ptr<scalar_t>(),
              grad_v.mutable_data_ptr<scalar_t>(), grad_s_rows.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor grad_s = n.per_position_s ? grad_s_rows : grad_s_rows.sum(1);
  return {grad_r, grad_v, grad_s.to(s_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(softmix, CUDA, m) {
  m.impl("latent_transform", &latent_transform);
  m.impl("latent_transform_backward", &latent_transform_backward);
}

}  // namespace softmix::cuda
