// Runtime helpers for the bindings: error messages and device queries.
#include <cuda_runtime.h>

#include "cuda_api.h"

namespace ipfm::cuda {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace ipfm::cuda
