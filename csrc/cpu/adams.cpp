// AdamS fused optimizer step on the CPU (cast_ext::adams_step_).
//
// Algorithm: one update pass over every tensor of the list, preceded at refresh steps by one
// read-only pass over the refreshing tensors' weights. The tensors are cut into chunks of whole
// packed-mask bytes (8 elements of a row; a row's last byte may hold 4), the chunks of all
// tensors are spread over OpenMP threads, and each chunk is walked in tiles of up to 256 elements.
//   0. refresh (t % mask_interval == 0), before anything is written: the weights are checked
//      finite (a NaN/Inf raises with nothing changed, as the contract requires, so this read is
//      needed anyway) and in the same read every group of m is ranked with csrc/nm_select.h
//      (the code the CUDA kernel runs, so masks agree bit for bit; 2:4 vectorised across groups)
//      into a temporary packed mask. The CUDA kernel, which cannot raise without a host sync,
//      ranks inside its update pass instead.
//   1. mask: the new bytes replace the stored mask (the old byte saved to prev_masks when given),
//      or the stored bytes are read; the bits become one int32 lane per element (256-entry table).
//   2. update: a branch-free loop over contiguous floats (GCC vectorises it; versions for AVX-512
//      and AVX2 are picked at run time; fp32 on AVX-512 is written with intrinsics, one pass in
//      registers with the mask bits as k-masks) doing the reference's operations in the
//      reference's order, each rounded to fp32 as torch rounds them. All versions give the same
//      bits (CAST_EXT_CPU_ISA picks a lower one; tests/test_adams.py compares them). Two deliberate
//      differences, each within an ulp per step: the bias corrections divide as multiplications by
//      their fp32 reciprocals (as the reference does on CUDA; two fewer divisions per element), and
//      sqrt is correctly rounded (torch's AVX-512 CPU sqrt is not always). Masks match the
//      reference exactly.
// Dense lists (no masks) are plain Adam and skip steps 0-1. grad_scale divides the gradient,
// found_inf != 0 skips everything. Steps are read on the host (fp32 0-d tensors, checked to be
// whole numbers) and incremented after the update.
// Layout: contiguous tensors; masks [*p.shape[:-1], ceil(k/8)] uint8, LSB first.
// Dtypes: fp32 params; or fp32/fp16/bf16 params with fp32 master weights (math on the master,
// the param receives its rounded value). State, steps, grad_scale, found_inf: fp32.
// Reference: cast_ext/reference.py adams_step_.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
// GCC 12 flags _mm512_sqrt_ps's internal _mm512_undefined_ps as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

#include "adams.h"
#include "cast_ext.h"
#include "isa.h"
#include "nm_select.h"
#include "vec.h"

// a*b+c must stay two roundings, as in the reference's separate torch ops.
#pragma GCC optimize("fp-contract=off")

namespace cast_ext {
namespace {

constexpr int64_t kTile = 256;            // elements per tile: 32 mask bytes
constexpr int64_t kChunkElems = 1 << 15;  // elements per parallel work item

// One int32 lane per bit of a mask byte: -1 where kept, 0 where pruned.
struct KeepTable {
  alignas(32) int32_t lanes[256][8];
  KeepTable() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 8; ++i) lanes[b][i] = ((b >> i) & 1) ? -1 : 0;
  }
};
const KeepTable kKeep;

template <typename T>
struct Ptrs {
  T* p;                  // params (the weights when there is no master)
  const T* g;            // grads
  float* mu;             // exp_avg
  float* v;              // exp_avg_sq
  float* w;              // fp32 weights: master, or p itself
  uint8_t* mask;         // packed mask or nullptr
  uint8_t* prev;         // where the old mask goes at a refresh, or nullptr
  const uint8_t* fresh;  // at a refresh: the new mask bits (ranked by rank_all), else nullptr
  int64_t rows, k, kb;   // k: row length (numel for dense lists, one row)
  AdamsCoeffs c;
};

