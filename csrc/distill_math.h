// The distillation forward's per-row results from its sums, in plain C++ with no torch headers,
// so the CPU kernel (csrc/cpu/distill.cpp) and the CUDA kernel (csrc/cuda/distill.cu) compute
// them with the same code. Semantics: cast_ext/reference.py distill_fwd (SPEC.md section 4).
#pragma once

#include <math.h>

#include "nm_select.h"  // CAST_HD

namespace cast_ext {

// log-sum-exp from the max and the sum of exp(x - max): the max itself when it is infinite, as
// torch.logsumexp gives (the sum is NaN there, from exp(inf - inf), or 0 for a row of -inf).
CAST_HD float lse_of(float max, float sum) {
  return max == INFINITY || max == -INFINITY ? max : max + logf(sum);
}

// T^2 KL(p_t || p_s) of a row from its sums: zs = sum exp((s - ms) / T), zt = sum exp((t - mt) /
// T), a = sum exp((t - mt) / T) (t - s) (ms, mt: the row maxima; it = 1 / T; t2 = T^2). It is
// a it / zt - ltt + lst with lst = ms / T + log zs and ltt = mt / T + log zt, computed with the
// maxima cancelled before they meet the logs: each log-sum-exp alone is rounded at the size of the
// largest logit, which left an error of ulp(max / T) in the KL (3e-5 at logits near 300; a small
// KL came out negative), and log zs - log zt as one log1p (the two logs' roundings, an ulp of
// log zt each, were most of a small KL's error). zs, zt >= 1 (the max's own term), so the ratio
// neither overflows nor divides by 0. Infinite or NaN maxima take the log-sum-exps' path.
CAST_HD float kl_of(float a, float zs, float zt, float ms, float mt, float it, float t2) {
  const float d = ms - mt;
  const float logs =
      d - d == 0.f ? d * it + log1pf((zs - zt) / zt) : lse_of(ms * it, zs) - lse_of(mt * it, zt);
  return t2 * (a * it / zt + logs);
}

}  // namespace cast_ext
