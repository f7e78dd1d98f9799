// CAST's distillation loss on CUDA, fused (cast_ext::distill_fwd / distill_bwd), no torch
// headers.
//
// Algorithm: one block per row of the [N, V] logits (grid-stride over rows). Forward: every
// thread walks its strided share of the row once, keeping an online softmax state for the
// student (running max, sum exp((s - max) / T) and, when T != 1, sum exp(s - max)) and for the
// teacher (running max, sum exp((t - max) / T), sum exp((t - max) / T) (t - s) / T), rescaled when
// the max grows; the states are merged across the warp with shuffles and across warps in shared
// memory, and thread 0 writes the row's KL, CE and the three log-sum-exps. So the forward reads
// each logit once (2 N V elements) and the backward reads them once more and writes the gradient
// once (3 N V): exp(s/T - lse_sT), exp(t/T - lse_tT) and exp(s - lse_s1) rebuild the softmaxes
// from the saved log-sum-exps; the label's element gets -scale (1 - eta). Loads are coalesced
// (consecutive threads, consecutive elements; four per thread in flight). Rows whose label is
// ignore_index are skipped (zeros out). A label outside [0, V) sets *bad_label (when given) and
// gives a NaN CE; a teacher logit of -inf (probability 0) adds nothing to the KL; NaN logits
// propagate to NaN.
// Math: fp32, expf/logf (not the fast intrinsics). The CPU kernel (csrc/cpu/distill.cpp) sums in
// another order: both are compared with the reference within fp32 rounding, not bit for bit.
// Layout: contiguous [N, V] logits, [N] int64 labels, [N, 3] fp32 lse; grad_scale a device fp32.
// Dtypes: fp32, fp16, bf16 logits (teacher in the student's dtype). Archs: sm80+ (any, really).
// Reference: cast_ext/reference.py distill_fwd, distill_bwd.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "cuda/kernels.h"
#include "cuda/vec8.cuh"

namespace cast_ext {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr int kBlocksPerSm = 4;

// exp((x - m) * it) for an element joining a state whose max is m (0 for x = -inf, also when
// m = -inf; NaN stays NaN).
__device__ __forceinline__ float exp_rel(float x, float m, float it) {
  return x == -INFINITY ? 0.f : expf((x - m) * it);
}

// The rescale factor of a state whose max m moves up to m_new (0 when m = -inf: nothing summed).
__device__ __forceinline__ float rescale(float m, float m_new, float it) {
  return m == -INFINITY ? 0.f : expf((m - m_new) * it);
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

template <bool kTeacher, bool kT1>
__device__ __forceinline__ void push(RowState& st, float s, float t, float it) {
  if (s > st.ms) {
    st.zs = st.zs * rescale(st.ms, s, it) + 1.f;
    if (!kT1) st.z1 = st.z1 * rescale(st.ms, s, 1.f) + 1.f;
    st.ms = s;
  } else {
    st.zs += exp_rel(s, st.ms, it);
    if (!kT1) st.z1 += exp_rel(s, st.ms, 1.f);
  }
  if (kTeacher) {
    const float d = (t - s) * it;
    if (t > st.mt) {
      const float c = rescale(st.mt, t, it);
      st.zt = st.zt * c + 1.f;
      st.a = st.a * c + d;
      st.mt = t;
    } else {
      const float e = exp_rel(t, st.mt, it);
      st.zt += e;
      st.a += t == -INFINITY ? 0.f : e * d;  // a teacher probability of 0 adds nothing
    }
  }
}

template <bool kTeacher, bool kT1>
__device__ __forceinline__ void merge(RowState& x, const RowState& y, float it) {
  const float ms = fmaxf(x.ms, y.ms);
  const float cx = rescale(x.ms, ms, it), cy = rescale(y.ms, ms, it);
  x.zs = x.zs * cx + y.zs * cy;
  if (!kT1) x.z1 = x.z1 * rescale(x.ms, ms, 1.f) + y.z1 * rescale(y.ms, ms, 1.f);
  x.ms = ms;
  if (kTeacher) {
    const float mt = fmaxf(x.mt, y.mt);
    const float dx = rescale(x.mt, mt, it), dy = rescale(y.mt, mt, it);
    x.zt = x.zt * dx + y.zt * dy;
    x.a = x.a * dx + y.a * dy;
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
__global__ void __launch_bounds__(kThreads)
    distill_fwd_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                       const int64_t* __restrict__ labels, int64_t rows, int64_t v, float it,
                       float t2, int64_t ignore_index, float* __restrict__ kl,
                       float* __restrict__ ce, float* __restrict__ lse, int* bad_label) {
  __shared__ RowState warp_states[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
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
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (j0 + int64_t(u) * kThreads < v) push<kTeacher, kT1>(st, sv[u], tv[u], it);
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) merge<kTeacher, kT1>(st, shfl_state(st, off), it);
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kWarps; ++w) merge<kTeacher, kT1>(st, warp_states[w], it);
      const float lst = st.ms * it + logf(st.zs);
      const float ls1 = kT1 ? lst : st.ms + logf(st.z1);
      const float ltt = kTeacher ? st.mt * it + logf(st.zt) : 0.f;
      kl[r] = kTeacher ? t2 * (st.a / st.zt - ltt + lst) : 0.f;
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
__global__ void __launch_bounds__(kThreads)
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
        const float es = expf(sv[u] * it - lst);
        float out = cb * (kT1 ? es : expf(sv[u] - ls1));
        if (kTeacher) out += ca * (es - expf(tv[u] * it - ltt));
        if (j == y) out -= cb;
        g[j] = Conv<T>::from(out);
      }
    }
  }
}

int grid_for(int64_t rows, int num_sms) {
  const int64_t cap = int64_t(num_sms > 0 ? num_sms : 1) * kBlocksPerSm;
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
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const float it = float(1.0 / temperature), t2 = float(temperature * temperature);
  const bool t1 = temperature == 1.0;
  const int grid = grid_for(rows, num_sms);
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
                        int num_sms, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const float it = float(1.0 / temperature);
  const float eta_t = float(eta * temperature), one_minus_eta = float(1.0 - eta);
  const bool t1 = temperature == 1.0;
  const int grid = grid_for(rows, num_sms);
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
