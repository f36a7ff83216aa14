// Which instruction-set path the CPU kernels take (see isa.h): IPFM_FAST_CPU_ISA, then the
// widest path the CPU (and the OS: __builtin_cpu_supports checks XCR0) supports.
#include "isa.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ipfm/registry.h"

namespace ipfm::cpu {
namespace {

const SimdKernels kGeneric = {Isa::kGeneric, "generic", generic::randn4, generic::randn4_sq, generic::sq_terms,
                              generic::apply_f32, generic::screen, generic::combine,
                              FieldTiles{2, 4, 24, 512, 8}, nullptr, 0};
const SimdKernels kAvx2 = {Isa::kAvx2, "avx2", avx2::randn4, avx2::randn4_sq, avx2::sq_terms, avx2::apply_f32,
                           avx2::screen, avx2::combine, avx2::kTiles, avx2::adam_body, 8};
const SimdKernels kAvx512 = {Isa::kAvx512, "avx512", avx512::randn4, avx512::randn4_sq, avx512::sq_terms,
                             avx512::apply_f32, avx512::screen, avx512::combine, avx512::kTiles, avx512::adam_body,
                             16};

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kGeneric: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("fma");
  }
  return false;
#else
  return isa == Isa::kGeneric;
#endif
}

const SimdKernels& kernels_of(Isa isa) {
  return isa == Isa::kAvx512 ? kAvx512 : isa == Isa::kAvx2 ? kAvx2 : kGeneric;
}

Isa widest() { return cpu_has(Isa::kAvx512) ? Isa::kAvx512 : cpu_has(Isa::kAvx2) ? Isa::kAvx2 : Isa::kGeneric; }

// name -> path; false for an unknown name ("" and "auto" mean the widest).
bool parse(const char* name, Isa& out) {
  const std::string s = name ? name : "";
  if (s.empty() || s == "auto") out = widest();
  else if (s == "avx512") out = Isa::kAvx512;
  else if (s == "avx2") out = Isa::kAvx2;
  else if (s == "generic" || s == "scalar") out = Isa::kGeneric;
  else return false;
  return true;
}

struct Choice {
  const SimdKernels* kernels;
  std::string requested;  // IPFM_FAST_CPU_ISA as given ("" when unset)
  std::string reason;     // why this path
};

Choice decide() {
  Choice c;
  const char* env = std::getenv("IPFM_FAST_CPU_ISA");
  c.requested = env ? env : "";
  Isa want = widest();
  if (!c.requested.empty() && !parse(env, want)) {
    c.reason = "IPFM_FAST_CPU_ISA=" + c.requested + " is not one of avx512, avx2, generic: the widest path";
    want = widest();
  } else if (!c.requested.empty() && c.requested != "auto") {
    if (cpu_has(want)) {
      c.reason = "IPFM_FAST_CPU_ISA=" + c.requested;
    } else {
      c.reason = "IPFM_FAST_CPU_ISA=" + c.requested + ", which this CPU lacks: the widest path it has";
      want = widest();
    }
  } else {
    c.reason = "the widest this CPU supports";
  }
  c.kernels = &kernels_of(want);
  return c;
}

Choice& choice() {
  static Choice c = decide();
  return c;
}

}  // namespace

const SimdKernels& simd() { return *choice().kernels; }

bool set_isa(const char* name) {
  if (!name || !*name) {  // back to what the environment and the CPU decide
    choice() = decide();
    return true;
  }
  Isa isa;
  if (!parse(name, isa) || !cpu_has(isa)) return false;
  Choice& c = choice();
  c.kernels = &kernels_of(isa);
  c.reason = std::string("set in-process (") + name + ")";
  return true;
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("cpu_isa", []() { return std::string(simd().name); },
        "the instruction-set path of the CPU kernels: avx512, avx2 or generic");
  m.def("cpu_isa_report", []() {
    py::list supported;
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric})
      if (cpu_has(isa)) supported.append(kernels_of(isa).name);
    py::dict d;
    d["path"] = simd().name;
    d["supported"] = supported;
    d["requested"] = choice().requested;
    d["reason"] = choice().reason;
    return d;
  }, "{path, supported, requested (IPFM_FAST_CPU_ISA), reason}");
  m.def("_set_cpu_isa", [](const std::string& name) { return set_isa(name.c_str()); }, py::arg("name"),
        "tests: switch the CPU kernels' path in-process (False if the CPU lacks it); '' restores the default");
  // Tests: one path's random-number kernels on their own, so that counters no op call can
  // reach in a test (the 2^32 carry into the high word needs 2^34 elements) and every tail
  // length are checked against the float64 spec. which: 0 randn4, 1 randn4_sq, 2 sq_terms.
  m.def("_cpu_rng", [](const std::string& name, int which, uint64_t seed, uint64_t first, int64_t count,
                       uintptr_t normals, uintptr_t terms) {
    Isa isa;
    if (!parse(name.c_str(), isa) || !cpu_has(isa))
      throw std::invalid_argument("_cpu_rng: path " + name + " is unknown or not supported by this CPU");
    if (count < 0) throw std::invalid_argument("_cpu_rng: negative count");
    const SimdKernels& k = kernels_of(isa);
    float* n = reinterpret_cast<float*>(normals);
    float* t = reinterpret_cast<float*>(terms);
    if (which == 0) k.randn4(seed, first, count, n);
    else if (which == 1) k.randn4_sq(seed, first, count, n, t);
    else if (which == 2) k.sq_terms(seed, first, count, t);
    else throw std::invalid_argument("_cpu_rng: which must be 0, 1 or 2");
  }, py::arg("isa"), py::arg("which"), py::arg("seed"), py::arg("first"), py::arg("count"), py::arg("normals"),
     py::arg("terms"), "tests: normals[4 count] / terms[count] of one path's Philox kernels (raw fp32 pointers)");
});

}  // namespace ipfm::cpu
