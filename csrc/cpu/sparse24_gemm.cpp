// 2:4 sparse GEMM on the CPU, on the portable packed format: y = x @ W^T (+ bias).
//
// Algorithm: W [N, K] is held as values [N, K/2] (the 2 kept elements of each group of 4, in
// ascending position) and meta [N, ceil(K/8)] (the packed 1-bit mask, a nibble per group). With
// AVX-512 or AVX2 and a finite x (a NaN or Inf of x must meet the pruned weights, as in
// F.linear), the kernels multiply straight from the packed format:
// * M <= kGemvMaxM rows of x (see GemvAvx512, gemv_rows): each group's kept values meet their x
//   elements through a permute indexed by the meta, so M = 1 reads 56% of a dense bf16 weight's
//   bytes and beats dense; for bf16 with AVX-512 BF16, vdpbf16ps (GemvBf16); with AVX2
//   but not AVX-512, the same with 8-lane vectors (GemvAvx2);
// * more rows, rows of x in the lanes: bf16 with AVX-512 BF16 and no subnormal in x, the pairs
//   kernel (x rewritten as the pairs each 2:4 pattern reads, one vdpbf16ps per kept pair and 16
//   rows of x: see PairsKernel, gemm_lanes); otherwise the kept-value kernel (x transposed, one
//   fp32 FMA per kept value and 16 rows of x, 8 with AVX2: see KeptKernel, KeptKernelAvx2).
//   Half a dense GEMM's multiply-adds.
// Otherwise rows of W are expanded into fp32 (zeros at the pruned positions) by a branch-free
// loop over groups that GCC vectorises (bit selects, no table lookups; x86-64-v4/v3/baseline
// versions picked at run time, csrc/cpu/isa.h), then multiplied:
// * M < kBlasMinM: OpenMP threads take tiles of kTileN rows of W, expand each tile once and run
//   every row of x against it with 8 independent accumulators (each expanded row is reused M
//   times while hot in cache);
// * M >= kBlasMinM: tiles of kBlasTileN rows are expanded (threads split the rows) and multiplied
//   with torch's CPU GEMM (at::mm, MKL/oneDNN: blocked and multi-threaded).
// x is converted to fp32 once (the pairs kernel reads a bf16 x as it is); accumulation is fp32
// and y is rounded once to x's dtype at the end (bias added in fp32), like the tensor-core GEMMs.
// A nibble without exactly 2 bits set is invalid meta: it is reported after the parallel regions
// and the output is dropped (nothing of the caller's is written).
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
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
// GCC 12 flags the AVX-512 intrinsics' internal _mm512_undefined_* as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same, in the shuffles of transpose16
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
constexpr int kGemvMaxM = 8;         // permute kernels: up to this many rows of x (then the
                                     // pairs and kept-value kernels)
constexpr int kGemvTileRows = 8;     // permute kernels: rows of W that share a chunk of x
constexpr int64_t kGemvChunkBytes = 16 * 1024;  // permute kernels: bytes of x (M rows) a chunk
constexpr int kGemvCopyMinM = 4;  // permute kernels: above this many rows, chunks are copied

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
// dropped). Accumulation: fp32, 16 lanes per row of x, summed at the end (gemv_rows runs the
// blocks and the groups past them): the order differs from the expansion path, within the same
// fp32 bound.
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

template <typename T>
struct GemvAvx512 {
  using X = float;
  using Value = T;
  using Acc = __m512;
  static constexpr int64_t kCols = 32;  // x columns of a block: 8 groups

  // Rows [0, rows) of a tile of W (row r's values at v + r * (k / 2), its meta at mt + r * kb)
  // over blocks [c0, c1), whose x is xc (row stride ldx, from block c0): acc_buf[r][i] += the
  // products with row i of x. False on an invalid nibble.
  template <int M>
  static CAST_GEMV_TARGET bool tile_chunk(__m512 (&acc_buf)[kGemvTileRows][M], int64_t rows,
                                          const float* xc, int64_t ldx, const T* v,
                                          const uint8_t* mt, int64_t kb, int64_t k, int64_t c0,
                                          int64_t c1) {
    const __m512i quad = group_offsets();
    __m512i flags = _mm512_setzero_si512();
    for (int64_t r = 0; r < rows; ++r) {
      const T* vr = v + r * (k / 2);
      const uint8_t* mr = mt + r * kb;
      __m512 acc[M];
      for (int i = 0; i < M; ++i) acc[i] = acc_buf[r][i];
      for (int64_t b = c0; b < c1; ++b) {
        uint32_t word;
        std::memcpy(&word, mr + 4 * b, 4);
        const __m512i pos = kept_positions(word);
        flags = _mm512_or_si512(flags, pos);
        const __m512i idx = _mm512_add_epi32(quad, pos);
        const __m512 w = load16(vr + 16 * b);
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
    return !any_bad(flags);
  }

  static CAST_GEMV_TARGET float reduce(const __m512& acc) { return _mm512_reduce_add_ps(acc); }
};

const bool kGemvAvx512 = cpu_isa() == CpuIsa::Avx512;

#undef CAST_GEMV_TARGET

// The decode-sized product for CPUs with AVX2 but not AVX-512 (x86-64-v3: most AMD Zen 2/3
// and Intel client CPUs), as GemvAvx512 with 8-lane vectors: 4 groups of a row (8 kept
// values, 2 meta bytes) at a time. A byte's two groups look up their 4 lanes' positions in a
// 256-entry table (kAvx2Positions: 4 KB, in the L1); the x elements come from the 16 that the
// 4 groups span through two one-source permutes and a blend on the position's bit 3. Up to 8
// rows of x (16 vector registers).
#define CAST_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

// Per meta byte (groups 2j, 2j+1 of a block of 4): the positions of its 4 kept values in the
// group pair's 8 elements (low nibble's two, then the high nibble's two, each +4), or kBadPos
// added for a nibble without exactly 2 bits.
struct Avx2Positions {
  alignas(16) int32_t pos[256][4];
};
constexpr Avx2Positions make_avx2_positions() {
  Avx2Positions t{};
  for (int b = 0; b < 256; ++b) {
    for (int h = 0; h < 2; ++h) {
      const int nib = (b >> (4 * h)) & 15;
      int lo = -1, hi = -1, bits = 0;
      for (int i = 0; i < 4; ++i) {
        if ((nib >> i) & 1) {
          lo = lo < 0 ? i : lo;
          hi = i;
          ++bits;
        }
      }
      const bool ok = bits == 2;
      t.pos[b][2 * h] = 4 * h + (ok ? lo : kBadPos);
      t.pos[b][2 * h + 1] = 4 * h + (ok ? hi : kBadPos);
    }
  }
  return t;
}
constexpr Avx2Positions kAvx2Positions = make_avx2_positions();

template <typename T>
CAST_AVX2_TARGET C10_ALWAYS_INLINE __m256 load8_avx2(const T* v) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  }
}

