// CPU-only builds (CAST_EXT_CUDA=0, or no nvcc / CPU torch at build time) register a CUDA kernel
// for every op that raises a clear error naming the build flag, instead of the dispatcher's
// generic "could not run ... with arguments from the 'CUDA' backend". (scaled_linear is made of
// ATen ops, a CompositeExplicitAutograd kernel: it runs on CUDA in any build.)
#ifndef CAST_EXT_WITH_CUDA
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

void cuda_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, "cast_ext.", op.schema().name().substr(sizeof("cast_ext::") - 1),
              ": got a CUDA tensor, but this cast_ext was built without CUDA kernels "
              "(CAST_EXT_CUDA=0, or no nvcc / a CPU-only torch at build time). Rebuild with "
              "CAST_EXT_CUDA=1 (see `python -m cast_ext info`).");
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) {
  for (const char* name :
       {"sparse24_mask", "nm_mask", "sparse24_prune", "sparse24_compress", "sparse24_decompress",
        "pack_mask", "unpack_mask", "mask_flips", "sparse24_gemm", "cslt_compress", "cslt_linear",
        "adams_step_", "distill_fwd", "distill_bwd"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_not_built>());
  }
}
#endif
