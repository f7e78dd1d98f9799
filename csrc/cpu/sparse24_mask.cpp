// N:M mask selection, pruning, 2:4 compression and packed masks on the CPU.
//
// Algorithm: rows (everything but the last dim) are split over OpenMP threads; each group of m
// along a row is ranked with the branch-free count of csrc/nm_select.h, the same code the CUDA
// kernels run, so CPU and CUDA agree bit for bit. Non-finite weights are detected in the same
// pass and turned into an error after it (outputs are fresh tensors: nothing of the caller's is
// written).
// Layout: contiguous rows x k (non-contiguous inputs are made contiguous first); packed masks
// rows x ceil(k/8) uint8, LSB first. Dtypes: fp32, fp16, bf16 (ranked as fp32 |w|).
// Reference: cast_ext/reference.py nm_mask, sparse24_mask, sparse24_prune, sparse24_compress,
// sparse24_decompress, pack_mask, unpack_mask, mask_flips.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cast_ext.h"
#include "isa.h"
#include "nm_select.h"

namespace cast_ext {
namespace {

enum class Mode { Mask, Prune, Compress };

int64_t grain_rows(int64_t k) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)); }

std::vector<int64_t> packed_shape(const at::Tensor& t, int64_t k) {
  auto shape = t.sizes().vec();
  shape.back() = packed_last_dim(k);
  return shape;
}

// ---- 2:4 fast path: plain loops over groups that GCC auto-vectorises (flags, no bit fields,
// an integer accumulator for the non-finite check, 16-bit types handled as raw bits), compiled
// for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, F16C) and baseline x86-64, picked at run time
// (csrc/cpu/isa.h): the package needs no -march flag.

// How a dtype's raw storage is ranked: `key` maps an element to a float whose order (and
// equality) is the order of |x| for finite x, and `bad` tells from a key whether the element
// was NaN/Inf (the op then refuses the tensor, so keys of NaN/Inf never reach an output).
struct F32 {
  using raw = float;
  static C10_ALWAYS_INLINE float key(float x) { return abs_f(x); }
  static C10_ALWAYS_INLINE uint32_t bad(float key) { return nonfinite(key); }
};
// fp16 and bf16 are sign-magnitude: with the sign bit cleared, the 15-bit pattern of a finite
// value grows with |x| (+0 and -0 both become 0), and a 15-bit integer converts to float
// exactly. Integer ops only, so the loops vectorise (a half->float conversion made the fp16
// compress loop scalar and 6x slower than bf16). kInf: the first non-finite pattern.
template <uint32_t kInf>
struct Bits16 {
  using raw = uint16_t;
  static C10_ALWAYS_INLINE float key(uint16_t x) {
    return static_cast<float>(int32_t(uint32_t(x) & 0x7FFFu));
  }
  static C10_ALWAYS_INLINE uint32_t bad(float key) { return uint32_t(key >= float(kInf)); }
};
using F16 = Bits16<0x7C00u>;
using BF16 = Bits16<0x7F80u>;

// The keys are computed first and `bad` updated once per group, in one expression: an update
// per element through the reference stopped GCC from vectorising the fp32 mask/prune loops.
template <typename K>
C10_ALWAYS_INLINE Keep4 keep_group(const typename K::raw* x, uint32_t& bad) {
  const float a0 = K::key(x[0]), a1 = K::key(x[1]), a2 = K::key(x[2]), a3 = K::key(x[3]);
  bad |= K::bad(a0) | K::bad(a1) | K::bad(a2) | K::bad(a3);
  return keep2_of_4(a0, a1, a2, a3);
}

C10_ALWAYS_INLINE uint32_t nibble(Keep4 k) {
  return uint32_t(k.k0) | (uint32_t(k.k1) << 1) | (uint32_t(k.k2) << 2) | (uint32_t(k.k3) << 3);
}

template <typename K>
C10_ALWAYS_INLINE uint32_t mask24_span(const typename K::raw* __restrict w, int64_t groups,
                                       bool* __restrict out) {
  uint32_t bad = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const Keep4 k = keep_group<K>(w + 4 * g, bad);
    out[4 * g] = k.k0;
    out[4 * g + 1] = k.k1;
    out[4 * g + 2] = k.k2;
    out[4 * g + 3] = k.k3;
  }
  return bad;
}

template <typename K>
C10_ALWAYS_INLINE uint32_t prune24_span(const typename K::raw* __restrict w, int64_t groups,
                                        typename K::raw* __restrict out) {
  using R = typename K::raw;
  uint32_t bad = 0;
  const R zero = R(0);  // +0 in every supported format
  for (int64_t g = 0; g < groups; ++g) {
    const R* x = w + 4 * g;
    const Keep4 k = keep_group<K>(x, bad);
    out[4 * g] = k.k0 ? x[0] : zero;
    out[4 * g + 1] = k.k1 ? x[1] : zero;
    out[4 * g + 2] = k.k2 ? x[2] : zero;
    out[4 * g + 3] = k.k3 ? x[3] : zero;
  }
  return bad;
}