CAST_AVX2_TARGET C10_ALWAYS_INLINE float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 d = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

template <typename T>
struct GemvAvx2 {
  using X = float;
  using Value = T;
  using Acc = __m256;
  static constexpr int64_t kCols = 16;  // x columns of a block: 4 groups

  template <int M>  // as GemvAvx512::tile_chunk
  static CAST_AVX2_TARGET bool tile_chunk(__m256 (&acc_buf)[kGemvTileRows][M], int64_t rows,
                                          const float* xc, int64_t ldx, const T* v,
                                          const uint8_t* mt, int64_t kb, int64_t k, int64_t c0,
                                          int64_t c1) {
    __m256i flags = _mm256_setzero_si256();
    for (int64_t r = 0; r < rows; ++r) {
      const T* vr = v + r * (k / 2);
      const uint8_t* mr = mt + r * kb;
      __m256 acc[M];
      for (int i = 0; i < M; ++i) acc[i] = acc_buf[r][i];
      for (int64_t b = c0; b < c1; ++b) {
        const __m128i lo =
            _mm_load_si128(reinterpret_cast<const __m128i*>(kAvx2Positions.pos[mr[2 * b]]));
        const __m128i hi =
            _mm_load_si128(reinterpret_cast<const __m128i*>(kAvx2Positions.pos[mr[2 * b + 1]]));
        const __m256i pos = _mm256_set_m128i(_mm_add_epi32(hi, _mm_set1_epi32(8)), lo);
        flags = _mm256_or_si256(flags, pos);
        const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(pos, 28));  // bit 3: x[8, 16)
        const __m256 w = load8_avx2(vr + 8 * b);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
          const float* xb = xc + i * ldx + 16 * (b - c0);
          const __m256 xs =
              _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xb), pos),
                               _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + 8), pos), upper);
          acc[i] = _mm256_fmadd_ps(w, xs, acc[i]);
        }
      }
      for (int i = 0; i < M; ++i) acc_buf[r][i] = acc[i];
    }
    const __m256i bad = _mm256_and_si256(flags, _mm256_set1_epi32(kBadPos));
    return _mm256_testz_si256(bad, bad);
  }

  static CAST_AVX2_TARGET float reduce(const __m256& acc) { return hsum8(acc); }
};
#undef CAST_AVX2_TARGET

const bool kGemvAvx2 = cpu_isa() == CpuIsa::Avx2;

// The same product for bf16 with AVX-512 BF16: 16 groups of a row (32 kept values, 8 meta
// bytes) at a time, the 32 values as they are stored, their x elements gathered by one
// two-source word permute from the 64 bf16 x elements the groups span, and one vdpbf16ps per
// row of x: lane q adds group q's two products. Per row of x, half the instructions and half
// the x bytes of GemvAvx512's fp32 lanes. The word indices come from kept_positions'
// dword ones (two halves of 8 groups), narrowed. Products of bf16 are exact in fp32, and
// vdpbf16ps adds them to the fp32 lane rounding to nearest: within the fp32 accumulation bound
// of the other paths, whose order it does not follow, except that it reads subnormal inputs as
// 0 and flushes subnormal sums to 0 (it ignores MXCSR). So an x with a subnormal element takes
// GemvAvx512; subnormal weights are read as 0.
#define CAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

struct GemvBf16 {
  using X = c10::BFloat16;
  using Value = c10::BFloat16;
  using Acc = __m512;
  static constexpr int64_t kCols = 64;  // x columns of a block: 16 groups

  template <int M>  // as GemvAvx512::tile_chunk
  static CAST_BF16_TARGET bool tile_chunk(__m512 (&acc_buf)[kGemvTileRows][M], int64_t rows,
                                          const c10::BFloat16* xc, int64_t ldx,
                                          const c10::BFloat16* v, const uint8_t* mt, int64_t kb,
                                          int64_t k, int64_t c0, int64_t c1) {
    const __m512i quad = group_offsets();
    const __m512i quad_hi = _mm512_add_epi32(quad, _mm512_set1_epi32(32));
    __m512i flags = _mm512_setzero_si512();
    for (int64_t r = 0; r < rows; ++r) {
      const c10::BFloat16* vr = v + r * (k / 2);
      const uint8_t* mr = mt + r * kb;
      __m512 acc[M];
      for (int i = 0; i < M; ++i) acc[i] = acc_buf[r][i];
      for (int64_t b = c0; b < c1; ++b) {
        uint32_t lo, hi;  // the nibbles of groups 0-7 and 8-15 of the block
        std::memcpy(&lo, mr + 8 * b, 4);
        std::memcpy(&hi, mr + 8 * b + 4, 4);
        const __m512i pos_lo = kept_positions(lo), pos_hi = kept_positions(hi);
        flags = _mm512_ternarylogic_epi32(flags, pos_lo, pos_hi, 0xFE);  // a | b | c
        const __m512i idx = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_add_epi32(quad, pos_lo))),
            _mm512_cvtepi32_epi16(_mm512_add_epi32(quad_hi, pos_hi)), 1);
        const __m512i w = _mm512_loadu_si512(vr + 32 * b);
#pragma GCC unroll 16  // whole: acc[] stays in registers
        for (int i = 0; i < M; ++i) {
          const c10::BFloat16* xb = xc + i * ldx + 64 * (b - c0);
          const __m512i xs =
              _mm512_permutex2var_epi16(_mm512_loadu_si512(xb), idx, _mm512_loadu_si512(xb + 32));
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)w, (__m512bh)xs);
        }
      }
      for (int i = 0; i < M; ++i) acc_buf[r][i] = acc[i];
    }
    return !any_bad(flags);
  }

  static CAST_BF16_TARGET float reduce(const __m512& acc) { return _mm512_reduce_add_ps(acc); }
};
#undef CAST_BF16_TARGET

