// The distillation forward's per-row results from its sums, in plain C++ with no torch headers,
// so the CPU kernel (csrc/cpu/distill.cpp) and the CUDA kernel (csrc/cuda/distill.cu) compute
// them with the same code. Semantics: cast_ext/reference.py distill_fwd (SPEC.md section 4).
#pragma once

#include <math.h>

#include "nm_select.h"  // CAST_HD

namespace cast_ext {

// max(a, b), NaN where either is NaN (as torch.max and torch.logsumexp): a row's max then
// carries a NaN logit into its log-sum-exps, which lse_of would otherwise set to an infinite max
// that the NaN sits beside (fmaxf and a plain compare drop NaN).
CAST_HD float nan_max(float a, float b) { return a > b || a != a ? a : b; }

// log-sum-exp from the max and the sum of exp(x - max): the max itself when it is infinite, as
// torch.logsumexp gives (the sum is NaN there, from exp(inf - inf), or 0 for a row of -inf).
CAST_HD float lse_of(float max, float sum) {
  return max == INFINITY || max == -INFINITY ? max : max + logf(sum);
}

// T^2 KL(p_t || p_s) of a row from its sums: zs = sum exp((s - ms) / T), zt = sum exp((t - mt) /
// T), a = sum exp((t - mt) / T) ((t - mt) - (s - ms)) (ms, mt: the row maxima; it = 1 / T;
// t2 = T^2). With finite maxima it is a it / zt + log(zs / zt): the logits enter only as
// differences from their row's max, so the maxima cancel before anything is rounded. (Summing
// e (t - s) on the raw logits and adding (ms - mt) / T left an error of ulp(max) in the KL: a row
// of huge logits, a teacher all finfo.min or -1e30, came out -inf or 0.) log zs - log zt is one
// log1p (the two logs' roundings, an ulp of log zt each, were most of a small KL's error). zs,
// zt >= 1 (the max's own term), so the ratio neither overflows nor divides by 0. Infinite or NaN
// maxima take the log-sum-exps' path: (a / zt + mt - ms) / T - ltt + lst.
CAST_HD float kl_of(float a, float zs, float zt, float ms, float mt, float it, float t2) {
  // Both maxima finite: the first form, which does not use ms - mt (that difference overflows
  // to inf for finite maxima of opposite signs beyond 1.7e38, and the second form gave -inf).
  if (ms - ms == 0.f && mt - mt == 0.f) return t2 * (a * it / zt + log1pf((zs - zt) / zt));
  const float d = ms - mt;
  return t2 * ((a / zt - d) * it - lse_of(mt * it, zt) + lse_of(ms * it, zs));
}

}  // namespace cast_ext
