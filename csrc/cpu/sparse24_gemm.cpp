// 2:4 sparse GEMM on the CPU, on the portable packed format: y = x @ W^T (+ bias).
//
// Algorithm: W [N, K] is held as values [N, K/2] (the 2 kept elements of each group of 4, in
// ascending position) and meta [N, ceil(K/8)] (the packed 1-bit mask, a nibble per group). Rows
// of W are expanded into fp32 (zeros at the pruned positions) by a branch-free loop over groups
// that GCC vectorises (bit selects, no table lookups; x86-64-v4/v3/baseline versions picked at
// run time, csrc/cpu/isa.h), then multiplied:
// * M <= kGemvMaxM rows of x on a CPU with AVX-512 (see gemv_rows_avx512) and a
//   finite x: no expansion; each group's kept values meet their x elements through a permute
//   indexed by the meta, so M = 1 reads 56% of a dense bf16 weight's bytes and beats dense;
// * otherwise M < kBlasMinM (decode-sized): OpenMP threads take tiles of kTileN rows of W, expand
//   each tile once and run every row of x against it with 8 independent accumulators (each
//   expanded row is reused M times while hot in cache);
// * M >= kBlasMinM: tiles of kBlasTileN rows are expanded (threads split the rows) and multiplied
//   with torch's CPU GEMM (at::mm, MKL/oneDNN: blocked and multi-threaded), so a large M runs
//   near dense speed; the expansion is then a small share of the work.
// x is converted to fp32 once; accumulation is fp32 and y is rounded once to x's dtype at the
// end (bias added in fp32), like the tensor-core GEMMs. A nibble without exactly 2 bits set is
// invalid meta: it is reported after the parallel regions and the output is dropped (nothing of
// the caller's is written).
// Layout: x [..., K] (made contiguous), values/meta row-major, y [..., N] contiguous.
// Dtypes: fp32, fp16, bf16; x, values and bias share one dtype.
// Reference: cast_ext/reference.py sparse24_gemm.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/accumulate.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
// GCC 12 flags the AVX-512 intrinsics' internal _mm512_undefined_* as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#endif

#include "cast_ext.h"
#include "isa.h"
#include "vec.h"

namespace cast_ext {
namespace {

constexpr int64_t kTileN = 16;       // dot path: rows of W expanded at a time
constexpr int64_t kBlasMinM = 8;     // from this many rows of x on, expanded tiles go to at::mm
constexpr int64_t kBlasTileN = 256;  // BLAS path: rows of W per GEMM call
constexpr int kGemvMaxM = 16;        // AVX-512 path: up to this many rows of x
constexpr int kGemvTileRows = 8;     // AVX-512 path: rows of W that share a chunk of x in the L1
constexpr int64_t kGemvChunkBytes = 16 * 1024;  // AVX-512 path: bytes of x (M rows) per chunk
constexpr int kGemvCopyMinM = 4;  // AVX-512 path: above this many rows of x, chunks are copied

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

// The 4 weights of one group from its nibble and 2 values: each weight is the first value if it
// is the first kept position, the second value if a kept position lies below it, else +0.
// Selects on bit patterns: exact for every value (Inf and NaN included), and vectorisable.
// Returns 1 if the nibble does not have exactly 2 bits.
C10_ALWAYS_INLINE uint32_t expand_group(uint32_t nib, float f0, float f1, float* __restrict dst) {
  const uint32_t b0 = nib & 1u, b1 = (nib >> 1) & 1u, b2 = (nib >> 2) & 1u, b3 = (nib >> 3) & 1u;
  const uint32_t v0 = c10::bit_cast<uint32_t>(f0), v1 = c10::bit_cast<uint32_t>(f1);
  // All-ones where set: keep_i, and "a kept position below i" for i = 1..3.
  const uint32_t k0 = 0u - b0, k1 = 0u - b1, k2 = 0u - b2, k3 = 0u - b3;
  const uint32_t s1 = k0, s2 = k0 | k1, s3 = k0 | k1 | k2;
  dst[0] = c10::bit_cast<float>(v0 & k0);
  dst[1] = c10::bit_cast<float>(((v1 & s1) | (v0 & ~s1)) & k1);
  dst[2] = c10::bit_cast<float>(((v1 & s2) | (v0 & ~s2)) & k2);
  dst[3] = c10::bit_cast<float>(((v1 & s3) | (v0 & ~s3)) & k3);
  return uint32_t(b0 + b1 + b2 + b3 != 2u);
}

// One row: fp32 values (2 per group) and meta bytes (2 groups each) -> 4 fp32 weights per
// group. One meta byte per iteration, so every load is contiguous and the loop vectorises.
// Returns nonzero on an invalid nibble.
C10_ALWAYS_INLINE uint32_t expand_groups(const float* __restrict v, const uint8_t* __restrict meta,
                                         int64_t groups, float* __restrict dst) {
  uint32_t bad = 0;
  const int64_t pairs = groups / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint32_t byte = meta[j];
    bad |= expand_group(byte & 0xFu, v[4 * j], v[4 * j + 1], dst + 8 * j);
    bad |= expand_group(byte >> 4, v[4 * j + 2], v[4 * j + 3], dst + 8 * j + 4);
  }
  if (groups % 2)
    bad |= expand_group(meta[pairs] & 0xFu, v[4 * pairs], v[4 * pairs + 1], dst + 8 * pairs);
  return bad;
}

// One version per instruction-set level (isa.h) of the row expansion.
#define CAST_EXPAND_LEVEL(LEVEL, ATTR)                                                     \
  ATTR uint32_t expand_groups_##LEVEL(const float* v, const uint8_t* meta, int64_t groups, \
                                      float* dst) {                                        \
    return expand_groups(v, meta, groups, dst);                                            \
  }