const bool kGemvBf16 = cpu_avx512_bf16();

// ---- Rows of x in the lanes (from kLaneMinM rows of x, AVX-512 or AVX2) ----------------------
// Three kernels, one structure: x is first rewritten into a layout with kLanes rows of x in the
// lanes of a vector (a tile of x: 16 rows with AVX-512, 8 with AVX2), then each kept weight (or
// kept pair) of W meets a tile of x in one instruction: the pairs kernel (bf16, AVX-512 BF16)
// and the kept-value kernels (fp32 FMAs, AVX-512 or AVX2).
// * A tile of kRows rows of W against 2 tiles of x at a time (the last one alone if their
//   count is odd): the weight broadcast, each tile's lanes of x (one vector load), one
//   instruction each into that row's accumulators, whose lanes are rows of x: no permute, no
//   horizontal sum, half the multiply-adds of a dense GEMM. Two tiles of x share each
//   broadcast: the loads, not the arithmetic, bound the loop (a 2-core Zen 4 took 0.50 ns a
//   vdpbf16ps with one tile of x, 0.40 with two, 0.27 with no loads). A tile's weights and their
//   offsets in x's layout are first packed side by side (one pointer for all its rows; the meta
//   is checked there), the next tile of W prefetched meanwhile.
// * Blocking: each thread takes a range of tiles of W; groups go in chunks whose layout (every
//   tile of x) fits kLaneChunkBytes, so a chunk stays in the L2 while the range's tiles pass over
//   it, and W is read once per block of kLaneBlockM rows of x. Between chunks the accumulators
//   rest in yT [n][kLanes * tiles of x].
// A kernel K gives: kLanes (rows of x per tile: its vectors' fp32 lanes), kRows (rows of W per
// tile: 2 kRows accumulators and a broadcast fit the vector registers), Source (x as the kernel
// reads it), Value (W's values), Layout (x's layout element), Tile (a packed tile of W),
// kGroupBytes (the layout of a group in one tile of x), kChunkMultiple (groups per run of meta its
// packing reads), tile_elems(k) and kPad (layout elements per tile of x, and after the last), build
// (x's layout), pack_row (one row of a tile; nonzero on an invalid nibble) and tiles_x<T> (T tiles
// of x against a packed tile).
constexpr int64_t kLaneMinM = kGemvMaxM + 1;     // from this many rows of x
constexpr int64_t kLaneBlockM = 512;             // rows of x per block (x's layout and yT)
constexpr int64_t kLaneChunkBytes = 512 * 1024;  // x's layout of a chunk of groups, all of x
constexpr int64_t kLaneMaxChunk = 128;           // groups per chunk at most

// x's layout for m rows and k columns, L x L blocks at a time in parallel: block(t, c0) writes
// tile t's columns [c0, c0 + L) (fewer at the end).
template <int64_t L, typename F>
void build_blocks(int64_t m, int64_t k, const F& block) {
  const int64_t blocks = (k + L - 1) / L;
  at::parallel_for(0, (m + L - 1) / L * blocks, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) block(i / blocks, L * (i % blocks));
  });
}

// Groups per chunk for m rows of x in tiles of `lanes`: a multiple of `multiple`, at most
// kLaneMaxChunk.
int64_t lane_chunk(int64_t m, int64_t lanes, int64_t group_bytes, int64_t multiple) {
  const int64_t c = kLaneChunkBytes / ((m + lanes - 1) / lanes * group_bytes);
  return std::clamp<int64_t>(c / multiple * multiple, multiple, kLaneMaxChunk);
}

// The accumulators of T tiles of x (t0 ...) for a tile of W (rows n0 ...), chunk groups from c0:
// 0 in the first chunk, else from yT (row r of W at yt + r * ld). V is a vector of L floats
// (__m512 or __m256), moved with memcpy and V{}: no target-specific intrinsic, so this inlines
// into either kernel's instruction set.
template <typename V, int R, int T>
C10_ALWAYS_INLINE void lanes_acc_load(V (&acc)[R][T], const float* yT, int64_t m, int64_t t0,
                                      int64_t n0, int64_t c0) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  const int64_t ld = L * ((m + L - 1) / L);
  const float* yt = yT + n0 * ld + L * t0;
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      if (c0 == 0)
        acc[r][t] = V{};
      else
        std::memcpy(&acc[r][t], yt + r * ld + L * t, sizeof(V));
    }
}

// After a chunk: the accumulators back to yT, or, after the last one, the tile's `rows` outputs
// into y32 [m, n].
template <typename V, int R, int T>
C10_ALWAYS_INLINE void lanes_acc_store(const V (&acc)[R][T], float* yT, float* y32, int64_t m,
                                       int64_t n, int64_t t0, int64_t n0, int64_t rows, bool last) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  const int64_t ld = L * ((m + L - 1) / L);
  if (!last) {
    float* yt = yT + n0 * ld + L * t0;
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) std::memcpy(yt + r * ld + L * t, &acc[r][t], sizeof(V));
    return;
  }
  alignas(64) float out[R][L];
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) std::memcpy(out[r], &acc[r][t], sizeof(V));
    const int64_t lanes = std::min<int64_t>(L, m - L * (t0 + t));
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t r = 0; r < rows; ++r) y32[(L * (t0 + t) + l) * n + n0 + r] = out[r][l];
  }
}

