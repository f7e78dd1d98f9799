// C++ signatures of the CUDA launchers: raw pointers, sizes and a stream, no torch types, so the
// .cu files compile without torch headers (seconds, not minutes, per file). The torch glue in
// csrc/cuda/*.cpp checks arguments, allocates and calls these. Every launcher returns the
// cudaError_t of its launch (cudaSuccess, or the error to report).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "adams_coeffs.h"

namespace cast_ext {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ---- sparse24_mask.cu (reference: nm_mask, sparse24_prune, sparse24_compress, ...) ----------
// All views are rows x k, row-major, contiguous; groups of m along k; packed masks rows x
// ceil(k/8) bytes. `bad` (an int the device can write, zeroed by the caller) is set if any weight
// is non-finite. Every error flag of these kernels may be nullptr: the check is then skipped, the
// outputs are the same. A flag is set with plain stores (all of the value 1), never read or
// combined on the device: DeviceFlag (glue.h) puts it in pinned host memory.
enum class MaskOut : int { Mask = 0, Prune = 1, Compress = 2 };

cudaError_t nm_select(DType dt, MaskOut mode, const void* w, int64_t rows, int64_t k, int n, int m,
                      bool* mask_out, void* values_out, uint8_t* meta_out, int* bad,
                      cudaStream_t stream);

cudaError_t sparse24_decompress(DType dt, const void* values, const uint8_t* meta, int64_t rows,
                                int64_t k, void* out, int* bad_meta, cudaStream_t stream);

cudaError_t pack_mask(const bool* mask, int64_t rows, int64_t k, uint8_t* packed,
                      cudaStream_t stream);

cudaError_t unpack_mask(const uint8_t* packed, int64_t rows, int64_t k, bool* mask,
                        cudaStream_t stream);

// out: one int64 on the device, zeroed by the caller; counts groups of m (4 or 8) that differ.
cudaError_t mask_flips(const uint8_t* a, const uint8_t* b, int64_t nbytes, int m, int64_t* out,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace cast_ext

// ---- sparse24_gemv.cu (reference: sparse24_gemm, for M <= kGemv24MaxM) ---------------------
// y [m, n] = x [m, k] @ W^T (+ bias) from values [n, k/2] + meta [n, k/8]; bias may be nullptr.
// `bad_meta` (an int the device can write, zeroed by the caller, or nullptr) is set if a nibble
// does not have exactly 2 bits.
namespace cast_ext {
namespace cuda {

constexpr int64_t kGemv24MaxM = 16;

// Whether sparse24_gemv takes these arguments: 1 <= m <= kGemv24MaxM, k % 16 == 0, aligned
// pointers (16 bytes for x and values, 2 for meta, bias and y).
bool sparse24_gemv_supported(int64_t m, int64_t k, const void* x, const void* values,
                             const uint8_t* meta, const void* bias, const void* y);

// `tensor_cores`: the device has them (compute capability >= 8.0); fp16/bf16 with
// 2 <= m <= kGemv24MaxM, k % 32 == 0 and a 4-byte-aligned meta then run the mma.sync kernel,
// everything else the SIMT one.
cudaError_t sparse24_gemv(DType dt, const void* x, const void* values, const uint8_t* meta,
                          const void* bias, int64_t m, int64_t n, int64_t k, void* y, int* bad_meta,
                          bool tensor_cores, cudaStream_t stream);

}  // namespace cuda
}  // namespace cast_ext

// ---- adams.cu (reference: adams_step_) -------------------------------------------------------
namespace cast_ext {
namespace cuda {

// One tensor of an AdamS step. Dense lists (plain Adam) have no mask: rows = 1, k = numel.
struct AdamsTensorArgs {
  void* param;         // fp32, or fp16/bf16 when `master` is set
  const void* grad;    // dtype of param
  float* exp_avg;      // fp32
  float* exp_avg_sq;   // fp32
  uint8_t* mask;       // packed mask rows x ceil(k/8), or nullptr (dense)
  uint8_t* prev_mask;  // receives the old mask at a refresh, or nullptr
  float* master;       // fp32 master weights, or nullptr
  float* step;         // fp32 completed steps (device), read in the kernel
  int64_t rows, k;
};

// All tensors share dtype `dt` and one device. Runs the update (one launch per few dozen tensors)
// then increments the steps (skipped on the device when *found_inf != 0). grad_scale and
// found_inf: device fp32 scalars or nullptr. num_sms sizes the grid.
cudaError_t adams_step(DType dt, bool master, bool sparse, const AdamsTensorArgs* tensors,
                       int64_t count, const AdamsHyper& h, const float* grad_scale,
                       const float* found_inf, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace cast_ext

// ---- distill.cu (reference: distill_fwd, distill_bwd) ----------------------------------------
// Logits [rows, vocab] row-major (teacher nullptr: no KL term, eta must be 0 in the backward),
// labels [rows] int64, lse [rows, 3] fp32. `bad_label` (an int the device can write, zeroed by the
// caller, or nullptr) is set if a label that is not ignore_index lies outside [0, vocab).
// grad_scale: a device fp32 read by the kernel. num_sms and threads_per_sm (the device's) size the
// grid.
namespace cast_ext {
namespace cuda {

cudaError_t distill_fwd(DType dt, const void* student, const void* teacher, const int64_t* labels,
                        int64_t rows, int64_t vocab, double temperature, int64_t ignore_index,
                        float* kl, float* ce, float* lse, int* bad_label, int num_sms,
                        int threads_per_sm, cudaStream_t stream);

cudaError_t distill_bwd(DType dt, const void* student, const void* teacher, const int64_t* labels,
                        const float* lse, const float* grad_scale, int64_t rows, int64_t vocab,
                        double eta, double temperature, int64_t ignore_index, void* grad,
                        int num_sms, int threads_per_sm, cudaStream_t stream);

}  // namespace cuda
}  // namespace cast_ext
