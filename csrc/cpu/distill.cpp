// CAST's distillation loss on the CPU, fused (cast_ext::distill_fwd / distill_bwd).
//
// Algorithm: rows of the [N, V] logits are spread over OpenMP threads; a row is a handful of
// passes over V contiguous floats that stay in the core's L2 (V = 49152 is 192 KB per tensor):
//   forward:  1. the maxima of s and t; 2. in one pass, sum exp((s - max) / T),
//             sum exp((t - max) / T), sum exp((t - max) / T) ((t - max) - (s - max_s)) and,
//             when T != 1, sum exp(s - max); the row's KL, CE and the three log-sum-exps follow;
//   backward: one pass writing scale * (eta T (exp(s/T - lse_sT) - exp(t/T - lse_tT))
//             + (1 - eta) exp(s - lse_s1)), then the label's element gets -scale (1 - eta).
// Nothing [N, V]-sized is allocated besides the gradient itself (fp16/bf16 rows are converted
// into per-thread fp32 row buffers). The sums run in 16 fp32 lanes (GCC vectorises the fixed-width
// lane loops; x86-64-v4/v3/baseline versions picked at run time, csrc/cpu/isa.h) with exp_lane's
// polynomial exp (Cephes' expf: relative error below 2e-7 on the range softmax uses), and are
// reduced over the lanes at the end of the row; the row's KL and log-sum-exps come from
// distill_math.h, the CUDA kernel's code. Rows whose label is ignore_index are skipped (zeros
// out). A teacher logit of probability 0 (a masked vocabulary entry: -inf, or finfo.min; an
// underflow) adds nothing to the KL, whatever the student's; a +inf logit makes its
// log-sum-exps +inf (so the CE +inf unless the label's logit is +inf), as in the reference; NaN
// logits propagate to NaN.
// Labels are checked before any work: a label outside [0, V) that is not ignore_index raises.
// Layout: contiguous [N, V] logits, [N] int64 labels, [N, 3] fp32 lse.
// Dtypes: fp32, fp16, bf16 logits (teacher in the student's dtype); fp32 math and outputs, the
// gradient in the logits' dtype.
// Reference: cast_ext/reference.py distill_fwd, distill_bwd.
#include "distill.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cast_ext.h"
#include "distill_math.h"
#include "isa.h"
#include "vec.h"

