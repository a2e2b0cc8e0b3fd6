"""The pure-PyTorch reference of the q / k prologue (backend "reference"; also the "torch"
backend, being PyTorch ops): the norm over the head dim, then the rotation, float32 inside, one
cast to the input's dtype. Differentiable by autograd in every tensor argument."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vitkern.ops.qk_prologue.spec import QKNorm, RopeTables

__all__ = ["apply_qk_prologue_ref", "qk_prologue_ref"]


def _norm_ref(x: Tensor, norm: QKNorm) -> Tensor:
    """``norm`` over the last dim in float32 (returns float32)."""
    x = x.float()
    if norm.kind == "layer":
        mean = x.mean(dim=-1, keepdim=True)
        x = x - mean
    var = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        x = x * norm.weight.float()
    if norm.bias is not None:
        x = x + norm.bias.float()
    return x


def _rotate_ref(x: Tensor, rope: RopeTables) -> Tensor:
    """``x * cos + rot(x) * sin`` in float32; ``x`` is ``(B, H, N, D)`` float32."""
    if rope.layout == "interleaved":
        # rot([x0, x1, x2, x3, ...]) = [-x1, x0, -x3, x2, ...]
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)
    else:
        # rot([a, b]) = [-b, a] with a, b the two halves
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
    return x * rope.cos.float() + rotated * rope.sin.float()


def apply_qk_prologue_ref(x: Tensor, norm: Optional[QKNorm] = None, rope: Optional[RopeTables] = None,
                          num_prefix_tokens: int = 0) -> Tensor:
    """The reference prologue of q or k, ``x`` of shape ``(B, H, T, D)``: ``norm`` over the head dim,
    then ``rope`` on tokens ``num_prefix_tokens:``; float32 inside, ``x.dtype`` out. Differentiable
    (autograd) in ``x``, the norm's weight and bias and the tables."""
    if norm is None and rope is None:
        return x
    y = _norm_ref(x, norm) if norm is not None else x.float()
    if rope is not None:
        n = int(num_prefix_tokens)
        if n:
            y = torch.cat([y[:, :, :n], _rotate_ref(y[:, :, n:], rope)], dim=2)
        else:
            y = _rotate_ref(y, rope)
    return y.to(x.dtype)


def qk_prologue_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], sin: Optional[Tensor],
                    cos: Optional[Tensor], norm_kind: Optional[str], eps: float, layout: str,
                    num_prefix_tokens: int) -> Tensor:
    """The backends' flat signature of :func:`apply_qk_prologue_ref`."""
    norm = QKNorm(norm_kind, weight, bias, eps) if norm_kind is not None else None
    rope = RopeTables(sin, cos, layout) if sin is not None else None
    return apply_qk_prologue_ref(x, norm, rope, num_prefix_tokens)