// Tiles [tile0, tile1) of W: y32 [m, n] for their columns, in chunks of `chunk` groups. Returns
// false on an invalid nibble.
template <typename K>
bool lanes_tiles(const typename K::Layout* xl, const typename K::Value* vals, const uint8_t* meta,
                 int64_t m, int64_t n, int64_t k, int64_t chunk, int64_t tile0, int64_t tile1,
                 float* yT, float* y32) {
  constexpr int R = K::kRows;
  const int64_t groups = k / 4, kb = packed_last_dim(k), xtiles = (m + K::kLanes - 1) / K::kLanes;
  typename K::Tile tile_w;
  uint32_t bad = 0;
  for (int64_t c0 = 0; c0 < groups; c0 += chunk) {
    const int64_t cn = std::min(groups, c0 + chunk) - c0;
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t n0 = tile * R, rows = std::min<int64_t>(R, n - n0);
      for (int r = 0; r < R; ++r) {  // rows past n: zero weights (x is finite)
        const bool real = r < rows;
        bad |= K::pack_row(tile_w, r, real ? vals + (n0 + r) * (k / 2) : nullptr,
                           real ? meta + (n0 + r) * kb : nullptr, c0, cn);
      }
      if (tile + 1 < tile1) {  // the next tile's part of the chunk, while this one computes
        const int64_t vsize = int64_t(sizeof(typename K::Value));
        for (int64_t r = n0 + R; r < std::min(n, n0 + 2 * R); ++r) {
          const char* vr = reinterpret_cast<const char*>(vals + r * (k / 2) + 2 * c0);
          for (int64_t i = 0; i < 2 * cn * vsize; i += 64) _mm_prefetch(vr + i, _MM_HINT_T0);
          const char* mr = reinterpret_cast<const char*>(meta + r * kb + c0 / 2);
          for (int64_t i = 0; i < (cn + 1) / 2; i += 64) _mm_prefetch(mr + i, _MM_HINT_T0);
        }
      }
      int64_t t = 0;
      for (; t + 2 <= xtiles; t += 2)
        K::template tiles_x<2>(xl, tile_w, m, n, k, t, n0, rows, c0, cn, yT, y32);
      if (t < xtiles) K::template tiles_x<1>(xl, tile_w, m, n, k, t, n0, rows, c0, cn, yT, y32);
    }
  }
  return bad == 0;
}

// y32 [m, n] = x [m, k] @ W^T with kernel K, kLaneBlockM rows of x at a time (so x's layout and
// yT stay a few MB).
template <typename K>
bool gemm_lanes(const typename K::Source* x, const typename K::Value* vals, const uint8_t* meta,
                int64_t m, int64_t n, int64_t k, float* y32) {
  using Layout = typename K::Layout;
  constexpr int64_t L = K::kLanes, R = K::kRows;
  const int64_t tiles = (n + R - 1) / R;
  const int64_t xtiles_max = (std::min(m, kLaneBlockM) + L - 1) / L;
  // Not zeroed: build writes all of x's layout, and yT is written before it is read. The layout
  // is 64-byte aligned for the aligned loads, kPad elements past its end. yT: tiles of W rounded
  // up (all of a tile's rows are stored).
  const std::unique_ptr<Layout[]> buf(
      new Layout[static_cast<size_t>(xtiles_max * K::tile_elems(k) + K::kPad + 64)]);
  Layout* xl =
      reinterpret_cast<Layout*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
  const std::unique_ptr<float[]> yT(new float[static_cast<size_t>(tiles * R * L * xtiles_max)]);
  std::atomic<bool> all_ok{true};
  for (int64_t m0 = 0; m0 < m; m0 += kLaneBlockM) {
    const int64_t mb = std::min(kLaneBlockM, m - m0);
    const int64_t chunk = lane_chunk(mb, L, K::kGroupBytes, K::kChunkMultiple);
    K::build(x + m0 * k, mb, k, xl);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      if (!lanes_tiles<K>(xl, vals, meta, mb, n, k, chunk, t0, t1, yT.get(), y32 + m0 * n))
        all_ok = false;
    });
    if (!all_ok) break;  // the meta is the same for every block
  }
  return all_ok;
}

// The pairs kernel: bf16 with AVX-512 BF16, x without a subnormal element.
// * x's layout: xp[t][g][p][l] (a uint32) holds row 16t + l of x at the two positions a < b of
//   pattern p in group g: x[a] in the low half, x[b] in the high half, as vdpbf16ps pairs them
//   with a group's two kept values (stored in ascending position). The patterns are the valid
//   nibbles 3 5 6 9 10 12 in that order: p = (nibble >> 1) - 1. Rows past M are 0. 3x x's bytes.
// * Per group and row of W: the group's value pair broadcast, its pattern's 16 lanes of xp, one
//   vdpbf16ps. The rounding is vdpbf16ps's (see GemvBf16).
#define CAST_PAIRS_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

constexpr int kPairWords = 6 * 16;  // uint32 of xp per group and tile of x
constexpr int kPairLo[6] = {0, 0, 1, 0, 1, 2}, kPairHi[6] = {1, 2, 2, 3, 3, 3};  // positions

// Transposes the 16 x 16 dwords of r (row i in r[i]) in place: r[j] holds column j. Unpacks
// of dwords and qwords, then two rounds of 128-bit lane shuffles (64 instructions).
__attribute__((target("avx512f"))) C10_ALWAYS_INLINE void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
}

// Tile t of xp for columns [c0, c0 + 16) of x [m, k] (bf16 bits; 4 groups, fewer at the end):
// the 16 rows widened to dwords and transposed (column c's 16 lanes in r[c], in the low halves),
// then each pattern's pairs are r[a] | r[b] << 16.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void build_pairs_block(const uint16_t* x,
                                                                            int64_t m, int64_t k,
                                                                            int64_t t, int64_t c0,
                                                                            uint32_t* xp) {
  const int64_t cols = std::min<int64_t>(16, k - c0);
  const __mmask16 mask = __mmask16((1u << cols) - 1u);
  __m512i r[16];
  for (int l = 0; l < 16; ++l) {
    const int64_t row = 16 * t + l;
    r[l] = row < m ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, x + row * k + c0))
                   : _mm512_setzero_si512();
  }
  transpose16(r);
  for (int64_t j = 0; j < cols / 4; ++j) {
    uint32_t* dst = xp + (t * (k / 4) + c0 / 4 + j) * kPairWords;
    for (int p = 0; p < 6; ++p)
      _mm512_store_si512(
          dst + 16 * p,
          _mm512_or_si512(r[4 * j + kPairLo[p]], _mm512_slli_epi32(r[4 * j + kPairHi[p]], 16)));
  }
}

