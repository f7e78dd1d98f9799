// cuSPARSELt-backed 2:4 sparse linear layer: y = act(x @ W^T + bias), W [n, k] 2:4 along k.
//
// Algorithm: cuSPARSELt computes D = act(A @ op(B) + bias) with A structured. We make the weight
// the structured operand, as torch's _cslt_sparse_mm does for F.linear:
//   A = W       rows n, cols k, ld k, row-major, opA = N     (2:4 along each row: along k)
//   B = x       rows Mp, cols k, ld k, row-major, opB = T    (so op(B) = x^T, k x Mp)
//   C = D       rows n, cols Mp, ld n, column-major          (= row-major [Mp, n]: y itself)
// so y comes out row-major without a transpose, and the bias runs along D's rows (out features).
// Mp is M (the rows of x) rounded up to kRowAlign with zero rows, which the dense operand's
// shape rules need; the padding rows are sliced off the output (a view, no copy).
// cuSPARSELt takes at most 2^31-1 elements per matrix (16-bit types): a larger weight is refused,
// and an x or y beyond it is multiplied in blocks of rows, each block its own problem and plan.
//
// Everything expensive happens once per problem: one handle per device (lazily created, never
// destroyed, like torch's), and a plan cache keyed by (device, Mp, n, k, dtype, bias, activation,
// the bias tensor's address: a plan keeps its bias pointer) whose entries own the descriptors,
// the algorithm selection and the plan at a fixed address (cuSPARSELt keeps pointers between
// them), plus the workspace size. The algorithm is chosen by cusparseLtMatmulSearch on the first
// call for a (GPU arch, bucket of M = next power of two of Mp, n, k, dtype, bias, activation);
// later plans in the same bucket reuse the winner without searching.
// The weight is compressed once, without a plan (cusparseLtSpMMACompress2), and since cuSPARSELt
// 0.6.2 a compressed layout need not suit every algorithm. So an algorithm other than the
// default must report the default plan's compressed size (cusparseLtSpMMACompressedSize, a
// host-side query at plan creation; a table entry that does not is dropped), and a search's
// winner is checked before it is kept: on a probe input (fixed-seed random, the caller's data
// untouched) it must also give the default algorithm's result; a winner that does not, or a
// search that fails, leaves the default algorithm in place, with a warning. A probe that proves
// nothing (an all-zero weight, a non-finite product) leaves the default in place, unsearched.
// Under CUDA graph capture nothing is searched (a search syncs): a plan built there runs the
// default algorithm in the graph and is searched at the first eager call of its shape; a plan a
// graph was captured with is never destroyed (the cache only retires it).
// The winners can be exported and re-imported (cast_ext.nn persists them as JSON). The
// workspace comes from torch's caching allocator, the stream is torch's current stream, and every
// cuSPARSELt status is checked and reported with the op, the call and the shapes.
//
// Dtypes: bf16 and fp16 (fp32 compute). fp32 is refused: cuSPARSELt's "50 percent" means 1:2 for
// fp32, not 2:4. Archs: sm80+ (2:4 sparse tensor cores; sm90 needs cuSPARSELt >= 0.6).
// Reference: cast_ext/reference.py sparse24_gemm (with W = the decompressed 2:4 weight).
#ifdef CAST_EXT_WITH_CUSPARSELT

#include "cuda/cusparselt.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <cusparseLt.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "cast_ext.h"

