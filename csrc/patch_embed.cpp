// vitkern_cuda::patch_embed_fwd / patch_embed_bwd: the ViT stem on cuBLASLt (host code only).
//
// Forward, images (B, C, H, W) -> tokens (B, K + N, D):
//   1. patchify (patchify.cu, NCHW or channels_last) into the (B * N, K') patch matrix, K' the
//      C * Ph * Pw pixels rounded up to 16 bytes (padded_patch_k: 588 -> 592 in bf16), the
//      padding columns zero in it and in the weight, so every row of both GEMM operands is 16-byte
//      aligned (rows of 1176 bytes would restrict cuBLASLt to kernels for 8-byte alignment);
//   2. one strided-batched GEMM (batch b = image b) writing straight into the token buffer at row
//      offset K of each image (D's batch stride (K + N) * D), with the bias in the BIAS epilogue
//      and the position embedding of the patch tokens as the C matrix with batch stride 0
//      (beta = 1); a plain 2-D GEMM over all B * N rows when there is neither a prefix nor a
//      position embedding;
//   3. the class / register tokens (+ their position embedding) written by a small kernel
//      (dense_epilogue.cu: launch_token_rows).
//   Where cuBLASLt cannot broadcast C or add the bias for this layout, the GEMM runs plain and the
//   token-row kernel adds both afterwards.
// Backward: dW = Gp^T P (+ db through BGRADB) with Gp the patch rows of the token gradient and P
//   the recomputed (padded) patch matrix, a (D, K') result returned as the view of its first
//   C * Ph * Pw columns (the layout vitkern/ops/patch_embed/layout.py's _cuda_dw gives the fake);
//   dImages = scatter(Gp W') with the padded weight (an ATen permute-copy, rarely needed).
//   The gradients of pos_embed and prefix_tokens are batch sums, taken in Python.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "dense_epilogue.h"
#include "fused_dense.h"
#include "ops.h"
#include "patchify.h"

namespace vitkern {
namespace {

void check_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& images) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == images.device(), op, ": ", name, " is on ", t.device(), " but images is on ",
              images.device());
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

struct PatchGeometry {
  int64_t B, C, H, W, D, Ph, Pw, N, K;
};

PatchGeometry check_patch_embed(const char* op, const at::Tensor& images, const at::Tensor& weight) {
  TORCH_CHECK(images.dim() == 4, op, ": images must be 4-D (B, C, H, W), got shape ", images.sizes());
  check_float(op, "images", images, images);
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (D, C, Ph, Pw), got shape ", weight.sizes());
  check_float(op, "weight", weight, images);
  TORCH_CHECK(weight.scalar_type() == images.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but images has ", images.scalar_type());
  PatchGeometry g{images.size(0), images.size(1), images.size(2), images.size(3), weight.size(0),
                  weight.size(2), weight.size(3), 0, 0};
  TORCH_CHECK(weight.size(1) == g.C, op, ": images has ", g.C, " channels but weight expects ", weight.size(1));
  TORCH_CHECK(g.Ph > 0 && g.Pw > 0 && g.H % g.Ph == 0 && g.W % g.Pw == 0, op, ": images height ", g.H, " and width ",
              g.W, " must be multiples of the patch size (", g.Ph, ", ", g.Pw, ")");
  g.N = (g.H / g.Ph) * (g.W / g.Pw);
  return g;
}

// The weight as the (D, K') GEMM operand: its C * Ph * Pw columns in (c, py, px) order, then
// K' - C * Ph * Pw zero columns (a copy of D x K' elements when padded).
Matrix padded_weight(const at::Tensor& weight, int64_t padded_k) {
  const int64_t D = weight.size(0), K = weight.size(1) * weight.size(2) * weight.size(3);
  const at::Tensor w = weight.reshape({D, K});
  if (padded_k == K) return as_matrix(w);
  return {at::constant_pad_nd(w, {0, padded_k - K}, 0), padded_k};
}

}  // namespace

