// ipfm_fast._C: pybind11 over raw pointers and streams, independent of torch's C++ ABI,
// so one build serves any torch version. Ops add themselves through ipfm::Registrar.
#include <pybind11/pybind11.h>

#include <exception>
#include <stdexcept>

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
  // The kernels throw std::invalid_argument for a caller's mistake (non-finite sigma, y or
  // x_ref): raise it as ipfm_fast.errors.InvalidInput (a ValueError) like the Python checks.
  // The class is looked up on each throw (rare) rather than kept in a static py::object,
  // whose destructor would run after the interpreter is gone. Local: other pybind11
  // modules keep their own translation.
  pybind11::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      namespace py = pybind11;
      py::object cls = py::reinterpret_borrow<py::object>(PyExc_ValueError);
      try {
        cls = py::module_::import("ipfm_fast.errors").attr("InvalidInput");
      } catch (py::error_already_set&) {  // not importable (never in practice): a plain ValueError
      }
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}