namespace cast_ext {
namespace cslt {
namespace {

constexpr int64_t kRowAlign = 8;    // the dense operand's rows, 16-bit types (torch uses 8 too)
constexpr int64_t kDimAlign = 16;   // n and k of the structured operand, 16-bit types
constexpr uint32_t kPtrAlign = 16;  // every descriptor is declared 16-byte aligned
constexpr size_t kMaxPlans = 1024;  // then the plan cache is emptied (algorithms are kept)
// The most elements of one matrix, 16-bit types (cuSPARSELt's documented limit; the library
// refuses larger ones, "matC, matD exceeds the maximum size allowed").
constexpr int64_t kMaxElems = (int64_t(1) << 31) - 1;

// ---- errors --------------------------------------------------------------------------------

const char* status_name(cusparseStatus_t s) {
  switch (s) {
    case CUSPARSE_STATUS_SUCCESS: return "CUSPARSE_STATUS_SUCCESS";
    case CUSPARSE_STATUS_NOT_INITIALIZED: return "CUSPARSE_STATUS_NOT_INITIALIZED";
    case CUSPARSE_STATUS_ALLOC_FAILED: return "CUSPARSE_STATUS_ALLOC_FAILED";
    case CUSPARSE_STATUS_INVALID_VALUE: return "CUSPARSE_STATUS_INVALID_VALUE";
    case CUSPARSE_STATUS_ARCH_MISMATCH: return "CUSPARSE_STATUS_ARCH_MISMATCH";
    case CUSPARSE_STATUS_MAPPING_ERROR: return "CUSPARSE_STATUS_MAPPING_ERROR";
    case CUSPARSE_STATUS_EXECUTION_FAILED: return "CUSPARSE_STATUS_EXECUTION_FAILED";
    case CUSPARSE_STATUS_INTERNAL_ERROR: return "CUSPARSE_STATUS_INTERNAL_ERROR";
    case CUSPARSE_STATUS_MATRIX_TYPE_NOT_SUPPORTED:
      return "CUSPARSE_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSPARSE_STATUS_ZERO_PIVOT: return "CUSPARSE_STATUS_ZERO_PIVOT";
    case CUSPARSE_STATUS_NOT_SUPPORTED: return "CUSPARSE_STATUS_NOT_SUPPORTED";
    case CUSPARSE_STATUS_INSUFFICIENT_RESOURCES: return "CUSPARSE_STATUS_INSUFFICIENT_RESOURCES";
    default: return "an unknown cuSPARSE status";
  }
}

void check(const char* op, const char* call, cusparseStatus_t st, const std::string& what) {
  if (st == CUSPARSE_STATUS_SUCCESS) return;
#if CUSPARSELT_VERSION >= 800
  const char* detail = cusparseLtGetErrorString(st);
#else
  const char* detail = "";
#endif
  // The GPU requirement is only named where the status can mean it (not, e.g., for a size limit).
  const bool arch = st == CUSPARSE_STATUS_ARCH_MISMATCH || st == CUSPARSE_STATUS_NOT_SUPPORTED;
  CAST_CHECK(false, op, call, " failed with ", status_name(st), " (", static_cast<int>(st), ") ",
             detail, " for ", what, arch ? ". Needs an sm80+ GPU (sm90: cuSPARSELt >= 0.6)" : "",
             "; set CUSPARSELT_LOG_LEVEL=5 for the library's own log.");
}

std::string dtype_name(cudaDataType t) { return t == CUDA_R_16BF ? "bf16" : "fp16"; }

cudaDataType to_cuda_type(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default:
      CAST_CHECK(false, op, name, " of shape ", shape_str(t), " has dtype ", t.scalar_type(),
                 "; the cuSPARSELt GEMM supports bfloat16 and float16 (use the packed "
                 "cast_ext.sparse24_gemm for float32)");
  }
  return CUDA_R_16BF;  // unreachable
}

cudaDataType parse_dtype(const std::string& s) {
  if (s == "bfloat16" || s == "bf16") return CUDA_R_16BF;
  if (s == "float16" || s == "fp16" || s == "half") return CUDA_R_16F;
  CAST_CHECK(false, "cslt_compressed_size", "dtype ", s, " is not supported (bfloat16, float16)");
  return CUDA_R_16BF;
}

// ---- handles: one per device -----------------------------------------------------------------

std::mutex g_mu;  // guards every map below and every use of a handle

// cusparseLtInit binds the handle to the current device and it must not move afterwards (it is
// a 512-byte struct the library points into), hence unique_ptr. Caller holds a CUDAGuard.
cusparseLtHandle_t* handle_for(const char* op, int device) {
  // Never destroyed: plans (below) built on a handle may outlive any static destructor order.
  static auto& handles = *new std::unordered_map<int, std::unique_ptr<cusparseLtHandle_t>>();
  auto it = handles.find(device);
  if (it != handles.end()) return it->second.get();
  auto h = std::make_unique<cusparseLtHandle_t>();
  check(op, "cusparseLtInit", cusparseLtInit(h.get()), "device cuda:" + std::to_string(device));
  return handles.emplace(device, std::move(h)).first->second.get();
}

// ---- compressed sizes ------------------------------------------------------------------------

struct Structured {
  cusparseLtMatDescriptor_t desc;
  bool ok = false;
  Structured(const char* op, cusparseLtHandle_t* h, int64_t n, int64_t k, cudaDataType t,
             const std::string& what) {
    check(op, "cusparseLtStructuredDescriptorInit",
          cusparseLtStructuredDescriptorInit(h, &desc, n, k, k, kPtrAlign, t, CUSPARSE_ORDER_ROW,
                                             CUSPARSELT_SPARSITY_50_PERCENT),
          what);
    ok = true;
  }
  ~Structured() {
    if (ok) cusparseLtMatDescriptorDestroy(&desc);
  }
  Structured(const Structured&) = delete;
  Structured& operator=(const Structured&) = delete;
};

std::string weight_what(int64_t n, int64_t k, cudaDataType t) {
  return "a " + dtype_name(t) + " weight [" + std::to_string(n) + ", " + std::to_string(k) + "]";
}

// (compressed bytes, compression scratch bytes); caller holds g_mu and a CUDAGuard.
std::pair<size_t, size_t> sizes_locked(const char* op, int device, int64_t n, int64_t k,
                                       cudaDataType t) {
  static std::map<std::tuple<int, int64_t, int64_t, int>, std::pair<size_t, size_t>> cache;
  const auto key = std::make_tuple(device, n, k, static_cast<int>(t));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  cusparseLtHandle_t* h = handle_for(op, device);
  const std::string what = weight_what(n, k, t);
  Structured a(op, h, n, k, t, what);
  size_t bytes = 0, scratch = 0;
  check(op, "cusparseLtSpMMACompressedSize2",
        cusparseLtSpMMACompressedSize2(h, &a.desc, &bytes, &scratch), what);
  return cache.emplace(key, std::make_pair(bytes, scratch)).first->second;
}

int64_t compressed_numel(size_t bytes, int64_t itemsize) {
  return static_cast<int64_t>((bytes + itemsize - 1) / itemsize);
}

void check_dims(const char* op, int64_t n, int64_t k) {
  CAST_CHECK(n > 0 && k > 0 && n % kDimAlign == 0 && k % kDimAlign == 0, op,
             "the cuSPARSELt GEMM needs out_features (n) and in_features (k) to be positive "
             "multiples of ",
             kDimAlign, ", got n=", n, ", k=", k,
             " (use the packed cast_ext.sparse24_gemm, or a dense layer, for other shapes)");
  CAST_CHECK(n <= kMaxElems / k, op, "a weight [", n, ", ", k, "] has more elements than ",
             "cuSPARSELt's limit of 2^31-1 per matrix (16-bit types); split the layer");
}

// Why fp16 is refused on `device` ("" where it runs). cuSPARSELt 0.8.0 on sm_90 (the H200,
// 2026-11-30): fp16 cslt_linear faulted the GPU (an illegal instruction during
// cusparseLtMatmulSearch; every later CUDA call of the process then failed) on shapes where bf16
// ran. Refused on sm_90 with cuSPARSELt <= 0.8.0 until a run isolates the fault;
// CAST_EXT_CSLT_FP16=1 lets it run (benchmarks/cslt_fp16_probe.py sets it, one case per process).
std::string fp16_refusal(int device) {
  const int count = c10::cuda::device_count();
  CAST_CHECK(device >= 0 && device < count, "cslt_fp16_refusal", "device ", device,
             " is not a visible CUDA device (", count, " visible)");
  const char* env = std::getenv("CAST_EXT_CSLT_FP16");
  if (env != nullptr && std::string(env) == "1") return "";
  if (at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(device))->major != 9) return "";
  int major = 0, minor = 0, patch = 0;
  if (cusparseLtGetProperty(MAJOR_VERSION, &major) != CUSPARSE_STATUS_SUCCESS ||
      cusparseLtGetProperty(MINOR_VERSION, &minor) != CUSPARSE_STATUS_SUCCESS ||
      cusparseLtGetProperty(PATCH_LEVEL, &patch) != CUSPARSE_STATUS_SUCCESS ||
      major * 1000 + minor * 100 + patch > 800) {
    return "";
  }
  return "float16 is refused on sm_90 with cuSPARSELt " + std::to_string(major) + "." +
         std::to_string(minor) + "." + std::to_string(patch) +
         ": there (an H200, 2026-11-30) an fp16 cslt_linear faulted the GPU, an illegal "
         "instruction in cuSPARSELt's algorithm search after which every CUDA call of the "
         "process failed, where bfloat16 ran. Use bfloat16 (or the packed "
         "cast_ext.sparse24_gemm), or set CAST_EXT_CSLT_FP16=1 to run it anyway";
}

void check_fp16(const char* op, cudaDataType t, int device) {
  if (t != CUDA_R_16F) return;
  const std::string why = fp16_refusal(device);
  CAST_CHECK(why.empty(), op, why);
}

// ---- plans -----------------------------------------------------------------------------------

struct AlgConfig {
  int alg_id = 0;
  int split_k = 1;
  int split_k_mode = 0;  // 0: the library's default
};

// One cached problem. Non-movable: cuSPARSELt keeps pointers from the matmul descriptor to the
// matrix descriptors and from the plan to both.
struct Plan {
  cusparseLtMatDescriptor_t a{}, b{}, c{};
  cusparseLtMatmulDescriptor_t mm{};
  cusparseLtMatmulAlgSelection_t sel{};
  cusparseLtMatmulPlan_t plan{};
  int inited = 0;  // how many of a, b, c, mm, sel, plan are live (in that order)
  AlgConfig cfg;
  size_t workspace = 0;
  int max_alg_id = -1;
  bool searched = false;
  bool custom = false;        // built from a config that changed the default selection
  bool captured = false;      // returned while a CUDA graph was being captured
  bool needs_search = false;  // built under capture with the default algorithm: search later
  int64_t hits = 0;
  std::string key;  // the problem, for cslt_cache_info

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (inited >= 6) cusparseLtMatmulPlanDestroy(&plan);
#if CUSPARSELT_VERSION >= 800
    if (inited >= 5) cusparseLtMatmulAlgSelectionDestroy(&sel);
#endif
    // The matmul descriptor has no destroy call.
    if (inited >= 3) cusparseLtMatDescriptorDestroy(&c);
    if (inited >= 2) cusparseLtMatDescriptorDestroy(&b);
    if (inited >= 1) cusparseLtMatDescriptorDestroy(&a);
  }
};