// Correctly rounded sqrt of a tile in place, one version per ISA. Written with intrinsics because
// GCC only vectorises sqrtf under -fno-math-errno, which neither `#pragma GCC optimize` nor the
// optimize attribute turns on (checked with GCC 12), and the build flags are shared by every
// kernel. The intrinsics must sit in functions carrying the matching target attribute.
__attribute__((always_inline)) inline void sqrt_tile_default(float* x, int64_t cnt) {
  int64_t i = 0;
#if defined(__x86_64__)
  for (; i + 4 <= cnt; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
#endif
  for (; i < cnt; ++i) x[i] = std::sqrt(x[i]);
}
#if defined(__x86_64__)
__attribute__((target("avx2"), always_inline)) inline void sqrt_tile_avx2(float* x, int64_t cnt) {
  int64_t i = 0;
  for (; i + 8 <= cnt; i += 8) _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
  for (; i < cnt; ++i) x[i] = std::sqrt(x[i]);
}
__attribute__((target("avx512f"), always_inline)) inline void sqrt_tile_avx512(float* x,
                                                                               int64_t cnt) {
  int64_t i = 0;
  for (; i + 16 <= cnt; i += 16) _mm512_storeu_ps(x + i, _mm512_sqrt_ps(_mm512_loadu_ps(x + i)));
  for (; i < cnt; ++i) x[i] = std::sqrt(x[i]);
}
#endif

// The update over `cnt` <= kTile contiguous elements starting at `off`. keep[i] != 0: kept.
// Three loops over the tile (the middle one is the sqrt), all vectorisable; the temporaries stay
// in L1.
// kF16c: fp16 grads and params are converted a tile at a time with F16C (x86 only).
template <typename T, bool kMaster, bool kSparse, bool kF16c, typename SqrtFn>
__attribute__((always_inline)) inline void update_body(SqrtFn sqrt_tile, const Ptrs<T>& x,
                                                       int64_t off, int64_t cnt,
                                                       const int32_t* __restrict keep,
                                                       float inv_scale) {
  const AdamsCoeffs c = x.c;  // a copy: loads of x.c would be reloaded after every store
  float* __restrict w = x.w + off;
  const T* __restrict g = x.g + off;
  float* __restrict mu = x.mu + off;
  float* __restrict v = x.v + off;
  T* __restrict p = x.p + off;
  alignas(64) float num_t[kTile];
  alignas(64) float root_t[kTile];
  alignas(64) float w_t[kTile];
  constexpr bool kTileF16 = kF16c && std::is_same_v<T, c10::Half>;
  alignas(64) float g_t[kTileF16 ? kTile : 1];
#if defined(__x86_64__)
  if constexpr (kTileF16) f16_to_f32_f16c(g, cnt, g_t);
#endif
  for (int64_t i = 0; i < cnt; ++i) {
    float gi;
    if constexpr (kTileF16)
      gi = g_t[i] * inv_scale;
    else
      gi = static_cast<float>(g[i]) * inv_scale;  // reference: g.float() * inv_scale
    const float wi = w[i] * c.wdf;                // decoupled weight decay
    const float t1 = mu[i] * c.b1;
    const float t2 = c.c1 * gi;
    const float m = t1 + t2;
    float me, num;
    if constexpr (kSparse) {
      const float sgn = float(wi > 0.f) - float(wi < 0.f);
      const float d1 = c.oma * m;
      const float d2 = c.ad * sgn;
      const float dec = d1 + d2;
      // keep[i] is all ones or zero: a bitwise select (a ?: here is left as a branch below
      // AVX-512, which stops GCC vectorising the loop)
      const uint32_t km = uint32_t(keep[i]);
      me = __builtin_bit_cast(float, (km & __builtin_bit_cast(uint32_t, m)) |
                                         (~km & __builtin_bit_cast(uint32_t, dec)));
      num = me;
    } else {
      me = gi;  // plain Adam: v averages g^2, the update uses mu
      num = m;
    }
    const float q = (c.c2 * me) * me;
    const float vv = v[i] * c.b2 + q;
    mu[i] = m;
    v[i] = vv;
    num_t[i] = num * c.rbc1;
    root_t[i] = vv * c.rbc2;
    w_t[i] = wi;
  }
  sqrt_tile(root_t, cnt);
  for (int64_t i = 0; i < cnt; ++i) {
    const float den = root_t[i] + c.eps;
    const float upd = num_t[i] / den;
    const float wi = w_t[i] - c.lr * upd;
    w[i] = wi;
    if constexpr (kMaster && !kTileF16) p[i] = static_cast<T>(wi);
  }
#if defined(__x86_64__)
  if constexpr (kTileF16 && kMaster) f32_to_f16_f16c(w, cnt, p);
#endif
}

template <typename T, bool kMaster, bool kSparse>
void update_default(const Ptrs<T>& x, int64_t off, int64_t cnt, const int32_t* keep, float s) {
  update_body<T, kMaster, kSparse, false>([](float* r, int64_t c) { sqrt_tile_default(r, c); }, x,
                                          off, cnt, keep, s);
}
#if defined(__x86_64__)
template <typename T, bool kMaster, bool kSparse>
__attribute__((target("avx2,f16c"))) void update_avx2(const Ptrs<T>& x, int64_t off, int64_t cnt,
                                                      const int32_t* keep, float s) {
  update_body<T, kMaster, kSparse, true>(
      [](float* r, int64_t c) __attribute__((target("avx2"))) { sqrt_tile_avx2(r, c); }, x, off,
      cnt, keep, s);
}
template <typename T, bool kMaster, bool kSparse>
__attribute__((target("avx512f,avx512bw,avx512vl,prefer-vector-width=512"))) void update_avx512(
    const Ptrs<T>& x, int64_t off, int64_t cnt, const int32_t* keep, float s) {
  update_body<T, kMaster, kSparse, true>(
      [](float* r, int64_t c) __attribute__((target("avx512f"))) { sqrt_tile_avx512(r, c); }, x,
      off, cnt, keep, s);
}
#endif

#if defined(__x86_64__)
// fp32 weights on AVX-512: the whole update in one pass in registers, 16 elements at a time, the
// mask bits used directly as the blend's k-mask (bits[j] holds elements 8j..8j+7, LSB first).
// The same operations in the same order as update_body, each one IEEE-rounded intrinsic, so the
// results are bit for bit those of the generic path (tests/test_adams.py runs both), without its
// lane table and its three L1 round trips per element. Row ends (cnt % 16 != 0) use masked loads
// and stores; the lanes past cnt compute on zeros and are never stored.
template <bool kMaster, bool kSparse>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void update_f32_avx512(
    const Ptrs<float>& x, int64_t off, int64_t cnt, const uint8_t* bits, float inv_scale) {
  const AdamsCoeffs& c = x.c;
  const float* g = x.g + off;
  float* w = x.w + off;
  float* mu = x.mu + off;
  float* v = x.v + off;
  float* p = x.p + off;
  const __m512 s = _mm512_set1_ps(inv_scale), wdf = _mm512_set1_ps(c.wdf);
  const __m512 b1 = _mm512_set1_ps(c.b1), c1 = _mm512_set1_ps(c.c1);
  const __m512 b2 = _mm512_set1_ps(c.b2), c2 = _mm512_set1_ps(c.c2);
  const __m512 oma = _mm512_set1_ps(c.oma), ad = _mm512_set1_ps(c.ad);
  const __m512 rbc1 = _mm512_set1_ps(c.rbc1), rbc2 = _mm512_set1_ps(c.rbc2);
  const __m512 eps = _mm512_set1_ps(c.eps), lr = _mm512_set1_ps(c.lr);
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  const int64_t nbytes = (cnt + 7) / 8;
  for (int64_t i = 0; i < cnt; i += 16) {
    const int64_t left = cnt - i;
    const __mmask16 lm = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
    const __m512 gi = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, g + i), s);
    const __m512 wi = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, w + i), wdf);
    const __m512 t1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, mu + i), b1);
    const __m512 m = _mm512_add_ps(t1, _mm512_mul_ps(c1, gi));
    __m512 me, num;
    if constexpr (kSparse) {
      const __m512 pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(wi, zero, _CMP_GT_OQ), one);
      const __m512 neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(wi, zero, _CMP_LT_OQ), one);
      const __m512 sgn = _mm512_sub_ps(pos, neg);
      const __m512 dec = _mm512_add_ps(_mm512_mul_ps(oma, m), _mm512_mul_ps(ad, sgn));
      const int64_t b = i / 8;
      const uint32_t kb = uint32_t(bits[b]) | (b + 1 < nbytes ? uint32_t(bits[b + 1]) << 8 : 0u);
      me = _mm512_mask_blend_ps(__mmask16(kb), dec, m);  // bit set (kept): m
      num = me;
    } else {
      me = gi;
      num = m;
    }
    const __m512 q = _mm512_mul_ps(_mm512_mul_ps(c2, me), me);
    const __m512 vv = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(lm, v + i), b2), q);
    _mm512_mask_storeu_ps(mu + i, lm, m);
    _mm512_mask_storeu_ps(v + i, lm, vv);
    const __m512 den = _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(vv, rbc2)), eps);
    const __m512 upd = _mm512_div_ps(_mm512_mul_ps(num, rbc1), den);
    const __m512 wn = _mm512_sub_ps(wi, _mm512_mul_ps(lr, upd));
    _mm512_mask_storeu_ps(w + i, lm, wn);
    if constexpr (kMaster) _mm512_mask_storeu_ps(p + i, lm, wn);
  }
}
#endif

