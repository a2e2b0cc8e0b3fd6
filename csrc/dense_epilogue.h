// The small elementwise kernels of the cuBLASLt backend (dense_epilogue.cu): what cuBLASLt's
// epilogues cannot express. Plain C++ interface (no torch types), so the .cu file compiles
// without the ATen headers; fused_dense.cpp and patch_embed.cpp fill these structs.
//
// Every launcher enqueues on `stream` and returns cudaErrorInvalidValue for an unsupported
// dtype / activation combination, else cudaSuccess without reading the launch status, which the
// caller checks (C10_CUDA_KERNEL_LAUNCH_CHECK). Matrices are row-major with a leading dimension
// (elements between rows) and unit column stride unless a column stride is given.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace vitkern {

// Element types of the kernels' operands.
enum DTypeCode : int { kDTypeF32 = 0, kDTypeF16 = 1, kDTypeBF16 = 2 };

// Activation ids; the op schemas carry the same integers (vitkern/ops/cuda_backend.py).
enum ActCode : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2 };

// Launch shape of the elementwise passes over a (rows, nvec) grid of column vectors: gx x gy
// blocks of bx * by threads, flattened: thread t of a block takes the row t / bx and the column
// vector t % bx, so a warp may span rows and a width that is not a multiple of 32 vectors wastes
// no lanes beyond the block's last warp. Each block covers bx column vectors and strides over the
// rows by gy * by. Chosen from the width (epilogue_block), host-only.
struct EpilogueBlock {
  int bx = 1, by = 1;     // column vectors and rows per block
  int64_t gx = 1, gy = 1;  // blocks along the columns and the rows
};

// The block shape with the largest share of useful lanes (nvec * rows covered per pass over the
// launched blocks' warps), at most 256 threads a block; ties go to fewer column blocks (longer
// contiguous runs of a row per warp), then to more threads a block. gy is capped at
// max_row_blocks (65535, the grid's y limit, or fewer where each row block writes a partial sum). E.g. bf16 N = 2304 (288 vectors of 8): 3 x 96 vectors,
// 2 rows a block, every lane busy, where a fixed 256-wide block left 44% of its lanes idle.
EpilogueBlock epilogue_block(int64_t nvec, int64_t rows, int64_t max_row_blocks);

// Forward epilogue, one pass over an (M, N) GEMM result `t` (compute dtype):
//   v    = round_to_compute(t + bias)        (bias only when not already added by cuBLASLt)
//   pre  = v                                  (optional; may alias t)
//   z    = act(v)                             (exact erf GELU, or the tanh form)
//   out  = residual + row_scale[m] * gamma[n] * z   with a residual (out in the residual's dtype)
//   out  = z                                        without (out in the compute dtype; may alias t)
// Math in fp32 with one rounding on each store.
struct DenseFwdEpilogue {
  int64_t rows = 0, cols = 0;  // M, N
  int dtype = kDTypeF32;       // compute dtype: t, bias, gamma, pre
  int out_dtype = kDTypeF32;   // out and residual: the compute dtype or fp32
  int act = kActNone;
  const void* t = nullptr;
  int64_t ld_t = 0;
  const void* bias = nullptr;       // (N,) or null
  const void* gamma = nullptr;      // (N,) or null; needs residual
  const void* row_scale = nullptr;  // (M,) or null; needs residual
  int row_scale_dtype = kDTypeF32;  // fp32 or the compute dtype
  const void* residual = nullptr;
  int64_t ld_residual = 0;
  void* pre = nullptr;
  int64_t ld_pre = 0;
  void* out = nullptr;
  int64_t ld_out = 0;
};
cudaError_t launch_dense_fwd_epilogue(const DenseFwdEpilogue& e, cudaStream_t stream);

