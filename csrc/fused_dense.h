// cuBLASLt GEMMs with epilogues, and the dense-layer building blocks shared by the fused dense,
// MLP and patch-embedding ops (implemented in fused_dense.cpp).
//
// Row-major PyTorch matrices map onto cuBLASLt's column-major GEMM D = op(A) op(B) (+ C) as
//   Y[M, N]  = X[M, K] W[N, K]^T   ->  D (N x M) = A^T B,  A = W (K x N, ld_w), B = X (K x M, ld_x)
//   dX[M, K] = dT[M, N] W[N, K]    ->  D (K x M) = A B,    A = W (K x N, ld_w), B = dT (N x M)
//   dW[N, K] = dT^T X              ->  D (K x N) = A B^T,  A = X (K x M, ld_x), B = dT (N x M)
// so a bias / bias gradient indexed by output feature is a vector over D's rows (forward) or
// columns (BGRADB in the weight gradient), as cuBLASLt's epilogues expect.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <cublasLt.h>
#include <library_types.h>

namespace vitkern {

// fp32 GEMMs built on this thread use TF32 (CUBLAS_COMPUTE_32F_FAST_TF32) while a Tf32Scope(true)
// lives. Each op takes torch's matmul precision as an argument (`allow_tf32`), read in Python from
// torch.backends.cuda.matmul.fp32_precision: the C++ accessor for it changed form across torch
// versions, so one source builds against torch 2.9 through 2.14. The ops run on the calling
// thread, which makes a thread-local scope exact.
class Tf32Scope {
 public:
  explicit Tf32Scope(bool allow);
  ~Tf32Scope();
  Tf32Scope(const Tf32Scope&) = delete;
  Tf32Scope& operator=(const Tf32Scope&) = delete;

 private:
  bool previous_;
};

// One cuBLASLt matmul: D = op(A) op(B) + (C ? C : 0) with an epilogue, fp32 accumulation.
struct LtGemm {
  const char* op = "vitkern_cuda";  // the calling op, for error messages
  cublasOperation_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;  // D is m x n (column-major)
  int64_t batch = 1;
  cudaDataType_t ab_type = CUDA_R_32F;  // A and B
  cudaDataType_t cd_type = CUDA_R_32F;  // C and D (and the bias / bias gradient vector)
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  const void* c = nullptr;  // beta = 1 when set (its own layout), else beta = 0
  int64_t ldc = 0, stride_c = 0;
  void* d = nullptr;
  int64_t ldd = 0, stride_d = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // bias (read) or bias gradient (written), of cd_type
  void* aux = nullptr;         // GELU_AUX* output / DGELU* input, of cd_type
  int64_t ld_aux = 0;          // a multiple of 8, >= m
};

// Runs the GEMM on the current stream of `device` with torch's cuBLASLt handle and a workspace
// from the caching allocator. The algorithm comes from cuBLASLt's heuristics, cached per device,
// dtypes, shape, layout, alignment and epilogue. Returns false, having run nothing, when
// cuBLASLt has no algorithm for a non-default epilogue or a C matrix (CUBLAS_STATUS_NOT_SUPPORTED,
// CUBLAS_STATUS_INVALID_VALUE or no result; logged, see lt_fallback_log), so that the caller runs
// the unfused equivalent; every other failure throws a c10::Error naming the call, the cuBLAS
// status and the GEMM.
bool lt_matmul(const LtGemm& g, int device);

// The GEMM mapping of Y[M, N] = X[M, K] W[N, K]^T into D (ld_y) (see the top of this file).
LtGemm gemm_forward_spec(const char* op, at::ScalarType ab, at::ScalarType cd, int64_t M, int64_t N, int64_t K,
                         const void* x, int64_t ld_x, const void* w, int64_t ld_w, void* y, int64_t ld_y);
// dX[M, K] = dT[M, N] W[N, K].
LtGemm gemm_input_grad_spec(const char* op, at::ScalarType dtype, int64_t M, int64_t N, int64_t K, const void* dt,
                            int64_t ld_dt, const void* w, int64_t ld_w, void* dx, int64_t ld_dx);
// dW[N, K] = dT[M, N]^T X[M, K]  (BGRADB puts the column sums of dT, i.e. db, in `bias`).
LtGemm gemm_weight_grad_spec(const char* op, at::ScalarType dtype, int64_t M, int64_t N, int64_t K, const void* dt,
                             int64_t ld_dt, const void* x, int64_t ld_x, void* dw, int64_t ld_dw);

// A 2-D tensor as a GEMM operand: unit column stride and its leading dimension (a copy only when
// the layout is not usable).
struct Matrix {
  at::Tensor t;
  int64_t ld;
};
Matrix as_matrix(const at::Tensor& t);

// dX = dT W (M x K), in dT's dtype.
at::Tensor dense_input_grad(const char* op, const at::Tensor& dt, const at::Tensor& weight);
// (dW or an empty tensor, db or an empty tensor) from dT (M x N) and X (M x K); db through the
// BGRADB epilogue of the dW GEMM (or a reduction when there is no dW GEMM).
std::tuple<at::Tensor, at::Tensor> dense_weight_grad(const char* op, const at::Tensor& dt, const at::Tensor& x,
                                                     bool need_dw, bool need_db);

cudaDataType_t cuda_data_type(at::ScalarType t);
int dtype_code(at::ScalarType t);  // DTypeCode of dense_epilogue.h
const char* epilogue_name(cublasLtEpilogue_t e);

// ---- debugging and tests (exposed as vitkern._C._cublaslt_*) ----------------------------------

// Build the descriptors of one of the backend's GEMMs (kind "forward", "input_grad" or
// "weight_grad"; dtype "float32" / "float16" / "bfloat16"; epilogue by name, e.g.
// "GELU_AUX_BIAS") with placeholder 256-byte-aligned pointers, read every attribute back and
// return them. Host-only: needs no GPU. When `query_heuristic` is set it also asks cuBLASLt's
// heuristics for an algorithm (needs a GPU) with a handle of its own, and returns the status name
// in `heuristic_status` (or the reason it could not ask).
std::map<std::string, int64_t> lt_describe(const std::string& kind, const std::string& dtype, int64_t M, int64_t N,
                                           int64_t K, const std::string& epilogue, bool query_heuristic,
                                           std::string* heuristic_status);
// Counters: fused / plain matmuls run, fallbacks to the unfused path, heuristic queries and the
// size of the algorithm cache.
std::map<std::string, int64_t> lt_stats();
// Treat every non-default epilogue and C matrix as unsupported (so the unfused paths run); returns
// the previous setting. For the tests of the fallback paths.
bool lt_set_force_unfused(bool value);
void lt_clear_cache();
// "op: status for GEMM" of the most recent GEMMs (up to 32) that fell back to the unfused path
// because cuBLASLt had no algorithm (each distinct GEMM once: the verdict is cached).
std::vector<std::string> lt_fallback_log();

}  // namespace vitkern
