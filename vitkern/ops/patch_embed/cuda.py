"""The "cuda" backend of ``patch_embed``: ``vitkern_cuda::patch_embed_fwd`` / ``patch_embed_bwd`` of
the C++/CUDA extension (schemas and fakes in :mod:`vitkern._extension`, kernels in ``csrc/``).

Forward: patchify (NCHW or channels_last) + one strided-batched GEMM straight into the
``(B, K + N, D)`` token buffer at row offset K, bias in the epilogue and the patch tokens' position
embedding as the C matrix with batch stride 0; class / register tokens written by a small kernel.
The GEMMs' K (pixels a patch) is padded to 16 bytes with zero columns (588 -> 592 in bf16), and the
weight gradient is returned as a view without them (:func:`vitkern.ops.patch_embed.layout._cuda_dw`).
Backward: ``patch_embed_bwd`` for the image / weight / bias gradients, batch sums here for
``pos_embed`` and ``prefix_tokens``. See :mod:`vitkern.ops.cuda_backend` for the numerics.

The implementation is registered by the package (``vitkern.ops.patch_embed``) whether or not the
extension is built; the autograd formula once the extension loads (:func:`vitkern._extension._on_load`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from vitkern import _extension
from vitkern._extension import allow_tf32
from vitkern.ops._autograd import register_autograd
from vitkern.ops.cuda_backend import tensor_reason

__all__ = ["patch_embed_cuda"]


def _patch_embed_supports(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None):
    return tensor_reason(images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)


def patch_embed_cuda(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The "cuda" backend of :func:`vitkern.patch_embed` (``vitkern_cuda::patch_embed_fwd``)."""
    return torch.ops.vitkern_cuda.patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens, allow_tf32())


# --------------------------------------------------------------------------------------------
# Autograd (the backward is another registered op, so torch.compile sees opaque kernels)
# --------------------------------------------------------------------------------------------


class _PatchEmbedState(NamedTuple):
    allow_tf32: bool  # backward GEMMs at the forward's precision
    num_prefix: int
    prefix_dtype: Optional[torch.dtype]
    pos_len: int
    pos_dtype: Optional[torch.dtype]


def _patch_embed_save(inputs, outputs):
    images, weight, _bias, pos_embed, prefix_tokens, tf32 = inputs
    state = _PatchEmbedState(
        tf32,
        prefix_tokens.shape[1] if prefix_tokens is not None else 0,
        prefix_tokens.dtype if prefix_tokens is not None else None,
        pos_embed.shape[1] if pos_embed is not None else 0,
        pos_embed.dtype if pos_embed is not None else None,
    )
    return (images, weight), state


def _patch_embed_backward(state: _PatchEmbedState, saved, grads, need):
    images, weight = saved
    (grad,) = grads
    k = state.num_prefix
    dimages = dw = db = dpos = dprefix = None
    if need[0] or need[1] or need[2]:
        dimages, dw, db = torch.ops.vitkern_cuda.patch_embed_bwd(
            grad, images, weight, k, need[0], need[1], need[2], state.allow_tf32
        )
    if need[3]:
        g = grad if state.pos_len == grad.shape[1] else grad[:, k:]
        dpos = g.sum(0, keepdim=True, dtype=torch.float32).to(state.pos_dtype)
    if need[4]:
        dprefix = grad[:, :k].sum(0, keepdim=True, dtype=torch.float32).to(state.prefix_dtype)
    return dimages, dw, db, dpos, dprefix, None


_extension._on_load(
    lambda: register_autograd("vitkern_cuda::patch_embed_fwd", save=_patch_embed_save, backward=_patch_embed_backward)
)