// Backward epilogue: dt = grad * row_scale[m] * gamma[n] * act'(pre)  (each factor optional),
// written in the compute dtype; `grad` has any strides (expanded gradients have stride 0) and the
// compute dtype or fp32. dt may alias grad when both have the compute dtype and the same layout.
// In the same pass, when their buffers are set, the partial sums of the LayerScale and row-scale
// gradients with z = act(pre) (pre: the branch before its scales; z = pre without activation):
//   dgamma_partial[j, n]     = sum of grad * row_scale[m] * z over the rows m of row block j
//   drow_scale_partial[i, m] = sum of grad * gamma[n] * z over the columns n of column block i
// fp32, (gy, N) and (gx, M) for the shape dense_bwd_epilogue_block returns; the caller sums them
// over the blocks. The partition depends only on the shape and the alignment, so the sums are the
// same on every run. dt may be null when only the partial sums are wanted.
struct DenseBwdEpilogue {
  int64_t rows = 0, cols = 0;
  int dtype = kDTypeF32;       // compute dtype: pre, gamma, dt
  int grad_dtype = kDTypeF32;  // the compute dtype or fp32
  int act = kActNone;
  const void* grad = nullptr;
  int64_t grad_stride_row = 0, grad_stride_col = 1;
  const void* pre = nullptr;  // needed when act != kActNone
  int64_t ld_pre = 0;
  const void* gamma = nullptr;
  const void* row_scale = nullptr;
  int row_scale_dtype = kDTypeF32;
  void* dt = nullptr;
  int64_t ld_dt = 0;
  float* dgamma_partial = nullptr;
  float* drow_scale_partial = nullptr;
};
cudaError_t launch_dense_bwd_epilogue(const DenseBwdEpilogue& e, cudaStream_t stream);

// Token rows of the patch-embedding output (B, T, D): for every batch b and row r in
// [row0, row0 + rows):
//   out[b, r, :] = (accumulate ? out[b, r, :] : 0) + src_a[r - row0 + a_row0, :] + src_b[...] + vec
// each source optional, math in fp32, one rounding on store. Used for the class / register tokens
// (prefix + their position embedding) and, when cuBLASLt cannot broadcast the position
// embedding through its C matrix, to add it (and the bias) to the patch rows.
struct TokenRows {
  void* out = nullptr;
  int out_dtype = kDTypeF32;
  int64_t batch = 0, batch_stride = 0;  // elements between batches of out
  int64_t row0 = 0, rows = 0, dim = 0;
  const void* src_a = nullptr;  // rows of `dim` contiguous elements
  int a_dtype = kDTypeF32;
  int64_t a_row0 = 0;
  const void* src_b = nullptr;
  int b_dtype = kDTypeF32;
  int64_t b_row0 = 0;
  const void* vec = nullptr;  // (dim,) added to every row
  int vec_dtype = kDTypeF32;
  bool accumulate = false;
};
cudaError_t launch_token_rows(const TokenRows& t, cudaStream_t stream);

// The token-row pass's plan, host-only: the elements per access (8, 4, 2 or 1: the widest for
// which every operand's pointer and row starts are aligned to min(16, width * element size)
// bytes; a row's dim % width tail is then written by scalar accesses), whether its row and
// column indices fit 32 bits (32, else 64), and its block shape over the rows' slots.
int token_rows_vector(const TokenRows& t);
int token_rows_index_bits(const TokenRows& t);
EpilogueBlock token_rows_block(const TokenRows& t);

// With partial sums the backward pass launches at most this many blocks (gx * gy, gy >= 1), so
// the (gy, N) partials stay small (a few MB) while about 8 blocks per SM fill an H100.
constexpr int64_t kScaleGradBlocks = 1024;

// The launch shape of launch_dense_bwd_epilogue for these pointers and sizes, with or without the
// partial sums (whose shapes come from it: allocate them, then set their pointers). Host-only.
EpilogueBlock dense_bwd_epilogue_block(const DenseBwdEpilogue& e, bool partial_sums);

// Elements per thread the forward / backward epilogue would use (16-byte vectors when every
// pointer, leading dimension and N allow it, else 1). Host-only.
int dense_fwd_epilogue_vector(const DenseFwdEpilogue& e);
int dense_bwd_epilogue_vector(const DenseBwdEpilogue& e);

}  // namespace vitkern
