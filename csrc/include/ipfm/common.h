// Definitions shared by the CPU (C++/OpenMP) and CUDA kernels.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IPFM_HD __host__ __device__ __forceinline__
#else
#define IPFM_HD inline
#endif

namespace ipfm {

// Element types the fused kernels read and write; arithmetic is always fp32.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Thrown (CPU) / returned (CUDA launcher) messages carry the op name so the Python
// wrapper can re-raise them unchanged.
}  // namespace ipfm