CAST_EXPAND_LEVEL(v4, CAST_TARGET_V4)
CAST_EXPAND_LEVEL(v3, CAST_TARGET_V3)
CAST_EXPAND_LEVEL(base, )
#undef CAST_EXPAND_LEVEL
uint32_t expand_groups_dispatch(const float* v, const uint8_t* meta, int64_t groups, float* dst) {
  return CAST_ISA_CALL(expand_groups, v, meta, groups, dst);
}

template <typename T>  // dtypes the op's checks refuse still instantiate the dispatch
void to_float(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void to_float(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void to_float(const c10::Half* src, int64_t n, float* dst) { half_to_float(src, n, dst); }
inline void to_float(const c10::BFloat16* src, int64_t n, float* dst) {
  bf16_to_float(src, n, dst);
}

// Expands one packed row of W into dst[k] (fp32), using v32[k/2] as scratch for its values.
// Returns false on an invalid nibble.
template <typename T>
bool expand_row(const T* vals, const uint8_t* meta, int64_t k, float* v32, float* dst) {
  to_float(vals, k / 2, v32);
  return expand_groups_dispatch(v32, meta, k / 4, dst) == 0u;
}

// y32 [m, n] = x32 [m, k] @ W^T, fp32.
template <typename T>
bool gemm_dot(const float* x32, const T* vals, const uint8_t* meta, int64_t m, int64_t n, int64_t k,
              float* y32) {
  const int64_t kb = packed_last_dim(k);
  const int64_t tiles = (n + kTileN - 1) / kTileN;
  std::atomic<bool> all_ok{true};
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> w32(static_cast<size_t>(kTileN * k)), v32(static_cast<size_t>(k / 2));
    bool ok = true;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTileN;
      const int64_t rn = std::min(kTileN, n - r0);
      for (int64_t r = 0; r < rn; ++r) {
        ok &=
            expand_row(vals + (r0 + r) * (k / 2), meta + (r0 + r) * kb, k, v32.data(), &w32[r * k]);
      }
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t r = 0; r < rn; ++r) y32[i * n + r0 + r] = dot(&x32[i * k], &w32[r * k], k);
      }
    }
    if (!ok) all_ok = false;
  });
  return all_ok;
}

#if defined(__x86_64__)
// The small-M paths' pieces below that need no vector instructions.

