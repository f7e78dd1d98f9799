// AdamS fused optimizer step on CUDA (cast_ext::adams_step_), no torch headers.
//
// Algorithm: multi-tensor, like torch's _fused_adam_ / apex multi_tensor_apply, but with the
// tensor table in the kernel arguments (<= 4 KB, so any driver takes it) and a grid-stride loop
// over chunks: a launch covers up to kMaxTensors tensors, each cut into chunks of kChunkUnits
// "units"; a block finds its chunk's tensor by binary search over the chunk prefix sums. A unit
// is one packed-mask byte: 8 consecutive elements of a row (4 at the end of a row of length 4 mod
// 8). Each thread owns whole units, so it ranks its groups in registers at a refresh (shared
// nm_select.h code: the CPU kernel agrees bit for bit), reads or writes the packed byte, and
// updates the 8 elements with 16-byte vector loads/stores, all in one pass over memory.
// Per tensor the kernel reads the step (device fp32) and computes alpha, bias corrections and the
// refresh flag in double, rounded to float as the CPU kernel does. The fp32 math uses
// __fmul_rn/__fadd_rn/__fdiv_rn/__fsqrt_rn: no FMA contraction, IEEE division and sqrt, so
// results equal the CPU kernel's (bias corrections applied as fp32 reciprocals, like torch's CUDA
// division by a scalar, so on CUDA the reference does the same operations). A second tiny kernel
// increments the steps after every update launch; both skip when *found_inf != 0. Non-finite
// weights at a refresh are NOT reported here (that would need a host sync per step); they rank as
// nm_select.h ranks them. Layout: contiguous tensors; masks rows x ceil(k/8) uint8, LSB first.
// Dtypes: fp32 params, or fp32/fp16/bf16 params with fp32 masters; fp32 state. Archs: sm80+.
// Reference: cast_ext/reference.py adams_step_ (CPU twin: csrc/cpu/adams.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/kernels.h"
#include "cuda/vec8.cuh"
#include "nm_select.h"

namespace cast_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkUnits = 2048;  // 16384 elements per chunk, 8 units per thread
constexpr int kMaxTensors = 36;        // keeps UpdateArgs under the classic 4 KB argument limit
constexpr int kMaxSteps = 400;         // keeps StepArgs under 4 KB

struct UpdateArgs {
  void* p[kMaxTensors];
  const void* g[kMaxTensors];
  float* mu[kMaxTensors];
  float* v[kMaxTensors];
  float* w[kMaxTensors];  // fp32 weights: master, or p itself
  uint8_t* mask[kMaxTensors];
  uint8_t* prev[kMaxTensors];
  const float* step[kMaxTensors];
  int64_t k[kMaxTensors];
  int64_t units[kMaxTensors];
  int64_t chunk_end[kMaxTensors];  // inclusive prefix sum of chunks
  uint8_t vec[kMaxTensors];        // 16-byte vector access allowed
  int ntensors;
  AdamsHyper h;
  const float* grad_scale;
  const float* found_inf;
};
static_assert(sizeof(UpdateArgs) <= 4096, "kernel arguments over 4 KB");

struct StepArgs {
  float* step[kMaxSteps];
  int count;
  const float* found_inf;
};
static_assert(sizeof(StepArgs) <= 4096, "kernel arguments over 4 KB");

// Mask bits of one unit from its fp32 weights (cnt 8, or 4 at a row end for m = 4).
__device__ __forceinline__ uint32_t rank_unit(const float* w, int cnt, int n, int m) {
  bool bad = false;  // not reported on CUDA (see the header comment)
  float a[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) a[i] = checked_abs(w[i], bad);
  if (m == 8) return topn_of_m<8>(a, n);
  uint32_t bits = n == 2 ? top2_of_4(a[0], a[1], a[2], a[3]) : topn_of_m<4>(a, n);
  if (cnt == 8) bits |= (n == 2 ? top2_of_4(a[4], a[5], a[6], a[7]) : topn_of_m<4>(a + 4, n)) << 4;
  return bits;
}

