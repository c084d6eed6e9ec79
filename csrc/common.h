// Macros shared by the host (CPU) and device (CUDA) compilations of the math headers.
#pragma once

#if defined(__CUDACC__)
#define SOFTMIX_HD __host__ __device__ __forceinline__
#else
#define SOFTMIX_HD inline
#endif

// A loop with a constant trip count unrolled whole: what lets an outer loop around it vectorise.
#if defined(__CUDACC__) || defined(__clang__)
#define SOFTMIX_UNROLL _Pragma("unroll")
#else
#define SOFTMIX_UNROLL _Pragma("GCC unroll 16")
#endif

// Reductions over contiguous rows vectorise only if the compiler may reorder the sum;
// `omp simd reduction` grants that for one loop (needs -fopenmp-simd, no OpenMP runtime).
// `omp simd` alone asks for a loop whose body holds an inner loop or branches to be
// vectorised anyway (gcc leaves such loops scalar by itself).
#if defined(SOFTMIX_OPENMP_SIMD) && !defined(__CUDACC__)
#define SOFTMIX_PRAGMA(text) _Pragma(#text)
#define SOFTMIX_SIMD_SUM(...) SOFTMIX_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define SOFTMIX_SIMD SOFTMIX_PRAGMA(omp simd)
#else
#define SOFTMIX_SIMD_SUM(...)
#define SOFTMIX_SIMD
#endif
