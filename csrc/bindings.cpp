// The Python module cast_ext._C. Importing it loads this shared object, which runs the
// TORCH_LIBRARY registrations of every op (ops.cpp, cpu/*.cpp, cuda/*.cpp). It exposes build
// facts for `python -m cast_ext info` and bug reports; tensor ops go through torch.ops.cast_ext.
#include <torch/extension.h>

#include <string>

#include "cast_ext.h"
#include "cpu/isa.h"

#ifdef CAST_EXT_WITH_CUSPARSELT
#include <cusparseLt.h>

#include "cuda/cusparselt.h"  // cslt_cache_info & co.
#endif
#ifdef CAST_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = std::string(TORCH_VERSION);
  d["compiler"] = std::string(__VERSION__);
  d["openmp"] = true;
  d["cpu_isa"] = std::string(cast_ext::cpu_isa_label());
#ifdef CAST_EXT_WITH_CUDA
  d["with_cuda"] = true;
  d["cuda_version"] =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  d["cuda_archs"] = std::string(CAST_EXT_CUDA_ARCHS);
#else
  d["with_cuda"] = false;
  d["cuda_version"] = pybind11::none();
  d["cuda_archs"] = pybind11::none();
#endif
#ifdef CAST_EXT_WITH_CUSPARSELT
  d["with_cusparselt"] = true;
  d["cusparselt_version"] = std::to_string(CUSPARSELT_VER_MAJOR) + "." +
                            std::to_string(CUSPARSELT_VER_MINOR) + "." +
                            std::to_string(CUSPARSELT_VER_PATCH);
#else
  d["with_cusparselt"] = false;
  d["cusparselt_version"] = pybind11::none();
#endif
#ifdef NDEBUG
  d["debug"] = false;
#else
  d["debug"] = true;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cast_ext compiled kernels (ops are registered under torch.ops.cast_ext)";
  m.def("build_info", &build_info,
        "Build facts: torch and CUDA versions, archs, with_cuda, with_cusparselt, cuSPARSELt "
        "version.");
  m.def(
      "set_cuda_value_checks", [](bool enabled) { cast_ext::cuda_value_checks().store(enabled); },
      pybind11::arg("enabled"),
      "Turn the CUDA ops' value checks (NaN/Inf weights, invalid 2:4 meta: one sync per call) "
      "on or off.");
  m.def(
      "cuda_value_checks", []() { return cast_ext::cuda_value_checks().load(); },
      "Whether the CUDA ops' value checks are on.");
  // cuSPARSELt plan cache and algorithm table (csrc/cuda/cusparselt.cpp).
#ifdef CAST_EXT_WITH_CUSPARSELT
  cast_ext::cslt::bind(m);
#endif
}
