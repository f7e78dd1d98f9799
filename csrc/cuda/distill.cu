// CAST's distillation loss on CUDA, fused (cast_ext::distill_fwd / distill_bwd), no torch
// headers.
//
// Algorithm: one block per row of the [N, V] logits (grid-stride over rows). Forward: every
// thread walks its strided share of the row once, keeping an online softmax state for the
// student (running max, sum exp((s - max) / T) and, when T != 1, sum exp(s - max)) and for the
// teacher (running max, sum exp((t - max) / T), sum exp((t - max) / T) ((t - max) - (s - max_s))),
// rescaled and rebased when the maxima grow (the whole block: 512 threads, 4 resident per SM); the
// states are merged across the warp with shuffles and across warps in shared memory, and thread 0
// writes the row's KL, CE and the three log-sum-exps. So the forward reads each logit once (2 N V
// elements) and the backward reads them once more and writes the gradient once (3 N V): exp(s/T -
// lse_sT), exp(t/T - lse_tT) and exp(s - lse_s1) rebuild the softmaxes from the saved log-sum-exps;
// the label's element gets -scale (1 - eta). Loads are coalesced (consecutive threads, consecutive
// elements; four per thread and tensor in flight). The max moves once per four elements, so the
// sums are rescaled once per four; exponentials are exp2f with log2(e) folded in, guards are
// selects: nothing branches on the data. Rows whose label is ignore_index are skipped (zeros out).
// A label outside [0, V) sets *bad_label (when given) and gives a NaN CE; a teacher logit of
// probability 0 (-inf, a mask's finfo.min, an underflow) adds nothing to the KL, whatever the
// student's; a +inf logit makes its log-sum-exps +inf (so the CE +inf unless the label's logit is
// +inf), as in the reference; NaN logits propagate to NaN. Math: fp32, exp2f/logf (not the fast
// intrinsics __expf/__logf); the row's KL and log-sum-exps come from distill_math.h, the CPU
// kernel's code. The backward trusts the labels the forward checked (an out-of-range one then adds
// no one-hot term). The CPU kernel (csrc/cpu/distill.cpp) sums in another order: both are compared
// with the reference within fp32 rounding, not bit for bit. Layout: contiguous [N, V] logits, [N]
// int64 labels, [N, 3] fp32 lse; grad_scale a device fp32. Dtypes: fp32, fp16, bf16 logits (teacher
// in the student's dtype). Archs: sm80+ (any, really). Reference: cast_ext/reference.py
// distill_fwd, distill_bwd.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "cuda/kernels.h"
#include "cuda/vec8.cuh"
#include "distill_math.h"

