// ipfm_fast._C: pybind11 over raw pointers and streams, independent of torch's C++ ABI,
// so one build serves any torch version. Ops add themselves through ipfm::Registrar.
#include <pybind11/pybind11.h>

#include "ipfm/registry.h"

#ifndef IPFM_CUDA_SKIP_REASON
#define IPFM_CUDA_SKIP_REASON ""
#endif
#ifndef IPFM_CUDA_ARCHS
#define IPFM_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "ipfm_fast compiled kernels (CPU C++/OpenMP, CUDA when built)";
#ifdef IPFM_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("cuda_archs") = IPFM_CUDA_ARCHS;
  m.attr("cuda_skip_reason") = IPFM_CUDA_SKIP_REASON;
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  for (auto& bind : ipfm::binders()) bind(m);
}