// The plan cache's key: every property a plan depends on.
struct PlanKey {
  int device;
  int64_t mp, n, k;
  int type;
  bool bias;
  bool relu;
  const void* bias_ptr;
  bool operator==(const PlanKey& o) const {  // by hand: torch 2.11 builds extensions as C++17
    return device == o.device && mp == o.mp && n == o.n && k == o.k && type == o.type &&
           bias == o.bias && relu == o.relu && bias_ptr == o.bias_ptr;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& x) const {
    size_t h = std::hash<const void*>()(x.bias_ptr);
    for (const int64_t v : {int64_t(x.device), x.mp, x.n, x.k, int64_t(x.type),
                            int64_t(x.bias) * 2 + int64_t(x.relu)}) {
      h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    }
    return h;
  }
};

struct Problem {
  int device;
  int sm;  // compute capability, major * 10 + minor: algorithm configs differ by arch
  int64_t mp, n, k;
  cudaDataType type;
  bool bias;
  bool relu;
  // The bias is fixed when the plan is built (cuSPARSELt may copy the matmul descriptor into the
  // plan), so each bias tensor gets its own plan; plans of one bucket share the searched
  // algorithm (alg_key has no pointer), so a new bias costs a plan init, never a search.
  const void* bias_ptr;

  PlanKey plan_key() const {
    return PlanKey{device, mp, n, k, static_cast<int>(type), bias, relu, bias_ptr};
  }
  const char* act() const { return relu ? "relu" : "none"; }
  // Algorithm-table key: arch, bucketed M, no device (cast_ext.nn files tables per GPU model).
  std::string alg_key() const {
    int64_t bucket = 1;
    while (bucket < mp) bucket <<= 1;
    std::ostringstream os;
    os << "sm" << sm << ":" << dtype_name(type) << ":m" << bucket << ":n" << n << ":k" << k
       << ":bias" << bias << ":" << act();
    return os.str();
  }
  std::string what() const {
    std::ostringstream os;
    os << "x [" << mp << ", " << k << "] @ W^T, W " << dtype_name(type) << " [" << n << ", " << k
       << "], bias=" << (bias ? "yes" : "no") << ", activation=" << act();
    return os.str();
  }
};

// Plans are used under g_mu only, so the cache owns them alone. Never destroyed at exit (no
// cuSPARSELt calls after the CUDA context may be gone).
auto& g_plans = *new std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash>();
std::map<std::string, AlgConfig> g_algs;  // alg_key -> winner (searched, checked, or imported)
int64_t g_hits = 0, g_misses = 0, g_searches = 0, g_rejected = 0, g_search_failures = 0;

// Reads the configuration a selection holds (the defaults after init, a search's winner after it).
AlgConfig read_config(const char* op, cusparseLtHandle_t* h, Plan& pl, const std::string& what) {
  AlgConfig cfg;
  cusparseLtSplitKMode_t mode = CUSPARSELT_INVALID_MODE;
  check(op, "cusparseLtMatmulAlgGetAttribute(CONFIG_ID)",
        cusparseLtMatmulAlgGetAttribute(h, &pl.sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &cfg.alg_id,
                                        sizeof(cfg.alg_id)),
        what);
  check(op, "cusparseLtMatmulAlgGetAttribute(SPLIT_K)",
        cusparseLtMatmulAlgGetAttribute(h, &pl.sel, CUSPARSELT_MATMUL_SPLIT_K, &cfg.split_k,
                                        sizeof(cfg.split_k)),
        what);
  check(op, "cusparseLtMatmulAlgGetAttribute(SPLIT_K_MODE)",
        cusparseLtMatmulAlgGetAttribute(h, &pl.sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode,
                                        sizeof(mode)),
        what);
  cfg.split_k_mode = static_cast<int>(mode);
  return cfg;
}