// The xp offset (in uint32) of the pattern of each nibble in dword lanes: ((nib >> 1) - 1) & 7,
// times 16. An invalid nibble's may be one of the 2 slots past its group (xp is padded; the
// output is then dropped).
CAST_PAIRS_TARGET C10_ALWAYS_INLINE __m512i pair_slot(__m512i nib) {
  const __m512i p = _mm512_sub_epi32(_mm512_srli_epi32(nib, 1), _mm512_set1_epi32(1));
  return _mm512_slli_epi32(_mm512_and_si512(p, _mm512_set1_epi32(7)), 4);
}

// The offsets of both nibbles of a meta byte in each dword lane: the low nibble's in the low
// half, the high nibble's in the high half (the order of their groups). bad gets a 1 in a lane
// with a nibble that does not have exactly 2 bits (the valid ones: the bits of 0x1668).
CAST_PAIRS_TARGET C10_ALWAYS_INLINE __m512i pair_offsets(__m512i bytes, __m512i& bad) {
  const __m512i lo = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
  const __m512i hi = _mm512_srli_epi32(bytes, 4);
  const __m512i valid = _mm512_set1_epi32(0x1668);
  const __m512i both = _mm512_and_si512(_mm512_srlv_epi32(valid, lo), _mm512_srlv_epi32(valid, hi));
  bad = _mm512_or_si512(bad, _mm512_andnot_si512(both, _mm512_set1_epi32(1)));
  return _mm512_or_si512(pair_slot(lo), _mm512_slli_epi32(pair_slot(hi), 16));
}

struct PairsKernel {
  static constexpr int kLanes = 16, kRows = 12;
  using Source = uint16_t;  // bf16 bits
  using Value = c10::BFloat16;
  using Layout = uint32_t;
  // Row r of the tile at [r][0, chunk): its value pairs (two bf16) and their patterns' offsets
  // in a group of xp.
  struct Tile {
    alignas(64) uint32_t wt[kRows][kLaneMaxChunk];
    alignas(64) uint16_t ot[kRows][kLaneMaxChunk];
  };
  static constexpr int64_t kGroupBytes = kPairWords * int64_t(sizeof(uint32_t));
  static constexpr int64_t kChunkMultiple = 32;  // meta read 16 bytes at a time
  static constexpr int64_t kPad = kPairWords;    // the 2 slots an invalid nibble may read
  static int64_t tile_elems(int64_t k) { return k / 4 * kPairWords; }

  static void build(const uint16_t* x, int64_t m, int64_t k, uint32_t* xp) {
    build_blocks<kLanes>(m, k,
                         [&](int64_t t, int64_t c0) { build_pairs_block(x, m, k, t, c0, xp); });
  }

  // Row r of the tile: groups [c0, c0 + cn) of the row whose values start at v (null: past n)
  // and meta at mt.
  static CAST_PAIRS_TARGET uint32_t pack_row(Tile& tw, int r, const c10::BFloat16* v,
                                             const uint8_t* mt, int64_t c0, int64_t cn) {
    if (v == nullptr) {
      std::fill_n(tw.wt[r], cn, 0u);
      std::fill_n(tw.ot[r], cn, uint16_t(0));
      return 0;
    }
    std::memcpy(tw.wt[r], v + 2 * c0, cn * sizeof(uint32_t));  // a group's 2 values
    const uint8_t* mr = mt + c0 / 2;
    __m512i bad = _mm512_setzero_si512();
    uint32_t bad_tail = 0;
    int64_t j = 0;  // meta bytes: 16 at a time (32 groups), then one at a time
    for (; 2 * j + 32 <= cn; j += 16) {
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mr + j)));
      _mm512_store_si512(&tw.ot[r][2 * j], pair_offsets(bytes, bad));
    }
    for (; 2 * j < cn; ++j) {
      const uint32_t nib[2] = {mr[j] & 15u, uint32_t(mr[j]) >> 4};
      for (int h = 0; h < 2 && 2 * j + h < cn; ++h) {
        tw.ot[r][2 * j + h] = uint16_t((((nib[h] >> 1) - 1u) & 7u) * 16u);
        bad_tail |= ~(0x1668u >> nib[h]) & 1u;
      }
    }
    return uint32_t(_mm512_test_epi32_mask(bad, bad) != 0) | bad_tail;
  }

  template <int T>
  static CAST_PAIRS_TARGET void tiles_x(const uint32_t* xp, const Tile& tw, int64_t m, int64_t n,
                                        int64_t k, int64_t t0, int64_t n0, int64_t rows, int64_t c0,
                                        int64_t cn, float* yT, float* y32) {
    const int64_t groups = k / 4, stride = groups * kPairWords;
    __m512 acc[kRows][T];
    lanes_acc_load(acc, yT, m, t0, n0, c0);
    const uint32_t* xt = xp + (t0 * groups + c0) * kPairWords;
    for (int64_t g = 0; g < cn; ++g) {
      const uint32_t* xg = xt + g * kPairWords;
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        const __m512i w = _mm512_set1_epi32(int(tw.wt[r][g]));
        const uint32_t* xs = xg + tw.ot[r][g];
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)w,
                                       (__m512bh)_mm512_load_si512(xs + t * stride));
      }
    }
    lanes_acc_store(acc, yT, y32, m, n, t0, n0, rows, c0 + cn == groups);
  }
};
#undef CAST_PAIRS_TARGET

// The kept-value kernels, for every dtype (x and the values in fp32; fp32, fp16, and bf16 where
// the pairs kernel does not run): KeptKernel with AVX-512F, KeptKernelAvx2 with AVX2 but not
// AVX-512.
// * x's layout: x transposed into tiles of kLanes rows (xt[t][c][l]: column c of row
//   kLanes * t + l).
// * Per kept value: the value broadcast, its column's kLanes lanes, one FMA.
// KeptTiles holds what they share: the packed tile, its rows' values and the offsets of groups
// taken one at a time.
template <typename T, int Lanes, int Rows>
struct KeptTiles {
  static constexpr int kLanes = Lanes, kRows = Rows;
  using Source = float;
  using Value = T;
  using Layout = float;
  // Row r of the tile at [r][0, 2 chunk): its kept values (fp32) and their columns' offsets in
  // the chunk of xt (kLanes floats a column).
  struct Tile {
    alignas(64) float wt[kRows][2 * kLaneMaxChunk];
    alignas(64) uint16_t ot[kRows][2 * kLaneMaxChunk];
  };
  static constexpr int64_t kGroupBytes = 4 * kLanes * int64_t(sizeof(float));
  static constexpr int64_t kChunkMultiple = 8;  // meta read up to 4 bytes at a time
  static constexpr int64_t kPad = 0;
  static int64_t tile_elems(int64_t k) { return k * kLanes; }

