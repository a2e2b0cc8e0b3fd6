"""The registered patch-embedding ops (``vitkern::patch_embed_fwd``, ``vitkern::patch_embed_bwd``:
custom ops with fakes), their autograd, and the Triton backend's implementation with its
``supports`` predicate.

The forward saves only the images and the weight: the additive terms' gradients are column sums
of dY. The launchers are imported where the ops run, so that importing this module needs no
Triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._autograd import kernel_op
from vitkern.ops.patch_embed.layout import _channels_last_k, _dw_layout
from vitkern.ops.patch_embed.reference import _out_dtype


def _fwd_fake(images, weight, bias, pos_embed, prefix_tokens):
    b, _, h, w = images.shape
    d, _, ph, pw = weight.shape
    n_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    t = n_prefix + (h // ph) * (w // pw)
    return images.new_empty((b, t, d), dtype=_out_dtype(images.dtype, pos_embed, prefix_tokens))


def _bwd_fake(grad, images, weight, need_dx, need_dw, bias_dtype, n_prefix, pos_len, pos_dtype, prefix_dtype):
    """The backward op's outputs: (0,) placeholders for the gradients not asked for."""
    d = weight.shape[0]
    dx = torch.empty_like(images) if need_dx else images.new_empty((0,))
    if need_dw:
        shape, perm = _dw_layout(weight, _channels_last_k(images))
        dw = weight.new_empty(shape).permute(perm)
    else:
        dw = weight.new_empty((0,))
    db = images.new_empty((d,) if bias_dtype is not None else (0,), dtype=bias_dtype or images.dtype)
    dpos = images.new_empty((1, pos_len, d) if pos_dtype is not None else (0,), dtype=pos_dtype or images.dtype)
    dpre = images.new_empty((1, n_prefix, d) if prefix_dtype is not None else (0,), dtype=prefix_dtype or images.dtype)
    return dx, dw, db, dpos, dpre


@kernel_op("vitkern::patch_embed_bwd", fake=_bwd_fake)
def _patch_embed_bwd_op(
    grad: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
    bias_dtype: Optional[torch.dtype],
    n_prefix: int,
    pos_len: int,
    pos_dtype: Optional[torch.dtype],
    prefix_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.patch_embed import launch as _launch

    outs = _launch._patch_embed_bwd(grad, images, weight, need_dx, need_dw, bias_dtype, n_prefix, pos_len,
                                    pos_dtype, prefix_dtype)
    # empty (0,) placeholders for the gradients not asked for (as the fake returns them)
    dtypes = (images.dtype, weight.dtype, bias_dtype, pos_dtype, prefix_dtype)
    return tuple(o if o is not None else images.new_empty((0,), dtype=dt or images.dtype)
                 for o, dt in zip(outs, dtypes))


def _fwd_save(inputs, output):
    images, weight, bias, pos_embed, prefix_tokens = inputs
    pos = (pos_embed.shape[1], pos_embed.dtype) if pos_embed is not None else None
    prefix = (prefix_tokens.shape[1], prefix_tokens.dtype) if prefix_tokens is not None else None
    return (images, weight), (bias.dtype if bias is not None else None, pos, prefix)


def _fwd_backward(state, saved, grads, need):
    bias_dtype, pos, prefix = state
    images, weight = saved
    (grad,) = grads
    n_prefix = prefix[0] if prefix is not None else 0
    pos_len, pos_dtype = pos if need[3] else (0, None)
    prefix_dtype = prefix[1] if need[4] else None
    return torch.ops.vitkern.patch_embed_bwd(grad, images, weight, need[0], need[1], bias_dtype if need[2] else None,
                                             n_prefix, pos_len, pos_dtype, prefix_dtype)


@kernel_op("vitkern::patch_embed_fwd", fake=_fwd_fake, save=_fwd_save, backward=_fwd_backward)
def _patch_embed_fwd_op(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    prefix_tokens: Optional[torch.Tensor],
) -> torch.Tensor:
    from vitkern.ops.patch_embed import launch as _launch

    return _launch._patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens)


def _patch_embed_triton(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None):
    return torch.ops.vitkern.patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens)


def _patch_embed_triton_supports(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None):
    if weight.shape[1] * weight.shape[2] * weight.shape[3] == 0:
        return f"the Triton kernels need C * Ph * Pw >= 1 (weight shape {tuple(weight.shape)})"
    return None
