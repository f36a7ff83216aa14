// Each op's translation unit registers its own Python bindings, so adding an op never
// edits a shared file: `static ipfm::Registrar reg([](pybind11::module_& m) { ... });`
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <vector>

namespace ipfm {

using Binder = std::function<void(pybind11::module_&)>;

inline std::vector<Binder>& binders() {
  static std::vector<Binder> all;
  return all;
}

struct Registrar {
  explicit Registrar(Binder binder) { binders().push_back(std::move(binder)); }
};

}  // namespace ipfm
