// latent_transform on CUDA: one warp per row (position), rows strided over the grid.
// Rows of up to 256 values and up to 4 layers (the SMD head's sizes) stay in registers, with
// every load issued up front. Longer rows run the math header's row routines, each warp
// keeping its running y (and, in the backward, y_0 .. y_{L-1} and g) in float accumulators in
// shared memory, or in a global workspace when even that is too small.
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
  for (int64_t row = first_warp(); row < N; row += warp_count()) {
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
  for (int64_t row = first_warp(); row < N; row += warp_count()) {
    const int64_t offset = row * D;
    math::latent_transform_backward_row(grad_y + offset, r + offset, v + offset, N * D, s + row * s_row_stride,
                                        s_layer_stride, L, D, scratch, grad_r + offset, grad_v + offset,
                                        grad_s + row, N, lanes);
  }
}

// Rows of up to kWarpSize * kValues coordinates and at most kLayers layers: the warp keeps
// the whole row in registers. Lane `lane` owns the packs lane, lane + 32, ... (kValues / kWidth
// of them), and every load of a row is issued before its first reduction. kLayers is 2 or 4:
// arrays sized for 4 layers would hold registers that the common L <= 2 never uses.
constexpr int kMaxLayers = 4;

template <typename acc_t, int kValues>
struct RowSlice {
  acc_t value[kValues];
};

// Loads this lane's coordinates of a row (zeros past D) as acc_t.
template <typename scalar_t, typename acc_t, int kWidth, int kValues>
__device__ __forceinline__ RowSlice<acc_t, kValues> load_slice(const scalar_t* row, int64_t D, int lane) {
  RowSlice<acc_t, kValues> slice;
#pragma unroll
  for (int p = 0; p < kValues / kWidth; ++p) {
    const int64_t d = (static_cast<int64_t>(p) * kWarpSize + lane) * kWidth;
    if (d < D) {
      const auto pack = load_pack<scalar_t, kWidth>(row + d);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) slice.value[p * kWidth + j] = static_cast<acc_t>(pack.value[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) slice.value[p * kWidth + j] = acc_t(0);
    }
  }
  return slice;
}

template <typename scalar_t, typename acc_t, int kWidth, int kValues>
__device__ __forceinline__ void store_slice(scalar_t* row, int64_t D, int lane, const RowSlice<acc_t, kValues>& slice) {
#pragma unroll
  for (int p = 0; p < kValues / kWidth; ++p) {
    const int64_t d = (static_cast<int64_t>(p) * kWarpSize + lane) * kWidth;
    if (d < D) {
      Pack<scalar_t, kWidth> pack;
#pragma unroll
      for (int j = 0; j < kWidth; ++j) pack.value[j] = static_cast<scalar_t>(slice.value[p * kWidth + j]);
      store_pack(row + d, pack);
    }
  }
}

// <a, b> over the whole row: this lane's share, summed over the warp.
template <typename acc_t, int kValues>
__device__ __forceinline__ acc_t row_dot(const RowSlice<acc_t, kValues>& a, const RowSlice<acc_t, kValues>& b) {
  acc_t partial = 0;
#pragma unroll
  for (int i = 0; i < kValues; ++i) partial += a.value[i] * b.value[i];
  return warp_sum(partial);
}

// What one row reads: its first vector (r in the forward, grad_y beside r in the backward)
// and the L rows of v.
template <typename acc_t, int kValues, int kLayers>
struct RowLoads {
  RowSlice<acc_t, kValues> r, grad_y;
  RowSlice<acc_t, kValues> v[kLayers];
};

template <typename scalar_t, typename acc_t, int kWidth, int kValues, int kLayers>
__device__ __forceinline__ void load_row(RowLoads<acc_t, kValues, kLayers>& loads, const scalar_t* grad_y,
                                         const scalar_t* r, const scalar_t* v, int64_t row, int64_t N, int64_t L,
                                         int64_t D, int lane) {
  loads.r = load_slice<scalar_t, acc_t, kWidth, kValues>(r + row * D, D, lane);
  if (grad_y != nullptr) loads.grad_y = load_slice<scalar_t, acc_t, kWidth, kValues>(grad_y + row * D, D, lane);
#pragma unroll
  for (int l = 0; l < kLayers; ++l) {
    if (l < L) loads.v[l] = load_slice<scalar_t, acc_t, kWidth, kValues>(v + (l * N + row) * D, D, lane);
  }
}

