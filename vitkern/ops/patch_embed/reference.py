"""The pure-PyTorch reference of the patch embedding (the "reference" backend, and what the kernels
are tested against), and the output-dtype rule every backend shares."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _out_dtype(compute: torch.dtype, *extra: Optional[torch.Tensor]) -> torch.dtype:
    """The tokens' dtype: the compute dtype promoted by the additive terms' (pos_embed, prefix
    tokens), which may be float32 with fp16 / bf16 images."""
    dtype = compute
    for t in extra:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def patch_embed_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference patch embedding (no argument checks; float64 accepted).

    timm-style ``conv2d(stride = patch) -> flatten(2).transpose(1, 2)``, then the prefix tokens and
    the position embedding added in fp32 (fp64 for fp64) with one cast to the output dtype (the
    promoted dtype of the conv output, ``pos_embed`` and ``prefix_tokens``).
    """
    d, c, ph, pw = weight.shape
    n_patch = (images.shape[2] // ph) * (images.shape[3] // pw)
    if n_patch == 0 or d == 0 or c * ph * pw == 0:
        # no patches, no output features or an empty reduction (conv2d refuses the first and gets
        # the shape of the last wrong): the same GEMM on the im2col patches, (B, N, K) @ (K, D)
        kc = c * ph * pw
        if images.numel() == 0:
            patches = images.reshape(images.shape[0], n_patch, kc)
        else:
            patches = F.unfold(images, (ph, pw), stride=(ph, pw)).transpose(1, 2)
        x = F.linear(patches, weight.reshape(d, kc), bias)
    else:
        x = F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)  # (B, N, D)
    out_dtype = _out_dtype(x.dtype, pos_embed, prefix_tokens)
    if pos_embed is None and prefix_tokens is None:
        return x
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    batch, n = x.shape[0], x.shape[1]
    k = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    x = x.to(acc)
    prefix = None if prefix_tokens is None else prefix_tokens.to(acc)
    if pos_embed is not None:
        pos = pos_embed.to(acc)
        if pos.shape[1] == n:
            x = x + pos
        else:
            x = x + pos[:, k:]
            if prefix is not None:
                prefix = prefix + pos[:, :k]
    if prefix is not None:
        x = torch.cat([prefix.expand(batch, -1, -1), x], dim=1)
    return x.to(out_dtype)