  // The start of pack_row (row r of the tile, groups [c0, c0 + cn) of the row whose values
  // start at v): a row past n (v null) gets zeros, and false; a real one its values in fp32.
  static bool row_values(Tile& tw, int r, const T* v, int64_t c0, int64_t cn) {
    if (v == nullptr) {
      std::fill_n(tw.wt[r], 2 * cn, 0.f);
      std::fill_n(tw.ot[r], 2 * cn, uint16_t(0));
      return false;
    }
    to_float(v + 2 * c0, 2 * cn, tw.wt[r]);
    return true;
  }

  // The offsets of groups [g0, cn) of row r, one at a time (mr: the chunk's meta). Returns 1 on
  // a nibble without exactly 2 bits.
  static uint32_t tail_offsets(Tile& tw, int r, const uint8_t* mr, int64_t g0, int64_t cn) {
    uint32_t bad = 0;
    for (int64_t g = g0; g < cn; ++g) {
      const uint32_t nb = (uint32_t(mr[g / 2]) >> (4 * (g & 1))) & 15u;
      bad |= uint32_t(__builtin_popcount(nb) != 2);
      const int p0 = nb ? __builtin_ctz(nb) : 0, p1 = nb ? 31 - __builtin_clz(nb) : 0;
      tw.ot[r][2 * g] = uint16_t((4 * g + p0) * kLanes);
      tw.ot[r][2 * g + 1] = uint16_t((4 * g + p1) * kLanes);
    }
    return bad;
  }
};

#define CAST_KEPT_TARGET __attribute__((target("avx512f,avx512bw")))

// Tile t of xt for columns [c0, c0 + 16) of x32 [m, k] (fewer at the end): the 16 rows
// transposed.
__attribute__((target("avx512f"))) void build_columns_block(const float* x32, int64_t m, int64_t k,
                                                            int64_t t, int64_t c0, float* xt) {
  const int64_t cols = std::min<int64_t>(16, k - c0);
  const __mmask16 mask = __mmask16((1u << cols) - 1u);
  __m512i r[16];
  for (int l = 0; l < 16; ++l) {
    const int64_t row = 16 * t + l;
    r[l] = row < m ? _mm512_maskz_loadu_epi32(mask, x32 + row * k + c0) : _mm512_setzero_si512();
  }
  transpose16(r);
  for (int64_t c = 0; c < cols; ++c) _mm512_store_si512(xt + (t * k + c0 + c) * 16, r[c]);
}

// AVX-512: tiles of 16 rows of x, 12 rows of W. A row's offsets come from kept_positions, 8
// groups at a time.
template <typename T>
struct KeptKernel : KeptTiles<T, 16, 12> {
  using Base = KeptTiles<T, 16, 12>;
  using Base::kRows;
  using typename Base::Tile;

  static void build(const float* x32, int64_t m, int64_t k, float* xt) {
    build_blocks<16>(m, k,
                     [&](int64_t t, int64_t c0) { build_columns_block(x32, m, k, t, c0, xt); });
  }

  // Row r of the tile: groups [c0, c0 + cn) of the row whose values start at v (null: past n)
  // and meta at mt.
  static CAST_KEPT_TARGET uint32_t pack_row(Tile& tw, int r, const T* v, const uint8_t* mt,
                                            int64_t c0, int64_t cn) {
    if (!Base::row_values(tw, r, v, c0, cn)) return 0;
    const uint8_t* mr = mt + c0 / 2;
    const __m512i quad = group_offsets();
    __m512i flags = _mm512_setzero_si512();
    int64_t b = 0;  // 8 groups (a meta word, 16 kept values) at a time, then one at a time
    for (; 8 * b + 8 <= cn; ++b) {
      uint32_t word;
      std::memcpy(&word, mr + 4 * b, 4);
      const __m512i pos = kept_positions(word);
      flags = _mm512_or_si512(flags, pos);
      const __m512i col =
          _mm512_add_epi32(_mm512_add_epi32(quad, _mm512_and_si512(pos, _mm512_set1_epi32(3))),
                           _mm512_set1_epi32(int(32 * b)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(&tw.ot[r][16 * b]),
                         _mm512_cvtepi32_epi16(_mm512_slli_epi32(col, 4)));
    }
    return uint32_t(any_bad(flags)) | Base::tail_offsets(tw, r, mr, 8 * b, cn);
  }

  template <int U>  // U tiles of x
  static CAST_KEPT_TARGET void tiles_x(const float* xt, const Tile& tw, int64_t m, int64_t n,
                                       int64_t k, int64_t t0, int64_t n0, int64_t rows, int64_t c0,
                                       int64_t cn, float* yT, float* y32) {
    __m512 acc[kRows][U];
    lanes_acc_load(acc, yT, m, t0, n0, c0);
    const float* xc = xt + (t0 * k + 4 * c0) * 16;
    for (int64_t q = 0; q < 2 * cn; ++q) {
#pragma GCC unroll 12
      for (int r = 0; r < kRows; ++r) {
        const __m512 w = _mm512_set1_ps(tw.wt[r][q]);
        const float* xs = xc + tw.ot[r][q];
        for (int t = 0; t < U; ++t)
          acc[r][t] = _mm512_fmadd_ps(w, _mm512_load_ps(xs + t * k * 16), acc[r][t]);
      }
    }
    lanes_acc_store(acc, yT, y32, m, n, t0, n0, rows, c0 + cn == k / 4);
  }
};
#undef CAST_KEPT_TARGET

#define CAST_KEPT2_TARGET __attribute__((target("avx2,fma,f16c")))

// Transposes the 8 x 8 floats of r (row i in r[i]) in place: r[j] holds column j.
CAST_KEPT2_TARGET C10_ALWAYS_INLINE void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // rows 2i, 2i+1 interleaved: columns (0 1 | 4 5), (2 3 | 6 7)
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3 of columns (c | c + 4), c = 0..3
    u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// Tile t of xt (8 rows) for columns [c0, c0 + 8) of x32 [m, k] (fewer at the end): the 8 rows
// transposed.
CAST_KEPT2_TARGET void build_columns8_block(const float* x32, int64_t m, int64_t k, int64_t t,
                                            int64_t c0, float* xt) {
  const int64_t cols = std::min<int64_t>(8, k - c0);
  const __m256i mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int(cols)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 r[8];
  for (int l = 0; l < 8; ++l) {
    const int64_t row = 8 * t + l;
    r[l] = row < m ? _mm256_maskload_ps(x32 + row * k + c0, mask) : _mm256_setzero_ps();
  }
  transpose8(r);
  for (int64_t c = 0; c < cols; ++c) _mm256_store_ps(xt + (t * k + c0 + c) * 8, r[c]);
}

// AVX2 (x86-64-v3: AMD Zen 2/3, Intel client CPUs): tiles of 8 rows of x, 6 rows of W (12
// accumulators and a broadcast in the 16 vector registers). A row's offsets come from
// kAvx2Positions, a meta byte (2 groups) at a time.
template <typename T>
struct KeptKernelAvx2 : KeptTiles<T, 8, 6> {
  using Base = KeptTiles<T, 8, 6>;
  using Base::kRows;
  using typename Base::Tile;