// Descriptors, algorithm selection (explicit config when `cfg` is given) and plan.
std::unique_ptr<Plan> build_plan(const char* op, cusparseLtHandle_t* h, const Problem& p,
                                 const void* bias_ptr, const AlgConfig* cfg) {
  auto pl = std::make_unique<Plan>();
  const std::string what = p.what();
  check(op, "cusparseLtStructuredDescriptorInit",
        cusparseLtStructuredDescriptorInit(h, &pl->a, p.n, p.k, p.k, kPtrAlign, p.type,
                                           CUSPARSE_ORDER_ROW, CUSPARSELT_SPARSITY_50_PERCENT),
        what);
  pl->inited = 1;
  check(op, "cusparseLtDenseDescriptorInit(x)",
        cusparseLtDenseDescriptorInit(h, &pl->b, p.mp, p.k, p.k, kPtrAlign, p.type,
                                      CUSPARSE_ORDER_ROW),
        what);
  pl->inited = 2;
  check(op, "cusparseLtDenseDescriptorInit(y)",
        cusparseLtDenseDescriptorInit(h, &pl->c, p.n, p.mp, p.n, kPtrAlign, p.type,
                                      CUSPARSE_ORDER_COL),
        what);
  pl->inited = 3;
  check(op, "cusparseLtMatmulDescriptorInit",
        cusparseLtMatmulDescriptorInit(h, &pl->mm, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                       CUSPARSE_OPERATION_TRANSPOSE, &pl->a, &pl->b, &pl->c, &pl->c,
                                       CUSPARSE_COMPUTE_32F),
        what);
  pl->inited = 4;
  if (p.relu) {
    const int on = 1;
    check(op, "cusparseLtMatmulDescSetAttribute(activation)",
          cusparseLtMatmulDescSetAttribute(h, &pl->mm, CUSPARSELT_MATMUL_ACTIVATION_RELU, &on,
                                           sizeof(on)),
          what);
  }
  if (p.bias) {
    // Set before the plan, which keeps it: the plan key holds the pointer.
    check(op, "cusparseLtMatmulDescSetAttribute(bias)",
          cusparseLtMatmulDescSetAttribute(h, &pl->mm, CUSPARSELT_MATMUL_BIAS_POINTER, &bias_ptr,
                                           sizeof(bias_ptr)),
          what);
  }
  check(op, "cusparseLtMatmulAlgSelectionInit",
        cusparseLtMatmulAlgSelectionInit(h, &pl->sel, &pl->mm, CUSPARSELT_MATMUL_ALG_DEFAULT),
        what);
  pl->inited = 5;
  check(op, "cusparseLtMatmulAlgGetAttribute(CONFIG_MAX_ID)",
        cusparseLtMatmulAlgGetAttribute(h, &pl->sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID,
                                        &pl->max_alg_id, sizeof(pl->max_alg_id)),
        what);
  if (cfg != nullptr) {
    CAST_CHECK(cfg->alg_id >= 0 && cfg->alg_id < pl->max_alg_id, op, "algorithm id ", cfg->alg_id,
               " is out of range [0, ", pl->max_alg_id, ") for ", what);
    // Only what the winner changed from the fresh selection's defaults is set: a default stored
    // by read_config (split_k -1, a mode) may be refused when set explicitly on some archs.
    const AlgConfig dflt = read_config(op, h, *pl, what);
    check(op, "cusparseLtMatmulAlgSetAttribute(CONFIG_ID)",
          cusparseLtMatmulAlgSetAttribute(h, &pl->sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                                          &cfg->alg_id, sizeof(cfg->alg_id)),
          what);
    pl->custom = cfg->alg_id != dflt.alg_id;
    if (cfg->split_k != dflt.split_k) {
      pl->custom = true;
      check(op, "cusparseLtMatmulAlgSetAttribute(SPLIT_K)",
            cusparseLtMatmulAlgSetAttribute(h, &pl->sel, CUSPARSELT_MATMUL_SPLIT_K, &cfg->split_k,
                                            sizeof(cfg->split_k)),
            what);
    }
    // a search may pick a mode (e.g. stream-K) with split_k 1
    if (cfg->split_k_mode > 0 && cfg->split_k_mode != dflt.split_k_mode) {
      pl->custom = true;
      const auto mode = static_cast<cusparseLtSplitKMode_t>(cfg->split_k_mode);
      check(op, "cusparseLtMatmulAlgSetAttribute(SPLIT_K_MODE)",
            cusparseLtMatmulAlgSetAttribute(h, &pl->sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode,
                                            sizeof(mode)),
            what);
    }
    pl->cfg = *cfg;
  }
  check(op, "cusparseLtMatmulPlanInit", cusparseLtMatmulPlanInit(h, &pl->plan, &pl->mm, &pl->sel),
        what);
  pl->inited = 6;
  check(op, "cusparseLtMatmulGetWorkspace",
        cusparseLtMatmulGetWorkspace(h, &pl->plan, &pl->workspace), what);
  return pl;
}

// Bytes of the compressed weight the plan's algorithm reads (the plan-based query). The weight
// is compressed once, without a plan, and read by the default algorithm; a plan that reports
// another size than the default plan of its problem cannot read that buffer. Host-only.
size_t plan_compressed_bytes(const char* op, cusparseLtHandle_t* h, Plan& pl,
                             const std::string& what) {
  size_t bytes = 0, scratch = 0;
  check(op, "cusparseLtSpMMACompressedSize",
        cusparseLtSpMMACompressedSize(h, &pl.plan, &bytes, &scratch), what);
  return bytes;
}