template <typename T, bool kMaster, bool kSparse>
__global__ void __launch_bounds__(kThreads) adams_kernel(const UpdateArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  const float inv_scale = args.grad_scale != nullptr ? __fdiv_rn(1.f, *args.grad_scale) : 1.f;
  const int64_t total_chunks = args.chunk_end[args.ntensors - 1];
  __shared__ AdamsCoeffs shared_c;
  AdamsCoeffs c{};
  int c_of = -1;  // the tensor whose coefficients c holds
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    // First tensor whose inclusive chunk_end exceeds `chunk`.
    int lo = 0, hi = args.ntensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (args.chunk_end[mid] > chunk) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const int ti = lo;
    const int64_t first = ti == 0 ? 0 : args.chunk_end[ti - 1];
    const int64_t u0 = (chunk - first) * kChunkUnits;
    const int64_t units = args.units[ti];
    const int64_t u1 = u0 + kChunkUnits < units ? u0 + kChunkUnits : units;
    const int64_t k = args.k[ti];
    const int64_t kb = (k + 7) / 8;
    const bool vec_ok = args.vec[ti] != 0;
    // One thread derives the tensor's coefficients (two double pows) for the whole block, once
    // per run of chunks of one tensor (a block's next chunk is mostly of the same tensor). The
    // chunk loop and ti are uniform across the block, so the barriers are reached by every
    // thread.
    if (ti != c_of) {
      if (threadIdx.x == 0) shared_c = adams_coeffs(args.h, int64_t(*args.step[ti]), kSparse);
      __syncthreads();
      c = shared_c;
      c_of = ti;
      __syncthreads();  // everyone has its copy before thread 0 overwrites it for another tensor
    }
    T* __restrict__ pp = static_cast<T*>(args.p[ti]);
    const T* __restrict__ gp = static_cast<const T*>(args.g[ti]);
    float* __restrict__ mup = args.mu[ti];
    float* __restrict__ vp = args.v[ti];
    float* __restrict__ wp = args.w[ti];
    for (int64_t u = u0 + threadIdx.x; u < u1; u += blockDim.x) {
      int64_t off;
      int cnt;
      if (k % 8 == 0) {
        off = u * 8;
        cnt = 8;
      } else {
        const int64_t r = u / kb;
        const int64_t col = (u - r * kb) * 8;
        off = r * k + col;
        cnt = k - col < 8 ? int(k - col) : 8;
      }
      const bool vec = vec_ok && cnt == 8;
      Pack8<float> w, mu, v;
      Pack8<T> g;
      load8(wp + off, cnt, vec, w);
      load8(gp + off, cnt, vec, g);
      load8(mup + off, cnt, vec, mu);
      load8(vp + off, cnt, vec, v);
      uint32_t bits = 0xFFu;
      if (kSparse) {
        uint8_t* mk = args.mask[ti] + u;
        if (c.refresh) {
          bits = rank_unit(w.v, cnt, int(args.h.n), int(args.h.m));
          if (args.prev[ti] != nullptr) args.prev[ti][u] = *mk;
          *mk = uint8_t(bits);
        } else {
          bits = *mk;
        }
      }
      Pack8<T> pout;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float gi = __fmul_rn(Conv<T>::to(g.v[i]), inv_scale);
        float wi = __fmul_rn(w.v[i], c.wdf);
        const float m = __fadd_rn(__fmul_rn(mu.v[i], c.b1), __fmul_rn(c.c1, gi));
        float me, num;
        if (kSparse) {
          const float sgn = float(wi > 0.f) - float(wi < 0.f);
          const float dec = __fadd_rn(__fmul_rn(c.oma, m), __fmul_rn(c.ad, sgn));
          me = ((bits >> i) & 1u) ? m : dec;
          num = me;
        } else {
          me = gi;
          num = m;
        }
        const float vv = __fadd_rn(__fmul_rn(v.v[i], c.b2), __fmul_rn(__fmul_rn(c.c2, me), me));
        const float a = __fmul_rn(num, c.rbc1);
        const float den = __fadd_rn(__fsqrt_rn(__fmul_rn(vv, c.rbc2)), c.eps);
        wi = __fsub_rn(wi, __fmul_rn(c.lr, __fdiv_rn(a, den)));
        mu.v[i] = m;
        v.v[i] = vv;
        w.v[i] = wi;
        pout.v[i] = Conv<T>::from(wi);
      }
      store8(mup + off, cnt, vec, mu);
      store8(vp + off, cnt, vec, v);
      store8(wp + off, cnt, vec, w);
      if (kMaster) store8(pp + off, cnt, vec, pout);
    }
  }
}