namespace cast_ext {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr int kMinBlocksPerSm = 4;  // 2048 resident threads on sm_80/sm_90: at most 32 registers
constexpr float kLog2e = 1.4426950408889634f;

// exp((x - m) * it) as exp2((x - m) * k) with k = it * log2(e): 0 for x = -inf, also when
// m = -inf (a select, not a branch); NaN stays NaN. exp2f is one MUFU.EX2 (plus its denormal
// fix-up), where expf adds a range reduction.
__device__ __forceinline__ float exp_rel(float x, float m, float k) {
  return exp2f(x == -INFINITY ? -INFINITY : (x - m) * k);
}

// One thread's online softmax sums of a row (see the header). Trivial (a __shared__ array of it
// may not have a constructor); empty_state() is the start.
struct RowState {
  float ms, zs, z1;
  float mt, zt, a;
};

__device__ __forceinline__ RowState empty_state() {
  return RowState{-INFINITY, 0.f, 0.f, -INFINITY, 0.f, 0.f};
}

// from - to, 0 where they are equal (both -inf: no NaN).
__device__ __forceinline__ float gap(float from, float to) { return from == to ? 0.f : from - to; }

// The teacher sum a = sum e ((t - mt) - (s - ms)) (see kl_of) of `zt`'s terms, rebased when the
// running maxima move: each term's weight times c = exp((mt - mt') / T) and its difference plus
// `shift` = (mt - mt') + (ms' - ms); a c + (zt c) shift (zt c, the terms' new weight, is taken
// first: small where c is). c == 0 drops the terms by a select: they weigh 0 against the new
// max (p_t = 0 adds nothing), and a state that had seen only a mask's finfo.min teacher logits
// (e = 1 each) may hold an overflowed +-inf, which times 0 would be NaN; zt == 0 (no teacher
// term yet) has nothing to rebase (its shift may be infinite). (A NaN logit still reaches the
// row's result through the normaliser sums.)
__device__ __forceinline__ float rebase(float a, float zt, float c, float shift) {
  return c == 0.f || zt == 0.f ? 0.f : a * c + (zt * c) * shift;
}

// Adds kUnroll elements (padding beyond the row is -inf in both: it adds nothing). The max moves
// once per chunk, so the sums are rescaled once per chunk, and nothing branches on the data.
// k = log2(e) / T; k1 = log2(e).
template <bool kTeacher, bool kT1>
__device__ __forceinline__ void push(RowState& st, const float (&sv)[kUnroll],
                                     const float (&tv)[kUnroll], float k, float k1) {
  const float ms0 = st.ms;
  float ms = st.ms;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) ms = nan_max(sv[u], ms);
  float zs = 0.f, z1 = 0.f;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    zs += exp_rel(sv[u], ms, k);
    if (!kT1) z1 += exp_rel(sv[u], ms, k1);
  }
  st.zs = st.zs * exp_rel(st.ms, ms, k) + zs;
  if (!kT1) st.z1 = st.z1 * exp_rel(st.ms, ms, k1) + z1;
  st.ms = ms;
  if (kTeacher) {
    float mt = st.mt;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) mt = nan_max(tv[u], mt);
    float zt = 0.f, a = 0.f;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const float e = exp_rel(tv[u], mt, k);
      zt += e;
      // p_t = 0 adds nothing, whatever s is (t = -inf, a mask's finfo.min past the running
      // max, an underflow: a student's -inf there would make 0 * inf); a student's -inf stays
      // -inf (s - ms would be NaN where ms is -inf too): teacher mass there makes a +inf, as
      // its term is. The 1 / T, which can overflow the difference, is applied to the row's sum.
      const float ds = sv[u] == -INFINITY ? -INFINITY : sv[u] - ms;
      a += e == 0.f ? 0.f : e * ((tv[u] - mt) - ds);
    }
    const float c = exp_rel(st.mt, mt, k);
    st.a = rebase(st.a, st.zt, c, gap(st.mt, mt) + gap(ms, ms0)) + a;
    st.zt = st.zt * c + zt;
    st.mt = mt;
  }
}

template <bool kTeacher, bool kT1>
__device__ __forceinline__ void merge(RowState& x, const RowState& y, float k, float k1) {
  const float xms = x.ms;
  const float ms = nan_max(x.ms, y.ms);
  x.zs = x.zs * exp_rel(x.ms, ms, k) + y.zs * exp_rel(y.ms, ms, k);
  if (!kT1) x.z1 = x.z1 * exp_rel(x.ms, ms, k1) + y.z1 * exp_rel(y.ms, ms, k1);
  x.ms = ms;
  if (kTeacher) {
    const float mt = nan_max(x.mt, y.mt);
    const float dx = exp_rel(x.mt, mt, k), dy = exp_rel(y.mt, mt, k);
    x.a = rebase(x.a, x.zt, dx, gap(x.mt, mt) + gap(ms, xms)) +
          rebase(y.a, y.zt, dy, gap(y.mt, mt) + gap(ms, y.ms));
    x.zt = x.zt * dx + y.zt * dy;
    x.mt = mt;
  }
}

__device__ __forceinline__ RowState shfl_state(const RowState& s, int lane_mask) {
  RowState o = s;
  o.ms = __shfl_xor_sync(0xffffffffu, s.ms, lane_mask);
  o.zs = __shfl_xor_sync(0xffffffffu, s.zs, lane_mask);
  o.z1 = __shfl_xor_sync(0xffffffffu, s.z1, lane_mask);
  o.mt = __shfl_xor_sync(0xffffffffu, s.mt, lane_mask);
  o.zt = __shfl_xor_sync(0xffffffffu, s.zt, lane_mask);
  o.a = __shfl_xor_sync(0xffffffffu, s.a, lane_mask);
  return o;
}