// Rows [0, M) of x (row stride k), columns [c, c + w), for a pass over them: where they are
// (stride k) for M <= kGemvCopyMinM, else copied side by side into buf (stride w). Rows of x
// k * sizeof(X) bytes apart, a multiple of 4 KB at most model widths, fall in the same L1 sets,
// and more of them than the L1 has ways evict each other (the fp32 path at M = 16 took 4x the
// time of M = 8 at k = 2048 before the copy).
template <int M, typename X>
C10_ALWAYS_INLINE const X* x_chunk(const X* x, int64_t k, int64_t c, int64_t w, X* buf,
                                   int64_t& ld) {
  if (M <= kGemvCopyMinM) {
    ld = k;
    return x + c;
  }
  ld = w;
  for (int i = 0; i < M; ++i) std::memcpy(buf + i * w, x + i * k + c, w * sizeof(X));
  return buf;
}

// Groups [g0, groups) of one row of W (values v, meta mt), one at a time: tail[i] += their
// products with row i of x (stride k). Returns nonzero on a nibble without exactly 2 bits.
template <int M, typename T, typename X>
C10_ALWAYS_INLINE uint32_t tail_groups(const T* v, const uint8_t* mt, const X* x, int64_t k,
                                       int64_t g0, int64_t groups, float* tail) {
  uint32_t bad = 0;
  for (int64_t g = g0; g < groups; ++g) {
    const uint32_t nb = (uint32_t(mt[g / 2]) >> (4 * (g & 1))) & 15u;
    bad |= uint32_t(__builtin_popcount(nb) != 2);
    const int p0 = nb ? __builtin_ctz(nb) : 0, p1 = nb ? 31 - __builtin_clz(nb) : 0;
    const float v0 = static_cast<float>(v[2 * g]), v1 = static_cast<float>(v[2 * g + 1]);
    for (int i = 0; i < M; ++i) {
      const X* xg = x + i * k + 4 * g;
      tail[i] += v0 * static_cast<float>(xg[p0]) + v1 * static_cast<float>(xg[p1]);
    }
  }
  return bad;
}

// The decode-sized product straight from the packed format, AVX-512F: nothing is expanded.
// 8 groups of a row (16 kept values, 4 meta bytes) at a time: lane j holds value j, of group
// q = j/2, whose position in the group kept_positions (below) looks up; a second two-source
// permute then gathers the matching x elements of the 32 that the 8 groups span, and one FMA
// per row of x accumulates. The meta is read 4 bytes at a time and the values once (56% of a
// dense bf16 row's bytes). A nibble whose popcount is not 2 looks up a flag bit (kBadPos) that
// is ORed up and reported (the lane's permute uses only the low 5 bits; the output is then
// dropped). Groups
// past the last multiple of 8 are done one at a time. Accumulation: fp32, 16 lanes per row of
// x, summed at the end: the order differs from the expansion path, within the same fp32 bound.
#define CAST_GEMV_TARGET __attribute__((target("avx512f")))

template <typename T>
CAST_GEMV_TARGET C10_ALWAYS_INLINE __m512 load16(const T* v) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  }
}

// What kept_positions gives a lane whose group's nibble does not have exactly 2 bits (3, 5, 6,
// 9, 10 and 12 are the valid ones): a flag bit above the 5 bits a lane's x permute reads.
constexpr int kBadPos = 256;

// 4 * (j / 2) for lane j: the shift that brings its group's nibble down, and the offset of its
// group's first element in the 32 x elements of 8 groups.
CAST_GEMV_TARGET C10_ALWAYS_INLINE __m512i group_offsets() {
  return _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
}

// The position in its group of the value lane j holds, for 8 groups whose nibbles are `word`
// (group q in bits 4q..4q+3; lane j: value j, of group j / 2): the lowest set bit of the nibble
// for even j, the highest for odd j, looked up in a 32-entry table (one two-source permute,
// indexed by the nibble plus 16 on odd lanes), or kBadPos.
CAST_GEMV_TARGET C10_ALWAYS_INLINE __m512i kept_positions(uint32_t word) {
  constexpr int X = kBadPos;
  const __m512i lut_lo = _mm512_setr_epi32(X, X, X, 0, X, 0, 1, X, X, 0, 1, X, 2, X, X, X);
  const __m512i lut_hi = _mm512_setr_epi32(X, X, X, 1, X, 2, 2, X, X, 3, 3, X, 3, X, X, X);
  const __m512i odd16 = _mm512_setr_epi32(0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16, 0, 16);
  // (word >> 4q) & 15 | (16 on odd lanes): the table index; 0xEA is (a & b) | c.
  const __m512i sel =
      _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(int(word)), group_offsets()),
                                _mm512_set1_epi32(15), odd16, 0xEA);
  return _mm512_permutex2var_epi32(lut_lo, sel, lut_hi);
}

