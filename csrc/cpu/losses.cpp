// CPU kernels of the IPFM generator loss and the fake (field-matching) loss (math in
// ipfm/losses_math.h). Forward: one read of each input; every (row, chunk) work item
// writes its partial sums, then one sequential pass sums the chunks of each row and the
// rows of the batch in a fixed order (fp64). Backward: one read of each needed input and
// one write of each needed gradient. Work items are split across OpenMP threads; the
// result bits never depend on the thread count.
//
// Inner loops keep kLanes independent fp32 accumulators (fixed order, no -ffast-math
// needed) so that GCC vectorizes them; each kernel is compiled for AVX2/FMA
// (x86-64-v3) and a baseline, picked at load time (target_clones).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "ipfm/losses_math.h"
#include "ipfm/registry.h"

namespace ipfm::cpu {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kChunk = 4096;  // elements per work item (a multiple of kLanes)

#define IPFM_INLINE inline __attribute__((always_inline))

template <typename T>
IPFM_INLINE float load(const T* p) {
  return to_float(*p);
}
template <typename T>
IPFM_INLINE void store(T* p, float v) {
  *p = from_float<T>(v);
}

template <typename T>
struct Rows {
  const T* p;
  int64_t stride;
  IPFM_INLINE const T* row(int64_t r) const { return p + r * stride; }
};

// Pairwise sum of the lanes: a fixed tree.
IPFM_INLINE float lane_sum(const float* acc) {
  float t[kLanes];
  for (int l = 0; l < kLanes; ++l) t[l] = acc[l];
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) t[l] += t[l + width];
  return t[0];
}

// ---------------------------------------------------------------------------------------
// chunk kernels (one row, elements [0, len) of a chunk), vectorized
// ---------------------------------------------------------------------------------------

// 0 when a, b and x are finite, NaN otherwise (v * 0 is NaN exactly for +-Inf and NaN;
// no -ffast-math here, so the compiler keeps it): four vector ops instead of the nine a
// compare-and-count takes, which matters because this loop is compute bound in cache.
IPFM_INLINE float nonfinite_flag(float a, float b, float x) { return a * 0.0f + b * 0.0f + x * 0.0f; }

template <typename T>
IPFM_INLINE void gen_partial_impl(const T* a, const T* b, const T* x, int64_t len, float alpha, float* out) {
  float acc_u[kLanes] = {}, acc_abs[kLanes] = {}, acc_bad[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= len; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float av = load(a + e + l), bv = load(b + e + l), xv = load(x + e + l);
      acc_u[l] += gen_term(av, bv, xv, alpha);
      acc_abs[l] += std::fabs(xv - av);
      acc_bad[l] += nonfinite_flag(av, bv, xv);
    }
  }
  for (int l = 0; e + l < len; ++l) {
    const float av = load(a + e + l), bv = load(b + e + l), xv = load(x + e + l);
    acc_u[l] += gen_term(av, bv, xv, alpha);
    acc_abs[l] += std::fabs(xv - av);
    acc_bad[l] += nonfinite_flag(av, bv, xv);
  }
  out[0] = lane_sum(acc_u);
  out[1] = lane_sum(acc_abs);
  out[2] = lane_sum(acc_bad);
}

template <typename T, bool kA, bool kB, bool kX>
IPFM_INLINE void gen_grad_impl(const T* a, const T* b, const T* x, T* ga, T* gb, T* gx, int64_t len, float alpha,
                               float c) {
  const float ca = 1.0f - 2.0f * alpha, cb = 2.0f * alpha;
#pragma GCC ivdep
  for (int64_t e = 0; e < len; ++e) {
    const float av = load(a + e), bv = load(b + e);
    const float d = av - bv;
    if constexpr (kA || kB) {
      const float ex = av - load(x + e);
      if constexpr (kA) store(ga + e, c * (ex + ca * d));
      if constexpr (kB) store(gb + e, c * (cb * d - ex));
    }
    if constexpr (kX) store(gx + e, -c * d);
  }
}

template <typename T>
IPFM_INLINE float fake_partial_impl(const T* b, const T* x, int64_t len) {
  float acc[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= len; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float r = load(b + e + l) - load(x + e + l);
      acc[l] += r * r;
    }
  }
  for (int l = 0; e + l < len; ++l) {
    const float r = load(b + e + l) - load(x + e + l);
    acc[l] += r * r;
  }
  return lane_sum(acc);
}

