"""Patch embedding's "torch" backend, as timm runs it: ``F.conv2d(stride = patch)``,
``flatten(2).transpose(1, 2)``, ``torch.cat`` of the prefix tokens and the add of the position
embedding, each a PyTorch op in its inputs' dtypes: the PyTorch-native fast path that "auto"
measures the fused kernel against. Differentiable through torch's autograd.

The order of the additive terms is timm's ``VisionTransformer._pos_embed``: a ``(1, K + N, D)``
``pos_embed`` is added after the prefix tokens are concatenated (it covers them), a ``(1, N, D)``
one (``no_embed_class``) before. Type promotion gives the output dtype of every backend (the
compute dtype promoted by ``pos_embed``'s and ``prefix_tokens``' dtypes).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["patch_embed_torch"]


def _patch_tokens(images: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``(B, N, D)`` patch tokens: the stride-P convolution, flattened to rows."""
    d, c, ph, pw = weight.shape
    n_patch = (images.shape[2] // ph) * (images.shape[3] // pw)
    if n_patch == 0 or d == 0 or c * ph * pw == 0:
        # no patches, no output features or an empty reduction (conv2d refuses the first and gets
        # the shape of the last wrong): the same GEMM on the im2col patches
        kc = c * ph * pw
        if images.numel() == 0:
            patches = images.reshape(images.shape[0], n_patch, kc)
        else:
            patches = F.unfold(images, (ph, pw), stride=(ph, pw)).transpose(1, 2)
        return F.linear(patches, weight.reshape(d, kc), bias)
    return F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)


def patch_embed_torch(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Op ``"patch_embed"`` in PyTorch ops: ``(B, C, H, W)`` images (contiguous or channels_last),
    ``(D, C, Ph, Pw)`` weight, ``(B, K + N, D)`` tokens."""
    x = _patch_tokens(images, weight, bias)
    n = x.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == n:
        x = x + pos_embed  # patch tokens only (timm's no_embed_class)
        pos_embed = None
    if prefix_tokens is not None:
        x = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed  # every token, the prefix tokens included
    return x