template <typename scalar_t, typename acc_t, int kWidth, int kValues, int kLayers>
__global__ void latent_transform_registers_kernel(const scalar_t* __restrict__ r, const scalar_t* __restrict__ v,
                                                  const acc_t* __restrict__ s, int64_t s_layer_stride,
                                                  int64_t s_row_stride, int64_t N, int64_t L, int64_t D,
                                                  scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t row = first_warp(); row < N; row += warp_count()) {
    RowLoads<acc_t, kValues, kLayers> loads;
    load_row<scalar_t, acc_t, kWidth>(loads, static_cast<const scalar_t*>(nullptr), r, v, row, N, L, D, lane);
    RowSlice<acc_t, kValues>& y = loads.r;
#pragma unroll
    for (int l = 0; l < kLayers; ++l) {
      if (l >= L) break;
      const acc_t a = row_dot(loads.v[l], y), s_l = s[row * s_row_stride + l * s_layer_stride];
#pragma unroll
      for (int i = 0; i < kValues; ++i) y.value[i] = math::layer_output(loads.v[l].value[i], a, s_l, y.value[i]);
    }
    store_slice<scalar_t, acc_t, kWidth, kValues>(out + row * D, D, lane, y);
  }
}

// The backward holds a row for longer (the forward again, then L rounds of two reductions),
// so it loads the warp's next row before working on this one: the loads stay in flight
// through the reductions. Only where that second row fits in registers (at most 128 bytes
// per lane): beyond, nvcc spills, or occupancy drops more than the prefetch gains.
template <typename scalar_t, typename acc_t, int kWidth, int kValues, int kLayers>
__global__ void latent_transform_registers_backward_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ r, const scalar_t* __restrict__ v,
    const acc_t* __restrict__ s, int64_t s_layer_stride, int64_t s_row_stride, int64_t N, int64_t L, int64_t D,
    scalar_t* __restrict__ grad_r, scalar_t* __restrict__ grad_v, acc_t* __restrict__ grad_s) {
  constexpr bool kPrefetch = kValues * (2 + kLayers) * sizeof(acc_t) <= 128;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = warp_count();
  int64_t row = first_warp();
  if (row >= N) return;
  RowLoads<acc_t, kValues, kLayers> loads, next_loads;
  load_row<scalar_t, acc_t, kWidth>(loads, grad_y, r, v, row, N, L, D, lane);
  for (;; row += stride) {
    const bool has_next = row + stride < N;
    if (kPrefetch && has_next) load_row<scalar_t, acc_t, kWidth>(next_loads, grad_y, r, v, row + stride, N, L, D, lane);

    // The forward again, keeping each layer's input y_l (y_0 = r) and a_l.
    RowSlice<acc_t, kValues> inputs[kLayers];
    acc_t a[kLayers], s_rows[kLayers];
    inputs[0] = loads.r;
#pragma unroll
    for (int l = 0; l < kLayers; ++l) {
      if (l >= L) break;
      a[l] = row_dot(loads.v[l], inputs[l]);
      s_rows[l] = s[row * s_row_stride + l * s_layer_stride];
      if (l + 1 < kLayers && l + 1 < L) {
#pragma unroll
        for (int i = 0; i < kValues; ++i) {
          inputs[l + 1].value[i] = math::layer_output(loads.v[l].value[i], a[l], s_rows[l], inputs[l].value[i]);
        }
      }
    }
    RowSlice<acc_t, kValues>& g = loads.grad_y;
#pragma unroll
    for (int l = kLayers - 1; l >= 0; --l) {
      if (l >= L) continue;
      const acc_t gv = row_dot(g, loads.v[l]), gy = row_dot(g, inputs[l]);
      RowSlice<acc_t, kValues> grad_v_l;
#pragma unroll
      for (int i = 0; i < kValues; ++i) {
        grad_v_l.value[i] = math::layer_grad_v(g.value[i], a[l], gv, inputs[l].value[i]);
        g.value[i] = math::layer_grad_input(loads.v[l].value[i], gv, s_rows[l], g.value[i]);
      }
      store_slice<scalar_t, acc_t, kWidth, kValues>(grad_v + (l * N + row) * D, D, lane, grad_v_l);
      if (lane == 0) grad_s[l * N + row] = gy;
    }
    store_slice<scalar_t, acc_t, kWidth, kValues>(grad_r + row * D, D, lane, g);
    if (!has_next) break;
    if constexpr (kPrefetch) {
      loads = next_loads;
    } else {
      load_row<scalar_t, acc_t, kWidth>(loads, grad_y, r, v, row + stride, N, L, D, lane);
    }
  }
}