// The weight was compressed (cusparseLtSpMMACompress2) into the bytes the plan-free size query
// gave, `wc_bytes`; a plan whose algorithm reads more would read past that buffer (torch's
// _cslt_sparse_mm assumes the two agree, unchecked). Checked before a new plan first runs.
void check_fits(const char* op, cusparseLtHandle_t* h, Plan& pl, const Problem& p,
                size_t wc_bytes) {
  const std::string what = p.what();
  const size_t need = plan_compressed_bytes(op, h, pl, what);
  CAST_CHECK(need <= wc_bytes, op, "cuSPARSELt's plan for ", what, " reads a ", need,
             "-byte compressed weight but cslt_compress made ", wc_bytes,
             " bytes; this problem cannot run on cuSPARSELt here");
}

bool search_enabled() {
  const char* s = std::getenv("CAST_EXT_CSLT_SEARCH");
  return s == nullptr || std::string(s) != "0";
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// y [mp, n] = plan(x [mp, k]) with the compressed weight `wc`, on `stream`: one
// cusparseLtMatmul, its workspace from torch's caching allocator. Holds g_mu (the handle).
void matmul_locked(const char* op, cusparseLtHandle_t* h, Plan& pl, const Problem& p,
                   const void* wc, const at::Tensor& x, const at::Tensor& y, cudaStream_t stream) {
  auto ws = c10::cuda::CUDACachingAllocator::get()->allocate(pl.workspace);
  const float alpha = 1.f, beta = 0.f;
  check(op, "cusparseLtMatmul",
        cusparseLtMatmul(h, &pl.plan, &alpha, wc, x.const_data_ptr(), &beta, y.data_ptr(),
                         y.data_ptr(), ws.get(), &stream, 1),
        p.what());
}

// Runs cusparseLtMatmulSearch on the default plan `pl` with a probe input, then checks the winner
// against the default algorithm: equal up to accumulation order (a few bf16 ulps), where a layout
// that does not suit the algorithm scrambles the weight and misses by O(1). Returns the plan to
// cache: the searched one, or a fresh default one (the searched selection's state is then
// unknown). A winner whose compressed size differs from the default plan's cannot read the
// weight's layout and is rejected before it runs. An all-zero weight, or a product that is not
// finite on the probe (fp16 overflow, NaN), proves nothing: its plan keeps the default,
// unsearched, and the bucket's next plan searches. Holds g_mu.
std::unique_ptr<Plan> search_plan(const char* op, cusparseLtHandle_t* h, const Problem& p,
                                  std::unique_ptr<Plan> pl, const void* wc,
                                  const at::TensorOptions& opts, cudaStream_t stream) {
  const std::string what = p.what();
  const std::string akey = p.alg_key();
  // The bucket keeps the default algorithm; a fresh plan (the searched selection's state is
  // unknown). The table stores that plan's own configuration, not AlgConfig{}: the library's
  // default may differ (e.g. split_k -1 on sm90), and a plan rebuilt from the table must not set
  // anything the default does not.
  const auto use_default = [&] {
    auto fresh = build_plan(op, h, p, p.bias_ptr, nullptr);
    fresh->cfg = read_config(op, h, *fresh, what);
    g_algs[akey] = fresh->cfg;
    return fresh;
  };
  // The probe needs several times the caller's x and y (fp32 copies): at a row block near the
  // 2^31-element limit, tens of GiB. Running out of memory here must not fail the caller's call,
  // which needs none of it: the plan then keeps the default algorithm, unsearched.
  at::Tensor x, y, want;
  float scale = 0.f;
  try {
    at::Generator gen =
        at::cuda::detail::createCUDAGenerator(static_cast<c10::DeviceIndex>(p.device));
    gen.set_current_seed(0x2a4);
    x = at::randn({p.mp, p.k}, gen, opts);
    y = at::empty({p.mp, p.n}, opts);
    matmul_locked(op, h, *pl, p, wc, x, y, stream);
    want = y.to(at::kFloat);
    // The tolerance scales with the product alone: y at x = 0 is act(bias), which a large bias
    // would otherwise let swamp an O(1) error of the product. (A bias far larger than the
    // product can then fail a good winner on the output's rounding: the safe side, the default
    // is kept.)
    matmul_locked(op, h, *pl, p, wc, at::zeros_like(x), y, stream);
    scale = (want - y.to(at::kFloat)).abs().max().item<float>();
  } catch (const c10::OutOfMemoryError& e) {
    ++g_search_failures;
    TORCH_WARN("cast_ext.", op, ": no memory for cuSPARSELt's algorithm search probe for ", what,
               "; using the default algorithm. ", e.what_without_backtrace());
    return pl;
  }
  if (!(scale > 0.f) || !std::isfinite(scale)) return pl;
  size_t dflt_bytes = 0, bytes = 0;
  try {
    auto ws = c10::cuda::CUDACachingAllocator::get()->allocate(pl->workspace);
    const float alpha = 1.f, beta = 0.f;
    dflt_bytes = plan_compressed_bytes(op, h, *pl, what);  // before the search changes the plan
    check(op, "cusparseLtMatmulSearch",
          cusparseLtMatmulSearch(h, &pl->plan, &alpha, wc, x.const_data_ptr(), &beta, y.data_ptr(),
                                 y.data_ptr(), ws.get(), &stream, 1),
          what);
    ++g_searches;
    pl->cfg = read_config(op, h, *pl, what);
    bytes = plan_compressed_bytes(op, h, *pl, what);
    if (bytes == dflt_bytes) {  // else it would read past (or misread) the weight: not run
      // The winner may need a different workspace than the default algorithm.
      check(op, "cusparseLtMatmulGetWorkspace",
            cusparseLtMatmulGetWorkspace(h, &pl->plan, &pl->workspace), what);
      matmul_locked(op, h, *pl, p, wc, x, y, stream);  // e.g. out of memory for its workspace
    }
  } catch (const c10::Error& e) {
    ++g_search_failures;
    TORCH_WARN("cast_ext.", op, ": cuSPARSELt's algorithm search failed for ", what,
               "; using the default algorithm. ", e.what_without_backtrace());
    return use_default();
  }
  if (bytes != dflt_bytes) {
    ++g_rejected;
    TORCH_WARN("cast_ext.", op, ": cuSPARSELt's searched algorithm (id ", pl->cfg.alg_id,
               ", split_k ", pl->cfg.split_k, ", mode ", pl->cfg.split_k_mode, ") needs a ", bytes,
               "-byte compressed weight but the default algorithm's is ", dflt_bytes, " bytes for ",
               what, " (the weight was compressed for the default); using the default.");
    return use_default();
  }
  // Written so that a NaN difference rejects the winner.
  const float diff = (y.to(at::kFloat) - want).abs().max().item<float>();
  if (!(diff <= 0.02f * scale)) {
    ++g_rejected;
    TORCH_WARN("cast_ext.", op, ": cuSPARSELt's searched algorithm (id ", pl->cfg.alg_id,
               ", split_k ", pl->cfg.split_k, ", mode ", pl->cfg.split_k_mode,
               ") disagrees with the default algorithm for ", what,
               " (the weight was compressed for another layout); using the default.");
    return use_default();
  }
  pl->searched = true;
  g_algs[akey] = pl->cfg;
  return pl;
}

// Plans a captured CUDA graph was recorded with, dropped from the cache: kept alive, never
// destroyed (the graph's launches were made with them and may be replayed at any time).
auto& g_retired = *new std::vector<std::unique_ptr<Plan>>();

// Drops every cached plan (keeping those a graph was captured with alive). Holds g_mu.
void clear_plans_locked() {
  for (auto& [key, pl] : g_plans) {
    if (pl->captured) g_retired.push_back(std::move(pl));
  }
  g_plans.clear();
}

// The cached plan for `p`, built (and its algorithm searched and checked) on first use. A plan
// built while a graph is captured (no search is possible then) is searched at the first eager
// call after it. Holds g_mu.
Plan& plan_locked(const char* op, cusparseLtHandle_t* h, const Problem& p, const void* wc,
                  size_t wc_bytes, const at::TensorOptions& opts, cudaStream_t stream) {
  const bool in_capture = capturing();
  const PlanKey key = p.plan_key();
  auto it = g_plans.find(key);
  if (it != g_plans.end()) {
    if (!it->second->needs_search || in_capture) {
      ++g_hits;
      ++it->second->hits;
      it->second->captured |= in_capture;
      return *it->second;
    }
    if (it->second->captured) g_retired.push_back(std::move(it->second));
    g_plans.erase(it);
  }
  ++g_misses;
  if (g_plans.size() >= kMaxPlans) clear_plans_locked();  // shapes churn (e.g. serving)
  std::unique_ptr<Plan> pl, dflt;
  auto known = g_algs.find(p.alg_key());
  if (known != g_algs.end()) {
    try {
      pl = build_plan(op, h, p, p.bias_ptr, &known->second);
      if (pl->custom) {
        // The weight's layout is the default plan's (see plan_compressed_bytes): an algorithm
        // that reports another compressed size is dropped like one that does not fit.
        const std::string what = p.what();
        dflt = build_plan(op, h, p, p.bias_ptr, nullptr);
        if (plan_compressed_bytes(op, h, *pl, what) != plan_compressed_bytes(op, h, *dflt, what)) {
          g_algs.erase(known);
          pl.reset();
        }
      }
    } catch (const c10::Error&) {
      g_algs.erase(known);  // a winner from another M (or an old table) that does not fit here
      pl.reset();
    }
  }
  if (pl) {
    check_fits(op, h, *pl, p, wc_bytes);
  } else {
    pl = dflt ? std::move(dflt) : build_plan(op, h, p, p.bias_ptr, nullptr);
    check_fits(op, h, *pl, p, wc_bytes);  // the search runs it first
    if (search_enabled()) {
      // A search launches many kernels and syncs: never while a CUDA graph is captured.
      if (in_capture) {
        pl->needs_search = true;
      } else {
        pl = search_plan(op, h, p, std::move(pl), wc, opts, stream);
      }
    }
  }
  pl->captured = in_capture;
  pl->key = p.what() + " on cuda:" + std::to_string(p.device) + (p.bias ? " (bias tensor)" : "");
  return *g_plans.emplace(key, std::move(pl)).first->second;
}

// ---- ops -------------------------------------------------------------------------------------

at::Tensor aligned(at::Tensor t) {
  t = t.contiguous();
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kPtrAlign != 0) t = t.clone();
  return t;
}