const CpuIsa kIsa = cpu_isa();

template <typename T, bool kMaster, bool kSparse>
inline void update(const Ptrs<T>& x, int64_t off, int64_t cnt, const int32_t* keep, float s) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float> && !kSparse) {
    if (kIsa == CpuIsa::Avx512) return update_f32_avx512<kMaster, false>(x, off, cnt, nullptr, s);
  }
  switch (kIsa) {
    case CpuIsa::Avx512: return update_avx512<T, kMaster, kSparse>(x, off, cnt, keep, s);
    case CpuIsa::Avx2: return update_avx2<T, kMaster, kSparse>(x, off, cnt, keep, s);
    default: break;
  }
#endif
  update_default<T, kMaster, kSparse>(x, off, cnt, keep, s);
}

// Mask bits of the byte whose first element is `src` (cnt = 8, or 4 at a row end for m = 4).
template <int M>
inline uint32_t rank_byte(const float* src, int64_t cnt, int n) {
  bool bad = false;  // finiteness was checked before the step
  float a[8];
  for (int i = 0; i < 8; ++i) a[i] = i < cnt ? checked_abs(src[i], bad) : 0.f;
  if constexpr (M == 8) {
    return topn_of_m<8>(a, n);
  } else {
    uint32_t bits = n == 2 ? top2_of_4(a[0], a[1], a[2], a[3]) : topn_of_m<4>(a, n);
    if (cnt == 8)
      bits |= (n == 2 ? top2_of_4(a[4], a[5], a[6], a[7]) : topn_of_m<4>(a + 4, n)) << 4;
    return bits;
  }
}

