"""Patch embedding: patchify + GEMM + bias + position embedding, prefix tokens written in place.

Public functions (re-exported from ``vitkern``):

- ``patch_embed(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None)``: the ViT stem
  ``(B, C, H, W) -> (B, K + N, D)``: timm's ``PatchEmbed`` (a stride-P conv) followed by
  ``VisionTransformer._pos_embed`` (class / register tokens and the absolute position embedding).
- ``resample_pos_embed(pos_embed, new_size, ...)``: interpolate an absolute position embedding to a
  new patch grid (``timm.layers.resample_abs_pos_embed`` semantics, plain torch).
- ``resample_patch_embed(weight, new_size, ...)``: resample a patch-embedding kernel to another
  patch size (FlexiViT; ``timm.layers.resample_patch_embed`` semantics, plain torch).

Backends are registered at the bottom of this module. Implementations of op ``"patch_embed"`` are
called as ``impl(images, weight, bias, pos_embed=..., prefix_tokens=...)`` after the public
function's checks and autocast casts.

The Triton backend is built on the GEMM core of :mod:`vitkern.ops.gemm` (its tiles, configs,
pipelining and fp32 epilogue) through its hooks. One forward launch writes the whole
(B, K + N, D) buffer: the patch GEMM with an implicit im2col, the bias and pos_embed in its
epilogue, the prefix rows in its prologue. Backward: the weight gradient and the image gradient
are GEMMs of the same core (a transposed im2col, and a col2im scatter), the bias, pos_embed and
prefix-token gradients column sums of dY. The package, one file per layer:

- ``reference``: ``patch_embed_ref``, the "reference" backend.
- ``native``: ``patch_embed_torch``, the "torch" backend as timm runs it (conv2d, flatten +
  transpose, cat, add), the PyTorch-native fast path "auto" measures the kernel against.
- ``pos_embed``: ``resample_pos_embed``, ``resample_patch_embed`` (reference only: no kernel, no
  backend).
- ``kernels``: the device functions plugged into the GEMM core, and the column-sum kernel.
- ``configs``: the GEMM config overrides and the rule that picks each GEMM's config.
- ``layout``: the pixel order (images, weight and weight gradient).
- ``launch``: the launchers ``_patch_embed_fwd`` / ``_patch_embed_bwd``.
- ``op``: the registered ops ``vitkern::patch_embed_fwd`` / ``vitkern::patch_embed_bwd``, their
  autograd, and the Triton backend.
- ``compile_cases``: the launches the static compile check (``vitkern.testing.compile_check``) runs.
- this module: the public function (argument checks, autocast, backend dispatch).

Cost (forward, elements of e bytes; N patches, T = K + N tokens, D width, P x P patches):
2 * B * N * D * C * P * P FLOPs; HBM bytes (images B * C * H * W + weight D * C * P * P + T * D
pos_embed + B * T * D tokens) * e, each read or written once (the pixels are re-read from L2 by
the D / BLOCK_N column tiles of a row block). At ViT-B/16, 224 px, batch 128, bf16: 29.6 GFLOP and
77 MB, compute-bound on an H100 (37 us at 800 TFLOP/s vs 26 us at 3 TB/s). timm runs the conv,
then flatten + transpose, cat and add as separate passes over the token buffer.
Backward: dW is the same GEMM size (reads images and dY), dX another (reads dY and W, writes
pixels), plus one pass over dY for the column sums.
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import (
    autocast_dtype,
    cast_floating,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
    contiguous_vectors,
)
from vitkern.ops.patch_embed import cuda as _cuda
from vitkern.ops.patch_embed.native import patch_embed_torch
from vitkern.ops.patch_embed.op import _patch_embed_triton, _patch_embed_triton_supports
from vitkern.ops.patch_embed.pos_embed import resample_patch_embed, resample_pos_embed
from vitkern.ops.patch_embed.reference import patch_embed_ref

__all__ = ["patch_embed", "patch_embed_ref", "resample_pos_embed", "resample_patch_embed"]


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ViT patch embedding with the prefix tokens and the position embedding fused in.

    ``tokens[:, K:] = patches(images) @ weight.flatten(1).T + bias (+ pos_embed)`` in row-major
    patch order, and ``tokens[:, :K] = prefix_tokens (+ pos_embed[:, :K])``. Equals timm's
    ``PatchEmbed`` followed by ``VisionTransformer._pos_embed``.

    Args:
        images: ``(B, C, H, W)`` float32 / float16 / bfloat16, contiguous or channels_last; H and
            W multiples of the patch size.
        weight: ``(D, C, Ph, Pw)`` (``nn.Conv2d`` layout); the patch size is read from it.
        bias: optional ``(D,)``.
        pos_embed: optional ``(1, N, D)`` for the ``N = (H / Ph) * (W / Pw)`` patch tokens only
            (timm ``no_embed_class=True``: prefix tokens get none), or ``(1, K + N, D)`` for all
            tokens (timm's default).
        prefix_tokens: optional ``(1, K, D)``: class and register tokens, written first and
            expanded over the batch.

    Returns:
        ``(B, K + N, D)`` tokens. Their dtype is the compute dtype, promoted by ``pos_embed``'s
        and ``prefix_tokens``' dtypes: those additive terms may be float32 with fp16/bf16 images
        (timm keeps them as float32 parameters, so under autocast its tokens are float32 too).

    Autocast: images, weight and bias are cast to the autocast dtype; ``pos_embed`` and
    ``prefix_tokens`` keep theirs (the compute dtype or float32). Outside autocast images, weight
    and bias must share one dtype.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mismatched dtype.
        ValueError: image size not divisible by the patch size, channel mismatch, a ``pos_embed``
            of a length other than ``N`` or ``K + N``, wrong shapes of ``bias`` / ``prefix_tokens``,
            tensors on different devices (each message names the argument).
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    batch, channels, height, width = images.shape
    dim, w_channels, ph, pw = weight.shape
    if w_channels != channels:
        raise ValueError(
            f"images has {channels} channels but weight expects {w_channels} (weight is (D, C, Ph, Pw) = "
            f"{tuple(weight.shape)})"
        )
    if ph == 0 or pw == 0 or height % ph != 0 or width % pw != 0:
        raise ValueError(
            f"images height {height} and width {width} must be multiples of the patch size ({ph}, {pw}) "
            f"(weight's last two dims)"
        )
    n = (height // ph) * (width // pw)
    check_optional_tensor("bias", bias, shape=(dim,))
    k = 0
    if prefix_tokens is not None:
        check_tensor("prefix_tokens", prefix_tokens, ndim=3)
        if prefix_tokens.shape[0] != 1 or prefix_tokens.shape[2] != dim:
            raise ValueError(
                f"prefix_tokens must have shape (1, K, {dim}) (class / register tokens, D = weight.shape[0]), "
                f"got {tuple(prefix_tokens.shape)}"
            )
        k = prefix_tokens.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        if pos_embed.shape[0] != 1 or pos_embed.shape[2] != dim:
            raise ValueError(
                f"pos_embed must have shape (1, L, {dim}) (D = weight.shape[0]), got {tuple(pos_embed.shape)}"
            )
        length = pos_embed.shape[1]
        if length not in (n, k + n):
            accepted = f"{n} (patch tokens only)"
            if k:
                accepted += f" or {k + n} ({k} prefix + {n} patch tokens)"
            raise ValueError(
                f"pos_embed has length {length} but must have length {accepted} for {height}x{width} images "
                f"and patch size ({ph}, {pw}); resample it with vitkern.resample_pos_embed"
            )
    device = check_same_device(
        images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens
    )
    ac = autocast_dtype(device)
    if ac is not None:
        images, weight, bias = cast_floating(ac, images, weight, bias)
    else:
        check_same_dtype(images=images, weight=weight, bias=bias)
    compute = images.dtype
    for name, t in (("pos_embed", pos_embed), ("prefix_tokens", prefix_tokens)):
        if t is not None and t.dtype not in (compute, torch.float32):
            raise TypeError(
                f"{name} must have the compute dtype ({str(compute).replace('torch.', '')}) or float32, "
                f"got {str(t.dtype).replace('torch.', '')}"
            )
    (bias,) = contiguous_vectors(bias)  # every backend reads it as contiguous
    kwargs = dict(pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    impl = select_impl("patch_embed", device, images, weight, bias, **kwargs)
    return impl(images, weight, bias, **kwargs)


register_impl("patch_embed", "reference", patch_embed_ref)
register_impl("patch_embed", "torch", patch_embed_torch)
register_impl("patch_embed", "triton", _patch_embed_triton, supports=_patch_embed_triton_supports)
register_impl("patch_embed", "cuda", _cuda.patch_embed_cuda, _cuda._patch_embed_supports)