// The 2 kept values of a group in ascending position: the first kept of {0, 1, 2} and the last
// kept of {1, 2, 3}, which covers all 6 patterns without a branch.
template <typename R>
C10_ALWAYS_INLINE void kept_pair(const R* x, Keep4 k, R* v) {
  v[0] = k.k0 ? x[0] : (k.k1 ? x[1] : x[2]);
  v[1] = k.k3 ? x[3] : (k.k2 ? x[2] : x[1]);
}

// One row: k/2 kept values and ceil(k/8) meta bytes, two groups (one byte) per iteration.
template <typename K>
C10_ALWAYS_INLINE uint32_t compress24_row(const typename K::raw* __restrict w, int64_t k,
                                          typename K::raw* __restrict vals,
                                          uint8_t* __restrict meta) {
  uint32_t bad = 0;
  const int64_t pairs = k / 8;
  for (int64_t j = 0; j < pairs; ++j) {
    const typename K::raw* x = w + 8 * j;
    const Keep4 a = keep_group<K>(x, bad), b = keep_group<K>(x + 4, bad);
    kept_pair(x, a, vals + 4 * j);
    kept_pair(x + 4, b, vals + 4 * j + 2);
    meta[j] = uint8_t(nibble(a) | (nibble(b) << 4));
  }
  if (k % 8) {  // a last, odd group: its byte's high nibble is padding (zero)
    const Keep4 a = keep_group<K>(w + 8 * pairs, bad);
    kept_pair(w + 8 * pairs, a, vals + 4 * pairs);
    meta[pairs] = uint8_t(nibble(a));
  }
  return bad;
}

// One version per instruction-set level (isa.h), each with the spans above inlined into it.
#define CAST_FAST_24(K, LEVEL, ATTR)                                                       \
  ATTR uint32_t mask24_##LEVEL(const K::raw* w, int64_t groups, bool* out, K) {            \
    return mask24_span<K>(w, groups, out);                                                 \
  }                                                                                        \
  ATTR uint32_t prune24_##LEVEL(const K::raw* w, int64_t groups, K::raw* out, K) {         \
    return prune24_span<K>(w, groups, out);                                                \
  }                                                                                        \
  ATTR uint32_t compress24_##LEVEL(const K::raw* w, int64_t k, K::raw* v, uint8_t* m, K) { \
    return compress24_row<K>(w, k, v, m);                                                  \
  }
#define CAST_FAST_24_LEVELS(K)        \
  CAST_FAST_24(K, v4, CAST_TARGET_V4) \
  CAST_FAST_24(K, v3, CAST_TARGET_V3) \
  CAST_FAST_24(K, base, )
CAST_FAST_24_LEVELS(F32)
CAST_FAST_24_LEVELS(BF16)
CAST_FAST_24_LEVELS(F16)
#undef CAST_FAST_24_LEVELS
#undef CAST_FAST_24
template <typename R, typename K>
uint32_t mask24(const R* w, int64_t groups, bool* out, K kind) {
  return CAST_ISA_CALL(mask24, w, groups, out, kind);
}
template <typename R, typename K>
uint32_t prune24(const R* w, int64_t groups, R* out, K kind) {
  return CAST_ISA_CALL(prune24, w, groups, out, kind);
}
template <typename R, typename K>
uint32_t compress24(const R* w, int64_t k, R* v, uint8_t* m, K kind) {
  return CAST_ISA_CALL(compress24, w, k, v, m, kind);
}

template <typename T>
struct KindOf;
template <>
struct KindOf<float> {
  using type = F32;
};
template <>
struct KindOf<c10::BFloat16> {
  using type = BF16;
};
template <>
struct KindOf<c10::Half> {
  using type = F16;
};

template <typename T>
using raw_t = typename KindOf<T>::type::raw;