template <typename T, bool kB, bool kX>
IPFM_INLINE void fake_grad_impl(const T* b, const T* x, T* gb, T* gx, int64_t len, float c2) {
#pragma GCC ivdep
  for (int64_t e = 0; e < len; ++e) {
    const float g = c2 * (load(b + e) - load(x + e));
    if constexpr (kB) store(gb + e, g);
    if constexpr (kX) store(gx + e, -g);
  }
}

// Non-template entry points, one per dtype (and gradient set), each cloned for AVX2.
#define IPFM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))

#define IPFM_DEFINE_FORWARD(T, SUFFIX)                                                             \
  IPFM_CLONES void gen_partial_##SUFFIX(const T* a, const T* b, const T* x, int64_t len, float alpha, \
                                        float* out) {                                               \
    gen_partial_impl<T>(a, b, x, len, alpha, out);                                                  \
  }                                                                                                 \
  IPFM_CLONES float fake_partial_##SUFFIX(const T* b, const T* x, int64_t len) {                    \
    return fake_partial_impl<T>(b, x, len);                                                         \
  }
IPFM_DEFINE_FORWARD(float, f32)
IPFM_DEFINE_FORWARD(fp16, f16)
IPFM_DEFINE_FORWARD(bf16, bf16)

#define IPFM_DEFINE_GEN_GRAD(T, SUFFIX, A, B, X)                                                    \
  IPFM_CLONES void gen_grad_##SUFFIX##_##A##B##X(const T* a, const T* b, const T* x, T* ga, T* gb, T* gx, \
                                                 int64_t len, float alpha, float c) {               \
    gen_grad_impl<T, (A) != 0, (B) != 0, (X) != 0>(a, b, x, ga, gb, gx, len, alpha, c);                                  \
  }
#define IPFM_DEFINE_GRADS(T, SUFFIX)                                                              \
  IPFM_DEFINE_GEN_GRAD(T, SUFFIX, 1, 1, 1)                                                        \
  IPFM_DEFINE_GEN_GRAD(T, SUFFIX, 1, 1, 0)                                                        \
  IPFM_DEFINE_GEN_GRAD(T, SUFFIX, 1, 0, 1)                                                        \
  IPFM_DEFINE_GEN_GRAD(T, SUFFIX, 1, 0, 0)                                                        \
  IPFM_DEFINE_GEN_GRAD(T, SUFFIX, 0, 1, 1)                                                        \
  IPFM_DEFINE_GEN_GRAD(T, SUFFIX, 0, 1, 0)                                                        \
  IPFM_DEFINE_GEN_GRAD(T, SUFFIX, 0, 0, 1)                                                        \
  IPFM_CLONES void fake_grad_##SUFFIX##_11(const T* b, const T* x, T* gb, T* gx, int64_t len, float c2) { \
    fake_grad_impl<T, true, true>(b, x, gb, gx, len, c2);                                         \
  }                                                                                               \
  IPFM_CLONES void fake_grad_##SUFFIX##_10(const T* b, const T* x, T* gb, T* gx, int64_t len, float c2) { \
    fake_grad_impl<T, true, false>(b, x, gb, gx, len, c2);                                        \
  }                                                                                               \
  IPFM_CLONES void fake_grad_##SUFFIX##_01(const T* b, const T* x, T* gb, T* gx, int64_t len, float c2) { \
    fake_grad_impl<T, false, true>(b, x, gb, gx, len, c2);                                        \
  }
IPFM_DEFINE_GRADS(float, f32)
IPFM_DEFINE_GRADS(fp16, f16)
IPFM_DEFINE_GRADS(bf16, bf16)

// Typed access to the cloned entry points.
template <typename T>
struct Kernels;