// 2:4 ranking of `ng` groups: one nibble per group. Same comparisons as top2_of_4 (nm_select.h),
// written as a loop over groups so GCC vectorises it across groups (|w| is fabs here: weights
// were checked finite, and -0 ranks like +0 either way).
__attribute__((always_inline)) inline void rank24_body(const float* __restrict w, int64_t ng,
                                                       uint8_t* __restrict nib) {
  for (int64_t g = 0; g < ng; ++g) {
    nib[g] = uint8_t(top2_of_4(__builtin_fabsf(w[4 * g]), __builtin_fabsf(w[4 * g + 1]),
                               __builtin_fabsf(w[4 * g + 2]), __builtin_fabsf(w[4 * g + 3])));
  }
}
void rank24_default(const float* w, int64_t ng, uint8_t* nib) { rank24_body(w, ng, nib); }
#if defined(__x86_64__)
__attribute__((target("avx2"))) void rank24_avx2(const float* w, int64_t ng, uint8_t* nib) {
  rank24_body(w, ng, nib);
}
__attribute__((target("avx512f,avx512bw,avx512vl,prefer-vector-width=512"))) void rank24_avx512(
    const float* w, int64_t ng, uint8_t* nib) {
  rank24_body(w, ng, nib);
}
#endif
inline void rank24(const float* w, int64_t ng, uint8_t* nib) {
#if defined(__x86_64__)
  switch (kIsa) {
    case CpuIsa::Avx512: return rank24_avx512(w, ng, nib);
    case CpuIsa::Avx2: return rank24_avx2(w, ng, nib);
    default: break;
  }
#endif
  rank24_default(w, ng, nib);
}