namespace cast_ext {
namespace {

constexpr int kLanes = 16;

// exp(x) by Cephes' expf: x = n ln2 + r (|r| <= ln2 / 2, Cody-Waite in two parts), a degree-7
// polynomial in r, times 2^n built in the exponent bits. Branch-free, so it vectorises. x is
// clamped to [-87, 88] for the polynomial, and below -87 the result is exactly 0 (it stood at
// exp(-87) = 1.6e-38, which times a teacher logit masked with finfo(float32).min, -3.4e38, added
// -5.5 to the KL's sum); NaN stays NaN (n is taken from the rounding's bits, never from a
// float-to-int conversion of NaN).
__attribute__((always_inline)) inline float exp_lane(float x0) {
  float x = x0 < -87.0f ? -87.0f : x0;
  x = x > 88.0f ? 88.0f : x;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float fx = x * 1.44269504088896341f + kMagic;
  const int32_t n = c10::bit_cast<int32_t>(fx) - c10::bit_cast<int32_t>(kMagic);
  const float fn = fx - kMagic;
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return x0 < -87.0f ? 0.f : p * c10::bit_cast<float>(uint32_t(n + 127) << 23);
}

__attribute__((always_inline)) inline float lane_sum(const float* a) {
  float h[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) h[j] = a[j] + a[j + kLanes / 2];
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) h[j] += h[j + w];
  return h[0];
}

// max over x[0, n), NaN if any is NaN.
__attribute__((always_inline)) inline float row_max(const float* x, int64_t n) {
  float m[kLanes];
  for (int j = 0; j < kLanes; ++j) m[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) m[j] = nan_max(x[i + j], m[j]);
  for (int j = 0; i + j < n; ++j) m[j] = nan_max(x[i + j], m[j]);
  float r = m[0];
  for (int j = 1; j < kLanes; ++j) r = nan_max(m[j], r);
  return r;
}

// The sums of the forward's second pass: out = {zs, zt, a, z1} with zs = sum exp((s - ms) it),
// zt = sum exp((t - mt) it), a = sum exp((t - mt) it) ((t - mt) - (s - ms)) (see kl_of),
// z1 = sum exp(s - ms) (= zs when T == 1). it = 1 / T.
// A term of teacher probability 0 adds nothing, whatever s is: t = -inf by a select; a mask's
// finfo.min or an underflow is e = 0 times a finite difference, also where the student's logit
// is -inf, whose s - ms the difference takes as the lowest finite float. Teacher mass on a
// student -inf makes a = +inf, as its term is: that mass is summed apart (sinf) and checked at
// the end. (A select on e == 0 instead stops GCC's vectoriser: 6.6x slower.) The 1 / T, which
// can overflow the difference, is applied to the sum.
template <bool kTeacher, bool kT1>
__attribute__((always_inline)) inline void row_sums(const float* s, const float* t, int64_t n,
                                                    float ms, float mt, float it, float* out) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  float zs[kLanes] = {}, zt[kLanes] = {}, a[kLanes] = {}, z1[kLanes] = {}, sinf[kLanes] = {};
  // a difference from a row max, -inf or NaN taken as the lowest finite float
  const auto finite = [](float d) { return d > kLowest ? d : kLowest; };
  auto body = [&](int j, float sv, float tv) {
    zs[j] += exp_lane((sv - ms) * it);
    if (!kT1) z1[j] += exp_lane(sv - ms);
    if (kTeacher) {
      const float e = exp_lane((tv - mt) * it);
      zt[j] += e;
      const float ds = sv - ms;  // NaN where both are -inf: the lowest float too
      // tv - mt overflows to -inf for a finite tv (finfo.min) below a max >= ~1e31: e is 0
      // there, and 0 * -inf would be NaN; clamped, the difference stays finite
      const float dt = tv - mt;
      a[j] += tv == -kInf ? 0.f : e * (finite(dt) - finite(ds));
      sinf[j] += sv == -kInf ? e : 0.f;
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) body(j, s[i + j], kTeacher ? t[i + j] : 0.f);
  for (int j = 0; i + j < n; ++j) body(j, s[i + j], kTeacher ? t[i + j] : 0.f);
  out[0] = lane_sum(zs);
  out[1] = kTeacher ? lane_sum(zt) : 0.f;
  out[2] = kTeacher ? lane_sum(a) + (lane_sum(sinf) > 0.f ? kInf : 0.f) : 0.f;
  out[3] = kT1 ? out[0] : lane_sum(z1);
}

// g[j] = ca (exp(s it - lst) - exp(t it - ltt)) + cb exp(s - ls1) (the one-hot term is added by
// the caller).
template <bool kTeacher, bool kT1>
__attribute__((always_inline)) inline void row_grad(const float* s, const float* t, int64_t n,
                                                    float it, float lst, float ltt, float ls1,
                                                    float ca, float cb, float* g) {
  for (int64_t i = 0; i < n; ++i) {
    const float es = exp_lane(s[i] * it - lst);
    float v = cb * (kT1 ? es : exp_lane(s[i] - ls1));
    if (kTeacher) v += ca * (es - exp_lane(t[i] * it - ltt));
    g[i] = v;
  }
}

#define CAST_DISTILL_SUMS(LEVEL, ATTR, TEACHER, T1)                                               \
  ATTR void row_sums_##LEVEL##_##TEACHER##T1(const float* s, const float* t, int64_t n, float ms, \
                                             float mt, float it, float* out) {                    \
    row_sums<TEACHER, T1>(s, t, n, ms, mt, it, out);                                              \
  }
#define CAST_DISTILL_GRAD(LEVEL, ATTR, TEACHER, T1)                                               \
  ATTR void row_grad_##LEVEL##_##TEACHER##T1(const float* s, const float* t, int64_t n, float it, \
                                             float lst, float ltt, float ls1, float ca, float cb, \
                                             float* g) {                                          \
    row_grad<TEACHER, T1>(s, t, n, it, lst, ltt, ls1, ca, cb, g);                                 \
  }
#define CAST_DISTILL_LEVEL(LEVEL, ATTR, VARIANT) \
  VARIANT(LEVEL, ATTR, false, false)             \
  VARIANT(LEVEL, ATTR, false, true)              \
  VARIANT(LEVEL, ATTR, true, false)              \
  VARIANT(LEVEL, ATTR, true, true)
#define CAST_DISTILL_GRADS(T1)                     \
  CAST_DISTILL_GRAD(v4, CAST_TARGET_V4, false, T1) \
  CAST_DISTILL_GRAD(v4, CAST_TARGET_V4, true, T1)  \
  CAST_DISTILL_GRAD(v3, CAST_TARGET_V3, false, T1) \
  CAST_DISTILL_GRAD(v3, CAST_TARGET_V3, true, T1)  \
  CAST_DISTILL_GRAD(base, , false, T1)             \
  CAST_DISTILL_GRAD(base, , true, T1)