// Whether a lane of flags (kept_positions ORed up) holds kBadPos.
CAST_GEMV_TARGET C10_ALWAYS_INLINE bool any_bad(__m512i flags) {
  return _mm512_test_epi32_mask(flags, _mm512_set1_epi32(kBadPos)) != 0;
}

template <typename T, int M>
CAST_GEMV_TARGET bool gemv_rows_avx512(const float* x32, const T* vals, const uint8_t* meta,
                                       int64_t n, int64_t k, int64_t r0, int64_t r1, float* y32) {
  const int64_t kb = packed_last_dim(k), groups = k / 4, blocks = groups / 8;
  const __m512i quad = group_offsets();
  __m512i flags = _mm512_setzero_si512();
  uint32_t bad_tail = 0;
  // Blocked for the L1: a tile of kGemvTileRows rows of W takes a chunk of the blocks at a time,
  // every row of the tile against the same kGemvChunkBytes of x (M rows), its accumulators
  // parked in acc_buf between chunks. Each lane accumulates its blocks in the same order as
  // without blocking. (x whole per row of W, as before, streamed M * k * 4 bytes from the L2
  // per row once M * k * 4 passed the L1: at M = 16, k = 4096, 256 KB a row.)
  const int64_t chunk = std::max<int64_t>(1, kGemvChunkBytes / (M * 32 * int64_t(sizeof(float))));
  __m512 acc_buf[kGemvTileRows][M];
  alignas(64) float xbuf[kGemvChunkBytes / sizeof(float)];
  for (int64_t t0 = r0; t0 < r1; t0 += kGemvTileRows) {
    const int64_t rows = std::min<int64_t>(kGemvTileRows, r1 - t0);
    for (int64_t r = 0; r < rows; ++r)
      for (int i = 0; i < M; ++i) acc_buf[r][i] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < blocks; c0 += chunk) {
      const int64_t c1 = std::min(blocks, c0 + chunk);
      int64_t ldx;
      const float* xc = x_chunk<M>(x32, k, 32 * c0, 32 * (c1 - c0), xbuf, ldx);
      for (int64_t r = 0; r < rows; ++r) {
        const T* v = vals + (t0 + r) * (k / 2);
        const uint8_t* mt = meta + (t0 + r) * kb;
        __m512 acc[M];
        for (int i = 0; i < M; ++i) acc[i] = acc_buf[r][i];
        for (int64_t b = c0; b < c1; ++b) {
          uint32_t word;
          std::memcpy(&word, mt + 4 * b, 4);
          const __m512i pos = kept_positions(word);
          flags = _mm512_or_si512(flags, pos);
          const __m512i idx = _mm512_add_epi32(quad, pos);
          const __m512 w = load16(v + 16 * b);
#pragma GCC unroll 16  // whole: acc[] stays in registers (GCC kept it in memory at M = 16)
          for (int i = 0; i < M; ++i) {
            const float* xb = xc + i * ldx + 32 * (b - c0);
            const __m512 xs =
                _mm512_permutex2var_ps(_mm512_loadu_ps(xb), idx, _mm512_loadu_ps(xb + 16));
            acc[i] = _mm512_fmadd_ps(w, xs, acc[i]);
          }
        }
        for (int i = 0; i < M; ++i) acc_buf[r][i] = acc[i];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T* v = vals + (t0 + r) * (k / 2);
      const uint8_t* mt = meta + (t0 + r) * kb;
      float tail[M] = {};
      bad_tail |= tail_groups<M>(v, mt, x32, k, 8 * blocks, groups, tail);
      for (int i = 0; i < M; ++i)
        y32[i * n + t0 + r] = _mm512_reduce_add_ps(acc_buf[r][i]) + tail[i];
    }
  }
  return !any_bad(flags) && bad_tail == 0;
}

// gemv_rows_avx512<T, M> for a run-time m in [1, kGemvMaxM].
template <typename T, int... Is>
bool dispatch_m(std::integer_sequence<int, Is...>, int m, const float* x32, const T* vals,
                const uint8_t* meta, int64_t n, int64_t k, int64_t r0, int64_t r1, float* y32) {
  bool ok = true;
  ((m == Is + 1 ? (ok = gemv_rows_avx512<T, Is + 1>(x32, vals, meta, n, k, r0, r1, y32), 0) : 0),
   ...);
  return ok;
}

