// 2:4 sparse GEMM on the CPU, on the portable packed format: y = x @ W^T (+ bias).
//
// Algorithm: W [N, K] is held as values [N, K/2] (the 2 kept elements of each group of 4, in
// ascending position) and meta [N, ceil(K/8)] (the packed 1-bit mask, a nibble per group). The
// N rows of W are cut into tiles of kTileN rows; OpenMP threads take whole tiles. A thread
// expands its tile once into an fp32 scratch (zeros at the pruned positions) and then runs every
// row of x (converted to fp32 once, up front) against it with 8 independent accumulators, so
// the inner loop vectorises without -ffast-math and each expanded row is reused M times while it
// is hot in cache. A nibble without exactly 2 bits set is invalid meta: it is reported after the
// parallel region and the output is dropped (nothing of the caller's is written).
// Layout: x [..., K] (made contiguous), values/meta row-major, y [..., N] contiguous.
// Dtypes: fp32, fp16, bf16; x, values and bias share one dtype; fp32 accumulation and a single
// rounding to x's dtype at the end, like the tensor-core GEMMs.
// Reference: cast_ext/reference.py sparse24_gemm.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cast_ext.h"

namespace cast_ext {
namespace {

constexpr int64_t kTileN = 16;  // rows of W expanded at a time (16 x 4096 fp32 = 256 KiB)

// Dot product of two fp32 rows; 8 lanes so the compiler can keep a vector register per lane.
inline float dot(const float* a, const float* b, int64_t k) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.f;
  for (; i < k; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Positions of the 2 kept elements of a group for each 4-bit mask; -1 for an invalid mask
// (not exactly 2 bits set). A table lookup instead of a bit loop: the expansion is what a
// small-M call spends its time on.
struct Pair {
  int8_t p0, p1;
};
constexpr Pair kPairs[16] = {{-1, -1}, {-1, -1}, {-1, -1}, {0, 1},  {-1, -1}, {0, 2},
                             {1, 2},   {-1, -1}, {-1, -1}, {0, 3},  {1, 3},   {-1, -1},
                             {2, 3},   {-1, -1}, {-1, -1}, {-1, -1}};

// Expands one packed row of W into dst[k] (fp32). Returns false on an invalid nibble.
template <typename T>
inline bool expand_row(const T* vals, const uint8_t* meta, int64_t k, float* dst) {
  bool ok = true;
  for (int64_t g = 0; g < k / 4; ++g) {
    const Pair p = kPairs[(meta[g >> 1] >> ((g & 1) * 4)) & 0xFu];
    float* out = dst + 4 * g;
    out[0] = out[1] = out[2] = out[3] = 0.f;
    if (p.p0 < 0) {
      ok = false;
      continue;
    }
    // Values are stored in ascending position: the first goes to p0, the second to p1.
    out[p.p0] = static_cast<float>(vals[2 * g]);
    out[p.p1] = static_cast<float>(vals[2 * g + 1]);
  }
  return ok;
}

template <typename T>
bool gemm_rows(const T* x, const T* vals, const uint8_t* meta, const T* bias, int64_t m, int64_t n,
               int64_t k, T* y) {
  // x once in fp32: every tile of W reads all of it.
  std::vector<float> x32(static_cast<size_t>(m * k));
  at::parallel_for(0, m * k, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) x32[i] = static_cast<float>(x[i]);
  });
  const int64_t kb = packed_last_dim(k);
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  std::atomic<bool> all_ok{true};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> w32(static_cast<size_t>(kTileN * k));
    bool ok = true;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTileN;
      const int64_t rn = std::min(kTileN, n - r0);
      for (int64_t r = 0; r < rn; ++r) {
        ok &= expand_row(vals + (r0 + r) * (k / 2), meta + (r0 + r) * kb, k, &w32[r * k]);
      }
      for (int64_t i = 0; i < m; ++i) {
        const float* xi = &x32[i * k];
        T* yi = y + i * n + r0;
        for (int64_t r = 0; r < rn; ++r) {
          float acc = dot(xi, &w32[r * k], k);
          if (bias != nullptr) acc += static_cast<float>(bias[r0 + r]);
          yi[r] = static_cast<T>(acc);
        }
      }
    }
    if (!ok) all_ok = false;
  });
  return all_ok;
}

at::Tensor sparse24_gemm_cpu(const at::Tensor& x_in, const at::Tensor& values_in,
                             const at::Tensor& meta_in, const std::optional<at::Tensor>& bias_in) {
  const char* op = "sparse24_gemm";
  check_gemm_args(op, x_in, values_in, meta_in, bias_in);
  const int64_t n = values_in.size(0);
  const int64_t k = values_in.size(1) * 2;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor meta = meta_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t m = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));  // rows of x
  auto oshape = x.sizes().vec();
  oshape.back() = n;
  at::Tensor y = at::empty(oshape, x.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse24_gemm", [&] {
    ok = gemm_rows<scalar_t>(x.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(),
                             meta.const_data_ptr<uint8_t>(),
                             bias ? bias->const_data_ptr<scalar_t>() : nullptr, m, n, k,
                             y.data_ptr<scalar_t>());
  });
  check_meta_flag(op, meta_in, !ok);
  return y;
}

// cuSPARSELt has no CPU side; say which op to use instead of the dispatcher's generic error.
void cslt_on_cpu(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, "cast_ext.", op.schema().name().substr(sizeof("cast_ext::") - 1),
              ": got a CPU tensor, but this op runs cuSPARSELt and needs CUDA tensors; on the CPU "
              "use cast_ext.sparse24_gemm with the packed format (values, meta)");
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CPU, m) {
  m.impl("sparse24_gemm", &sparse24_gemm_cpu);
  for (const char* name : {"cslt_compress", "cslt_linear"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cslt_on_cpu>());
  }
}

}  // namespace cast_ext