// Elements [8 * cb0, min(8 * cb1, k)) of row r, in tiles: at a refresh the new bits (ranked by
// rank_all) replace the mask (the old byte saved to prev); the bits become keep lanes; update.
template <typename T, bool kMaster>
void sparse_segment(const Ptrs<T>& x, int64_t r, int64_t cb0, int64_t cb1, float inv_scale) {
  alignas(64) int32_t keep[kTile];
  for (int64_t cb = cb0; cb < cb1; cb += kTile / 8) {
    const int64_t ce = std::min(cb1, cb + kTile / 8);
    const int64_t e0 = cb * 8;
    const int64_t cnt = std::min(ce * 8, x.k) - e0;
    const int64_t byte0 = r * x.kb + cb;
    uint8_t* mk = x.mask + byte0;
    if (x.fresh) {
      if (x.prev) std::memcpy(x.prev + byte0, mk, size_t(ce - cb));
      std::memcpy(mk, x.fresh + byte0, size_t(ce - cb));
    }
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, float>) {
      if (kIsa == CpuIsa::Avx512) {
        update_f32_avx512<kMaster, true>(x, r * x.k + e0, cnt, mk, inv_scale);
        continue;
      }
    }
#endif
    for (int64_t j = 0; j < ce - cb; ++j)
      std::memcpy(keep + j * 8, kKeep.lanes[mk[j]], sizeof(kKeep.lanes[0]));
    update<T, kMaster, true>(x, r * x.k + e0, cnt, keep, inv_scale);
  }
}