#define IPFM_KERNELS(T, SUFFIX)                                                                     \
  template <>                                                                                       \
  struct Kernels<T> {                                                                               \
    using GenGrad = void (*)(const T*, const T*, const T*, T*, T*, T*, int64_t, float, float);      \
    using FakeGrad = void (*)(const T*, const T*, T*, T*, int64_t, float);                          \
    static void gen_partial(const T* a, const T* b, const T* x, int64_t len, float alpha, float* out) { \
      gen_partial_##SUFFIX(a, b, x, len, alpha, out);                                               \
    }                                                                                               \
    static float fake_partial(const T* b, const T* x, int64_t len) { return fake_partial_##SUFFIX(b, x, len); } \
    static GenGrad gen_grad(bool na, bool nb, bool nx) {                                            \
      const GenGrad table[8] = {nullptr,                      gen_grad_##SUFFIX##_001,             \
                                gen_grad_##SUFFIX##_010,      gen_grad_##SUFFIX##_011,             \
                                gen_grad_##SUFFIX##_100,      gen_grad_##SUFFIX##_101,             \
                                gen_grad_##SUFFIX##_110,      gen_grad_##SUFFIX##_111};            \
      return table[(na ? 4 : 0) | (nb ? 2 : 0) | (nx ? 1 : 0)];                                     \
    }                                                                                               \
    static FakeGrad fake_grad(bool nb, bool nx) {                                                   \
      return nb ? (nx ? fake_grad_##SUFFIX##_11 : fake_grad_##SUFFIX##_10)                          \
                : (nx ? fake_grad_##SUFFIX##_01 : nullptr);                                         \
    }                                                                                               \
  };
IPFM_KERNELS(float, f32)
IPFM_KERNELS(fp16, f16)
IPFM_KERNELS(bf16, bf16)

// ---------------------------------------------------------------------------------------
// row loops
// ---------------------------------------------------------------------------------------

int64_t chunks_per_row(int64_t n) { return (n + kChunk - 1) / kChunk; }

// fn(item, row, e0, len) for every kChunk-wide piece of every row, the pieces split across
// threads; item = row * chunks_per_row(n) + chunk indexes per-piece partials.
template <typename F>
void for_each_chunk(int64_t rows, int64_t n, int threads, F&& fn) {
  const int64_t chunks = chunks_per_row(n);
  const int64_t work = rows * chunks;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t item = 0; item < work; ++item) {
    const int64_t row = item / chunks, e0 = (item % chunks) * kChunk;
    fn(item, row, e0, std::min(kChunk, n - e0));
  }
}

template <typename T>
void zero_row(T* g, int64_t n) {
  if (g) std::fill(g, g + n, from_float<T>(0.0f));
}

template <typename T>
void gen_forward(Rows<T> a, Rows<T> b, Rows<T> x, int64_t rows, int64_t n, const float* weight, float alpha,
                 int reduction, float* loss, int64_t* masked, float* stats, int threads) {
  const int64_t chunks = chunks_per_row(n);
  std::vector<float> partials(static_cast<size_t>(rows * chunks) * kGenPartials);
  for_each_chunk(rows, n, threads, [&](int64_t item, int64_t row, int64_t e0, int64_t len) {
    Kernels<T>::gen_partial(a.row(row) + e0, b.row(row) + e0, x.row(row) + e0, len, alpha,
                            partials.data() + item * kGenPartials);
  });
  double total = 0.0;
  int64_t count = 0;
  for (int64_t row = 0; row < rows; ++row) {
    double su = 0.0, sabs = 0.0, sbad = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = partials.data() + (row * chunks + c) * kGenPartials;
      su += p[0];
      sabs += p[1];
      sbad += p[2];
    }
    const GenRow r = gen_finalize_row(static_cast<float>(su), static_cast<float>(sabs), static_cast<float>(sbad), n,
                                      weight == nullptr, weight ? weight[row] : 0.0f);
    stats[row] = r.w;
    stats[rows + row] = r.u;
    stats[2 * rows + row] = r.keep;
    if (reduction == static_cast<int>(Reduction::kNone)) loss[row] = r.loss;
    total += r.loss;
    count += r.keep == 0.0f;
  }
  if (reduction == static_cast<int>(Reduction::kMean)) *loss = static_cast<float>(total / static_cast<double>(rows));
  if (reduction == static_cast<int>(Reduction::kSum)) *loss = static_cast<float>(total);
  if (masked) *masked = count;
}

template <typename T>
void gen_backward(const float* grad, int64_t grad_stride, Rows<T> a, Rows<T> b, Rows<T> x, int64_t rows, int64_t n,
                  const float* stats, float alpha, float scale, T* ga, T* gb, T* gx, int64_t g_stride,
                  int threads) {
  const auto kernel = Kernels<T>::gen_grad(ga != nullptr, gb != nullptr, gx != nullptr);
  if (kernel == nullptr) return;
  for_each_chunk(rows, n, threads, [&](int64_t, int64_t row, int64_t e0, int64_t len) {
    const int64_t off = row * g_stride + e0;
    T* ga_r = ga ? ga + off : nullptr;
    T* gb_r = gb ? gb + off : nullptr;
    T* gx_r = gx ? gx + off : nullptr;
    if (stats[2 * rows + row] == 0.0f) {  // masked row: zero gradient, inputs not read
      zero_row(ga_r, len);
      zero_row(gb_r, len);
      zero_row(gx_r, len);
      return;
    }
    const float c = gen_grad_coef(grad[row * grad_stride], scale, stats[row], 1.0f);
    kernel(a.row(row) + e0, b.row(row) + e0, x.row(row) + e0, ga_r, gb_r, gx_r, len, alpha, c);
  });
}

template <typename T>
void fake_forward(Rows<T> b, Rows<T> x, int64_t rows, int64_t n, const float* sigma, float sigma_scalar,
                  float sigma_data, int reduction, float* loss, float* stats, int threads) {
  const int64_t chunks = chunks_per_row(n);
  std::vector<float> partials(static_cast<size_t>(rows * chunks));
  for_each_chunk(rows, n, threads, [&](int64_t item, int64_t row, int64_t e0, int64_t len) {
    partials[item] = Kernels<T>::fake_partial(b.row(row) + e0, x.row(row) + e0, len);
  });
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[row * chunks + c];
    const float sig = sigma ? sigma[row] : sigma_scalar;
    if (!(sig > 0.0f && sig < INFINITY))  // checked here rather than in an extra pass on the host
      throw std::invalid_argument("ipfm_fake_loss: sigma must be positive and finite, got " + std::to_string(sig) +
                                  " in row " + std::to_string(row));
    const float lam = fake_weight(sig, sigma_data);
    const float sf = static_cast<float>(s);
    const float l = lam * sf;
    stats[row] = lam;
    stats[rows + row] = sf;
    if (reduction == static_cast<int>(Reduction::kNone)) loss[row] = l;
    total += l;
  }
  if (reduction == static_cast<int>(Reduction::kMean)) *loss = static_cast<float>(total / static_cast<double>(rows));
  if (reduction == static_cast<int>(Reduction::kSum)) *loss = static_cast<float>(total);
}

template <typename T>
void fake_backward(const float* grad, int64_t grad_stride, Rows<T> b, Rows<T> x, int64_t rows, int64_t n,
                   const float* stats, float scale, T* gb, T* gx, int64_t g_stride, int threads) {
  const auto kernel = Kernels<T>::fake_grad(gb != nullptr, gx != nullptr);
  if (kernel == nullptr) return;
  for_each_chunk(rows, n, threads, [&](int64_t, int64_t row, int64_t e0, int64_t len) {
    const int64_t off = row * g_stride + e0;
    const float c2 = 2.0f * grad[row * grad_stride] * scale * stats[row];
    kernel(b.row(row) + e0, x.row(row) + e0, gb ? gb + off : nullptr, gx ? gx + off : nullptr, len, c2);
  });
}

void check_shape(int64_t rows, int64_t n, const char* op) {
  if (rows < 0 || n < 0) throw std::invalid_argument(std::string(op) + ": negative shape");
}

template <typename T>
Rows<T> rows_of(uintptr_t p, int64_t stride) {
  return Rows<T>{reinterpret_cast<const T*>(p), stride};
}

// ---------------------------------------------------------------------------------------
// entry points (raw pointers; 0 = absent)
// ---------------------------------------------------------------------------------------

void gen_loss_forward(uintptr_t a, int64_t a_stride, uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride,
                      int dtype, int64_t rows, int64_t n, uintptr_t weight, float alpha, int reduction,
                      uintptr_t loss, uintptr_t masked, uintptr_t stats, int threads) {
  check_shape(rows, n, "ipfm_generator_loss");
  dispatch_dtype(dtype, [&]<typename T>() {
    gen_forward<T>(rows_of<T>(a, a_stride), rows_of<T>(b, b_stride), rows_of<T>(x, x_stride), rows, n,
                   reinterpret_cast<const float*>(weight), alpha, reduction, reinterpret_cast<float*>(loss),
                   reinterpret_cast<int64_t*>(masked), reinterpret_cast<float*>(stats), threads_for(rows * n, threads));
  });
}

void gen_loss_backward(uintptr_t grad, int64_t grad_stride, uintptr_t a, int64_t a_stride, uintptr_t b,
                       int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype, int64_t rows, int64_t n,
                       uintptr_t stats, float alpha, float scale, uintptr_t ga, uintptr_t gb, uintptr_t gx,
                       int64_t g_stride, int threads) {
  check_shape(rows, n, "ipfm_generator_loss_backward");
  dispatch_dtype(dtype, [&]<typename T>() {
    gen_backward<T>(reinterpret_cast<const float*>(grad), grad_stride, rows_of<T>(a, a_stride), rows_of<T>(b, b_stride),
                    rows_of<T>(x, x_stride), rows, n, reinterpret_cast<const float*>(stats), alpha, scale,
                    reinterpret_cast<T*>(ga), reinterpret_cast<T*>(gb), reinterpret_cast<T*>(gx), g_stride,
                    threads_for(rows * n, threads));
  });
}

void fake_loss_forward(uintptr_t b, int64_t b_stride, uintptr_t x, int64_t x_stride, int dtype, int64_t rows,
                       int64_t n, uintptr_t sigma, float sigma_scalar, float sigma_data, int reduction,
                       uintptr_t loss, uintptr_t stats, int threads) {
  check_shape(rows, n, "ipfm_fake_loss");
  dispatch_dtype(dtype, [&]<typename T>() {
    fake_forward<T>(rows_of<T>(b, b_stride), rows_of<T>(x, x_stride), rows, n, reinterpret_cast<const float*>(sigma),
                    sigma_scalar, sigma_data, reduction, reinterpret_cast<float*>(loss), reinterpret_cast<float*>(stats),
                    threads_for(rows * n, threads));
  });
}

void fake_loss_backward(uintptr_t grad, int64_t grad_stride, uintptr_t b, int64_t b_stride, uintptr_t x,
                        int64_t x_stride, int dtype, int64_t rows, int64_t n, uintptr_t stats, float scale,
                        uintptr_t gb, uintptr_t gx, int64_t g_stride, int threads) {
  check_shape(rows, n, "ipfm_fake_loss_backward");
  dispatch_dtype(dtype, [&]<typename T>() {
    fake_backward<T>(reinterpret_cast<const float*>(grad), grad_stride, rows_of<T>(b, b_stride), rows_of<T>(x, x_stride),
                     rows, n, reinterpret_cast<const float*>(stats), scale, reinterpret_cast<T*>(gb),
                     reinterpret_cast<T*>(gx), g_stride, threads_for(rows * n, threads));
  });
}

static Registrar registrar([](pybind11::module_& m) {
  namespace py = pybind11;
  m.def("gen_loss_forward_cpu", &gen_loss_forward, py::arg("a"), py::arg("a_stride"), py::arg("b"),
        py::arg("b_stride"), py::arg("x"), py::arg("x_stride"), py::arg("dtype"), py::arg("rows"), py::arg("n"),
        py::arg("weight"), py::arg("alpha"), py::arg("reduction"), py::arg("loss"), py::arg("masked"),
        py::arg("stats"), py::arg("threads"), py::call_guard<py::gil_scoped_release>(),
        "IPFM generator loss forward over rows of raw pointers (see ipfm_fast.ops.losses)");
  m.def("gen_loss_backward_cpu", &gen_loss_backward, py::arg("grad"), py::arg("grad_stride"), py::arg("a"),
        py::arg("a_stride"), py::arg("b"), py::arg("b_stride"), py::arg("x"), py::arg("x_stride"), py::arg("dtype"),
        py::arg("rows"), py::arg("n"), py::arg("stats"), py::arg("alpha"), py::arg("scale"), py::arg("ga"),
        py::arg("gb"), py::arg("gx"), py::arg("g_stride"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>(), "IPFM generator loss backward (gradients 0 = not needed)");
  m.def("fake_loss_forward_cpu", &fake_loss_forward, py::arg("b"), py::arg("b_stride"), py::arg("x"),
        py::arg("x_stride"), py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("sigma"),
        py::arg("sigma_scalar"), py::arg("sigma_data"), py::arg("reduction"), py::arg("loss"), py::arg("stats"),
        py::arg("threads"), py::call_guard<py::gil_scoped_release>(), "IPFM fake loss forward");
  m.def("fake_loss_backward_cpu", &fake_loss_backward, py::arg("grad"), py::arg("grad_stride"), py::arg("b"),
        py::arg("b_stride"), py::arg("x"), py::arg("x_stride"), py::arg("dtype"), py::arg("rows"), py::arg("n"),
        py::arg("stats"), py::arg("scale"), py::arg("gb"), py::arg("gx"), py::arg("g_stride"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>(), "IPFM fake loss backward (gradients 0 = not needed)");
});

}  // namespace
}  // namespace ipfm::cpu
