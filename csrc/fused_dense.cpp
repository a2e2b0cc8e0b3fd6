// vitkern_cuda::fused_dense_fwd / fused_dense_bwd / mlp_fwd / mlp_bwd: dense layers on cuBLASLt
// with fused epilogues (host code only; the elementwise kernels are in dense_epilogue.cu).
//
// Forward, Y = act(X W^T + b), optionally out = residual + row_scale * gamma * Y:
//   - no residual, activation None / "gelu_tanh": one GEMM with the BIAS, GELU_BIAS or (saving the
//     pre-activation for backward) GELU_AUX_BIAS epilogue;
//   - residual only (no LayerScale, no row scale, residual in the compute dtype): one GEMM with
//     the residual as the C matrix (beta = 1) and the BIAS epilogue;
//   - everything else: a GEMM with the BIAS epilogue, then one elementwise pass
//     (dense_epilogue.cu) for the exact erf GELU (cuBLASLt's GELU is the tanh approximation, never
//     substituted for "gelu"), LayerScale, the drop-path row scale and the residual add.
//   "pre" (the pre-activation, or the branch before its scales when their gradients are wanted)
//   is kept as an (M, round_up(N, 8)) buffer: cuBLASLt's GELU aux leading dimension must be a
//   multiple of 8.
// Backward: dT = grad * row_scale * gamma * act'(pre) in one pass (skipped when it is grad itself),
//   dX = dT W, and dW = dT^T X with the BGRADB epilogue giving db. The MLP's hidden gradient uses
//   DGELU_BGRAD (the derivative of the tanh GELU and db1 in the dX GEMM of fc2) for "gelu_tanh",
//   a plain GEMM and the elementwise erf derivative for "gelu". LayerScale and row-scale
//   gradients (only when asked for) come from the same pass as dT: its blocks write fp32 partial
//   sums, added over the blocks afterwards (branch_grads).
// Where cuBLASLt has no algorithm for an epilogue or the C matrix, the same results come from the
// unfused equivalent (plain GEMM + the elementwise pass / a reduction); lt_stats() counts these.

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/version.h>

#include "dense_epilogue.h"
#include "fused_dense.h"
#include "ops.h"

namespace vitkern {

// ============================================================================ cuBLASLt wrapper

namespace {

std::atomic<bool> g_force_unfused{false};
std::atomic<int64_t> g_fused_runs{0}, g_plain_runs{0}, g_fallbacks{0}, g_heuristic_queries{0};

// The most recent GEMMs that cuBLASLt had no algorithm for (status: GEMM), newest last.
constexpr size_t kFallbackLogSize = 32;
std::mutex g_log_mutex;
std::deque<std::string>& fallback_log() {
  static auto* log = new std::deque<std::string>();  // never destroyed
  return *log;
}

const char* op_name(cublasOperation_t t) { return t == CUBLAS_OP_N ? "N" : "T"; }

const char* type_name(cudaDataType_t t) {
  switch (t) {
    case CUDA_R_32F: return "fp32";
    case CUDA_R_16F: return "fp16";
    case CUDA_R_16BF: return "bf16";
    default: return "other";
  }
}

std::string describe(const LtGemm& g) {
  std::ostringstream s;
  s << "D(" << g.m << " x " << g.n << ") = op_" << op_name(g.transa) << "(A) op_" << op_name(g.transb)
    << "(B), k=" << g.k;
  if (g.batch > 1) s << ", batch=" << g.batch;
  s << ", A/B " << type_name(g.ab_type) << ", C/D " << type_name(g.cd_type)
    << (g.compute == CUBLAS_COMPUTE_32F_FAST_TF32 ? ", TF32" : "") << ", lda=" << g.lda << ", ldb=" << g.ldb
    << ", ldd=" << g.ldd;
  if (g.c != nullptr) s << ", C ldc=" << g.ldc << " batch stride " << g.stride_c;
  s << ", epilogue " << epilogue_name(g.epilogue);
  if (g.aux != nullptr) s << " (aux ld " << g.ld_aux << ")";
  return s.str();
}

[[noreturn]] void throw_status(cublasStatus_t st, const char* call, const LtGemm& g) {
  TORCH_CHECK(false, g.op, ": ", call, " failed with ", cublasLtGetStatusName(st), " (",
              cublasLtGetStatusString(st), ") for the GEMM ", describe(g));
}

#define VK_LT_CHECK(expr, g)                                   \
  do {                                                         \
    const cublasStatus_t vk_status_ = (expr);                  \
    if (vk_status_ != CUBLAS_STATUS_SUCCESS) {                 \
      ::vitkern::throw_status(vk_status_, #expr, (g));         \
    }                                                          \
  } while (0)

// Largest power of two <= 16 dividing the address (and the batch stride in bytes when batched).
uint32_t alignment(const void* p, int64_t stride_bytes = 0) {
  const uint64_t v = reinterpret_cast<uint64_t>(p) | static_cast<uint64_t>(stride_bytes);
  for (uint32_t a : {16u, 8u, 4u, 2u}) {
    if (v % a == 0) return a;
  }
  return 1;
}

int64_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  Descriptors() = default;
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    for (auto l : {a, b, c, d}) {
      if (l) cublasLtMatrixLayoutDestroy(l);
    }
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

template <typename V>
void set_desc(const LtGemm& g, cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, V value) {
  VK_LT_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), g);
}

void make_layout(const LtGemm& g, cublasLtMatrixLayout_t* layout, cudaDataType_t type, int64_t rows, int64_t cols,
                 int64_t ld, int64_t stride) {
  VK_LT_CHECK(cublasLtMatrixLayoutCreate(layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld),
              g);
  if (g.batch > 1) {
    const int32_t count = static_cast<int32_t>(g.batch);
    VK_LT_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
                g);
    VK_LT_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                 sizeof(stride)),
                g);
  }
}