const bool kGemvAvx512 = cpu_isa() == CpuIsa::Avx512;

// y32 [m, n] = x32 [m, k] @ W^T for 1 <= m <= kGemvMaxM with gemv_rows_avx512.
template <typename T>
bool gemm_gemv_avx512(const float* x32, const T* vals, const uint8_t* meta, int64_t m, int64_t n,
                      int64_t k, float* y32) {
  std::atomic<bool> all_ok{true};
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    if (!dispatch_m<T>(std::make_integer_sequence<int, kGemvMaxM>{}, int(m), x32, vals, meta, n, k,
                       r0, r1, y32))
      all_ok = false;
  });
  return all_ok;
}
#undef CAST_GEMV_TARGET

// The same product for bf16 with AVX-512 BF16: 16 groups of a row (32 kept values, 8 meta
// bytes) at a time, the 32 values as they are stored, their x elements gathered by one
// two-source word permute from the 64 bf16 x elements the groups span, and one vdpbf16ps per
// row of x: lane q adds group q's two products. Per row of x, half the instructions and half
// the x bytes of gemv_rows_avx512's fp32 lanes. The word indices come from kept_positions'
// dword ones (two halves of 8 groups), narrowed. Products of bf16 are exact in fp32, and
// vdpbf16ps adds them to the fp32 lane rounding to nearest: within the fp32 accumulation bound
// of the other paths, whose order it does not follow, except that it reads subnormal inputs as
// 0 and flushes subnormal sums to 0 (it ignores MXCSR). So an x with a subnormal element takes
// gemv_rows_avx512; subnormal weights are read as 0. Groups past the last multiple of 16 are
// done one at a time.
#define CAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

template <int M>
CAST_BF16_TARGET bool gemv_rows_bf16(const c10::BFloat16* x, const c10::BFloat16* vals,
                                     const uint8_t* meta, int64_t n, int64_t k, int64_t r0,
                                     int64_t r1, float* y32) {
  const int64_t kb = packed_last_dim(k), groups = k / 4, blocks = groups / 16;
  const __m512i quad = group_offsets();
  const __m512i quad_hi = _mm512_add_epi32(quad, _mm512_set1_epi32(32));
  __m512i flags = _mm512_setzero_si512();
  uint32_t bad_tail = 0;
  using Bf16 = c10::BFloat16;
  // Blocked for the L1 as gemv_rows_avx512 is (blocks of 64 columns here).
  const int64_t chunk = std::max<int64_t>(1, kGemvChunkBytes / (M * 64 * int64_t(sizeof(Bf16))));
  __m512 acc_buf[kGemvTileRows][M];
  alignas(64) Bf16 xbuf[kGemvChunkBytes / sizeof(Bf16)];
  for (int64_t t0 = r0; t0 < r1; t0 += kGemvTileRows) {
    const int64_t rows = std::min<int64_t>(kGemvTileRows, r1 - t0);
    for (int64_t r = 0; r < rows; ++r)
      for (int i = 0; i < M; ++i) acc_buf[r][i] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < blocks; c0 += chunk) {
      const int64_t c1 = std::min(blocks, c0 + chunk);
      int64_t ldx;
      const Bf16* xc = x_chunk<M>(x, k, 64 * c0, 64 * (c1 - c0), xbuf, ldx);
      for (int64_t r = 0; r < rows; ++r) {
        const Bf16* v = vals + (t0 + r) * (k / 2);
        const uint8_t* mt = meta + (t0 + r) * kb;
        __m512 acc[M];
        for (int i = 0; i < M; ++i) acc[i] = acc_buf[r][i];
        for (int64_t b = c0; b < c1; ++b) {
          uint32_t lo, hi;  // the nibbles of groups 0-7 and 8-15 of the block
          std::memcpy(&lo, mt + 8 * b, 4);
          std::memcpy(&hi, mt + 8 * b + 4, 4);
          const __m512i pos_lo = kept_positions(lo), pos_hi = kept_positions(hi);
          flags = _mm512_ternarylogic_epi32(flags, pos_lo, pos_hi, 0xFE);  // a | b | c
          const __m512i idx = _mm512_inserti64x4(
              _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_add_epi32(quad, pos_lo))),
              _mm512_cvtepi32_epi16(_mm512_add_epi32(quad_hi, pos_hi)), 1);
          const __m512i w = _mm512_loadu_si512(v + 32 * b);
#pragma GCC unroll 16  // whole: acc[] stays in registers
          for (int i = 0; i < M; ++i) {
            const Bf16* xb = xc + i * ldx + 64 * (b - c0);
            const __m512i xs =
                _mm512_permutex2var_epi16(_mm512_loadu_si512(xb), idx, _mm512_loadu_si512(xb + 32));
            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)w, (__m512bh)xs);
          }
        }
        for (int i = 0; i < M; ++i) acc_buf[r][i] = acc[i];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const Bf16* v = vals + (t0 + r) * (k / 2);
      const uint8_t* mt = meta + (t0 + r) * kb;
      float tail[M] = {};
      bad_tail |= tail_groups<M>(v, mt, x, k, 16 * blocks, groups, tail);
      for (int i = 0; i < M; ++i)
        y32[i * n + t0 + r] = _mm512_reduce_add_ps(acc_buf[r][i]) + tail[i];
    }
  }
  return !any_bad(flags) && bad_tail == 0;
}
#undef CAST_BF16_TARGET