template <typename T>
const raw_t<T>* raw(const T* p) {
  return reinterpret_cast<const raw_t<T>*>(p);
}
template <typename T>
raw_t<T>* raw(T* p) {
  return reinterpret_cast<raw_t<T>*>(p);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// ---- General N:M (m = 4 or 8, any n): the shared bit-field ranking, one group at a time.
template <typename T, int M>
inline uint32_t group_bits(const T* p, int n, bool& bad) {
  float a[M];
  for (int i = 0; i < M; ++i) a[i] = checked_abs(to_float(p[i]), bad);
  return topn_of_m<M>(a, n);
}

template <typename T, int M, Mode MODE>
bool select_rows(const T* w, int64_t rows, int64_t k, int n, bool* mask, T* values, uint8_t* meta) {
  std::atomic<bool> any_bad{false};
  const int64_t kb = packed_last_dim(k);
  const bool fast = M == 4 && n == 2;
  at::parallel_for(0, rows, grain_rows(k), [&](int64_t r0, int64_t r1) {
    bool bad = false;
    if (fast) {
      // Rows are contiguous and hold whole groups: mask and prune run over the whole span.
      const int64_t groups = (r1 - r0) * k / 4;
      const typename KindOf<T>::type kind{};
      if constexpr (MODE == Mode::Mask) {
        bad = mask24(raw(w + r0 * k), groups, mask + r0 * k, kind) != 0u;
      } else if constexpr (MODE == Mode::Prune) {
        bad = prune24(raw(w + r0 * k), groups, raw(values + r0 * k), kind) != 0u;
      } else {
        for (int64_t r = r0; r < r1; ++r) {
          bad |=
              compress24(raw(w + r * k), k, raw(values + r * (k / 2)), meta + r * kb, kind) != 0u;
        }
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) {
        const T* src = w + r * k;
        for (int64_t c = 0; c < k; c += M) {
          const uint32_t bits = group_bits<T, M>(src + c, n, bad);
          if constexpr (MODE == Mode::Mask) {
            bool* dst = mask + r * k + c;
            for (int i = 0; i < M; ++i) dst[i] = (bits >> i) & 1u;
          } else if constexpr (MODE == Mode::Prune) {
            T* dst = values + r * k + c;
            for (int i = 0; i < M; ++i) dst[i] = ((bits >> i) & 1u) ? src[c + i] : T(0);
          }
        }
      }
    }
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });
  return any_bad.load();
}

template <Mode MODE>
std::vector<at::Tensor> nm_select_cpu(const char* op, const at::Tensor& w_in, int64_t n,
                                      int64_t m) {
  check_nm(op, n, m);
  check_grouped_weight(op, "w", w_in, m);
  const at::Tensor w = w_in.contiguous();
  const int64_t k = w.size(-1);
  const int64_t rows = k == 0 ? 0 : w.numel() / k;
  std::vector<at::Tensor> outs;
  bool bad = false;
  CAST_DISPATCH_FLOATS(w.scalar_type(), "cast_ext_cpu", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    if constexpr (MODE == Mode::Mask) {
      auto mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
      bad = m == 8 ? select_rows<scalar_t, 8, MODE>(src, rows, k, n, mask.data_ptr<bool>(), nullptr,
                                                    nullptr)
                   : select_rows<scalar_t, 4, MODE>(src, rows, k, n, mask.data_ptr<bool>(), nullptr,
                                                    nullptr);
      outs = {mask};
    } else if constexpr (MODE == Mode::Prune) {
      auto out = at::empty_like(w);
      bad = select_rows<scalar_t, 4, MODE>(src, rows, k, n, nullptr, out.data_ptr<scalar_t>(),
                                           nullptr);
      outs = {out};
    } else {
      auto vshape = w.sizes().vec();
      vshape.back() = k / 2;
      auto values = at::empty(vshape, w.options());
      auto meta = at::empty(packed_shape(w, k), w.options().dtype(at::kByte));
      bad = select_rows<scalar_t, 4, MODE>(src, rows, k, n, nullptr, values.data_ptr<scalar_t>(),
                                           meta.data_ptr<uint8_t>());
      outs = {values, meta};
    }
  });
  check_finite_flag(op, "w", w_in, bad);
  return outs;
}

at::Tensor nm_mask_cpu(const at::Tensor& w, int64_t n, int64_t m) {
  return nm_select_cpu<Mode::Mask>("nm_mask", w, n, m)[0];
}

at::Tensor sparse24_mask_cpu(const at::Tensor& w) {
  return nm_select_cpu<Mode::Mask>("sparse24_mask", w, 2, 4)[0];
}

at::Tensor sparse24_prune_cpu(const at::Tensor& w) {
  return nm_select_cpu<Mode::Prune>("sparse24_prune", w, 2, 4)[0];
}

std::tuple<at::Tensor, at::Tensor> sparse24_compress_cpu(const at::Tensor& w) {
  auto outs = nm_select_cpu<Mode::Compress>("sparse24_compress", w, 2, 4);
  return {outs[0], outs[1]};
}

