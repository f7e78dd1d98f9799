// extern "C" wrappers around the CUDA launchers of csrc/cuda/kernels.h, for ctypes, in the CPU
// emulation (cuda_emu.h). Tests only. Pointers are host buffers (numpy/torch CPU tensors) standing
// in for device memory; each wrapper returns the launcher's cudaError_t as an int.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <vector>

#include "cuda/kernels.h"

namespace cuda = cast_ext::cuda;

static_assert(sizeof(bool) == 1, "bool masks are one byte, as torch.bool");

extern "C" {

int emu_nm_select(int dt, int mode, const void* w, int64_t rows, int64_t k, int n, int m,
                  bool* mask_out, void* values_out, uint8_t* meta_out, int* bad) {
  return cuda::nm_select(cuda::DType(dt), cuda::MaskOut(mode), w, rows, k, n, m, mask_out,
                         values_out, meta_out, bad, nullptr);
}

int emu_sparse24_decompress(int dt, const void* values, const uint8_t* meta, int64_t rows,
                            int64_t k, void* out, int* bad_meta) {
  return cuda::sparse24_decompress(cuda::DType(dt), values, meta, rows, k, out, bad_meta, nullptr);
}

int emu_pack_mask(const bool* mask, int64_t rows, int64_t k, uint8_t* packed) {
  return cuda::pack_mask(mask, rows, k, packed, nullptr);
}

int emu_unpack_mask(const uint8_t* packed, int64_t rows, int64_t k, bool* mask) {
  return cuda::unpack_mask(packed, rows, k, mask, nullptr);
}

int emu_mask_flips(const uint8_t* a, const uint8_t* b, int64_t nbytes, int m, int64_t* out) {
  return cuda::mask_flips(a, b, nbytes, m, out, nullptr);
}

// `tensor_cores`: whether the device has them (the glue passes compute capability >= 8.0).
int emu_sparse24_gemv(int dt, const void* x, const void* values, const uint8_t* meta,
                      const void* bias, int64_t m, int64_t n, int64_t k, void* y, int tensor_cores,
                      int* bad_meta) {
  return cuda::sparse24_gemv(cuda::DType(dt), x, values, meta, bias, m, n, k, y, bad_meta,
                             tensor_cores != 0, nullptr);
}

// `table`: `count` rows of 10 words, the fields of AdamsTensorArgs in declaration order (param,
// grad, exp_avg, exp_avg_sq, mask, prev_mask, master, step as addresses, 0 for nullptr; then
// rows, k). `hyper_d`: lr, beta1, beta2, eps, weight_decay, decay; `hyper_i`: total_steps,
// mask_interval, n, m.
int emu_adams_step(int dt, int master, int sparse, const uint64_t* table, int64_t count,
                   const double* hyper_d, const int64_t* hyper_i, const float* grad_scale,
                   const float* found_inf, int num_sms) {
  std::vector<cuda::AdamsTensorArgs> ts(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t* r = table + 10 * i;
    cuda::AdamsTensorArgs& t = ts[static_cast<size_t>(i)];
    t.param = reinterpret_cast<void*>(r[0]);
    t.grad = reinterpret_cast<const void*>(r[1]);
    t.exp_avg = reinterpret_cast<float*>(r[2]);
    t.exp_avg_sq = reinterpret_cast<float*>(r[3]);
    t.mask = reinterpret_cast<uint8_t*>(r[4]);
    t.prev_mask = reinterpret_cast<uint8_t*>(r[5]);
    t.master = reinterpret_cast<float*>(r[6]);
    t.step = reinterpret_cast<float*>(r[7]);
    t.rows = static_cast<int64_t>(r[8]);
    t.k = static_cast<int64_t>(r[9]);
  }
  const cast_ext::AdamsHyper h{hyper_d[0], hyper_d[1], hyper_d[2], hyper_d[3], hyper_d[4],
                               hyper_d[5], hyper_i[0], hyper_i[1], hyper_i[2], hyper_i[3]};
  return cuda::adams_step(cuda::DType(dt), master != 0, sparse != 0, ts.data(), count, h,
                          grad_scale, found_inf, num_sms, nullptr);
}

int emu_distill_fwd(int dt, const void* student, const void* teacher, const int64_t* labels,
                    int64_t rows, int64_t vocab, double temperature, int64_t ignore_index,
                    float* kl, float* ce, float* lse, int num_sms, int* bad_label) {
  return cuda::distill_fwd(cuda::DType(dt), student, teacher, labels, rows, vocab, temperature,
                           ignore_index, kl, ce, lse, bad_label, num_sms, 2048, nullptr);
}

int emu_distill_bwd(int dt, const void* student, const void* teacher, const int64_t* labels,
                    const float* lse, const float* grad_scale, int64_t rows, int64_t vocab,
                    double eta, double temperature, int64_t ignore_index, void* grad, int num_sms) {
  return cuda::distill_bwd(cuda::DType(dt), student, teacher, labels, lse, grad_scale, rows, vocab,
                           eta, temperature, ignore_index, grad, num_sms, 2048, nullptr);
}

// The stubs' conversions (Conv<T> of csrc/cuda/vec8.cuh uses them), elementwise on raw bits, so
// the tests can compare them with torch's round-to-nearest-even over every fp16/bf16 value.
void emu_float2half_rn(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).__x;
}
void emu_half2float(const uint16_t* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
void emu_float2bfloat16_rn(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}
void emu_bfloat162float(const uint16_t* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{in[i]});
}

}  // extern "C"