template <int... Is>
bool dispatch_m_bf16(std::integer_sequence<int, Is...>, int m, const c10::BFloat16* x,
                     const c10::BFloat16* vals, const uint8_t* meta, int64_t n, int64_t k,
                     int64_t r0, int64_t r1, float* y32) {
  bool ok = true;
  ((m == Is + 1 ? (ok = gemv_rows_bf16<Is + 1>(x, vals, meta, n, k, r0, r1, y32), 0) : 0), ...);
  return ok;
}

const bool kGemvBf16 = cpu_avx512_bf16();

// y32 [m, n] = x [m, k] @ W^T (bf16) for 1 <= m <= kGemvMaxM with gemv_rows_bf16.
bool gemm_gemv_bf16(const c10::BFloat16* x, const c10::BFloat16* vals, const uint8_t* meta,
                    int64_t m, int64_t n, int64_t k, float* y32) {
  std::atomic<bool> all_ok{true};
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    if (!dispatch_m_bf16(std::make_integer_sequence<int, kGemvMaxM>{}, int(m), x, vals, meta, n, k,
                         r0, r1, y32))
      all_ok = false;
  });
  return all_ok;
}

// Whether one of x[0..cnt) is subnormal (exponent field 0, fraction not): an integer test that
// vectorises.
inline bool has_subnormal(const float* x, int64_t cnt) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  uint32_t acc = 0;
  for (int64_t i = 0; i < cnt; ++i)
    acc |= uint32_t((u[i] & 0x7f800000u) == 0u) & uint32_t((u[i] & 0x007fffffu) != 0u);
  return acc != 0u;
}

// The small-M product from x (T) or its fp32 copy x32: gemv_rows_bf16 for bf16 where the CPU
// has AVX-512 BF16 and x has no subnormal element, else gemv_rows_avx512.
template <typename T>
bool gemm_gemv(const T* /*x*/, const float* x32, const T* vals, const uint8_t* meta, int64_t m,
               int64_t n, int64_t k, float* y32) {
  return gemm_gemv_avx512<T>(x32, vals, meta, m, n, k, y32);
}
template <>
bool gemm_gemv<c10::BFloat16>(const c10::BFloat16* x, const float* x32, const c10::BFloat16* vals,
                              const uint8_t* meta, int64_t m, int64_t n, int64_t k, float* y32) {
  return kGemvBf16 && !has_subnormal(x32, m * k)
             ? gemm_gemv_bf16(x, vals, meta, m, n, k, y32)
             : gemm_gemv_avx512<c10::BFloat16>(x32, vals, meta, m, n, k, y32);
}
#endif