// The validation pass of a refresh: for every tensor with `fresh` set, checks that the fp32
// weights are finite and ranks every group into `fresh`, reading each weight once, before anything
// of the caller's is written (a NaN must raise with nothing changed, so this read cannot be
// skipped; ranking here keeps that compute off the update pass). Returns per tensor whether it
// held a non-finite weight (vec.h's nonfinite_bits, an integer test that vectorises).
template <typename T>
std::vector<uint8_t> rank_all(const std::vector<Ptrs<T>>& xs, int n, int m) {
  std::vector<int64_t> idx;
  std::vector<std::pair<int64_t, int64_t>> ranges;  // byte ranges, row-major over rows x kb
  for (size_t i = 0; i < xs.size(); ++i) {
    if (!xs[i].fresh) continue;
    const int64_t units = xs[i].rows * xs[i].kb;
    for (int64_t b = 0; b < units; b += kChunkElems / 8) {
      idx.push_back(int64_t(i));
      ranges.push_back({b, std::min(units, b + kChunkElems / 8)});
    }
  }
  std::unique_ptr<std::atomic<uint8_t>[]> bad(new std::atomic<uint8_t>[xs.size()]);
  for (size_t i = 0; i < xs.size(); ++i) bad[i].store(0, std::memory_order_relaxed);
  at::parallel_for(0, int64_t(idx.size()), 1, [&](int64_t w0, int64_t w1) {
    alignas(64) uint8_t nib[kTile / 4];
    for (int64_t wi = w0; wi < w1; ++wi) {
      const Ptrs<T>& x = xs[idx[wi]];
      uint8_t* fresh = const_cast<uint8_t*>(x.fresh);
      uint32_t acc = 0;
      for (int64_t b = ranges[wi].first; b < ranges[wi].second;) {
        const int64_t r = b / x.kb;
        const int64_t cb1 = std::min(x.kb, ranges[wi].second - r * x.kb);
        for (int64_t cb = b - r * x.kb; cb < cb1; cb += kTile / 8) {
          const int64_t ce = std::min(cb1, cb + kTile / 8);
          const int64_t cnt = std::min(ce * 8, x.k) - cb * 8;
          const float* w = x.w + r * x.k + cb * 8;
          acc |= nonfinite_bits(w, cnt);
          uint8_t* out = fresh + r * x.kb + cb;
          if (m == 4 && n == 2) {
            const int64_t ng = cnt / 4;
            rank24(w, ng, nib);
            for (int64_t j = 0; j < ce - cb; ++j)
              out[j] = uint8_t(nib[2 * j] | (2 * j + 1 < ng ? nib[2 * j + 1] << 4 : 0));
          } else {
            for (int64_t j = 0; j < ce - cb; ++j) {
              const int64_t bc = std::min<int64_t>(8, cnt - j * 8);
              out[j] =
                  uint8_t(m == 8 ? rank_byte<8>(w + j * 8, bc, n) : rank_byte<4>(w + j * 8, bc, n));
            }
          }
        }
        b = r * x.kb + cb1;
      }
      if (acc) bad[idx[wi]].store(1, std::memory_order_relaxed);
    }
  });
  std::vector<uint8_t> out(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) out[i] = bad[i].load();
  return out;
}

struct Work {
  int32_t tensor;
  int64_t begin, end;  // packed bytes (sparse, row-major over rows x kb) or elements (dense)
};

template <typename T, bool kMaster, bool kSparse>
void run_all(const std::vector<Ptrs<T>>& xs, float inv_scale) {
  std::vector<Work> work;
  for (size_t i = 0; i < xs.size(); ++i) {
    const int64_t units = kSparse ? xs[i].rows * xs[i].kb : xs[i].k;
    const int64_t per = kSparse ? kChunkElems / 8 : kChunkElems;
    for (int64_t b = 0; b < units; b += per)
      work.push_back({int32_t(i), b, std::min(units, b + per)});
  }
  at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t wi = w0; wi < w1; ++wi) {
      const Work& wk = work[wi];
      const Ptrs<T>& x = xs[wk.tensor];
      if constexpr (kSparse) {
        for (int64_t b = wk.begin; b < wk.end;) {
          const int64_t r = b / x.kb;
          const int64_t cb0 = b - r * x.kb;
          const int64_t cb1 = std::min(x.kb, wk.end - r * x.kb);
          sparse_segment<T, kMaster>(x, r, cb0, cb1, inv_scale);
          b = r * x.kb + cb1;
        }
      } else {
        for (int64_t e = wk.begin; e < wk.end; e += kTile) {
          update<T, kMaster, false>(x, e, std::min(kTile, wk.end - e), nullptr, inv_scale);
        }
      }
    }
  });
}

// Refresh validation + ranking (sparse lists), then the update pass. `wname` names the fp32
// weights (params or master_params) in the error.
template <typename T, bool kMaster>
void run(const char* op, bool sparse, std::vector<Ptrs<T>>& xs, at::TensorList weights,
         const char* wname, int n, int m, float s) {
  if (!sparse) return run_all<T, kMaster, false>(xs, s);
  std::vector<std::unique_ptr<uint8_t[]>> fresh(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    if (!xs[i].c.refresh) continue;
    fresh[i].reset(new uint8_t[size_t(xs[i].rows * xs[i].kb)]);
    xs[i].fresh = fresh[i].get();
  }
  const std::vector<uint8_t> bad = rank_all(xs, n, m);
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string name = std::string(wname) + "[" + std::to_string(i) + "]";
    check_finite_flag(op, name.c_str(), weights[i], bad[i] != 0);
  }
  run_all<T, kMaster, true>(xs, s);
}

