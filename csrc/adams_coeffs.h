// AdamS's scalar arguments and the per-tensor float coefficients of one step, in plain C++ with
// no torch headers, so the CPU kernel (csrc/cpu/adams.cpp) and the CUDA kernel
// (csrc/cuda/adams.cu) compute them with the same code. They agree bit for bit except where
// CUDA's double pow (libdevice, within 2 ulp) and glibc's differ in the last bit of a bias
// correction, which survives the rounding to float about once in 1e9 steps.
// Semantics: cast_ext/reference.py adams_step_ (SPEC.md section 2).
#pragma once

#include <cmath>
#include <cstdint>

#include "nm_select.h"  // CAST_HD

namespace cast_ext {

// The op's scalar arguments, as the schema hands them over (Python floats are doubles).
struct AdamsHyper {
  double lr, beta1, beta2, eps, weight_decay, decay;
  int64_t total_steps, mask_interval, n, m;
};

// What one tensor's step needs, in float, rounded from double exactly as torch rounds a Python
// scalar that meets an fp32 tensor (the reference multiplies fp32 tensors by Python floats).
struct AdamsCoeffs {
  float b1, c1;   // beta1, 1 - beta1
  float b2, c2;   // beta2, 1 - beta2
  float oma, ad;  // 1 - alpha, alpha * decay
  // 1 / (1 - beta^(t+1)): the bias corrections' fp32 reciprocals, 1.0f / float(bc). Dividing by
  // them is a multiply, as torch's CUDA division by a Python scalar does (one division and one
  // sqrt per element are left, which keeps the CPU kernel memory-bound). The division is IEEE
  // rounded on both devices (nvcc's default -prec-div=true).
  float rbc1, rbc2;
  float eps, lr;
  float wdf;  // 1 - lr * weight_decay
  bool refresh;
};

// a * b rounded once, never contracted with a following add into an FMA (nvcc contracts double
// mul + sub on the device by default; the host does not).
CAST_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// t = completed steps. Computed in double like the reference (Python floats), then rounded.
CAST_HD AdamsCoeffs adams_coeffs(const AdamsHyper& h, int64_t t, bool sparse) {
  AdamsCoeffs c;
  const double alpha = ::fmin(double(t) / double(h.total_steps), 1.0);
  c.b1 = float(h.beta1);
  c.c1 = float(1.0 - h.beta1);
  c.b2 = float(h.beta2);
  c.c2 = float(1.0 - h.beta2);
  c.oma = float(1.0 - alpha);
  c.ad = float(alpha * h.decay);
  c.rbc1 = 1.0f / float(1.0 - ::pow(h.beta1, double(t + 1)));
  c.rbc2 = 1.0f / float(1.0 - ::pow(h.beta2, double(t + 1)));
  c.eps = float(h.eps);
  c.lr = float(h.lr);
  c.wdf = float(1.0 - mul_rn(h.lr, h.weight_decay));
  c.refresh = sparse && (t % h.mask_interval) == 0;
  return c;
}

}  // namespace cast_ext