at::Tensor cslt_compress_cuda(const at::Tensor& w_in) {
  const char* op = "cslt_compress";
  CAST_CHECK(w_in.is_cuda(), op, "w must be a CUDA tensor, got one on ", w_in.device());
  CAST_CHECK(w_in.dim() == 2, op, "w of shape ", shape_str(w_in),
             " must be 2-D [out_features, in_features]");
  const cudaDataType t = to_cuda_type(op, "w", w_in);
  const int64_t n = w_in.size(0), k = w_in.size(1);
  check_dims(op, n, k);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = aligned(w_in);
  // cuSPARSELt compresses whatever it is given; a group with 3 or 4 nonzeros would silently
  // lose some. One reduction and a sync: compression is a one-time step per weight.
  if (!capturing()) {
    const bool ok = w.view({n, k / 4, 4}).ne(0).sum(-1).le(2).all().item<bool>();
    CAST_CHECK(ok, op, "w of shape ", shape_str(w_in),
               " is not 2:4 sparse along its last dim (a group of 4 has more than 2 nonzeros); "
               "prune it first (cast_ext.sparse24_prune)");
  }
  const int device = w.get_device();
  check_fp16(op, t, device);
  std::lock_guard<std::mutex> lk(g_mu);  // the sizes cache and the handle (see cslt_linear_cuda)
  const auto sz = sizes_locked(op, device, n, k, t);
  cusparseLtHandle_t* h = handle_for(op, device);
  // Zeroed: bytes the library leaves as padding are then deterministic (compress is one-time).
  at::Tensor out = at::zeros({compressed_numel(sz.first, w.element_size())}, w.options());
  auto scratch = c10::cuda::CUDACachingAllocator::get()->allocate(sz.second);
  const std::string what = weight_what(n, k, t);
  Structured a(op, h, n, k, t, what);
  check(
      op, "cusparseLtSpMMACompress2",
      cusparseLtSpMMACompress2(h, &a.desc, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, w.const_data_ptr(),
                               out.data_ptr(), scratch.get(), at::cuda::getCurrentCUDAStream()),
      what);
  return out;
}

