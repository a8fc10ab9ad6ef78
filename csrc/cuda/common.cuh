// Helpers shared by the CUDA kernels: vector access, launch geometry.
// Only c10/cuda headers are used (no cuBLAS headers needed).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace ibmd {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per vector access (16 bytes of float32)

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kVec) Vec4 {
  scalar_t v[kVec];
};

template <typename scalar_t>
__device__ __forceinline__ Vec4<scalar_t> load4(const scalar_t* p) {
  return *reinterpret_cast<const Vec4<scalar_t>*>(p);
}

template <typename scalar_t>
__device__ __forceinline__ void store4(scalar_t* p, const Vec4<scalar_t>& x) {
  *reinterpret_cast<Vec4<scalar_t>*>(p) = x;
}

// Whether every pointer allows kVec-wide accesses at multiples of kVec.
template <typename scalar_t>
inline bool vec_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * kVec) != 0) return false;
  return true;
}

// Grid for a per-sample map: x spans the work items of one sample, y the
// samples (the kernels loop over y when B exceeds the grid limit).
inline dim3 per_sample_grid(int64_t items_per_sample, int64_t batch) {
  const int64_t x = std::max<int64_t>(1, (items_per_sample + kThreads - 1) / kThreads);
  TORCH_CHECK(x < (int64_t(1) << 31), "ibmd: tensor too large for one launch (", std::to_string(items_per_sample),
              " work items per sample)");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
}

inline unsigned flat_blocks(int64_t items) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t(1) << 30));
}

}  // namespace cuda
}  // namespace ibmd
