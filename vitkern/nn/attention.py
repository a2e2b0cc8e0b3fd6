"""``Attention``: timm's multi-head self-attention over the fused qkv GEMM, flash attention and
proj GEMM (with the block's residual, LayerScale and drop path in the proj epilogue)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from vitkern.ops.attention import (
    attention,
    attention_qkvpacked,
    attention_qkvpacked_varlen,
    attention_varlen,
    scaled_dot_product_attention,
)
from vitkern.ops.qk_prologue import QKNorm, check_prologue, qk_prologue
from vitkern.ops.linear import linear
from vitkern.nn.layer_norm import apply_norm, apply_pre_norm, default_norm_layer
from vitkern.nn.linear import Linear, add_scaled_residual

__all__ = ["Attention"]

_warned_attn_drop = False


def _warn_attn_drop_once() -> None:
    global _warned_attn_drop
    if _warned_attn_drop or torch.compiler.is_compiling():
        return
    _warned_attn_drop = True
    warnings.warn(
        "vitkern.nn.Attention: attn_drop > 0 in training runs the unfused reference attention "
        "(torch scaled_dot_product_attention with dropout_p), which materialises the attention "
        "probabilities; the flash kernel has no dropout.",
        stacklevel=3,
    )


def _prologue_norms(q_norm: nn.Module, k_norm: nn.Module):
    """``(q_norm, k_norm)`` as the attention prologue's :class:`QKNorm` s (None for
    ``nn.Identity``), or None when a norm is a module the prologue does not implement."""
    try:
        return QKNorm.from_module(q_norm), QKNorm.from_module(k_norm)
    except ValueError:
        return None


class Attention(nn.Module):
    """Multi-head self-attention with the parameters and state_dict keys of timm 1.0's
    ``timm.layers.Attention``: ``qkv``, ``q_norm``/``k_norm`` (with ``qk_norm``), ``norm``
    (with ``scale_norm``) and ``proj``.

    Fast path (eval, or ``attn_drop == 0``): ``qkv = x @ Wqkv^T + b`` is viewed as
    ``(B, T, 3, H, d)`` without a permute and fed to ``attention_qkvpacked``, which writes
    ``(B, T, H, d)``; reshaped to ``(B, T, C)`` it goes through the proj GEMM. ``qk_norm`` (a
    LayerNorm or RMSNorm ``norm_layer``) and ``forward(x, rope=...)`` (a
    :class:`vitkern.RopeTables` or :class:`vitkern.Rope2D` for the tokens after the first
    ``num_prefix_tokens``) run in the attention op's q / k prologue; other norm modules run their
    own forward on strided q / k views first.

    ``forward(x, residual=r, residual_scale=g, row_scale=s)`` returns
    ``r + s[:, None] * g * proj(attn(x))`` with that epilogue fused into the proj GEMM (how
    :class:`vitkern.nn.Block` adds the residual, LayerScale and drop path).

    Unfused paths:

    - ``attn_drop > 0`` in training: dropout on the attention probabilities like timm, through
      ``torch.nn.functional.scaled_dot_product_attention(..., dropout_p=attn_drop)`` (the flash
      kernel has no dropout); a warning is issued once.
    - ``attn_mask`` given: ``vitkern.scaled_dot_product_attention`` on permuted q/k/v views.
    - ``proj_drop > 0`` in training: element-wise dropout after the proj GEMM, then the residual
      add in PyTorch.

    ``norm_layer`` (for ``qk_norm`` / ``scale_norm``) defaults to LayerNorm with eps=1e-6 (timm's
    ``LayerNorm``); any ``nn.LayerNorm`` runs the fused op with its own eps.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer=None,
        num_prefix_tokens: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        norm_layer = norm_layer or default_norm_layer
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        rope=None,
        key_padding_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        residual: Optional[torch.Tensor] = None,
        residual_scale: Optional[torch.Tensor] = None,
        row_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(
                f"Attention: x must have shape (B, T, {self.num_heads * self.head_dim}), got {tuple(x.shape)}")
        B, T, C = x.shape
        H, d = self.num_heads, self.head_dim
        qkv = linear(x, self.qkv.weight, self.qkv.bias).reshape(B, T, 3, H, d)
        drop_p = self.attn_drop.p if self.training else 0.0
        # forward is also bound to timm's Attention instances (vitkern.patch_model): only the
        # attributes both have, and num_prefix_tokens where it exists
        npt = getattr(self, "num_prefix_tokens", 0) if rope is not None else 0
        norms = _prologue_norms(self.q_norm, self.k_norm)

        if cu_seqlens is not None:
            o = _packed_attention(self, qkv, cu_seqlens, max_seqlen, rope, drop_p, attn_mask, key_padding_mask)
        elif drop_p > 0 or attn_mask is not None or norms is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, d) views
            if norms is None:  # norm modules the prologue does not know run their own forward
                q, k = apply_norm(self.q_norm, q), apply_norm(self.k_norm, k)
                q_norm = k_norm = None
            else:
                q_norm, k_norm = norms
            if drop_p > 0 or attn_mask is not None:
                attn_mask = _with_key_padding(attn_mask, key_padding_mask)
                if q_norm is not None or k_norm is not None or rope is not None:
                    q_norm, k_norm, rope, npt = check_prologue(q_norm, k_norm, rope, npt, heads=H, tokens=T,
                                                               head_dim=d, device=x.device)
                    q, k = qk_prologue(q, q_norm, rope, npt), qk_prologue(k, k_norm, rope, npt)
                if drop_p > 0:
                    _warn_attn_drop_once()
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop_p,
                                                       is_causal=is_causal)
                else:
                    o = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
            else:
                o = attention(q, k, v, causal=is_causal, rope=rope, num_prefix_tokens=npt,
                              key_padding_mask=key_padding_mask)
            o = o.transpose(1, 2).reshape(B, T, C)
        else:
            q_norm, k_norm = norms
            o = attention_qkvpacked(qkv, causal=is_causal, q_norm=q_norm, k_norm=k_norm, rope=rope,
                                    num_prefix_tokens=npt, key_padding_mask=key_padding_mask).reshape(B, T, C)

        o = apply_pre_norm(self.norm, o)
        if self.training and self.proj_drop.p > 0:
            out = self.proj_drop(linear(o, self.proj.weight, self.proj.bias))
            return add_scaled_residual(out, residual, residual_scale, row_scale)
        return linear(
            o,
            self.proj.weight,
            self.proj.bias,
            residual=residual,
            residual_scale=residual_scale,
            row_scale=row_scale,
        )

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