at::Tensor cslt_linear_cuda(const at::Tensor& x_in, const at::Tensor& wc_in, int64_t n, int64_t k,
                            const std::optional<at::Tensor>& bias_in, c10::string_view activation) {
  const char* op = "cslt_linear";
  CAST_CHECK(x_in.is_cuda(), op, "x must be a CUDA tensor, got one on ", x_in.device());
  CAST_CHECK(x_in.dim() >= 1, op, "x must have at least one dim, got a 0-d tensor");
  const cudaDataType t = to_cuda_type(op, "x", x_in);
  check_dims(op, n, k);
  CAST_CHECK(x_in.size(-1) == k, op, "x of shape ", shape_str(x_in), ": last dim must be k = ", k);
  check_same_device(op, "w_compressed", wc_in, "x", x_in);
  CAST_CHECK(wc_in.dim() == 1 && wc_in.scalar_type() == x_in.scalar_type(), op,
             "w_compressed of shape ", shape_str(wc_in), " and dtype ", wc_in.scalar_type(),
             " must be a 1-D buffer from cslt_compress with x's dtype ", x_in.scalar_type());
  const std::string act(activation);
  CAST_CHECK(act == "none" || act == "relu", op, "activation must be none or relu, got ", act,
             act == "gelu" ? " (cuSPARSELt's GELU epilogue takes int8/fp8 inputs only; apply "
                             "torch.nn.functional.gelu to the output)"
                           : "");
  if (bias_in.has_value()) {
    const at::Tensor& b = *bias_in;
    CAST_CHECK(b.dim() == 1 && b.size(0) == n, op, "bias of shape ", shape_str(b),
               " must be 1-D of size n = ", n);
    CAST_CHECK(b.scalar_type() == x_in.scalar_type(), op, "bias has dtype ", b.scalar_type(),
               " but x has dtype ", x_in.scalar_type(), "; they must match");
    check_same_device(op, "bias", b, "x", x_in);
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int device = x_in.get_device();
  check_fp16(op, t, device);
  cusparseLtHandle_t* h;
  size_t wc_bytes = 0;  // what cslt_compress wrote
  {
    std::lock_guard<std::mutex> lk(g_mu);
    const auto sz = sizes_locked(op, device, n, k, t);
    wc_bytes = sz.first;
    CAST_CHECK(wc_in.numel() == compressed_numel(sz.first, wc_in.element_size()), op,
               "w_compressed has ", wc_in.numel(), " elements but a compressed ",
               weight_what(n, k, t), " has ", compressed_numel(sz.first, wc_in.element_size()),
               "; were n and k those given to cslt_compress?");
    h = handle_for(op, device);
  }
  auto oshape = x_in.sizes().vec();
  oshape.back() = n;
  const int64_t m = c10::multiply_integers(x_in.sizes().slice(0, x_in.dim() - 1));
  if (m == 0) return at::empty(oshape, x_in.options());

  const int64_t mp = (m + kRowAlign - 1) / kRowAlign * kRowAlign;
  at::Tensor x = x_in.reshape({m, k});
  if (mp != m) {
    at::Tensor padded = at::zeros({mp, k}, x.options());
    padded.narrow(0, 0, m).copy_(x);
    x = padded;
  } else {
    x = aligned(x);
  }
  const at::Tensor wc = aligned(wc_in);
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = aligned(*bias_in);
  at::Tensor y = at::empty({mp, n}, x.options());

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const void* bias_ptr = bias ? bias->const_data_ptr() : nullptr;
  const auto* props = at::cuda::getDeviceProperties(device);
  // x [mp, k] and y [mp, n] must each stay within kMaxElems: beyond it they are multiplied in
  // blocks of `chunk` rows, each an ordinary problem with its own plan (the last block its own
  // shape). chunk >= 16 since n * k <= kMaxElems with n, k >= 16.
  const int64_t chunk = kMaxElems / std::max(n, k) / kRowAlign * kRowAlign;
  {
    // One launch at a time per process: threads share the device's handle and the plans, and
    // cuSPARSELt does not promise that a handle may be used by two threads at once (torch keeps
    // one per thread). The launch is asynchronous, so the lock is held for microseconds (but a
    // first call of a shape builds and searches its plan under it).
    std::lock_guard<std::mutex> lk(g_mu);
    for (int64_t r0 = 0; r0 < mp; r0 += chunk) {
      const int64_t rows = std::min(chunk, mp - r0);
      const Problem p{
          device,  props->major * 10 + props->minor, rows, n, k, t, bias.has_value(), act == "relu",
          bias_ptr};
      Plan& pl = plan_locked(op, h, p, wc.const_data_ptr(), wc_bytes, x.options(), stream);
      if (rows == mp) {
        matmul_locked(op, h, pl, p, wc.const_data_ptr(), x, y, stream);
      } else {
        // Row blocks of row-major contiguous tensors are contiguous, and r0 (a multiple of
        // kRowAlign) times n or k (multiples of 16) elements keeps a block 16-byte aligned.
        const at::Tensor xc = x.narrow(0, r0, rows), yc = y.narrow(0, r0, rows);
        TORCH_INTERNAL_ASSERT(xc.is_contiguous() && yc.is_contiguous() &&
                              reinterpret_cast<uintptr_t>(xc.const_data_ptr()) % kPtrAlign == 0 &&
                              reinterpret_cast<uintptr_t>(yc.const_data_ptr()) % kPtrAlign == 0);
        matmul_locked(op, h, pl, p, wc.const_data_ptr(), xc, yc, stream);
      }
    }
  }
  return y.narrow(0, 0, m).view(oshape);
}

}  // namespace