CAST_TARGET_V4 float row_max_v4(const float* x, int64_t n) { return row_max(x, n); }
CAST_TARGET_V3 float row_max_v3(const float* x, int64_t n) { return row_max(x, n); }
float row_max_base(const float* x, int64_t n) { return row_max(x, n); }
CAST_DISTILL_LEVEL(v4, CAST_TARGET_V4, CAST_DISTILL_SUMS)
CAST_DISTILL_LEVEL(v3, CAST_TARGET_V3, CAST_DISTILL_SUMS)
CAST_DISTILL_LEVEL(base, , CAST_DISTILL_SUMS)
CAST_DISTILL_GRADS(true)
// When T != 1 the gradient's exponents s it - lse_sT and t it - lse_tT must round s it and t it
// as the forward rounded max it inside the log-sum-exps: contracted into an FMA (x86-64-v3/v4),
// the product went in exact, and a row's largest softmax entries came out off by up to
// |s / T| 2^-24 (3e-4 at s = 1e4, T = 3; a 1-token vocabulary's gradient was not 0). (T == 1:
// it = 1, the product is exact either way, and the exponentials keep their FMAs.)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
CAST_DISTILL_GRADS(false)
#pragma GCC pop_options
#undef CAST_DISTILL_GRADS
#undef CAST_DISTILL_LEVEL
#undef CAST_DISTILL_GRAD
#undef CAST_DISTILL_SUMS

// The row-sum and gradient versions of one instruction-set level and one (teacher, T == 1) case.
struct RowFns {
  void (*sums)(const float*, const float*, int64_t, float, float, float, float*);
  void (*grad)(const float*, const float*, int64_t, float, float, float, float, float, float,
               float*);
};