__global__ void adams_steps_kernel(const StepArgs args) {
  if (args.found_inf != nullptr && *args.found_inf != 0.f) return;
  for (int i = threadIdx.x; i < args.count; i += blockDim.x) *args.step[i] += 1.f;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kMaster, bool kSparse>
cudaError_t launch_all(const AdamsTensorArgs* ts, int64_t count, const AdamsHyper& h,
                       const float* grad_scale, const float* found_inf, int num_sms,
                       cudaStream_t stream) {
  // One wave of resident blocks (the grid-stride loop takes the rest): a grid of more blocks than
  // fit runs its last wave part-empty (60-71 registers a thread leave room for 3-4 blocks of 256
  // threads per SM on sm_90, and 8 a SM as a fixed guess made 2.67 waves at 3).
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, adams_kernel<T, kMaster, kSparse>,
                                                    kThreads, 0) != cudaSuccess ||
      per_sm < 1) {
    (void)cudaGetLastError();  // not this op's failure: fall back to one block per SM
    per_sm = 1;
  }
  for (int64_t b = 0; b < count;) {
    UpdateArgs a;
    a.h = h;
    a.grad_scale = grad_scale;
    a.found_inf = found_inf;
    a.ntensors = 0;
    int64_t chunks = 0;
    for (; b < count && a.ntensors < kMaxTensors; ++b) {
      const AdamsTensorArgs& t = ts[b];
      const int64_t kb = (t.k + 7) / 8;
      const int64_t units = t.rows * kb;
      if (units == 0) continue;
      const int i = a.ntensors++;
      a.p[i] = t.param;
      a.g[i] = t.grad;
      a.mu[i] = t.exp_avg;
      a.v[i] = t.exp_avg_sq;
      a.w[i] = kMaster ? t.master : static_cast<float*>(t.param);
      a.mask[i] = t.mask;
      a.prev[i] = t.prev_mask;
      a.step[i] = t.step;
      a.k[i] = t.k;
      a.units[i] = units;
      chunks += (units + kChunkUnits - 1) / kChunkUnits;
      a.chunk_end[i] = chunks;
      // Vector access needs every full unit 16-byte aligned: whole-byte rows (a dense tensor is
      // one row whose only short unit is the last) and aligned bases.
      a.vec[i] = (t.k % 8 == 0 || t.rows == 1) && aligned16(t.param) && aligned16(t.grad) &&
                 aligned16(t.exp_avg) && aligned16(t.exp_avg_sq) && aligned16(t.master);
    }
    if (a.ntensors == 0) continue;
    const int64_t cap = int64_t(num_sms) * per_sm;
    const int64_t grid64 = chunks < cap ? chunks : cap;
    adams_kernel<T, kMaster, kSparse><<<int(grid64), kThreads, 0, stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Steps last: every update launch above read the pre-step counts.
  for (int64_t b = 0; b < count;) {
    StepArgs s;
    s.found_inf = found_inf;
    s.count = 0;
    for (; b < count && s.count < kMaxSteps; ++b) s.step[s.count++] = ts[b].step;
    adams_steps_kernel<<<1, kThreads, 0, stream>>>(s);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, bool kMaster>
cudaError_t launch_sparse(bool sparse, const AdamsTensorArgs* ts, int64_t count,
                          const AdamsHyper& h, const float* gs, const float* fi, int sms,
                          cudaStream_t st) {
  return sparse ? launch_all<T, kMaster, true>(ts, count, h, gs, fi, sms, st)
                : launch_all<T, kMaster, false>(ts, count, h, gs, fi, sms, st);
}

}  // namespace

cudaError_t adams_step(DType dt, bool master, bool sparse, const AdamsTensorArgs* tensors,
                       int64_t count, const AdamsHyper& h, const float* grad_scale,
                       const float* found_inf, int num_sms, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (num_sms < 1) num_sms = 1;
  switch (dt) {
    case DType::F32:
      return master ? launch_sparse<float, true>(sparse, tensors, count, h, grad_scale, found_inf,
                                                 num_sms, stream)
                    : launch_sparse<float, false>(sparse, tensors, count, h, grad_scale, found_inf,
                                                  num_sms, stream);
    case DType::F16:
      if (!master) return cudaErrorInvalidValue;  // the glue requires masters for fp16
      return launch_sparse<__half, true>(sparse, tensors, count, h, grad_scale, found_inf, num_sms,
                                         stream);
    case DType::BF16:
      if (!master) return cudaErrorInvalidValue;
      return launch_sparse<__nv_bfloat16, true>(sparse, tensors, count, h, grad_scale, found_inf,
                                                num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace cast_ext