  static void build(const float* x32, int64_t m, int64_t k, float* xt) {
    build_blocks<8>(m, k,
                    [&](int64_t t, int64_t c0) { build_columns8_block(x32, m, k, t, c0, xt); });
  }

  static CAST_KEPT2_TARGET uint32_t pack_row(Tile& tw, int r, const T* v, const uint8_t* mt,
                                             int64_t c0, int64_t cn) {
    if (!Base::row_values(tw, r, v, c0, cn)) return 0;
    const uint8_t* mr = mt + c0 / 2;
    __m128i flags = _mm_setzero_si128();
    int64_t j = 0;  // meta bytes (2 groups, 4 kept values) while both groups are in the chunk
    for (; 2 * j + 2 <= cn; ++j) {
      const __m128i pos =
          _mm_load_si128(reinterpret_cast<const __m128i*>(kAvx2Positions.pos[mr[j]]));
      flags = _mm_or_si128(flags, pos);
      // column 8j + position (its low 3 bits: a flagged one stays in the chunk), 8 floats each
      const __m128i col =
          _mm_add_epi32(_mm_and_si128(pos, _mm_set1_epi32(7)), _mm_set1_epi32(int(8 * j)));
      const __m128i off = _mm_slli_epi32(col, 3);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(&tw.ot[r][4 * j]), _mm_packus_epi32(off, off));
    }
    const uint32_t bad = uint32_t(!_mm_testz_si128(flags, _mm_set1_epi32(kBadPos)));
    return bad | Base::tail_offsets(tw, r, mr, 2 * j, cn);
  }

  template <int U>  // U tiles of x
  static CAST_KEPT2_TARGET void tiles_x(const float* xt, const Tile& tw, int64_t m, int64_t n,
                                        int64_t k, int64_t t0, int64_t n0, int64_t rows, int64_t c0,
                                        int64_t cn, float* yT, float* y32) {
    __m256 acc[kRows][U];
    lanes_acc_load(acc, yT, m, t0, n0, c0);
    const float* xc = xt + (t0 * k + 4 * c0) * 8;
    for (int64_t q = 0; q < 2 * cn; ++q) {
#pragma GCC unroll 6
      for (int r = 0; r < kRows; ++r) {
        // (set1 of the value: through _mm256_broadcast_ss's float pointer, GCC 12 stored every
        // accumulator to the stack after each FMA; 4096 x 4096 fp32, M = 128: 29 ms, not 23)
        const __m256 w = _mm256_set1_ps(tw.wt[r][q]);
        const float* xs = xc + tw.ot[r][q];
        for (int t = 0; t < U; ++t)
          acc[r][t] = _mm256_fmadd_ps(w, _mm256_load_ps(xs + t * k * 8), acc[r][t]);
      }
    }
    lanes_acc_store(acc, yT, y32, m, n, t0, n0, rows, c0 + cn == k / 4);
  }
};
#undef CAST_KEPT2_TARGET

// The lanes of 32 bf16 (bits) that are NaN, Inf or subnormal: an exponent field of all ones, or
// of 0 with a fraction.
__attribute__((target("avx512f,avx512bw"))) C10_ALWAYS_INLINE __mmask32 bf16_odd_lanes(__m512i v) {
  const __m512i exp = _mm512_set1_epi16(0x7f80), e = _mm512_and_si512(v, exp);
  return _mm512_cmpeq_epi16_mask(e, exp) |
         (_mm512_testn_epi16_mask(e, e) & _mm512_test_epi16_mask(v, _mm512_set1_epi16(0x007f)));
}

// Whether every element of a bf16 x[0..cnt) (bits) is finite and not subnormal, 32 at a time
// (callers have AVX-512 BF16).
__attribute__((target("avx512f,avx512bw"))) bool bf16_finite_normal(const uint16_t* x,
                                                                    int64_t cnt) {
  __mmask32 acc = 0;
  int64_t i = 0;
  for (; i + 32 <= cnt; i += 32) acc |= bf16_odd_lanes(_mm512_loadu_si512(x + i));
  if (i < cnt)
    acc |= bf16_odd_lanes(_mm512_maskz_loadu_epi16(__mmask32((1ull << (cnt - i)) - 1u), x + i));
  return acc == 0;
}