// Every descriptor of the GEMM: host-only calls (no GPU needed).
void build_descriptors(const LtGemm& g, uint64_t workspace, Descriptors& d) {
  TORCH_CHECK(g.batch >= 1 && g.batch <= INT32_MAX, g.op, ": GEMM batch count ", g.batch, " out of range");
  VK_LT_CHECK(cublasLtMatmulDescCreate(&d.op, g.compute, CUDA_R_32F), g);
  set_desc(g, d.op, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(g.transa));
  set_desc(g, d.op, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(g.transb));
  if (g.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    set_desc(g, d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(g.epilogue));
  }
  if (g.bias != nullptr) {
    set_desc(g, d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
    // The bias (or its gradient) is one vector for the whole batch.
    if (g.batch > 1) set_desc(g, d.op, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, static_cast<int64_t>(0));
  }
  if (g.aux != nullptr) {
    set_desc(g, d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g.aux);
    set_desc(g, d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.ld_aux);
  }
  const bool na = g.transa == CUBLAS_OP_N, nb = g.transb == CUBLAS_OP_N;
  make_layout(g, &d.a, g.ab_type, na ? g.m : g.k, na ? g.k : g.m, g.lda, g.stride_a);
  make_layout(g, &d.b, g.ab_type, nb ? g.k : g.n, nb ? g.n : g.k, g.ldb, g.stride_b);
  make_layout(g, &d.d, g.cd_type, g.m, g.n, g.ldd, g.stride_d);
  if (g.c != nullptr) make_layout(g, &d.c, g.cd_type, g.m, g.n, g.ldc, g.stride_c);

  VK_LT_CHECK(cublasLtMatmulPreferenceCreate(&d.pref), g);
  VK_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                   sizeof(workspace)),
              g);
  if (g.ab_type != CUDA_R_32F) {
    // fp16 / bf16 accumulate in fp32: no split-K reduction in the output type.
    const uint32_t mask = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    VK_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask,
                                                     sizeof(mask)),
                g);
  }
  const int64_t ab = type_size(g.ab_type), cd = type_size(g.cd_type);
  const bool batched = g.batch > 1;
  const uint32_t align_a = alignment(g.a, batched ? g.stride_a * ab : 0);
  const uint32_t align_b = alignment(g.b, batched ? g.stride_b * ab : 0);
  const uint32_t align_d = alignment(g.d, batched ? g.stride_d * cd : 0);
  const uint32_t align_c = g.c != nullptr ? alignment(g.c, batched ? g.stride_c * cd : 0) : align_d;
  const std::array<std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t>, 4> aligns{{
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d},
  }};
  for (const auto& [attr, value] : aligns) {
    VK_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, attr, &value, sizeof(value)), g);
  }
}

// ---- algorithm cache ---------------------------------------------------------------------

using Key = std::array<int64_t, 30>;

struct KeyHash {
  size_t operator()(const Key& k) const noexcept {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the fields
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

struct CachedAlgo {
  bool found = false;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

std::mutex g_cache_mutex;
std::unordered_map<Key, CachedAlgo, KeyHash>& algo_cache() {
  static auto* cache = new std::unordered_map<Key, CachedAlgo, KeyHash>();  // never destroyed
  return *cache;
}

Key make_key(const LtGemm& g, int device, uint64_t workspace) {
  const int64_t ab = type_size(g.ab_type), cd = type_size(g.cd_type);
  const bool batched = g.batch > 1;
  return Key{device,
             static_cast<int64_t>(g.transa),
             static_cast<int64_t>(g.transb),
             g.m,
             g.n,
             g.k,
             g.batch,
             static_cast<int64_t>(g.ab_type),
             static_cast<int64_t>(g.cd_type),
             static_cast<int64_t>(g.compute),
             g.lda,
             g.ldb,
             g.c != nullptr ? g.ldc : -1,
             g.ldd,
             g.stride_a,
             g.stride_b,
             g.c != nullptr ? g.stride_c : -1,
             g.stride_d,
             static_cast<int64_t>(g.epilogue),
             g.bias != nullptr,
             g.aux != nullptr ? g.ld_aux : -1,
             alignment(g.a, batched ? g.stride_a * ab : 0),
             alignment(g.b, batched ? g.stride_b * ab : 0),
             g.c != nullptr ? alignment(g.c, batched ? g.stride_c * cd : 0) : 0,
             alignment(g.d, batched ? g.stride_d * cd : 0),
             g.bias != nullptr ? alignment(g.bias) : 0,
             g.aux != nullptr ? alignment(g.aux) : 0,
             static_cast<int64_t>(workspace),
             0,
             0};
}

// Workspace offered to the heuristics: VITKERN_CUBLASLT_WORKSPACE_MB, else 32 MiB on sm_90+ (as
// cuBLAS recommends for Hopper) and 4 MiB before. The matmul allocates only what its algorithm
// needs, from the caching allocator.
uint64_t workspace_limit(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, uint64_t> sizes;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = sizes.find(device);
  if (it != sizes.end()) return it->second;
  uint64_t bytes = 0;
  if (const char* env = std::getenv("VITKERN_CUBLASLT_WORKSPACE_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && mb >= 0 && mb <= 4096,
                "VITKERN_CUBLASLT_WORKSPACE_MB must be an integer in [0, 4096], got '", env, "'");
    bytes = static_cast<uint64_t>(mb) << 20;
  } else {
    const auto* props = at::cuda::getDeviceProperties(device);
    bytes = (props->major >= 9 ? 32ull : 4ull) << 20;
  }
  sizes.emplace(device, bytes);
  return bytes;
}

}  // namespace

const char* epilogue_name(cublasLtEpilogue_t e) {
  switch (e) {
    case CUBLASLT_EPILOGUE_DEFAULT: return "DEFAULT";
    case CUBLASLT_EPILOGUE_BIAS: return "BIAS";
    case CUBLASLT_EPILOGUE_GELU: return "GELU";
    case CUBLASLT_EPILOGUE_GELU_BIAS: return "GELU_BIAS";
    case CUBLASLT_EPILOGUE_GELU_AUX: return "GELU_AUX";
    case CUBLASLT_EPILOGUE_GELU_AUX_BIAS: return "GELU_AUX_BIAS";
    case CUBLASLT_EPILOGUE_DGELU: return "DGELU";
    case CUBLASLT_EPILOGUE_DGELU_BGRAD: return "DGELU_BGRAD";
    case CUBLASLT_EPILOGUE_BGRADA: return "BGRADA";
    case CUBLASLT_EPILOGUE_BGRADB: return "BGRADB";
    default: return "other";
  }
}

bool lt_matmul(const LtGemm& g, int device) {
  const bool fused = g.epilogue != CUBLASLT_EPILOGUE_DEFAULT || g.c != nullptr;
  if (fused && g_force_unfused.load()) {
    ++g_fallbacks;
    return false;
  }
  const uint64_t workspace = workspace_limit(device);
  Descriptors desc;
  build_descriptors(g, workspace, desc);
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();

  const Key key = make_key(g, device, workspace);
  CachedAlgo algo;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    auto it = algo_cache().find(key);
    if (it != algo_cache().end()) {
      algo = it->second;
      cached = true;
    }
  }
  if (!cached) {
    ++g_heuristic_queries;
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    algo.status = cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.c ? desc.c : desc.d, desc.d,
                                                 desc.pref, 1, &result, &returned);
    algo.found = algo.status == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (algo.found) {
      algo.algo = result.algo;
      algo.workspace = result.workspaceSize;
    }
    // A fused request (epilogue or C matrix) that cuBLASLt refuses for this layout falls back
    // to the unfused path; NOT_SUPPORTED, INVALID_VALUE (e.g. a batch-stride combination an
    // epilogue does not take) and "no result" all mean that here. A plain GEMM must succeed.
    const bool unsupported = algo.status == CUBLAS_STATUS_NOT_SUPPORTED ||
                             algo.status == CUBLAS_STATUS_INVALID_VALUE ||
                             (algo.status == CUBLAS_STATUS_SUCCESS && !algo.found);
    if (!algo.found && !(fused && unsupported)) {
      if (algo.status != CUBLAS_STATUS_SUCCESS) throw_status(algo.status, "cublasLtMatmulAlgoGetHeuristic", g);
      TORCH_CHECK(false, g.op, ": cuBLASLt's heuristics found no algorithm for the GEMM ", describe(g));
    }
    if (!algo.found) {
      std::lock_guard<std::mutex> lock(g_log_mutex);
      auto& log = fallback_log();
      log.push_back(std::string(g.op) + ": " + cublasLtGetStatusName(algo.status) + " for " + describe(g));
      if (log.size() > kFallbackLogSize) log.pop_front();
    }
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    algo_cache().emplace(key, algo);
  }
  if (!algo.found) {
    ++g_fallbacks;
    return false;
  }
  at::Tensor ws;
  void* ws_ptr = nullptr;
  if (algo.workspace > 0) {
    ws = at::empty({static_cast<int64_t>(algo.workspace)},
                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    ws_ptr = ws.data_ptr();
  }
  const float alpha = 1.0f;
  const float beta = g.c != nullptr ? 1.0f : 0.0f;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  VK_LT_CHECK(cublasLtMatmul(handle, desc.op, &alpha, g.a, desc.a, g.b, desc.b, &beta, g.c ? g.c : g.d,
                             g.c ? desc.c : desc.d, g.d, desc.d, &algo.algo, ws_ptr, algo.workspace, stream),
              g);
  if (fused) {
    ++g_fused_runs;
  } else {
    ++g_plain_runs;
  }
  return true;
}

std::map<std::string, int64_t> lt_stats() {
  std::map<std::string, int64_t> s;
  s["fused_matmuls"] = g_fused_runs.load();
  s["plain_matmuls"] = g_plain_runs.load();
  s["unfused_fallbacks"] = g_fallbacks.load();
  s["heuristic_queries"] = g_heuristic_queries.load();
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    s["cached_algorithms"] = static_cast<int64_t>(algo_cache().size());
  }
  s["force_unfused"] = g_force_unfused.load() ? 1 : 0;
  return s;
}