at::Tensor patch_embed_fwd_cuda(const at::Tensor& images, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed,
                                const std::optional<at::Tensor>& prefix_tokens, bool allow_tf32) {
  constexpr const char* op = "vitkern_cuda::patch_embed_fwd";
  const Tf32Scope tf32(allow_tf32);
  PatchGeometry g = check_patch_embed(op, images, weight);
  const auto T = images.scalar_type();
  auto O = T;
  if (bias) {
    check_float(op, "bias", *bias, images);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.D, op, ": bias must have shape (", g.D, "), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == T, op, ": bias has dtype ", bias->scalar_type(), " but images has ", T);
  }
  if (prefix_tokens) {
    check_float(op, "prefix_tokens", *prefix_tokens, images);
    TORCH_CHECK(prefix_tokens->dim() == 3 && prefix_tokens->size(0) == 1 && prefix_tokens->size(2) == g.D, op,
                ": prefix_tokens must have shape (1, K, ", g.D, "), got ", prefix_tokens->sizes());
    TORCH_CHECK(prefix_tokens->scalar_type() == T || prefix_tokens->scalar_type() == at::kFloat, op,
                ": prefix_tokens must have the compute dtype (", T, ") or float32, got ",
                prefix_tokens->scalar_type());
    g.K = prefix_tokens->size(1);
    O = at::promote_types(O, prefix_tokens->scalar_type());
  }
  int64_t L = 0;
  if (pos_embed) {
    check_float(op, "pos_embed", *pos_embed, images);
    TORCH_CHECK(pos_embed->dim() == 3 && pos_embed->size(0) == 1 && pos_embed->size(2) == g.D, op,
                ": pos_embed must have shape (1, L, ", g.D, "), got ", pos_embed->sizes());
    L = pos_embed->size(1);
    TORCH_CHECK(L == g.N || L == g.K + g.N, op, ": pos_embed has length ", L, " but must have length ", g.N,
                " (patch tokens only) or ", g.K + g.N, " (prefix + patch tokens)");
    TORCH_CHECK(pos_embed->scalar_type() == T || pos_embed->scalar_type() == at::kFloat, op,
                ": pos_embed must have the compute dtype (", T, ") or float32, got ", pos_embed->scalar_type());
    O = at::promote_types(O, pos_embed->scalar_type());
  }
  const int64_t B = g.B, D = g.D, N = g.N, K = g.K, CPP = g.C * g.Ph * g.Pw;
  at::Tensor out = at::empty({B, K + N, D}, images.options().dtype(O));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(images.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(images.device().index()).stream();
  const int device = images.get_device();
  const int64_t osize = static_cast<int64_t>(out.element_size());
  // pos_embed in the output dtype (cuBLASLt's C has D's type): a copy only under mixed dtypes.
  const at::Tensor pos = pos_embed ? pos_embed->to(O).contiguous() : at::Tensor();
  const int64_t pos_patch_row0 = (pos_embed && L == K + N) ? K : 0;

  if (N > 0) {
    char* patch_rows = static_cast<char*>(out.mutable_data_ptr()) + K * D * osize;
    if (CPP == 0) {
      out.narrow(1, K, N).zero_();
    } else {
      const int64_t Kp = padded_patch_k(CPP, images.element_size());
      const at::Tensor P = patch_matrix(op, images, g.Ph, g.Pw, Kp);
      const Matrix w = padded_weight(weight, Kp);
      const bool flat = (K == 0 && !pos_embed) || B == 1;
      LtGemm gm = gemm_forward_spec(op, T, O, flat ? B * N : N, D, Kp, P.const_data_ptr(), Kp,
                                    w.t.const_data_ptr(), w.ld, patch_rows, D);
      if (!flat) {
        gm.batch = B;
        gm.stride_a = 0;       // the weight, shared
        gm.stride_b = N * Kp;  // image b's patches
        gm.stride_d = (K + N) * D;
      }
      const at::Tensor bias_o = bias ? bias->to(O).contiguous() : at::Tensor();
      if (bias) {
        gm.epilogue = CUBLASLT_EPILOGUE_BIAS;
        gm.bias = bias_o.const_data_ptr();
      }
      if (pos_embed) {
        gm.c = static_cast<const char*>(pos.const_data_ptr()) + pos_patch_row0 * D * osize;
        gm.ldc = D;
        gm.stride_c = 0;  // one position embedding for every image
      }
      const bool fused = (bias || pos_embed) && lt_matmul(gm, device);
      if (!fused) {
        gm.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        gm.bias = nullptr;
        gm.c = nullptr;
        lt_matmul(gm, device);
        if (bias || pos_embed) {
          TokenRows t;
          t.out = out.mutable_data_ptr();
          t.out_dtype = dtype_code(O);
          t.batch = B;
          t.batch_stride = (K + N) * D;
          t.row0 = K;
          t.rows = N;
          t.dim = D;
          if (pos_embed) {
            t.src_b = pos.const_data_ptr();
            t.b_dtype = dtype_code(O);
            t.b_row0 = pos_patch_row0;
          }
          if (bias) {
            t.vec = bias_o.const_data_ptr();
            t.vec_dtype = dtype_code(O);
          }
          t.accumulate = true;
          C10_CUDA_CHECK(launch_token_rows(t, stream));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    }
  }
  if (K > 0) {
    const at::Tensor prefix = prefix_tokens->contiguous();
    TokenRows t;
    t.out = out.mutable_data_ptr();
    t.out_dtype = dtype_code(O);
    t.batch = B;
    t.batch_stride = (K + N) * D;
    t.row0 = 0;
    t.rows = K;
    t.dim = D;
    t.src_a = prefix.const_data_ptr();
    t.a_dtype = dtype_code(prefix.scalar_type());
    if (pos_embed && L == K + N) {
      t.src_b = pos.const_data_ptr();
      t.b_dtype = dtype_code(O);
    }
    C10_CUDA_CHECK(launch_token_rows(t, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd_cuda(const at::Tensor& grad, const at::Tensor& images,
                                                                    const at::Tensor& weight,
                                                                    int64_t num_prefix_tokens, bool need_dimages,
                                                                    bool need_dweight, bool need_dbias, bool allow_tf32) {
  constexpr const char* op = "vitkern_cuda::patch_embed_bwd";
  const Tf32Scope tf32(allow_tf32);
  PatchGeometry g = check_patch_embed(op, images, weight);
  g.K = num_prefix_tokens;
  const int64_t B = g.B, D = g.D, N = g.N, K = g.K, CPP = g.C * g.Ph * g.Pw;
  TORCH_CHECK(K >= 0, op, ": num_prefix_tokens must be >= 0, got ", K);
  check_float(op, "grad", grad, images);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == K + N && grad.size(2) == D, op,
              ": grad must have shape (", B, ", ", K + N, ", ", D, ") (the tokens' shape), got ", grad.sizes());
  const auto T = images.scalar_type();
  const c10::cuda::CUDAGuard guard(images.device());
  const auto opts = images.options();
  at::Tensor dimages = at::empty({0}, opts), dweight = at::empty({0}, opts), dbias = at::empty({0}, opts);
  // The patch rows of the gradient as one (B * N, D) matrix in the compute dtype (a copy when
  // there are prefix rows between the images, or under mixed dtypes).
  at::Tensor gp = grad.narrow(1, K, N);
  if (gp.scalar_type() != T) gp = gp.to(T);
  gp = gp.reshape({B * N, D});
  const int64_t Kp = padded_patch_k(CPP, images.element_size());
  if (need_dweight || need_dbias) {
    if (need_dweight) {
      const at::Tensor P = CPP > 0 ? patch_matrix(op, images, g.Ph, g.Pw, Kp) : at::empty({B * N, 0}, opts);
      at::Tensor dw2;  // (D, Kp); its padding columns (zero for a finite gradient) are not returned
      std::tie(dw2, dbias) = dense_weight_grad(op, gp, P, true, need_dbias);
      dweight = dw2.narrow(1, 0, CPP).view({D, g.C, g.Ph, g.Pw});
    } else {
      dbias = gp.to(at::kFloat).sum(0).to(T);
    }
  }
  if (need_dimages) {
    const auto fmt = (!images.is_contiguous() && images.is_contiguous(at::MemoryFormat::ChannelsLast))
                         ? at::MemoryFormat::ChannelsLast
                         : at::MemoryFormat::Contiguous;
    dimages = at::empty({B, g.C, g.H, g.W}, opts.memory_format(fmt));
    if (dimages.numel() > 0) {
      const Matrix w = padded_weight(weight, Kp);
      const at::Tensor dp = dense_input_grad(op, gp, w.t);  // (B * N, Kp)
      const int64_t Hp = g.H / g.Ph, Wp = g.W / g.Pw;
      const at::Tensor src = dp.narrow(1, 0, CPP).view({B, Hp, Wp, g.C, g.Ph, g.Pw});
      if (fmt == at::MemoryFormat::Contiguous) {
        dimages.view({B, g.C, Hp, g.Ph, Wp, g.Pw}).copy_(src.permute({0, 3, 1, 4, 2, 5}));
      } else {
        dimages.permute({0, 2, 3, 1}).view({B, Hp, g.Ph, Wp, g.Pw, g.C}).copy_(src.permute({0, 1, 4, 2, 5, 3}));
      }
    }
  }
  return {dimages, dweight, dbias};
}

}  // namespace vitkern