void adams_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList masks, at::TensorList steps,
                    at::TensorList master_params, at::TensorList prev_masks, double lr,
                    double beta1, double beta2, double eps, double weight_decay, double decay,
                    int64_t total_steps, int64_t mask_interval, int64_t n, int64_t m,
                    const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf) {
  const char* op = "adams_step_";
  const AdamsHyper h{lr, beta1, beta2, eps, weight_decay, decay, total_steps, mask_interval, n, m};
  check_adams_args(op, params, grads, exp_avgs, exp_avg_sqs, masks, steps, master_params,
                   prev_masks, h, grad_scale, found_inf, c10::DeviceType::CPU);
  if (params.empty()) return;
  if (found_inf.has_value() && found_inf->item<float>() != 0.f) return;
  const float inv_scale = grad_scale.has_value() ? 1.0f / grad_scale->item<float>() : 1.0f;
  const bool sparse = !masks.empty();
  const bool master = !master_params.empty();

  // Everything that can fail is checked before the first write.
  std::vector<int64_t> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const float sv = steps[i].item<float>();
    CAST_CHECK(sv >= 0.f && sv < 16777216.f && sv == std::floor(sv), op, "steps[", i,
               "] must hold a whole number of completed steps in [0, 2^24), got ", sv);
    ts[i] = int64_t(sv);
  }

  auto fill = [&](auto* tag, auto& xs) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (size_t i = 0; i < params.size(); ++i) {
      Ptrs<T> x;
      x.p = static_cast<T*>(params[i].data_ptr());
      x.g = static_cast<const T*>(grads[i].const_data_ptr());
      x.mu = exp_avgs[i].data_ptr<float>();
      x.v = exp_avg_sqs[i].data_ptr<float>();
      x.w = master ? master_params[i].data_ptr<float>() : reinterpret_cast<float*>(x.p);
      x.mask = sparse ? masks[i].data_ptr<uint8_t>() : nullptr;
      x.prev = prev_masks.empty() ? nullptr : prev_masks[i].data_ptr<uint8_t>();
      x.fresh = nullptr;
      const int64_t numel = params[i].numel();
      x.k = sparse ? params[i].size(-1) : numel;
      x.rows = x.k == 0 ? 0 : numel / x.k;
      x.kb = packed_last_dim(x.k);
      x.c = adams_coeffs(h, ts[i], sparse);
      xs.push_back(x);
    }
  };
  const int ni = int(n), mi = int(m);
  const at::TensorList weights = master ? master_params : params;
  const char* wname = master ? "master_params" : "params";
  switch (params[0].scalar_type()) {
    case at::kFloat: {
      std::vector<Ptrs<float>> xs;
      fill(static_cast<float*>(nullptr), xs);
      if (master)
        run<float, true>(op, sparse, xs, weights, wname, ni, mi, inv_scale);
      else
        run<float, false>(op, sparse, xs, weights, wname, ni, mi, inv_scale);
      break;
    }
    case at::kHalf: {
      std::vector<Ptrs<c10::Half>> xs;
      fill(static_cast<c10::Half*>(nullptr), xs);
      run<c10::Half, true>(op, sparse, xs, weights, wname, ni, mi, inv_scale);
      break;
    }
    case at::kBFloat16: {
      std::vector<Ptrs<c10::BFloat16>> xs;
      fill(static_cast<c10::BFloat16*>(nullptr), xs);
      run<c10::BFloat16, true>(op, sparse, xs, weights, wname, ni, mi, inv_scale);
      break;
    }
    default: TORCH_INTERNAL_ASSERT(false, "unchecked dtype");
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    float* s = steps[i].data_ptr<float>();
    *s = *s + 1.0f;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CPU, m) { m.impl("adams_step_", &adams_step_cpu); }

}  // namespace cast_ext