def _with_key_padding(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor]):
    """``attn_mask`` (None, bool or additive) with the keys ``key_padding_mask`` (B, T) marks
    invalid masked out too, for the unfused SDPA paths."""
    if key_padding_mask is None:
        return attn_mask
    keep = key_padding_mask.bool()[:, None, None, :]
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


def _packed_attention(m: nn.Module, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: Optional[int],
                      rope, drop_p: float, attn_mask, key_padding_mask) -> torch.Tensor:
    """Attention over packed sequences: ``qkv`` ``(1, total, 3, H, d)`` of images laid end to end,
    ``cu_seqlens`` their offsets; one varlen call, ``(1, total, H * d)`` out."""
    B, T, _, H, d = qkv.shape
    if B != 1:
        raise ValueError(f"Attention: with cu_seqlens, x must be packed as (1, total, C), got batch {B}")
    if rope is not None or drop_p > 0 or attn_mask is not None or key_padding_mask is not None:
        raise ValueError("Attention: packed sequences (cu_seqlens) take no rope, attn_mask, key_padding_mask "
                         "or attention dropout")
    qkv = qkv[0]
    if not (isinstance(m.q_norm, nn.Identity) and isinstance(m.k_norm, nn.Identity)):
        q, k, v = qkv.unbind(1)  # (total, H, d) strided views: the norms over d run first
        q, k = apply_norm(m.q_norm, q), apply_norm(m.k_norm, k)
        o = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    else:
        o = attention_qkvpacked_varlen(qkv, cu_seqlens, max_seqlen=max_seqlen)
    return o.reshape(1, T, H * d)