// Runs body(width, values, layers) for the register kernels when a row fits them (D <= 256
// values, L <= kMaxLayers) and returns true; else returns false. `values` per lane is 4
// (D <= 128) or 8, `layers` 2 (L <= 2) or 4; the width is the widest pack up to `values` that
// the rows at `pointers` allow, else 1.
template <typename scalar_t, typename Body, typename... Pointers>
bool with_register_rows(int64_t L, int64_t D, Body&& body, const Pointers*... pointers) {
  if (L > kMaxLayers || D > 8 * kWarpSize) return false;
  const auto run = [&](auto values, auto layers) {
    constexpr int kValues = decltype(values)::value;
    constexpr int kWide = kPackWidth<scalar_t> < kValues ? kPackWidth<scalar_t> : kValues;
    with_packs<kWide>(D, [&](auto width) { body(width, values, layers); }, pointers...);
  };
  const auto with_layers = [&](auto values) {
    if (L <= 2) {
      run(values, std::integral_constant<int, 2>{});
    } else {
      run(values, std::integral_constant<int, kMaxLayers>{});
    }
  };
  if (D <= 4 * kWarpSize) {
    with_layers(std::integral_constant<int, 4>{});
  } else {
    with_layers(std::integral_constant<int, 8>{});
  }
  return true;
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
    const scalar_t *r_ptr = r.const_data_ptr<scalar_t>(), *v_ptr = v.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    const auto in_registers = [&](auto width, auto values, auto layers) {
      constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
      latent_transform_registers_kernel<scalar_t, acc_t, decltype(width)::value, decltype(values)::value,
                                        decltype(layers)::value>
          <<<blocks_for(n.N, kWarpsPerBlock), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
              r_ptr, v_ptr, s.const_data_ptr<acc_t>(), s_layer_stride, s_row_stride, n.N, n.L, n.D, out_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (with_register_rows<scalar_t>(n.L, n.D, in_registers, r_ptr, v_ptr, out_ptr)) return;
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
      const scalar_t *grad_y_ptr = grad_y.const_data_ptr<scalar_t>(), *r_ptr = r.const_data_ptr<scalar_t>(),
                     *v_ptr = v.const_data_ptr<scalar_t>();
      scalar_t *grad_r_ptr = grad_r.mutable_data_ptr<scalar_t>(), *grad_v_ptr = grad_v.mutable_data_ptr<scalar_t>();
      const auto in_registers = [&](auto width, auto values, auto layers) {
        constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
        latent_transform_registers_backward_kernel<scalar_t, acc_t, decltype(width)::value, decltype(values)::value,
                                                   decltype(layers)::value>
            <<<blocks_for(n.N, kWarpsPerBlock), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
                grad_y_ptr, r_ptr, v_ptr, s.const_data_ptr<acc_t>(), s_layer_stride, s_row_stride, n.N, n.L, n.D,
                grad_r_ptr, grad_v_ptr, grad_s_rows.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (with_register_rows<scalar_t>(n.L, n.D, in_registers, grad_y_ptr, r_ptr, v_ptr, grad_r_ptr, grad_v_ptr)) {
        return;
      }
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
