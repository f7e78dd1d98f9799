// Shared host-side helpers for the torch glue: argument checks whose errors name the op, the
// tensor, its shape and the rule ("cast_ext.sparse24_mask: w of shape [128, 30]: last dim must
// be a multiple of 4").
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <optional>
#include <sstream>
#include <string>

namespace cast_ext {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// Data checks that need the values on the host (NaN/Inf in a weight, an invalid 2:4 meta) cost
// one device-to-host sync per call on CUDA. On by default; cast_ext.set_cuda_value_checks(False)
// turns them off for hot loops (the CPU kernels check for free, in the same pass, always).
inline std::atomic<bool>& cuda_value_checks() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// Dispatch over the weight dtypes the kernels support: float32, float16, bfloat16.
#define CAST_DISPATCH_FLOATS(TYPE, NAME, ...)                                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

#define CAST_CHECK(cond, op, ...) TORCH_CHECK(cond, "cast_ext.", op, ": ", __VA_ARGS__)

// A floating weight (fp32, fp16, bf16) grouped by m along its last dim.
inline void check_grouped_weight(const char* op, const char* name, const at::Tensor& w, int64_t m) {
  CAST_CHECK(w.dim() >= 1, op, name, " must have at least one dim, got a 0-d tensor");
  const auto st = w.scalar_type();
  CAST_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, name, " of shape ",
             shape_str(w), " has dtype ", st, "; expected float32, float16 or bfloat16");
  CAST_CHECK(w.size(-1) % m == 0, op, name, " of shape ", shape_str(w),
             ": last dim must be a multiple of ", m);
}

inline void check_nm(const char* op, int64_t n, int64_t m) {
  CAST_CHECK(m == 4 || m == 8, op, "m must be 4 or 8, got ", m);
  CAST_CHECK(n > 0 && n <= m, op, "need 0 < n <= m, got n=", n, ", m=", m);
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  CAST_CHECK(t.device() == ref.device(), op, name, " is on ", t.device(), " but ", ref_name,
             " is on ", ref.device());
}

inline void check_finite_flag(const char* op, const char* name, const at::Tensor& w, bool bad) {
  CAST_CHECK(!bad, op, name, " of shape ", shape_str(w),
             " contains NaN or Inf; a mask of non-finite weights is undefined");
}

// Packed masks: [*w.shape[:-1], ceil(k / 8)] uint8 (see reference.pack_mask). k >= 0; no k + 7
// (a last_dim near 2^63, which unpack_mask takes from its caller, would overflow it).
inline int64_t packed_last_dim(int64_t k) { return k / 8 + (k % 8 != 0 ? 1 : 0); }

inline void check_meta_flag(const char* op, const at::Tensor& meta, bool bad) {
  CAST_CHECK(!bad, op, "meta of shape ", shape_str(meta),
             " is not a valid 2:4 mask: every group of 4 must keep exactly 2 elements");
}

inline void check_bool_mask(const char* op, const at::Tensor& mask) {
  CAST_CHECK(mask.dim() >= 1, op, "mask must have at least one dim, got a 0-d tensor");
  CAST_CHECK(mask.scalar_type() == at::kBool, op, "mask of shape ", shape_str(mask), " has dtype ",
             mask.scalar_type(), "; expected bool");
}

// A packed mask holding `last_dim` elements per row.
inline void check_packed_mask(const char* op, const char* name, const at::Tensor& packed,
                              int64_t last_dim) {
  CAST_CHECK(packed.dim() >= 1, op, name, " must have at least one dim, got a 0-d tensor");
  CAST_CHECK(packed.scalar_type() == at::kByte, op, name, " of shape ", shape_str(packed),
             " has dtype ", packed.scalar_type(), "; expected uint8 (a packed mask)");
  CAST_CHECK(last_dim >= 0 && packed.size(-1) == packed_last_dim(last_dim), op, name, " of shape ",
             shape_str(packed), " cannot hold ", last_dim,
             " elements per row: its last dim must be ceil(last_dim / 8)");
}

// values [..., k/2] + meta [..., ceil(k/8)] of the packed 2:4 format.
inline void check_compressed(const char* op, const at::Tensor& values, const at::Tensor& meta) {
  CAST_CHECK(values.dim() >= 1, op, "values must have at least one dim, got a 0-d tensor");
  const auto st = values.scalar_type();
  CAST_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, "values of shape ",
             shape_str(values), " has dtype ", st, "; expected float32, float16 or bfloat16");
  CAST_CHECK(values.size(-1) % 2 == 0, op, "values of shape ", shape_str(values),
             ": last dim must be even (2 kept values per group of 4)");
  check_same_device(op, "meta", meta, "values", values);
  check_packed_mask(op, "meta", meta, values.size(-1) * 2);
  CAST_CHECK(meta.sizes().slice(0, meta.dim() - 1) == values.sizes().slice(0, values.dim() - 1), op,
             "meta of shape ", shape_str(meta), " and values of shape ", shape_str(values),
             " must agree on every dim but the last");
}

inline void check_flips(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t m) {
  CAST_CHECK(m == 4 || m == 8, op, "m must be 4 or 8, got ", m);
  CAST_CHECK(a.scalar_type() == at::kByte && b.scalar_type() == at::kByte, op,
             "a and b must be packed masks (uint8), got ", a.scalar_type(), " and ",
             b.scalar_type());
  CAST_CHECK(a.sizes() == b.sizes(), op, "a of shape ", shape_str(a), " and b of shape ",
             shape_str(b), " differ");
  CAST_CHECK(a.dim() >= 1, op, "a and b must be packed masks with at least one dim, got 0-d");
  check_same_device(op, "b", b, "a", a);
}

// sparse24_gemm: x [..., k], values [n, k/2] + meta [n, ceil(k/8)], bias [n] (CPU and CUDA).
inline void check_gemm_args(const char* op, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& meta, const std::optional<at::Tensor>& bias) {
  check_compressed(op, values, meta);
  CAST_CHECK(values.dim() == 2, op, "values of shape ", shape_str(values),
             " must be 2-D [out_features, in_features / 2] (one weight matrix)");
  CAST_CHECK(x.dim() >= 1, op, "x must have at least one dim, got a 0-d tensor");
  CAST_CHECK(x.scalar_type() == values.scalar_type(), op, "x has dtype ", x.scalar_type(),
             " but values has dtype ", values.scalar_type(), "; they must match");
  check_same_device(op, "x", x, "values", values);
  const int64_t k = values.size(1) * 2;
  CAST_CHECK(x.size(-1) == k, op, "x of shape ", shape_str(x), " and values of shape ",
             shape_str(values), ": x's last dim must be in_features = 2 * values.size(1) = ", k);
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    CAST_CHECK(b.dim() == 1 && b.size(0) == values.size(0), op, "bias of shape ", shape_str(b),
               " must be 1-D of size out_features = ", values.size(0));
    CAST_CHECK(b.scalar_type() == x.scalar_type(), op, "bias has dtype ", b.scalar_type(),
               " but x has dtype ", x.scalar_type(), "; they must match");
    check_same_device(op, "bias", b, "x", x);
  }
}

}  // namespace cast_ext