// ---- Python-side introspection (bound in bindings.cpp) --------------------------------------

// Runs f() under g_mu with the GIL released: an op holding g_mu may need the GIL (a
// TorchDispatchMode or tensor subclass active in its thread re-enters Python), so waiting for the
// lock with the GIL held could deadlock. f() must not touch Python objects.
template <typename F>
auto without_gil_locked(F&& f) {
  pybind11::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lk(g_mu);
  return f();
}

struct PlanInfo {
  std::string key;
  AlgConfig cfg;
  int max_alg_id;
  size_t workspace;
  bool searched, captured, needs_search;
  int64_t hits;
};

void bind(pybind11::module& m) {
  namespace py = pybind11;
  m.def(
      "cslt_fp16_refusal", [](int device) { return fp16_refusal(device); }, py::arg("device"),
      "Why cslt_compress/cslt_linear refuse float16 on this CUDA device (\"\" where they run).");
  m.def(
      "_cslt_compressed_size",
      [](int64_t n, int64_t k, const std::string& dtype, int device) -> int64_t {
        check_dims("cslt_compress", n, k);
        const cudaDataType t = parse_dtype(dtype);
        const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        return without_gil_locked([&] {
          return compressed_numel(sizes_locked("cslt_compress", device, n, k, t).first, 2);
        });
      },
      py::arg("n"), py::arg("k"), py::arg("dtype"), py::arg("device"),
      "Elements (16-bit) of cslt_compress's buffer for a [n, k] weight (asks the library).");
  m.def(
      "cslt_cache_info",
      []() {
        std::vector<int64_t> counts;
        std::vector<PlanInfo> plans;
        without_gil_locked([&] {
          counts = {static_cast<int64_t>(g_plans.size()),
                    g_hits,
                    g_misses,
                    g_searches,
                    g_rejected,
                    g_search_failures};
          for (const auto& [key, pl] : g_plans) {
            plans.push_back(PlanInfo{pl->key, pl->cfg, pl->max_alg_id, pl->workspace, pl->searched,
                                     pl->captured, pl->needs_search, pl->hits});
          }
          return 0;
        });
        py::dict d;
        const char* names[] = {"plans",    "hits",     "misses",
                               "searches", "rejected", "search_failures"};
        for (size_t i = 0; i < counts.size(); ++i) d[names[i]] = counts[i];
        py::list entries;
        for (const PlanInfo& pl : plans) {
          py::dict e;
          e["key"] = pl.key;
          e["alg_id"] = pl.cfg.alg_id;
          e["split_k"] = pl.cfg.split_k;
          e["split_k_mode"] = pl.cfg.split_k_mode;
          e["max_alg_id"] = pl.max_alg_id;
          e["workspace_bytes"] = pl.workspace;
          e["searched"] = pl.searched;
          e["captured"] = pl.captured;
          e["needs_search"] = pl.needs_search;
          e["hits"] = pl.hits;
          entries.append(e);
        }
        d["entries"] = entries;
        return d;
      },
      "cuSPARSELt plan cache: plans, hits, misses, searches, searched algorithms rejected (they "
      "disagreed with the default), failed searches, and one entry per plan.");
  m.def(
      "cslt_cache_clear",
      [](bool algorithms) {
        without_gil_locked([&] {
          clear_plans_locked();
          g_hits = g_misses = g_searches = g_rejected = g_search_failures = 0;
          if (algorithms) g_algs.clear();
          return 0;
        });
      },
      py::arg("algorithms") = false,
      "Drop every cached plan (and the searched algorithms too if algorithms=True).");
  m.def(
      "cslt_get_algs",
      []() {
        const auto algs = without_gil_locked([] { return g_algs; });
        py::dict d;
        for (const auto& [key, cfg] : algs) {
          d[py::str(key)] = py::make_tuple(cfg.alg_id, cfg.split_k, cfg.split_k_mode);
        }
        return d;
      },
      "The algorithm table: {problem key: (alg_id, split_k, split_k_mode)}.");
  m.def(
      "cslt_set_algs",
      [](const std::map<std::string, std::tuple<int, int, int>>& table) {
        without_gil_locked([&] {
          for (const auto& [key, v] : table) {
            g_algs[key] = AlgConfig{std::get<0>(v), std::get<1>(v), std::get<2>(v)};
          }
          return 0;
        });
      },
      py::arg("table"), "Merge {problem key: (alg_id, split_k, split_k_mode)} into the table.");
  m.def(
      "cslt_runtime_version",
      []() {
        int major = 0, minor = 0, patch = 0;
        check("cslt_runtime_version", "cusparseLtGetProperty",
              cusparseLtGetProperty(MAJOR_VERSION, &major), "MAJOR_VERSION");
        check("cslt_runtime_version", "cusparseLtGetProperty",
              cusparseLtGetProperty(MINOR_VERSION, &minor), "MINOR_VERSION");
        check("cslt_runtime_version", "cusparseLtGetProperty",
              cusparseLtGetProperty(PATCH_LEVEL, &patch), "PATCH_LEVEL");
        return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
      },
      "Version of the cuSPARSELt library loaded at run time.");
}

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) {
  m.impl("cslt_compress", &cslt_compress_cuda);
  m.impl("cslt_linear", &cslt_linear_cuda);
}

}  // namespace cslt
}  // namespace cast_ext

#else  // CUDA build without cuSPARSELt: the ops exist and say why they cannot run.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

void cusparselt_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, "cast_ext.", op.schema().name().substr(sizeof("cast_ext::") - 1),
              ": this cast_ext was built without cuSPARSELt (CAST_EXT_CUSPARSELT=0, or no "
              "nvidia-cusparselt wheel at build time). Rebuild with CAST_EXT_CUSPARSELT=1, or "
              "use the packed cast_ext.sparse24_gemm.");
}

}  // namespace

TORCH_LIBRARY_IMPL(cast_ext, CUDA, m) {
  for (const char* name : {"cslt_compress", "cslt_linear"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cusparselt_not_built>());
  }
}

#endif  // CAST_EXT_WITH_CUSPARSELT