at::Tensor sparse24_decompress_cpu(const at::Tensor& values_in, const at::Tensor& meta_in) {
  const char* op = "sparse24_decompress";
  check_compressed(op, values_in, meta_in);
  const at::Tensor values = values_in.contiguous();
  const at::Tensor meta = meta_in.contiguous();
  const int64_t k = values.size(-1) * 2;
  const int64_t rows = k == 0 ? 0 : values.numel() * 2 / k;
  const int64_t kb = packed_last_dim(k);
  auto oshape = values.sizes().vec();
  oshape.back() = k;
  auto out = at::empty(oshape, values.options());
  std::atomic<bool> any_bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, values.scalar_type(), "cast_ext_cpu", [&] {
        const scalar_t* src = values.const_data_ptr<scalar_t>();
        const uint8_t* mt = meta.const_data_ptr<uint8_t>();
        scalar_t* dst = out.data_ptr<scalar_t>();
        at::parallel_for(0, rows, grain_rows(k), [&](int64_t r0, int64_t r1) {
          bool bad = false;
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* v = src + r * (k / 2);
            for (int64_t c = 0; c < k; c += 4) {
              const uint32_t bits = (mt[r * kb + c / 8] >> (c % 8)) & 0xFu;
              const bool ok = __builtin_popcount(bits) == 2;
              bad |= !ok;
              for (int i = 0; i < 4; ++i) {
                const bool keep = ok && ((bits >> i) & 1u);
                dst[r * k + c + i] = keep ? *v : scalar_t(0);
                v += keep;
              }
              v += ok ? 0 : 2;
            }
            if ((k % 8) != 0 && (mt[r * kb + kb - 1] >> 4) != 0) bad = true;
          }
          if (bad) any_bad.store(true, std::memory_order_relaxed);
        });
      });
  check_meta_flag(op, meta_in, any_bad.load());
  return out;
}

at::Tensor pack_mask_cpu(const at::Tensor& mask_in) {
  check_bool_mask("pack_mask", mask_in);
  const at::Tensor mask = mask_in.contiguous();
  const int64_t k = mask.size(-1);
  const int64_t rows = k == 0 ? 0 : mask.numel() / k;
  const int64_t kb = packed_last_dim(k);
  auto packed = at::empty(packed_shape(mask, k), mask.options().dtype(at::kByte));
  // Bytes, not bools: a bool whose byte is neither 0 nor 1 (a uint8 tensor viewed as bool) is
  // true, as torch reads it, and sets one bit.
  const auto* src = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, rows, grain_rows(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t b = 0; b < kb; ++b) {
        uint32_t bits = 0;
        const int64_t c0 = b * 8;
        const int64_t count = std::min<int64_t>(8, k - c0);
        for (int64_t i = 0; i < count; ++i) bits |= uint32_t(src[r * k + c0 + i] != 0) << i;
        dst[r * kb + b] = uint8_t(bits);
      }
    }
  });
  return packed;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed_in, int64_t last_dim) {
  check_packed_mask("unpack_mask", "packed", packed_in, last_dim);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t k = last_dim;
  const int64_t kb = packed_last_dim(k);
  const int64_t rows = kb == 0 ? 0 : packed.numel() / kb;
  auto shape = packed.sizes().vec();
  shape.back() = k;
  auto mask = at::empty(shape, packed.options().dtype(at::kBool));
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  bool* dst = mask.data_ptr<bool>();
  at::parallel_for(0, rows, grain_rows(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < k; ++c) dst[r * k + c] = (src[r * kb + c / 8] >> (c % 8)) & 1u;
    }
  });
  return mask;
}

at::Tensor mask_flips_cpu(const at::Tensor& a_in, const at::Tensor& b_in, int64_t m) {
  check_flips("mask_flips", a_in, b_in, m);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const uint8_t* pa = a.const_data_ptr<uint8_t>();
  const uint8_t* pb = b.const_data_ptr<uint8_t>();
  const int64_t count = at::parallel_reduce(
      0, a.numel(), 1 << 16, int64_t(0),
      [&](int64_t i0, int64_t i1, int64_t acc) {
        for (int64_t i = i0; i < i1; ++i) {
          const uint32_t d = uint32_t(pa[i] ^ pb[i]);
          acc += m == 8 ? (d != 0u) : ((d & 0xFu) != 0u) + ((d >> 4) != 0u);
        }
        return acc;
      },
      [](int64_t x, int64_t y) { return x + y; });
  return at::scalar_tensor(count, a.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CPU, m) {
  m.impl("sparse24_mask", &sparse24_mask_cpu);
  m.impl("nm_mask", &nm_mask_cpu);
  m.impl("sparse24_prune", &sparse24_prune_cpu);
  m.impl("sparse24_compress", &sparse24_compress_cpu);
  m.impl("sparse24_decompress", &sparse24_decompress_cpu);
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
  m.impl("mask_flips", &mask_flips_cpu);
}

}  // namespace cast_ext
