// What the CUDA kernels share: how a warp shares one row of the math headers (see
// math/latent_transform.h), 16-byte packs of values, and the grid size.
#pragma once

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS and cuSPARSE, which a
// bare nvcc install (the compile check on CPU-only machines) does not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace softmix::cuda {

constexpr int kWarpSize = 32;
constexpr int kThreadsPerBlock = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// A warp shares one row: lane i owns coordinates i, i + 32, i + 64, ...
struct WarpLanes {
  int lane;
  __device__ int64_t first() const { return lane; }
  __device__ static constexpr int64_t step() { return kWarpSize; }
  template <typename T>
  __device__ T sum(T partial) const { return warp_sum(partial); }
  __device__ bool is_leader() const { return lane == 0; }
  __device__ void sync() const { __syncwarp(); }
};

// kWidth consecutive values moved by one 16-byte (or narrower) global access: elementwise
// kernels stream packs, not scalars, so that every lane keeps more bytes in flight.
template <typename T, int kWidth>
struct alignas(sizeof(T) * kWidth) Pack {
  T value[kWidth];
};

template <typename T, int kWidth>
__device__ __forceinline__ Pack<T, kWidth> load_pack(const T* from) {
  return *reinterpret_cast<const Pack<T, kWidth>*>(from);
}

template <typename T, int kWidth>
__device__ __forceinline__ void store_pack(T* to, const Pack<T, kWidth>& pack) {
  *reinterpret_cast<Pack<T, kWidth>*>(to) = pack;
}

// The widest pack of T: 16 bytes.
template <typename T>
constexpr int kPackWidth = 16 / sizeof(T);

// Runs body(std::integral_constant<int, width>{}) with width = kWidth when rows of
// `row_length` values at each pointer (null: absent) split into whole packs of kWidth at
// 16-byte-aligned addresses; otherwise with width 1, single values.
template <int kWidth, typename Body, typename... Pointers>
void with_packs(int64_t row_length, Body&& body, const Pointers*... pointers) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (row_length % kWidth == 0 && (aligned(pointers) && ...)) {
    body(std::integral_constant<int, kWidth>{});
  } else {
    body(std::integral_constant<int, 1>{});
  }
}

// Kernels that give each warp one work item at a time stride the items over the grid's warps.
__device__ __forceinline__ int64_t first_warp() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int64_t warp_count() { return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize); }

inline int64_t multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// Enough blocks to fill the GPU several times over; kernels loop when there is more work.
inline int64_t blocks_for(int64_t work_items, int64_t items_per_block, int64_t blocks_per_sm = 16) {
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  const int64_t cap = multiprocessor_count() * blocks_per_sm;
  return std::max<int64_t>(1, std::min(needed, cap));
}

}  // namespace softmix::cuda
