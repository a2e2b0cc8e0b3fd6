// Host entry points of the vitkern_cuda:: ops (registered in bindings.cpp). Schemas, in the order
// of the arguments below, are in bindings.cpp; fake implementations and autograd live in Python
// (vitkern/_extension.py, vitkern/ops/cuda_backend.py).
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace vitkern {

// vitkern_cuda::patchify(Tensor images, int patch_size) -> Tensor  (patchify_op.cpp)
at::Tensor patchify_cuda(const at::Tensor& images, int64_t patch_size);

// vitkern_cuda::fused_dense_fwd -> (out, pre)  (fused_dense.cpp)
std::tuple<at::Tensor, at::Tensor> fused_dense_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, int64_t activation,
                                                        const std::optional<at::Tensor>& residual,
                                                        const std::optional<at::Tensor>& residual_scale,
                                                        const std::optional<at::Tensor>& row_scale, bool save_pre,
                                                        bool allow_tf32);

// vitkern_cuda::fused_dense_bwd -> (dx, dweight, dbias, dscale, drow_scale)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_dense_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& residual_scale, const std::optional<at::Tensor>& row_scale,
    const at::Tensor& pre, int64_t activation, bool need_dx, bool need_dweight, bool need_dbias, bool need_dscale,
    bool need_drow_scale, bool allow_tf32);

// vitkern_cuda::mlp_fwd -> (out, pre, h, branch)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_fwd_cuda(
    const at::Tensor& x, const at::Tensor& fc1_weight, const std::optional<at::Tensor>& fc1_bias,
    const at::Tensor& fc2_weight, const std::optional<at::Tensor>& fc2_bias, int64_t activation,
    const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& residual_scale,
    const std::optional<at::Tensor>& row_scale, bool save_pre, bool save_branch, bool allow_tf32);

// vitkern_cuda::mlp_bwd -> (dx, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dscale, drow_scale)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& fc1_weight, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& residual_scale, const std::optional<at::Tensor>& row_scale,
    const at::Tensor& pre, const at::Tensor& h, const at::Tensor& branch, int64_t activation, bool need_dx,
    bool need_dfc1_weight, bool need_dfc1_bias, bool need_dfc2_weight, bool need_dfc2_bias, bool need_dscale,
    bool need_drow_scale, bool allow_tf32);

// vitkern_cuda::patch_embed_fwd -> tokens (B, K + N, D)  (patch_embed.cpp)
at::Tensor patch_embed_fwd_cuda(const at::Tensor& images, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed,
                                const std::optional<at::Tensor>& prefix_tokens, bool allow_tf32);

// vitkern_cuda::patch_embed_bwd -> (dimages, dweight, dbias)
std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd_cuda(const at::Tensor& grad, const at::Tensor& images,
                                                                    const at::Tensor& weight,
                                                                    int64_t num_prefix_tokens, bool need_dimages,
                                                                    bool need_dweight, bool need_dbias, bool allow_tf32);

// The (B * N, C * Ph * Pw) patch matrix of NCHW-contiguous or channels_last images (other layouts
// are copied to NCHW first), on the current stream; with row_elems > C * Ph * Pw a (B * N,
// row_elems) matrix whose columns past C * Ph * Pw are zero.  (patchify_op.cpp)
at::Tensor patch_matrix(const char* op, const at::Tensor& images, int64_t patch_h, int64_t patch_w,
                        int64_t row_elems = 0);

}  // namespace vitkern