bool lt_set_force_unfused(bool value) { return g_force_unfused.exchange(value); }

std::vector<std::string> lt_fallback_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  return {fallback_log().begin(), fallback_log().end()};
}

void lt_clear_cache() {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  algo_cache().clear();
}

// ============================================================================== GEMM shapes

cudaDataType_t cuda_data_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: break;
  }
  TORCH_CHECK(false, "vitkern_cuda: unsupported dtype ", t);
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kDTypeF32;
    case at::kHalf: return kDTypeF16;
    case at::kBFloat16: return kDTypeBF16;
    default: break;
  }
  TORCH_CHECK(false, "vitkern_cuda: unsupported dtype ", t);
}

namespace {

// fp32 operands follow torch's matmul precision as the caller read it (see Tf32Scope).
thread_local bool t_allow_tf32 = false;

cublasComputeType_t compute_type(at::ScalarType ab) {
  if (ab == at::kFloat && t_allow_tf32) return CUBLAS_COMPUTE_32F_FAST_TF32;
  return CUBLAS_COMPUTE_32F;
}

}  // namespace

LtGemm gemm_forward_spec(const char* op, at::ScalarType ab, at::ScalarType cd, int64_t M, int64_t N, int64_t K,
                         const void* x, int64_t ld_x, const void* w, int64_t ld_w, void* y, int64_t ld_y) {
  LtGemm g;
  g.op = op;
  g.transa = CUBLAS_OP_T;
  g.transb = CUBLAS_OP_N;
  g.m = N;
  g.n = M;
  g.k = K;
  g.ab_type = cuda_data_type(ab);
  g.cd_type = cuda_data_type(cd);
  g.compute = compute_type(ab);
  g.a = w;
  g.lda = ld_w;
  g.b = x;
  g.ldb = ld_x;
  g.d = y;
  g.ldd = ld_y;
  return g;
}

LtGemm gemm_input_grad_spec(const char* op, at::ScalarType dtype, int64_t M, int64_t N, int64_t K, const void* dt,
                            int64_t ld_dt, const void* w, int64_t ld_w, void* dx, int64_t ld_dx) {
  LtGemm g;
  g.op = op;
  g.transa = CUBLAS_OP_N;
  g.transb = CUBLAS_OP_N;
  g.m = K;
  g.n = M;
  g.k = N;
  g.ab_type = g.cd_type = cuda_data_type(dtype);
  g.compute = compute_type(dtype);
  g.a = w;
  g.lda = ld_w;
  g.b = dt;
  g.ldb = ld_dt;
  g.d = dx;
  g.ldd = ld_dx;
  return g;
}

LtGemm gemm_weight_grad_spec(const char* op, at::ScalarType dtype, int64_t M, int64_t N, int64_t K, const void* dt,
                             int64_t ld_dt, const void* x, int64_t ld_x, void* dw, int64_t ld_dw) {
  LtGemm g;
  g.op = op;
  g.transa = CUBLAS_OP_N;
  g.transb = CUBLAS_OP_T;  // BGRADB needs op(B) = T
  g.m = K;
  g.n = N;
  g.k = M;
  g.ab_type = g.cd_type = cuda_data_type(dtype);
  g.compute = compute_type(dtype);
  g.a = x;
  g.lda = ld_x;
  g.b = dt;
  g.ldb = ld_dt;
  g.d = dw;
  g.ldd = ld_dw;
  return g;
}