template <typename T, bool kTeacher, bool kT1>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    distill_fwd_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                       const int64_t* __restrict__ labels, int64_t rows, int64_t v, float it,
                       float t2, int64_t ignore_index, float* __restrict__ kl,
                       float* __restrict__ ce, float* __restrict__ lse, int* bad_label) {
  __shared__ RowState warp_states[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float k = it * kLog2e;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t y = labels[r];
    if (y == ignore_index) {  // the same for the whole block
      if (tid == 0) kl[r] = ce[r] = lse[3 * r] = lse[3 * r + 1] = lse[3 * r + 2] = 0.f;
      continue;
    }
    const T* s = student + r * v;
    const T* t = kTeacher ? teacher + r * v : nullptr;
    RowState st = empty_state();
    for (int64_t j0 = tid; j0 < v; j0 += int64_t(kThreads) * kUnroll) {
      float sv[kUnroll], tv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + int64_t(u) * kThreads;
        sv[u] = j < v ? Conv<T>::to(s[j]) : -INFINITY;
        tv[u] = kTeacher && j < v ? Conv<T>::to(t[j]) : -INFINITY;
      }
      push<kTeacher, kT1>(st, sv, tv, k, kLog2e);
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) merge<kTeacher, kT1>(st, shfl_state(st, off), k, kLog2e);
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kWarps; ++w) merge<kTeacher, kT1>(st, warp_states[w], k, kLog2e);
      // max / T rounded (__fmul_rn: not contracted with the log's addition), as the backward
      // rounds s / T: the row's largest entries then rebuild their softmax exactly
      const float lst = lse_of(__fmul_rn(st.ms, it), st.zs);
      const float ls1 = kT1 ? lst : lse_of(st.ms, st.z1);
      const float ltt = kTeacher ? lse_of(__fmul_rn(st.mt, it), st.zt) : 0.f;
      kl[r] = kTeacher ? kl_of(st.a, st.zs, st.zt, st.ms, st.mt, it, t2) : 0.f;
      if (y >= 0 && y < v) {
        ce[r] = ls1 - Conv<T>::to(s[y]);
      } else {
        ce[r] = NAN;
        if (bad_label) *bad_label = 1;
      }
      lse[3 * r] = lst;
      lse[3 * r + 1] = ltt;
      lse[3 * r + 2] = ls1;
    }
    __syncthreads();  // warp_states is reused by the next row
  }
}

template <typename T, bool kTeacher, bool kT1>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    distill_bwd_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                       const int64_t* __restrict__ labels, const float* __restrict__ lse,
                       const float* __restrict__ grad_scale, int64_t rows, int64_t v, float it,
                       float eta_t, float one_minus_eta, int64_t ignore_index,
                       T* __restrict__ grad) {
  const float scale = *grad_scale;
  const float ca = scale * eta_t, cb = scale * one_minus_eta;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t y = labels[r];
    const T* s = student + r * v;
    const T* t = kTeacher ? teacher + r * v : nullptr;
    T* g = grad + r * v;
    if (y == ignore_index) {
      for (int64_t j = threadIdx.x; j < v; j += kThreads) g[j] = Conv<T>::from(0.f);
      continue;
    }
    // exp(s / T - lse) as exp2((s / T - lse) log2(e)), s / T rounded (__fmul_rn, no FMA) as the
    // forward rounded max / T in lse: near the max the difference is then exact (an FMA of
    // s k - lse log2(e) was off by up to |s / T| 2^-23 relative: 1e-3 at s = 1e4)
    const float lst = lse[3 * r], ltt = lse[3 * r + 1], ls1 = lse[3 * r + 2];
    for (int64_t j0 = threadIdx.x; j0 < v; j0 += int64_t(kThreads) * kUnroll) {
      float sv[kUnroll], tv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + int64_t(u) * kThreads;
        sv[u] = j < v ? Conv<T>::to(s[j]) : 0.f;
        tv[u] = kTeacher && j < v ? Conv<T>::to(t[j]) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + int64_t(u) * kThreads;
        if (j >= v) break;
        const float es = exp2f((__fmul_rn(sv[u], it) - lst) * kLog2e);
        float out = cb * (kT1 ? es : exp2f((sv[u] - ls1) * kLog2e));
        if (kTeacher) out += ca * (es - exp2f((__fmul_rn(tv[u], it) - ltt) * kLog2e));
        if (j == y) out -= cb;
        g[j] = Conv<T>::from(out);
      }
    }
  }
}

// Blocks resident on the device at once (the grid-stride loops take the rest of the rows).
int grid_for(int64_t rows, int num_sms, int threads_per_sm) {
  const int per_sm =
      threads_per_sm / kThreads < kMinBlocksPerSm ? threads_per_sm / kThreads : kMinBlocksPerSm;
  const int64_t cap = int64_t(num_sms > 0 ? num_sms : 1) * (per_sm > 0 ? per_sm : 1);
  return int(rows < cap ? rows : cap);
}

