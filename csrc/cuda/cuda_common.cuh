// Helpers shared by the CUDA kernels: fp32 <-> element type, 4-element vector access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace ipfm::cuda {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Four consecutive elements as one vector access (16 bytes for fp32, 8 for 16-bit types).
template <typename T>
struct Vec4 {
  using type = typename std::conditional<sizeof(T) == 4, float4, uint2>::type;
  union {
    type v;
    T e[4];
  };
};

}  // namespace ipfm::cuda