Matrix as_matrix(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2, "as_matrix: expected a 2-D tensor, got ", t.sizes());
  const int64_t rows = t.size(0), cols = t.size(1);
  const int64_t min_ld = std::max<int64_t>(cols, 1);
  if ((t.stride(1) == 1 || cols <= 1) && (rows <= 1 || t.stride(0) >= min_ld)) {
    return {t, rows <= 1 ? min_ld : t.stride(0)};
  }
  return {t.contiguous(), min_ld};
}

// ============================================================================ building blocks

namespace {

constexpr int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

at::Tensor empty0(const at::TensorOptions& o) { return at::empty({0}, o); }

void check_cuda_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

void check_act(const char* op, int64_t act) {
  TORCH_CHECK(act == kActNone || act == kActGelu || act == kActGeluTanh, op,
              ": activation must be 0 (none), 1 (gelu, erf) or 2 (gelu_tanh), got ", act);
}

// A dense layer's input as the checks see it: x (M, K) of dtype T on `device`.
struct DenseInput {
  int64_t M, K;
  at::ScalarType T;
  at::Device device;
  const char* name;
};

DenseInput check_input(const char* op, const char* name, const at::Tensor& x) {
  check_cuda_float(op, name, x);
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (M, K), got shape ", x.sizes());
  return {x.size(0), x.size(1), x.scalar_type(), x.device(), name};
}

void check_device(const char* op, const char* name, const at::Tensor& t, const DenseInput& in) {
  TORCH_CHECK(t.device() == in.device, op, ": ", name, " is on ", t.device(), " but ", in.name, " is on ", in.device);
}

// The dense layer's other arguments: weight (N, K), bias (N,), residual (M, N) in the compute
// dtype or fp32, residual_scale (N,), row_scale (M,) in fp32 or the compute dtype. In the
// backward ops the gradient takes the residual's place (r_name).
void check_dense_args(const char* op, const DenseInput& in, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& row_scale,
                      const char* w_name = "weight", const char* b_name = "bias", const char* r_name = "residual") {
  const auto T = in.T;
  const int64_t M = in.M, K = in.K;
  check_cuda_float(op, w_name, weight);
  check_device(op, w_name, weight, in);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, op, ": ", w_name, " must have shape (N, ", K, ") (K = ",
              in.name, ".shape[1]), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == T, op, ": ", w_name, " has dtype ", weight.scalar_type(), " but ", in.name,
              " has ", T);
  const int64_t N = weight.size(0);
  if (bias) {
    check_cuda_float(op, b_name, *bias);
    check_device(op, b_name, *bias, in);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": ", b_name, " must have shape (", N, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == T, op, ": ", b_name, " has dtype ", bias->scalar_type(), " but ", in.name,
                " has ", T);
  }
  if (residual) {
    check_cuda_float(op, r_name, *residual);
    check_device(op, r_name, *residual, in);
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N, op, ": ", r_name,
                " must have shape (", M, ", ", N, "), got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == T || residual->scalar_type() == at::kFloat, op, ": ", r_name,
                " must have the compute dtype (", T, ") or float32, got ", residual->scalar_type());
  }
  if (gamma) {
    TORCH_CHECK(residual.has_value(), op, ": residual_scale needs residual");
    check_cuda_float(op, "residual_scale", *gamma);
    check_device(op, "residual_scale", *gamma, in);
    TORCH_CHECK(gamma->dim() == 1 && gamma->size(0) == N, op, ": residual_scale must have shape (", N, "), got ",
                gamma->sizes());
    TORCH_CHECK(gamma->scalar_type() == T, op, ": residual_scale has dtype ", gamma->scalar_type(), " but ", in.name,
                " has ", T);
  }
  if (row_scale) {
    TORCH_CHECK(residual.has_value(), op, ": row_scale needs residual");
    check_cuda_float(op, "row_scale", *row_scale);
    check_device(op, "row_scale", *row_scale, in);
    TORCH_CHECK(row_scale->dim() == 1 && row_scale->size(0) == M, op, ": row_scale must have shape (", M,
                "), got ", row_scale->sizes());
    TORCH_CHECK(row_scale->scalar_type() == T || row_scale->scalar_type() == at::kFloat, op,
                ": row_scale must have dtype float32 or the compute dtype (", T, "), got ",
                row_scale->scalar_type());
  }
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  if (!t) return std::nullopt;
  return t->contiguous();
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// The forward dense layer (see the top of the file). Returns (out, pre).
std::tuple<at::Tensor, at::Tensor> dense_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias_in, int64_t act,
                                                 const std::optional<at::Tensor>& residual,
                                                 const std::optional<at::Tensor>& gamma_in,
                                                 const std::optional<at::Tensor>& rs_in, bool save_pre) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto T = x.scalar_type();
  const auto O = residual ? residual->scalar_type() : T;
  const int device = x.get_device();
  at::Tensor out = at::empty({M, N}, x.options().dtype(O));
  const int64_t pre_ld = round_up8(N);
  at::Tensor pre = save_pre ? at::empty({M, pre_ld}, x.options()) : empty0(x.options());
  // Defined padding columns (nothing reads them, but they are part of an op output).
  if (save_pre && pre_ld != N && M > 0) pre.narrow(1, N, pre_ld - N).zero_();
  if (M == 0 || N == 0) return {out, pre};

  const auto bias = contiguous_opt(bias_in);
  const auto gamma = contiguous_opt(gamma_in);
  const auto rs = contiguous_opt(rs_in);
  const void* bias_ptr = bias ? bias->const_data_ptr() : nullptr;
  Matrix xm{x, 1}, wm{weight, 1};
  if (K > 0) {
    xm = as_matrix(x);
    wm = as_matrix(weight);
  }

  // (1) residual through cuBLASLt's C matrix (C and D share one layout).
  if (residual && act == kActNone && !gamma && !rs && !save_pre && O == T && K > 0) {
    Matrix r = as_matrix(*residual);
    if (r.ld != N) r = {residual->contiguous(), N};
    LtGemm g = gemm_forward_spec(op, T, T, M, N, K, xm.t.const_data_ptr(), xm.ld, wm.t.const_data_ptr(), wm.ld,
                                 out.mutable_data_ptr(), N);
    g.c = r.t.const_data_ptr();
    g.ldc = N;
    if (bias_ptr) {
      g.epilogue = CUBLASLT_EPILOGUE_BIAS;
      g.bias = bias_ptr;
    }
    if (lt_matmul(g, device)) return {out, pre};
  }

  // (2) one GEMM: bias and the tanh GELU in the epilogue, the pre-activation saved as its aux.
  if (!residual && act != kActGelu && K > 0 && !(save_pre && act == kActNone)) {
    LtGemm g = gemm_forward_spec(op, T, T, M, N, K, xm.t.const_data_ptr(), xm.ld, wm.t.const_data_ptr(), wm.ld,
                                 out.mutable_data_ptr(), N);
    g.bias = bias_ptr;
    if (act == kActNone) {
      g.epilogue = bias_ptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    } else if (save_pre) {
      g.epilogue = bias_ptr ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      g.aux = pre.mutable_data_ptr();
      g.ld_aux = pre_ld;
    } else {
      g.epilogue = bias_ptr ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    }
    if (lt_matmul(g, device)) return {out, pre};
  }

  // (3) GEMM (+ bias) into t, then the elementwise epilogue pass.
  at::Tensor t;
  int64_t ld_t = N;
  if (save_pre) {
    t = pre;
    ld_t = pre_ld;
  } else if (O == T) {
    t = out;
  } else {
    t = at::empty({M, N}, x.options());
  }
  bool bias_done = false;
  if (K == 0) {
    t.zero_();
  } else {
    LtGemm g = gemm_forward_spec(op, T, T, M, N, K, xm.t.const_data_ptr(), xm.ld, wm.t.const_data_ptr(), wm.ld,
                                 t.mutable_data_ptr(), ld_t);
    if (bias_ptr) {
      g.epilogue = CUBLASLT_EPILOGUE_BIAS;
      g.bias = bias_ptr;
      bias_done = lt_matmul(g, device);
    }
    if (!bias_done) {
      g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
      g.bias = nullptr;
      lt_matmul(g, device);
    }
  }
  DenseFwdEpilogue e;
  e.rows = M;
  e.cols = N;
  e.dtype = dtype_code(T);
  e.out_dtype = dtype_code(O);
  e.act = static_cast<int>(act);
  e.t = t.const_data_ptr();
  e.ld_t = ld_t;
  e.bias = bias_done ? nullptr : bias_ptr;
  e.gamma = gamma ? gamma->const_data_ptr() : nullptr;
  e.row_scale = rs ? rs->const_data_ptr() : nullptr;
  e.row_scale_dtype = rs ? dtype_code(rs->scalar_type()) : kDTypeF32;
  Matrix r{at::Tensor(), 0};
  if (residual) {
    r = as_matrix(*residual);
    e.residual = r.t.const_data_ptr();
    e.ld_residual = r.ld;
  }
  // pre aliases t when it is saved: rewrite it only when the bias is added here.
  e.pre = (save_pre && e.bias != nullptr) ? pre.mutable_data_ptr() : nullptr;
  e.ld_pre = pre_ld;
  e.out = out.mutable_data_ptr();
  e.ld_out = N;
  const bool in_place_identity = e.bias == nullptr && act == kActNone && !residual && t.is_same(out);
  if (!in_place_identity) {
    C10_CUDA_CHECK(launch_dense_fwd_epilogue(e, current_stream(x)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, pre};
}

void check_pre(const char* op, const at::Tensor& pre, int64_t M, int64_t N, const at::Tensor& x, const char* what) {
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == M && pre.size(1) >= N && pre.stride(1) == 1 &&
                  (M <= 1 || pre.stride(0) >= pre.size(1)),
              op, ": ", what, " must be the (", M, ", >= ", N,
              ") buffer that the forward op saved (call the forward with save_pre=True), got shape ", pre.sizes());
  TORCH_CHECK(pre.scalar_type() == x.scalar_type() && pre.device() == x.device(), op, ": ", what,
              " must have x's dtype and device");
}