RowFns row_fns(bool teacher, bool t1) {
#define CAST_PICK(LEVEL)                                                                     \
  return teacher ? (t1 ? RowFns{row_sums_##LEVEL##_truetrue, row_grad_##LEVEL##_truetrue}    \
                       : RowFns{row_sums_##LEVEL##_truefalse, row_grad_##LEVEL##_truefalse}) \
                 : (t1 ? RowFns{row_sums_##LEVEL##_falsetrue, row_grad_##LEVEL##_falsetrue}  \
                       : RowFns{row_sums_##LEVEL##_falsefalse, row_grad_##LEVEL##_falsefalse})
  switch (cpu_isa()) {
    case CpuIsa::Avx512: CAST_PICK(v4);
    case CpuIsa::Avx2: CAST_PICK(v3);
    default: CAST_PICK(base);
  }
#undef CAST_PICK
}

float max_dispatch(const float* x, int64_t n) { return CAST_ISA_CALL(row_max, x, n); }

// A row of logits as fp32: the data itself for fp32, else converted into `buf` (vec.h).
const float* row_f32(const float* src, int64_t, std::vector<float>&) { return src; }
const float* row_f32(const c10::BFloat16* src, int64_t n, std::vector<float>& buf) {
  buf.resize(size_t(n));
  bf16_to_float(src, n, buf.data());
  return buf.data();
}
const float* row_f32(const c10::Half* src, int64_t n, std::vector<float>& buf) {
  buf.resize(size_t(n));
  half_to_float(src, n, buf.data());
  return buf.data();
}

// Where the gradient row is computed (fp32: in place), and its conversion after.
float* grad_f32(float* dst, int64_t, std::vector<float>&) { return dst; }
template <typename T>
float* grad_f32(T*, int64_t n, std::vector<float>& buf) {
  buf.resize(size_t(n));
  return buf.data();
}
void grad_store(const float*, int64_t, float*) {}
void grad_store(const float* src, int64_t n, c10::BFloat16* dst) { float_to_bf16(src, n, dst); }
void grad_store(const float* src, int64_t n, c10::Half* dst) { float_to_half(src, n, dst); }

void check_labels_cpu(const char* op, const at::Tensor& labels, int64_t vocab,
                      int64_t ignore_index) {
  const int64_t* y = labels.const_data_ptr<int64_t>();
  bool bad = false;
  for (int64_t r = 0; r < labels.numel(); ++r)
    bad |= y[r] != ignore_index && (y[r] < 0 || y[r] >= vocab);
  check_label_flag(op, labels, vocab, ignore_index, bad);
}

template <typename T>
void fwd_rows(const T* s, const T* t, const int64_t* y, int64_t rows, int64_t v, double temperature,
              int64_t ignore_index, float* kl, float* ce, float* lse) {
  const float it = float(1.0 / temperature);
  const float t2 = float(temperature * temperature);
  const bool t1 = temperature == 1.0;
  const RowFns fns = row_fns(t != nullptr, t1);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf, tbuf;
    for (int64_t r = r0; r < r1; ++r) {
      if (y[r] == ignore_index) {
        kl[r] = ce[r] = 0.f;
        lse[3 * r] = lse[3 * r + 1] = lse[3 * r + 2] = 0.f;
        continue;
      }
      const float* sr = row_f32(s + r * v, v, sbuf);
      const float* tr = t ? row_f32(t + r * v, v, tbuf) : nullptr;
      const float ms = max_dispatch(sr, v);
      const float mt = tr ? max_dispatch(tr, v) : 0.f;
      float z[4];
      fns.sums(sr, tr, v, ms, mt, it, z);
      const float lst = lse_of(ms * it, z[0]);
      const float ls1 = t1 ? lst : lse_of(ms, z[3]);
      const float ltt = tr ? lse_of(mt * it, z[1]) : 0.f;
      kl[r] = tr ? kl_of(z[2], z[0], z[1], ms, mt, it, t2) : 0.f;
      ce[r] = ls1 - sr[y[r]];
      lse[3 * r] = lst;
      lse[3 * r + 1] = ltt;
      lse[3 * r + 2] = ls1;
    }
  });
}

template <typename T>
void bwd_rows(const T* s, const T* t, const int64_t* y, const float* lse, float scale, int64_t rows,
              int64_t v, double eta, double temperature, int64_t ignore_index, T* grad) {
  const float it = float(1.0 / temperature);
  const float ca = float(double(scale) * eta * temperature);
  const float cb = float(double(scale) * (1.0 - eta));
  const RowFns fns = row_fns(t != nullptr, temperature == 1.0);
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> sbuf, tbuf, gbuf;
    for (int64_t r = r0; r < r1; ++r) {
      T* gr = grad + r * v;
      if (y[r] == ignore_index) {
        std::memset(static_cast<void*>(gr), 0, sizeof(T) * size_t(v));
        continue;
      }
      const float* sr = row_f32(s + r * v, v, sbuf);
      const float* tr = t ? row_f32(t + r * v, v, tbuf) : nullptr;
      float* g = grad_f32(gr, v, gbuf);
      fns.grad(sr, tr, v, it, lse[3 * r], lse[3 * r + 1], lse[3 * r + 2], ca, cb, g);
      g[y[r]] -= cb;
      grad_store(g, v, gr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_fwd_cpu(
    const at::Tensor& student, const c10::optional<at::Tensor>& teacher_opt,
    const at::Tensor& labels, double temperature, int64_t ignore_index) {
  const char* op = "distill_fwd";
  const at::Tensor teacher = teacher_opt.value_or(at::Tensor());
  check_distill_args(op, student, teacher, labels, temperature);
  const int64_t rows = student.size(0), v = student.size(1);
  check_labels_cpu(op, labels, v, ignore_index);
  at::Tensor kl, ce, lse;  // named, not structured bindings: C++17 lambdas cannot capture those
  std::tie(kl, ce, lse) = distill_fwd_outputs(student);
  CAST_DISPATCH_FLOATS(student.scalar_type(), "distill_fwd", [&] {
    fwd_rows<scalar_t>(student.const_data_ptr<scalar_t>(),
                       teacher.defined() ? teacher.const_data_ptr<scalar_t>() : nullptr,
                       labels.const_data_ptr<int64_t>(), rows, v, temperature, ignore_index,
                       kl.data_ptr<float>(), ce.data_ptr<float>(), lse.data_ptr<float>());
  });
  return {kl, ce, lse};
}

at::Tensor distill_bwd_cpu(const at::Tensor& student, const c10::optional<at::Tensor>& teacher_opt,
                           const at::Tensor& labels, const at::Tensor& lse,
                           const at::Tensor& grad_scale, double eta, double temperature,
                           int64_t ignore_index) {
  const char* op = "distill_bwd";
  const at::Tensor teacher = teacher_opt.value_or(at::Tensor());
  check_distill_bwd_args(op, student, teacher, labels, lse, grad_scale, eta, temperature);
  const int64_t rows = student.size(0), v = student.size(1);
  check_labels_cpu(op, labels, v, ignore_index);
  const float scale = grad_scale.item<float>();
  at::Tensor grad = at::empty_like(student);
  CAST_DISPATCH_FLOATS(student.scalar_type(), "distill_bwd", [&] {
    bwd_rows<scalar_t>(student.const_data_ptr<scalar_t>(),
                       teacher.defined() ? teacher.const_data_ptr<scalar_t>() : nullptr,
                       labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), scale, rows,
                       v, eta, temperature, ignore_index, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CPU, m) {
  m.impl("distill_fwd", &distill_fwd_cpu);
  m.impl("distill_bwd", &distill_bwd_cpu);
}

}  // namespace cast_ext