// The small-M kernels' loops around a kernel G's blocks (GemvAvx512, GemvAvx2, GemvBf16): rows
// [r0, r1) of W into y32 [m, n] from M rows of x (row stride k). Blocked for the L1: a tile of
// kGemvTileRows rows of W takes a chunk of the blocks at a time, every row of the tile against
// the same kGemvChunkBytes of x (M rows), its accumulators parked in acc_buf between chunks.
// Each lane accumulates its blocks in the same order as without blocking. (x whole per row of
// W, as before, streamed M * k * 4 bytes from the L2 per row once M * k * 4 passed the L1: at
// M = 16, k = 4096, 256 KB a row.) Groups past the last whole block are done one at a time.
// G gives X (x's element), Value, Acc (its vector of fp32 lanes), kCols (x's columns in a
// block), tile_chunk<M> (a tile's rows of W over a chunk of blocks; false on an invalid nibble) and
// reduce (an accumulator's lanes summed). No vector instruction here (accumulators zeroed as
// Acc{}): G's functions hold them.
template <typename G, int M>
bool gemv_rows(const typename G::X* x, const typename G::Value* vals, const uint8_t* meta,
               int64_t n, int64_t k, int64_t r0, int64_t r1, float* y32) {
  using X = typename G::X;
  const int64_t kb = packed_last_dim(k), groups = k / 4, blocks = groups / (G::kCols / 4);
  const int64_t chunk = std::max<int64_t>(1, kGemvChunkBytes / (M * G::kCols * int64_t(sizeof(X))));
  typename G::Acc acc_buf[kGemvTileRows][M];
  alignas(64) X xbuf[kGemvChunkBytes / sizeof(X)];
  bool ok = true;
  uint32_t bad_tail = 0;
  for (int64_t t0 = r0; t0 < r1; t0 += kGemvTileRows) {
    const int64_t rows = std::min<int64_t>(kGemvTileRows, r1 - t0);
    for (int64_t r = 0; r < rows; ++r)
      for (int i = 0; i < M; ++i) acc_buf[r][i] = typename G::Acc{};
    for (int64_t c0 = 0; c0 < blocks; c0 += chunk) {
      const int64_t c1 = std::min(blocks, c0 + chunk);
      int64_t ldx;
      const X* xc = x_chunk<M>(x, k, G::kCols * c0, G::kCols * (c1 - c0), xbuf, ldx);
      ok &= G::template tile_chunk<M>(acc_buf, rows, xc, ldx, vals + t0 * (k / 2), meta + t0 * kb,
                                      kb, k, c0, c1);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float tail[M] = {};
      bad_tail |= tail_groups<M>(vals + (t0 + r) * (k / 2), meta + (t0 + r) * kb, x, k,
                                 G::kCols / 4 * blocks, groups, tail);
      for (int i = 0; i < M; ++i) y32[i * n + t0 + r] = G::reduce(acc_buf[r][i]) + tail[i];
    }
  }
  return ok && bad_tail == 0;
}

// f(std::integral_constant<int, M>{}) for the run-time m in [1, kGemvMaxM]: the small-M kernels
// are compiled per M (their accumulators in registers).
template <typename F, int... Is>
bool with_m(int m, F&& f, std::integer_sequence<int, Is...>) {
  bool ok = true;
  ((m == Is + 1 ? (ok = f(std::integral_constant<int, Is + 1>{}), 0) : 0), ...);
  return ok;
}

// The small-M product from x (T) or its fp32 copy x32, threads taking rows of W 64 at a time:
// GemvBf16 for bf16 where the CPU has AVX-512 BF16 and x has no subnormal element, else
// GemvAvx512, or GemvAvx2 where the CPU has AVX2 but not AVX-512.
template <typename T>
bool gemm_gemv(const T* x, const float* x32, const T* vals, const uint8_t* meta, int64_t m,
               int64_t n, int64_t k, float* y32) {
  bool bf16 = false;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    bf16 = kGemvBf16 && bf16_finite_normal(reinterpret_cast<const uint16_t*>(x), m * k);
  std::atomic<bool> all_ok{true};
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    const auto rows = [&](auto mc) {
      constexpr int M = decltype(mc)::value;
      if constexpr (std::is_same_v<T, c10::BFloat16>)
        if (bf16) return gemv_rows<GemvBf16, M>(x, vals, meta, n, k, r0, r1, y32);
      return kGemvAvx512 ? gemv_rows<GemvAvx512<T>, M>(x32, vals, meta, n, k, r0, r1, y32)
                         : gemv_rows<GemvAvx2<T>, M>(x32, vals, meta, n, k, r0, r1, y32);
    };
    if (!with_m(int(m), rows, std::make_integer_sequence<int, kGemvMaxM>{})) all_ok = false;
  });
  return all_ok;
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
  // bf16 x, finite, without a subnormal element, 9 rows or more: the pairs kernel, on x as it is.
  bool pairs = false;
#if defined(__x86_64__)
  pairs = x.scalar_type() == at::kBFloat16 && kGemvBf16 && m >= kLaneMinM &&
          bf16_finite_normal(reinterpret_cast<const uint16_t*>(x.const_data_ptr()), m * k);
#endif
  const at::Tensor x32 = pairs ? at::Tensor() : x.reshape({m, k}).to(at::kFloat);
  // fp32 results are computed in y itself; other dtypes are rounded once at the end.
  const bool direct = x.scalar_type() == at::kFloat;
  const at::Tensor y32 = direct ? y.view({m, n}) : at::empty({m, n}, x.options().dtype(at::kFloat));
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse24_gemm", [&] {
    const scalar_t* vals = values.const_data_ptr<scalar_t>();
    const uint8_t* mt = meta.const_data_ptr<uint8_t>();
    float* yp = y32.data_ptr<float>();
#if defined(__x86_64__)
    if (pairs) {  // (bf16: scalar_t is c10::BFloat16)
      ok = gemm_lanes<PairsKernel>(static_cast<const uint16_t*>(x.const_data_ptr()),
                                   reinterpret_cast<const c10::BFloat16*>(vals), mt, m, n, k, yp);
      return;
    }
#endif
    const float* xp = x32.const_data_ptr<float>();
#if defined(__x86_64__)
    // The kernels on the packed format never multiply a pruned weight, so a NaN or Inf of x at
    // a pruned position would not reach y, where F.linear on the decompressed weight (and every
    // other path here and on CUDA) forms 0 * NaN = NaN: such inputs take the expansion paths.
    const bool finite = (kGemvAvx512 || kGemvAvx2) && nonfinite_bits(xp, m * k) == 0u;
    if (finite && m >= kLaneMinM) {
      ok = kGemvAvx512 ? gemm_lanes<KeptKernel<scalar_t>>(xp, vals, mt, m, n, k, yp)
                       : gemm_lanes<KeptKernelAvx2<scalar_t>>(xp, vals, mt, m, n, k, yp);
    } else if (finite) {
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