// The branch's gradients from the upstream gradient of out = residual + row_scale * gamma * act(pre):
//   dt     = grad * row_scale * gamma * act'(pre)  (the compute dtype; grad itself when there is
//            nothing to apply), when need_dt;
//   dscale = sum_m grad * row_scale * z,  drs = sum_n grad * gamma * z,  z = act(pre)  (pre: the
//            branch before its scales), when asked for;
// all in one pass over grad and pre (launch_dense_bwd_epilogue), whose blocks write fp32 partial
// sums that are added here over the blocks (a few MB; deterministic). The gradients not asked
// for are empty tensors with `opts` (x's dtype, as the fakes make them).
struct BranchGrads {
  at::Tensor dt, dscale, drs;
};

BranchGrads branch_grads(const at::Tensor& grad, const at::Tensor* pre, int64_t act,
                         const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& rs,
                         at::ScalarType T, bool need_dt, bool need_dscale, bool need_drs,
                         const at::TensorOptions& opts) {
  BranchGrads out{at::Tensor(), empty0(opts), empty0(opts)};
  const bool scale = need_dscale || need_drs;
  if (!scale && act == kActNone && !gamma && !rs) {
    if (need_dt) out.dt = grad.scalar_type() == T ? grad : grad.to(T);
    return out;
  }
  const int64_t M = grad.size(0), N = grad.size(1);
  if (need_dt) out.dt = at::empty({M, N}, grad.options().dtype(T));
  if (M == 0 || N == 0) {
    if (need_dscale) out.dscale = at::zeros({N}, opts.dtype(gamma->scalar_type()));
    if (need_drs) out.drs = at::zeros({M}, opts.dtype(rs->scalar_type()));
    return out;
  }
  if (!need_dt && !scale) return out;
  const auto g = contiguous_opt(gamma);
  const auto r = contiguous_opt(rs);
  DenseBwdEpilogue e;
  e.rows = M;
  e.cols = N;
  e.dtype = dtype_code(T);
  e.grad_dtype = dtype_code(grad.scalar_type());
  e.act = static_cast<int>(act);
  e.grad = grad.const_data_ptr();
  e.grad_stride_row = grad.stride(0);
  e.grad_stride_col = grad.stride(1);
  if (act != kActNone || scale) {
    e.pre = pre->const_data_ptr();
    e.ld_pre = M <= 1 ? pre->size(1) : pre->stride(0);
  }
  e.gamma = g ? g->const_data_ptr() : nullptr;
  e.row_scale = r ? r->const_data_ptr() : nullptr;
  e.row_scale_dtype = r ? dtype_code(r->scalar_type()) : kDTypeF32;
  if (need_dt) {
    e.dt = out.dt.mutable_data_ptr();
    e.ld_dt = N;
  }
  at::Tensor dscale_part, drs_part;
  if (scale) {
    const EpilogueBlock b = dense_bwd_epilogue_block(e, true);
    const auto f32 = opts.dtype(at::kFloat);
    if (need_dscale) {
      dscale_part = at::empty({b.gy, N}, f32);
      e.dgamma_partial = dscale_part.mutable_data_ptr<float>();
    }
    if (need_drs) {
      drs_part = at::empty({b.gx, M}, f32);
      e.drow_scale_partial = drs_part.mutable_data_ptr<float>();
    }
  }
  C10_CUDA_CHECK(launch_dense_bwd_epilogue(e, current_stream(grad)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (need_dscale) out.dscale = dscale_part.sum(0).to(gamma->scalar_type());
  if (need_drs) out.drs = drs_part.sum(0).to(rs->scalar_type());
  return out;
}

}  // namespace

at::Tensor dense_input_grad(const char* op, const at::Tensor& dt, const at::Tensor& weight) {
  const int64_t M = dt.size(0), N = dt.size(1), K = weight.size(1);
  at::Tensor dx = at::empty({M, K}, dt.options());
  if (M == 0 || K == 0) return dx;
  if (N == 0) return dx.zero_();
  const Matrix d = as_matrix(dt), w = as_matrix(weight);
  LtGemm g = gemm_input_grad_spec(op, dt.scalar_type(), M, N, K, d.t.const_data_ptr(), d.ld, w.t.const_data_ptr(),
                                  w.ld, dx.mutable_data_ptr(), K);
  lt_matmul(g, dt.get_device());
  return dx;
}

std::tuple<at::Tensor, at::Tensor> dense_weight_grad(const char* op, const at::Tensor& dt, const at::Tensor& x,
                                                     bool need_dw, bool need_db) {
  const int64_t M = dt.size(0), N = dt.size(1), K = x.size(1);
  const auto T = dt.scalar_type();
  at::Tensor dw = need_dw ? at::empty({N, K}, dt.options()) : empty0(dt.options());
  at::Tensor db = need_db ? at::empty({N}, dt.options()) : empty0(dt.options());
  bool db_done = !need_db || N == 0;
  if (need_dw && N > 0 && K > 0) {
    if (M == 0) {
      dw.zero_();
    } else {
      const Matrix d = as_matrix(dt), xm = as_matrix(x);
      LtGemm g = gemm_weight_grad_spec(op, T, M, N, K, d.t.const_data_ptr(), d.ld, xm.t.const_data_ptr(), xm.ld,
                                       dw.mutable_data_ptr(), K);
      bool ran = false;
      if (!db_done) {
        g.epilogue = CUBLASLT_EPILOGUE_BGRADB;
        g.bias = db.mutable_data_ptr();
        ran = db_done = lt_matmul(g, dt.get_device());
      }
      if (!ran) {
        g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        g.bias = nullptr;
        lt_matmul(g, dt.get_device());
      }
    }
  }
  if (!db_done) db.copy_(dt.to(at::kFloat).sum(0));
  return {dw, db};
}

// ==================================================================================== the ops

Tf32Scope::Tf32Scope(bool allow) : previous_(t_allow_tf32) { t_allow_tf32 = allow; }
Tf32Scope::~Tf32Scope() { t_allow_tf32 = previous_; }

std::tuple<at::Tensor, at::Tensor> fused_dense_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, int64_t activation,
                                                        const std::optional<at::Tensor>& residual,
                                                        const std::optional<at::Tensor>& residual_scale,
                                                        const std::optional<at::Tensor>& row_scale, bool save_pre,
                                                        bool allow_tf32) {
  constexpr const char* op = "vitkern_cuda::fused_dense_fwd";
  const Tf32Scope tf32(allow_tf32);
  check_act(op, activation);
  check_dense_args(op, check_input(op, "x", x), weight, bias, residual, residual_scale, row_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  return dense_forward(op, x, weight, bias, activation, residual, residual_scale, row_scale, save_pre);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_dense_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& residual_scale, const std::optional<at::Tensor>& row_scale,
    const at::Tensor& pre, int64_t activation, bool need_dx, bool need_dweight, bool need_dbias, bool need_dscale,
    bool need_drow_scale, bool allow_tf32) {
  constexpr const char* op = "vitkern_cuda::fused_dense_bwd";
  const Tf32Scope tf32(allow_tf32);
  check_act(op, activation);
  // grad stands in for the residual: (M, N), the compute dtype or fp32.
  check_dense_args(op, check_input(op, "x", x), weight, std::nullopt, grad, residual_scale, row_scale, "weight",
                   "bias", "grad");
  TORCH_CHECK(!need_dscale || residual_scale, op, ": need_dscale without residual_scale");
  TORCH_CHECK(!need_drow_scale || row_scale, op, ": need_drow_scale without row_scale");
  const int64_t M = x.size(0), N = weight.size(0);
  const auto T = x.scalar_type();
  const c10::cuda::CUDAGuard guard(x.device());
  const bool need_branch = need_dx || need_dweight || need_dbias;
  if ((need_branch && activation != kActNone) || need_dscale || need_drow_scale) {
    check_pre(op, pre, M, N, x, "pre");
  }
  const auto opts = x.options();
  auto [dt, dscale, drs] = branch_grads(grad, &pre, activation, residual_scale, row_scale, T, need_branch, need_dscale,
                                        need_drow_scale, opts);
  at::Tensor dx = need_dx ? dense_input_grad(op, dt, weight) : empty0(opts);
  at::Tensor dw = empty0(opts), db = empty0(opts);
  if (need_dweight || need_dbias) std::tie(dw, db) = dense_weight_grad(op, dt, x, need_dweight, need_dbias);
  return {dx, dw, db, dscale, drs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_fwd_cuda(
    const at::Tensor& x, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, int64_t activation,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
    const std::optional<at::Tensor>& row_scale, bool save_pre, bool save_branch, bool allow_tf32) {
  constexpr const char* op = "vitkern_cuda::mlp_fwd";
  const Tf32Scope tf32(allow_tf32);
  check_act(op, activation);
  const DenseInput in = check_input(op, "x", x);
  check_dense_args(op, in, fc1_weight, fc1_bias, std::nullopt, std::nullopt, std::nullopt, "fc1_weight", "fc1_bias");
  const DenseInput hidden{in.M, fc1_weight.size(0), in.T, in.device, "h (fc1's output)"};
  check_dense_args(op, hidden, fc2_weight, fc2_bias, residual, residual_scale, row_scale, "fc2_weight", "fc2_bias");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [h, pre] = dense_forward(op, x, fc1_weight, fc1_bias, activation, std::nullopt, std::nullopt, std::nullopt,
                                save_pre && activation != kActNone);
  auto [out, branch] = dense_forward(op, h, fc2_weight, fc2_bias, kActNone, residual, residual_scale, row_scale,
                                     save_branch);
  return {out, pre, h, branch};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& residual_scale, const std::optional<at::Tensor>& row_scale,
    const at::Tensor& pre, const at::Tensor& h, const at::Tensor& branch, int64_t activation, bool need_dx,
    bool need_dfc1_weight, bool need_dfc1_bias, bool need_dfc2_weight, bool need_dfc2_bias, bool need_dscale,
    bool need_drow_scale, bool allow_tf32) {
  constexpr const char* op = "vitkern_cuda::mlp_bwd";
  const Tf32Scope tf32(allow_tf32);
  check_act(op, activation);
  const DenseInput in = check_input(op, "x", x);
  check_dense_args(op, in, fc1_weight, std::nullopt, std::nullopt, std::nullopt, std::nullopt, "fc1_weight");
  const int64_t M = x.size(0), H = fc1_weight.size(0);
  const auto T = x.scalar_type();
  TORCH_CHECK(h.dim() == 2 && h.size(0) == M && h.size(1) == H && h.scalar_type() == T && h.device() == x.device(),
              op, ": h must be the (", M, ", ", H, ") hidden activations that mlp_fwd returned, got ", h.sizes());
  check_dense_args(op, check_input(op, "h", h), fc2_weight, std::nullopt, grad, residual_scale, row_scale,
                   "fc2_weight", "fc2_bias", "grad");
  TORCH_CHECK(!need_dscale || residual_scale, op, ": need_dscale without residual_scale");
  TORCH_CHECK(!need_drow_scale || row_scale, op, ": need_drow_scale without row_scale");
  const int64_t N = fc2_weight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options();
  const bool need_dp = need_dx || need_dfc1_weight || need_dfc1_bias;
  if (need_dp && activation != kActNone) check_pre(op, pre, M, H, x, "pre");
  if (need_dscale || need_drow_scale) check_pre(op, branch, M, N, x, "branch");

  const bool need_dt2 = need_dp || need_dfc2_weight || need_dfc2_bias;
  // fc2 has no activation: z is the saved branch itself.
  auto [dt2, dscale, drs] = branch_grads(grad, &branch, kActNone, residual_scale, row_scale, T, need_dt2, need_dscale,
                                         need_drow_scale, opts);
  at::Tensor dw2 = empty0(opts), db2 = empty0(opts);
  if (need_dfc2_weight || need_dfc2_bias) {
    std::tie(dw2, db2) = dense_weight_grad(op, dt2, h, need_dfc2_weight, need_dfc2_bias);
  }

  at::Tensor dx = empty0(opts), dw1 = empty0(opts), db1 = empty0(opts);
  if (need_dp) {
    at::Tensor dp = at::empty({M, H}, opts);
    bool db1_done = false;
    if (M > 0 && H > 0) {
      if (N == 0) {
        dp.zero_();
      } else {
        const Matrix d2 = as_matrix(dt2), w2 = as_matrix(fc2_weight);
        LtGemm g = gemm_input_grad_spec(op, T, M, N, H, d2.t.const_data_ptr(), d2.ld, w2.t.const_data_ptr(), w2.ld,
                                        dp.mutable_data_ptr(), H);
        bool fused = false;
        const int64_t ld_pre = activation == kActNone ? 0 : (M <= 1 ? pre.size(1) : pre.stride(0));
        if (activation == kActGeluTanh && ld_pre % 8 == 0) {
          // cuBLASLt's DGELU is the derivative of the tanh GELU: dP = (dT2 W2) * gelu_tanh'(pre),
          // and DGELU_BGRAD also sums dP's columns into db1.
          g.aux = const_cast<void*>(pre.const_data_ptr());
          g.ld_aux = ld_pre;
          if (need_dfc1_bias) {
            db1 = at::empty({H}, opts);
            g.epilogue = CUBLASLT_EPILOGUE_DGELU_BGRAD;
            g.bias = db1.mutable_data_ptr();
          } else {
            g.epilogue = CUBLASLT_EPILOGUE_DGELU;
          }
          fused = lt_matmul(g, x.get_device());
          db1_done = fused && need_dfc1_bias;
        }
        if (!fused) {
          g.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
          g.bias = nullptr;
          g.aux = nullptr;
          g.ld_aux = 0;
          lt_matmul(g, x.get_device());
          if (activation != kActNone) {
            // dP *= act'(pre), in place (each element read, then written, by one thread).
            DenseBwdEpilogue e;
            e.rows = M;
            e.cols = H;
            e.dtype = e.grad_dtype = dtype_code(T);
            e.act = static_cast<int>(activation);
            e.grad = dp.const_data_ptr();
            e.grad_stride_row = H;
            e.grad_stride_col = 1;
            e.pre = pre.const_data_ptr();
            e.ld_pre = ld_pre;
            e.dt = dp.mutable_data_ptr();
            e.ld_dt = H;
            C10_CUDA_CHECK(launch_dense_bwd_epilogue(e, current_stream(x)));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      }
    }
    if (need_dx) dx = dense_input_grad(op, dp, fc1_weight);
    if (need_dfc1_weight || (need_dfc1_bias && !db1_done)) {
      at::Tensor db1b;
      std::tie(dw1, db1b) = dense_weight_grad(op, dp, x, need_dfc1_weight, need_dfc1_bias && !db1_done);
      if (need_dfc1_bias && !db1_done) db1 = db1b;
    }
  }
  return {dx, dw1, db1, dw2, db2, dscale, drs};
}

// ============================================================================ test hooks

namespace {

at::ScalarType parse_dtype(const std::string& s) {
  if (s == "float32") return at::kFloat;
  if (s == "float16") return at::kHalf;
  if (s == "bfloat16") return at::kBFloat16;
  TORCH_CHECK(false, "_cublaslt_describe: dtype must be float32, float16 or bfloat16, got '", s, "'");
}

cublasLtEpilogue_t parse_epilogue(const std::string& s) {
  for (auto e : {CUBLASLT_EPILOGUE_DEFAULT, CUBLASLT_EPILOGUE_BIAS, CUBLASLT_EPILOGUE_GELU, CUBLASLT_EPILOGUE_GELU_BIAS,
                 CUBLASLT_EPILOGUE_GELU_AUX, CUBLASLT_EPILOGUE_GELU_AUX_BIAS, CUBLASLT_EPILOGUE_DGELU,
                 CUBLASLT_EPILOGUE_DGELU_BGRAD, CUBLASLT_EPILOGUE_BGRADA, CUBLASLT_EPILOGUE_BGRADB}) {
    if (s == epilogue_name(e)) return e;
  }
  TORCH_CHECK(false, "_cublaslt_describe: unknown epilogue '", s, "'");
}

template <typename V>
int64_t get_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const LtGemm& g) {
  V v{};
  size_t written = 0;
  VK_LT_CHECK(cublasLtMatmulDescGetAttribute(d, attr, &v, sizeof(v), &written), g);
  return static_cast<int64_t>(v);
}

template <typename V>
int64_t get_layout(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr, const LtGemm& g) {
  V v{};
  size_t written = 0;
  VK_LT_CHECK(cublasLtMatrixLayoutGetAttribute(l, attr, &v, sizeof(v), &written), g);
  return static_cast<int64_t>(v);
}

template <typename V>
int64_t get_pref(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr, const LtGemm& g) {
  V v{};
  size_t written = 0;
  VK_LT_CHECK(cublasLtMatmulPreferenceGetAttribute(p, attr, &v, sizeof(v), &written), g);
  return static_cast<int64_t>(v);
}

}  // namespace

std::map<std::string, int64_t> lt_describe(const std::string& kind, const std::string& dtype, int64_t M, int64_t N,
                                           int64_t K, const std::string& epilogue, bool query_heuristic,
                                           std::string* heuristic_status) {
  const auto T = parse_dtype(dtype);
  // Placeholder device addresses (never dereferenced), 256-byte aligned and far apart.
  auto fake = [](int i) { return reinterpret_cast<void*>(static_cast<uintptr_t>(i) << 32); };
  const char* op = "vitkern_cuda::_cublaslt_describe";
  LtGemm g;
  if (kind == "forward") {
    g = gemm_forward_spec(op, T, T, M, N, K, fake(1), K, fake(2), K, fake(3), N);
  } else if (kind == "input_grad") {
    g = gemm_input_grad_spec(op, T, M, N, K, fake(1), N, fake(2), K, fake(3), K);
  } else if (kind == "weight_grad") {
    g = gemm_weight_grad_spec(op, T, M, N, K, fake(1), N, fake(2), K, fake(3), K);
  } else {
    TORCH_CHECK(false, "_cublaslt_describe: kind must be forward, input_grad or weight_grad, got '", kind, "'");
  }
  g.epilogue = parse_epilogue(epilogue);
  const bool has_bias = g.epilogue == CUBLASLT_EPILOGUE_BIAS || g.epilogue == CUBLASLT_EPILOGUE_GELU_BIAS ||
                        g.epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS || g.epilogue == CUBLASLT_EPILOGUE_DGELU_BGRAD ||
                        g.epilogue == CUBLASLT_EPILOGUE_BGRADA || g.epilogue == CUBLASLT_EPILOGUE_BGRADB;
  const bool has_aux = g.epilogue == CUBLASLT_EPILOGUE_GELU_AUX || g.epilogue == CUBLASLT_EPILOGUE_GELU_AUX_BIAS ||
                       g.epilogue == CUBLASLT_EPILOGUE_DGELU || g.epilogue == CUBLASLT_EPILOGUE_DGELU_BGRAD;
  if (has_bias) g.bias = fake(4);
  if (has_aux) {
    g.aux = fake(5);
    g.ld_aux = round_up8(g.m);
  }
  const uint64_t workspace = 4ull << 20;
  Descriptors d;
  build_descriptors(g, workspace, d);
  std::map<std::string, int64_t> r;
  r["m"] = g.m;
  r["n"] = g.n;
  r["k"] = g.k;
  r["epilogue"] = get_desc<uint32_t>(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, g);
  r["transa"] = get_desc<int32_t>(d.op, CUBLASLT_MATMUL_DESC_TRANSA, g);
  r["transb"] = get_desc<int32_t>(d.op, CUBLASLT_MATMUL_DESC_TRANSB, g);
  r["compute_type"] = get_desc<int32_t>(d.op, CUBLASLT_MATMUL_DESC_COMPUTE_TYPE, g);
  r["scale_type"] = get_desc<int32_t>(d.op, CUBLASLT_MATMUL_DESC_SCALE_TYPE, g);
  r["bias_pointer"] = get_desc<uintptr_t>(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g);
  r["aux_pointer"] = get_desc<uintptr_t>(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, g);
  r["aux_ld"] = get_desc<int64_t>(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g);
  r["bias_data_type"] = get_desc<int32_t>(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, g);
  const std::array<std::pair<const char*, cublasLtMatrixLayout_t>, 3> layouts{{{"a", d.a}, {"b", d.b}, {"d", d.d}}};
  for (const auto& [name, l] : layouts) {
    const std::string p(name);
    r[p + "_type"] = get_layout<int32_t>(l, CUBLASLT_MATRIX_LAYOUT_TYPE, g);
    r[p + "_rows"] = get_layout<uint64_t>(l, CUBLASLT_MATRIX_LAYOUT_ROWS, g);
    r[p + "_cols"] = get_layout<uint64_t>(l, CUBLASLT_MATRIX_LAYOUT_COLS, g);
    r[p + "_ld"] = get_layout<int64_t>(l, CUBLASLT_MATRIX_LAYOUT_LD, g);
  }
  r["pref_max_workspace"] = get_pref<uint64_t>(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, g);
  r["pref_reduction_mask"] = get_pref<uint32_t>(d.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, g);
  r["pref_min_alignment_a"] = get_pref<uint32_t>(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, g);
  r["pref_min_alignment_d"] = get_pref<uint32_t>(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, g);

  if (heuristic_status != nullptr) *heuristic_status = "";
  if (query_heuristic && heuristic_status != nullptr) {
    cublasLtHandle_t handle = nullptr;
    const cublasStatus_t created = cublasLtCreate(&handle);
    if (created != CUBLAS_STATUS_SUCCESS) {
      *heuristic_status = std::string("cublasLtCreate: ") + cublasLtGetStatusName(created);
    } else {
      cublasLtMatmulHeuristicResult_t result{};
      int returned = 0;
      const cublasStatus_t st =
          cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.d, d.d, d.pref, 1, &result, &returned);
      *heuristic_status = cublasLtGetStatusName(st);
      r["heuristic_results"] = returned;
      cublasLtDestroy(handle);
    }
  }
  return r;
}

}  // namespace vitkern
