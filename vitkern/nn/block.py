"""``Block``: the pre-norm ViT block (timm's ``Block``), with the residual add, LayerScale and drop
path riding in the proj and fc2 GEMM epilogues."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from vitkern._backend import get_backend
from vitkern.nn.attention import Attention
from vitkern.nn.layer_norm import add_final_norm, add_pre_norm, apply_norm, apply_pre_norm, default_norm_layer
from vitkern.nn.linear import Mlp, SwiGLUPacked

__all__ = ["Block", "LayerScale", "DropPath", "can_defer_residuals", "drop_path_row_scale", "layer_scale_gamma",
           "run_blocks"]


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (timm's ``LayerScale``; key ``gamma``, init ``init_values``).

    Inside :class:`Block` the scale is not applied by this module's forward but passed as
    ``residual_scale`` to the proj / fc2 epilogue.
    """

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): in training each sample's branch is
    kept with probability ``1 - drop_prob`` and scaled by ``1 / keep`` (``scale_by_keep``).

    :meth:`row_scale` gives the same per-sample multiplier as a ``(B * T,)`` vector over the
    flattened tokens, the ``row_scale`` argument of the fused ``linear`` / ``mlp`` epilogues.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"DropPath: drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def sample_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``(B,)`` multipliers (0 or ``1/keep``) for the samples of ``x``, or None when inactive."""
        return _sample_scale(self, x)

    def row_scale(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-token multipliers ``(B * T,)`` for ``x`` of shape ``(B, T, ...)``, or None."""
        return drop_path_row_scale(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.sample_scale(x)
        if mask is None:
            return x
        return x * mask.reshape((x.shape[0],) + (1,) * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def _sample_scale(dp: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    # The draws of timm's drop_path (one bernoulli per sample, in x's dtype), so a patched timm
    # model and vitkern's drop the same samples from the same random stream.
    if dp.drop_prob == 0.0 or not dp.training:
        return None
    keep = 1.0 - dp.drop_prob
    mask = x.new_empty((x.shape[0],)).bernoulli_(keep)
    if keep > 0.0 and dp.scale_by_keep:
        mask.div_(keep)
    return mask


def drop_path_row_scale(
    dp: nn.Module, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """The drop-path multiplier of a drop-path module (vitkern's or timm's ``DropPath``: its
    ``drop_prob`` and ``scale_by_keep``) as a ``(B * T,)`` per-token vector for ``x`` of shape
    ``(B, T, ...)``, the ``row_scale`` of the fused epilogues; None for ``nn.Identity`` or when
    inactive (eval, ``drop_prob == 0``). With ``cu_seqlens`` ``x`` holds packed sequences
    ``(1, total, D)``: one draw per sequence, repeated over its tokens on the device (no sync)."""
    if isinstance(dp, nn.Identity):
        return None
    if cu_seqlens is not None:
        mask = _sample_scale(dp, x.new_empty((cu_seqlens.numel() - 1, 1)))
        if mask is None:
            return None
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        return mask.repeat_interleave(lengths, output_size=math.prod(x.shape[:-1]))
    mask = _sample_scale(dp, x)
    if mask is None:
        return None
    tokens = math.prod(x.shape[1:-1])  # 1 for (B, D); any count, 0 included, for B = 0
    return mask.repeat_interleave(tokens)


def layer_scale_gamma(ls: nn.Module) -> Optional[torch.Tensor]:
    """The ``gamma`` of a LayerScale module (vitkern's or timm's), the ``residual_scale`` of the
    fused epilogues; None for ``nn.Identity``."""
    return None if isinstance(ls, nn.Identity) else ls.gamma


def can_defer_residuals(blocks, *, grad_checkpointing: bool = False) -> bool:
    """Whether a model may run ``blocks`` with their residual adds deferred into the next norm
    (each block's ``forward(..., pending=, defer_residual=True)``, :meth:`Block.forward_deferred`):
    not under gradient checkpointing with autograd on (one block a checkpoint: the plain forward),
    not with a block that has no ``forward_deferred``, not where a hook would see a block's
    input or output (a deferred block takes the stream as ``(x, pending)`` and returns such a
    pair: a forward or forward pre-hook on a block, feature extraction or FSDP's unshard /
    reshard, or a global one), and not with the "cuda" backend selected (the extension's
    epilogues take LayerScale and drop path only with a residual)."""
    if grad_checkpointing and torch.is_grad_enabled():
        return False
    if get_backend() == "cuda":
        return False
    module = nn.modules.module
    if getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None):
        return False
    return all(callable(getattr(blk, "forward_deferred", None)) and not blk._forward_hooks
               and not blk._forward_pre_hooks for blk in blocks)


def run_blocks(blocks, x: torch.Tensor, final_norm: nn.Module, *, block_args: Optional[Callable] = None,
               plain_call: Optional[Callable] = None, grad_checkpointing: bool = False, **kwargs) -> torch.Tensor:
    """A model's blocks on the stream ``x``, then ``final_norm``: with each residual add deferred
    into the next norm (the last one into ``final_norm``) where :func:`can_defer_residuals`
    allows, else the plain blocks. Block ``i`` gets ``x``, ``block_args(i)`` (default none) and
    ``kwargs``; ``plain_call(blk, x, *args, **kwargs)`` runs a plain block (default: calling it;
    a model's gradient-checkpointing wrapper)."""
    args = block_args or (lambda i: ())
    if not can_defer_residuals(blocks, grad_checkpointing=grad_checkpointing):
        call = plain_call or (lambda blk, *a, **kw: blk(*a, **kw))
        for i, blk in enumerate(blocks):
            x = call(blk, x, *args(i), **kwargs)
        return apply_norm(final_norm, x)
    pending = None
    for i, blk in enumerate(blocks):
        x, pending = blk(x, *args(i), pending=pending, defer_residual=True, **kwargs)
    return add_final_norm(final_norm, x, pending)


class Block(nn.Module):
    """Pre-norm transformer block with timm's constructor and state_dict keys (``norm1``, ``attn``,
    ``ls1.gamma``, ``norm2``, ``mlp``, ``ls2.gamma``)::

        h = LN1(x)
        x = x + s1 * g1 * (attention(h) @ Wo^T + bo)      # residual, LayerScale, drop path: proj epilogue
        h = LN2(x)
        x = x + s2 * g2 * (GELU(h @ W1^T + b1) @ W2^T + b2)  # the same in fc2's epilogue

    ``g1``/``g2`` are the LayerScale gammas (``init_values``; absent when None) and ``s1``/``s2``
    the drop-path row scales (training only; 0 or ``1/keep`` per sample). ``norm_layer`` defaults
    to LayerNorm with eps=1e-6 (timm's); ``act_layer`` to the erf GELU.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        act_layer=nn.GELU,
        norm_layer=None,
        mlp_layer: str = "mlp",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or default_norm_layer
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            scale_norm=scale_attn_norm,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        if mlp_layer == "swiglu_packed":  # timm's SwiGLUPacked (DINOv2 giant): the fused SwiGLU GEMMs
            if scale_mlp_norm:
                raise ValueError("Block: scale_mlp_norm is not supported with mlp_layer='swiglu_packed'")
            self.mlp = SwiGLUPacked(dim, int(dim * mlp_ratio), bias=proj_bias, drop=proj_drop, **dd)
        elif mlp_layer == "mlp":
            self.mlp = Mlp(
                in_features=dim,
                hidden_features=int(dim * mlp_ratio),
                act_layer=act_layer,
                norm_layer=norm_layer if scale_mlp_norm else None,
                bias=proj_bias,
                drop=proj_drop,
                **dd,
            )
        else:
            raise ValueError(f"Block: mlp_layer must be 'mlp' or 'swiglu_packed', got {mlp_layer!r}")
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
        pending: Optional[torch.Tensor] = None,
        defer_residual: bool = False,
    ):
        """``x`` (B, T, D); ``key_padding_mask`` (B, T) bool marks the valid keys of a padded
        batch. Packed sequences: ``x`` (1, total, D) with the images' ``cu_seqlens`` (their
        attention is per image, and drop path draws one sample per image).

        ``pending`` (a branch of x's shape not yet added: the stream is ``x + pending``) and
        ``defer_residual=True`` run :meth:`forward_deferred` and return its ``(x, pending)`` pair
        (models call it so only where :func:`can_defer_residuals` finds no hook to see it)."""
        if defer_residual:
            return self.forward_deferred(x, pending, attn_mask, is_causal, key_padding_mask=key_padding_mask,
                                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if pending is not None:
            x = x + pending
        h = apply_pre_norm(self.norm1, x)
        x = self.attn(
            h,
            attn_mask,
            is_causal,
            key_padding_mask=key_padding_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            residual=x,
            residual_scale=layer_scale_gamma(self.ls1),
            row_scale=drop_path_row_scale(self.drop_path1, x, cu_seqlens),
        )
        h = apply_pre_norm(self.norm2, x)
        x = self.mlp(
            h,
            residual=x,
            residual_scale=layer_scale_gamma(self.ls2),
            row_scale=drop_path_row_scale(self.drop_path2, x, cu_seqlens),
        )
        return x

    def forward_deferred(
        self,
        x: torch.Tensor,
        pending: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        max_seqlen: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block with each residual add deferred into the norm after it: the stream is
        ``x + pending`` (``pending``: the previous block's MLP branch not yet added, or None), and
        the result ``(x', pending')`` means the block's output ``x' + pending'``::

            x, h = x + pending, LN1(x + pending)     add_layer_norm (one pass)
            b = s1 * g1 * (attention(h) @ Wo^T + bo)  proj epilogue, no residual: a 16-bit branch
            x, h = x + b, LN2(x + b)                 add_layer_norm
            pending' = s2 * g2 * mlp(h)              fc2 epilogue, no residual

        The next block's norm1 (or the model's final norm, :func:`vitkern.nn.layer_norm.add_pre_norm`)
        adds ``pending'``. Forward bytes equal :meth:`forward`'s (the add moves from the GEMM's
        epilogue into the norm's pass); in the backward the norm's pass also adds the stream's
        gradient (no autograd sum of two float32 gradients) and writes it once more in the
        branch's 16-bit dtype, which the proj / fc2 GEMMs read (half the bytes of the float32
        stream gradient, no float32 operand in their backward). The branch is rounded to its
        dtype before the add, as timm's blocks under autocast do."""
        x, h = add_pre_norm(self.norm1, x, pending)
        b = self.attn(
            h,
            attn_mask,
            is_causal,
            key_padding_mask=key_padding_mask,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            residual_scale=layer_scale_gamma(self.ls1),
            row_scale=drop_path_row_scale(self.drop_path1, x, cu_seqlens),
        )
        x, h = add_pre_norm(self.norm2, x, b)
        b = self.mlp(h, residual_scale=layer_scale_gamma(self.ls2),
                     row_scale=drop_path_row_scale(self.drop_path2, x, cu_seqlens))
        return x, b
