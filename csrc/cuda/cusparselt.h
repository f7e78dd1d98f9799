// Host-side API of the cuSPARSELt wrapper (csrc/cuda/cusparselt.cpp) for the pybind11 module:
// compressed sizes for the fake kernels, plan-cache statistics and the algorithm table that
// cast_ext.nn persists to disk. Only compiled with CAST_EXT_WITH_CUSPARSELT.
#pragma once

#include <pybind11/pybind11.h>

namespace cast_ext {
namespace cslt {

// Registers _cslt_compressed_size, cslt_cache_info, cslt_cache_clear, cslt_get_algs,
// cslt_set_algs and cslt_runtime_version on the module.
void bind(pybind11::module& m);

}  // namespace cslt
}  // namespace cast_ext