template <typename T>
cudaError_t fwd_typed(const void* s, const void* t, const int64_t* labels, int64_t rows, int64_t v,
                      float it, float t2, bool t1, int64_t ignore_index, float* kl, float* ce,
                      float* lse, int* bad, int grid, cudaStream_t stream) {
  const T* st = static_cast<const T*>(s);
  const T* tt = static_cast<const T*>(t);
#define CAST_FWD(TEACHER, T1)                                        \
  distill_fwd_kernel<T, TEACHER, T1><<<grid, kThreads, 0, stream>>>( \
      st, tt, labels, rows, v, it, t2, ignore_index, kl, ce, lse, bad)
  if (t)
    t1 ? CAST_FWD(true, true) : CAST_FWD(true, false);
  else
    t1 ? CAST_FWD(false, true) : CAST_FWD(false, false);
#undef CAST_FWD
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* s, const void* t, const int64_t* labels, const float* lse,
                      const float* grad_scale, int64_t rows, int64_t v, float it, float eta_t,
                      float one_minus_eta, bool t1, int64_t ignore_index, void* grad, int grid,
                      cudaStream_t stream) {
  const T* st = static_cast<const T*>(s);
  const T* tt = static_cast<const T*>(t);
  T* g = static_cast<T*>(grad);
#define CAST_BWD(TEACHER, T1)                                        \
  distill_bwd_kernel<T, TEACHER, T1><<<grid, kThreads, 0, stream>>>( \
      st, tt, labels, lse, grad_scale, rows, v, it, eta_t, one_minus_eta, ignore_index, g)
  if (t)
    t1 ? CAST_BWD(true, true) : CAST_BWD(true, false);
  else
    t1 ? CAST_BWD(false, true) : CAST_BWD(false, false);
#undef CAST_BWD
  return cudaGetLastError();
}

}  // namespace

cudaError_t distill_fwd(DType dt, const void* student, const void* teacher, const int64_t* labels,
                        int64_t rows, int64_t vocab, double temperature, int64_t ignore_index,
                        float* kl, float* ce, float* lse, int* bad_label, int num_sms,
                        int threads_per_sm, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const float it = float(1.0 / temperature), t2 = float(temperature * temperature);
  const bool t1 = temperature == 1.0;
  const int grid = grid_for(rows, num_sms, threads_per_sm);
  switch (dt) {
    case DType::F32:
      return fwd_typed<float>(student, teacher, labels, rows, vocab, it, t2, t1, ignore_index, kl,
                              ce, lse, bad_label, grid, stream);
    case DType::F16:
      return fwd_typed<__half>(student, teacher, labels, rows, vocab, it, t2, t1, ignore_index, kl,
                               ce, lse, bad_label, grid, stream);
    case DType::BF16:
      return fwd_typed<__nv_bfloat16>(student, teacher, labels, rows, vocab, it, t2, t1,
                                      ignore_index, kl, ce, lse, bad_label, grid, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t distill_bwd(DType dt, const void* student, const void* teacher, const int64_t* labels,
                        const float* lse, const float* grad_scale, int64_t rows, int64_t vocab,
                        double eta, double temperature, int64_t ignore_index, void* grad,
                        int num_sms, int threads_per_sm, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const float it = float(1.0 / temperature);
  const float eta_t = float(eta * temperature), one_minus_eta = float(1.0 - eta);
  const bool t1 = temperature == 1.0;
  const int grid = grid_for(rows, num_sms, threads_per_sm);
  switch (dt) {
    case DType::F32:
      return bwd_typed<float>(student, teacher, labels, lse, grad_scale, rows, vocab, it, eta_t,
                              one_minus_eta, t1, ignore_index, grad, grid, stream);
    case DType::F16:
      return bwd_typed<__half>(student, teacher, labels, lse, grad_scale, rows, vocab, it, eta_t,
                               one_minus_eta, t1, ignore_index, grad, grid, stream);
    case DType::BF16:
      return bwd_typed<__nv_bfloat16>(student, teacher, labels, lse, grad_scale, rows, vocab, it,
                                      eta_t, one_minus_eta, t1, ignore_index, grad, grid, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace cast_ext