// y32 [m, n] = x32 [m, k] @ W^T through at::mm on expanded tiles of W.
template <typename T>
bool gemm_blas(const at::Tensor& x32, const T* vals, const uint8_t* meta, int64_t n, int64_t k,
               const at::Tensor& y32) {
  const int64_t kb = packed_last_dim(k);
  at::Tensor w32 = at::empty({std::min(kBlasTileN, n), k}, x32.options());
  float* w = w32.data_ptr<float>();
  std::atomic<bool> all_ok{true};
  for (int64_t r0 = 0; r0 < n; r0 += kBlasTileN) {
    const int64_t rn = std::min(kBlasTileN, n - r0);
    at::parallel_for(0, rn, 8, [&](int64_t a, int64_t b) {
      std::vector<float> v32(static_cast<size_t>(k / 2));
      bool ok = true;
      for (int64_t r = a; r < b; ++r) {
        ok &= expand_row(vals + (r0 + r) * (k / 2), meta + (r0 + r) * kb, k, v32.data(), w + r * k);
      }
      if (!ok) all_ok = false;
    });
    y32.narrow(1, r0, rn).copy_(at::mm(x32, w32.narrow(0, 0, rn).t()));
  }
  return all_ok;
}

at::Tensor sparse24_gemm_cpu(const at::Tensor& x_in, const at::Tensor& values_in,
                             const at::Tensor& meta_in, const std::optional<at::Tensor>& bias_in,
                             bool /*check_meta: the CPU kernels check the meta in the same pass*/) {
  const char* op = "sparse24_gemm";
  check_gemm_args(op, x_in, values_in, meta_in, bias_in);
  const int64_t n = values_in.size(0);
  const int64_t k = values_in.size(1) * 2;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const at::Tensor meta = meta_in.contiguous();
  const int64_t m = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));  // rows of x
  {
    const uint8_t* mt = meta.const_data_ptr<uint8_t>();
    const int64_t kb = meta.size(1), groups = k / 4;
    bool bad = false;
    // A row's last byte holds one group: its padding nibble must be 0, as sparse24_decompress
    // (the backward's) requires, so the forward does not take a meta the backward refuses.
    if (k % 8 != 0)
      for (int64_t r = 0; r < n; ++r) bad |= (mt[r * kb + kb - 1] >> 4) != 0;
    // The kernels check the groups in their pass; with no rows of x none runs, so check them
    // here (as CUDA's decompression does): a valid nibble has 2 bits, one of 3 5 6 9 10 12.
    if (m == 0)
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < groups; ++g)
          bad |= ((0x1668u >> ((mt[r * kb + g / 2] >> (4 * (g % 2))) & 0xFu)) & 1u) == 0;
    check_meta_flag(op, meta_in, bad);
  }
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  auto oshape = x.sizes().vec();
  oshape.back() = n;
  at::Tensor y = at::empty(oshape, x.options());
  if (m == 0 || n == 0) return y;
  const at::Tensor x32 = x.reshape({m, k}).to(at::kFloat);
  // fp32 results are computed in y itself; other dtypes are rounded once at the end.
  const bool direct = x.scalar_type() == at::kFloat;
  const at::Tensor y32 = direct ? y.view({m, n}) : at::empty({m, n}, x32.options());
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse24_gemm", [&] {
    const scalar_t* vals = values.const_data_ptr<scalar_t>();
    const uint8_t* mt = meta.const_data_ptr<uint8_t>();
    const float* xp = x32.const_data_ptr<float>();
    float* yp = y32.data_ptr<float>();
#if defined(__x86_64__)
    // gemv_rows_avx512 never multiplies a pruned weight, so a NaN or Inf of x at a pruned
    // position would not reach y, where F.linear on the decompressed weight (and every other
    // path here and on CUDA) forms 0 * NaN = NaN: such inputs take another path.
    if (kGemvAvx512 && m <= kGemvMaxM && nonfinite_bits(xp, m * k) == 0u) {
      ok = gemm_gemv<scalar_t>(x.const_data_ptr<scalar_t>(), xp, vals, mt, m, n, k, yp);
    } else
#endif
        if (m >= kBlasMinM) {
      ok = gemm_blas<scalar_t>(x32, vals, mt, n, k, y32);
    } else {
      ok = gemm_dot<scalar_t>(xp, vals, mt, m, n, k, yp);
    }
  });
  check_meta_flag(op, meta_in, !ok);
  if (bias) y32.add_(bias->to(at::kFloat));  // in fp32, before the one rounding
  if (!direct) y.view({m, n}).copy_(y32);
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
