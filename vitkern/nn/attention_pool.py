"""``AttentionPoolLatent``: the multihead attention pooling ("MAP") head of SigLIP / SigLIP2 image
towers, with timm's ``timm.layers.AttentionPoolLatent`` parameters and state_dict keys (``latent``,
``q``, ``kv``, ``proj``, ``norm``, ``mlp.fc1`` / ``mlp.fc2``), on vitkern's ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitkern.ops.attention import attention, attention_varlen
from vitkern.ops.linear import linear
from vitkern.nn.layer_norm import apply_pre_norm, default_norm_layer
from vitkern.nn.linear import Linear, Mlp

__all__ = ["AttentionPoolLatent"]

POOL_TYPES = ("token", "avg", "")


class AttentionPoolLatent(nn.Module):
    """Attention pooling with learned latent queries (big_vision's ``MAPHead``)::

        q = latent @ Wq^T + bq                    (L, D): the same for every image
        k, v = split(x @ Wkv^T + bkv)             (B, N, D) each, viewed as (B, H, N, d)
        y = attention(q, k, v) @ Wo^T + bo        vitkern's flash attention, L query rows
        y = y + mlp(norm(y))                      residual add in fc2's epilogue
        token: y[:, 0]; avg: y.mean(1); "": (B, L, D)

    ``patch_model`` binds this forward on timm's ``AttentionPoolLatent`` instances (same attributes).
    ``latent_len`` queries (1 in every SigLIP), ``num_heads`` heads of ``dim // num_heads`` (72 for
    the so400m towers), an MLP of ``int(dim * mlp_ratio)`` hidden units with ``act_layer`` ("gelu",
    "gelu_tanh", ...). Only timm's SigLIP configuration is built: a query projection, no qk-norm,
    no position embedding, an output projection to ``dim``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        latent_len: int = 1,
        pool_type: str = "token",
        norm_layer=None,
        act_layer="gelu",
        drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"AttentionPoolLatent: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if latent_len < 1:
            raise ValueError(f"AttentionPoolLatent: latent_len must be >= 1, got {latent_len}")
        if pool_type not in POOL_TYPES:
            raise ValueError(f"AttentionPoolLatent: pool_type must be one of {POOL_TYPES}, got {pool_type!r}")
        norm_layer = norm_layer or default_norm_layer
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.pool = pool_type
        self.latent_len = latent_len
        self.latent_dim = dim
        self.pos_embed = None  # timm's attribute: no position embedding in the SigLIP heads
        self.latent = nn.Parameter(torch.empty(1, latent_len, dim, **dd))
        self.q = Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(drop)
        self.norm = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), out_features=dim, act_layer=act_layer, **dd)
        self.out_features = dim
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's init of the latent queries (truncated normal, std ``dim ** -0.5``, cut at +-2)."""
        std = self.latent_dim**-0.5
        latent = torch.empty_like(self.latent, dtype=torch.float32)
        nn.init.trunc_normal_(latent, mean=0.0, std=1.0, a=-2.0, b=2.0)
        self.latent.copy_(latent * std)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, *,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, N, D) -> pooled; ``key_padding_mask`` (B, N) bool marks the valid tokens of a
        padded batch (NaFlex), inside the attention kernel."""
        if x.dim() != 3 or x.shape[-1] != self.latent_dim:
            raise ValueError(f"AttentionPoolLatent: x must have shape (B, N, {self.latent_dim}), got {tuple(x.shape)}")
        if attn_mask is not None:
            raise ValueError("AttentionPoolLatent: attn_mask is not supported (a padded batch: key_padding_mask)")
        B, N, C = x.shape
        H, d, L = self.num_heads, self.head_dim, self.latent_len
        # The query is the same for every image: one (L, D) GEMM, broadcast over the batch.
        q = linear(self.latent[0], self.q.weight, self.q.bias).reshape(1, L, H, d).transpose(1, 2)
        kv = linear(x, self.kv.weight, self.kv.bias).reshape(B, N, 2, H, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, N, d) strided views
        o = attention(q.expand(B, H, L, d), k, v, key_padding_mask=key_padding_mask)
        return _pool_head(self, o.transpose(1, 2).reshape(B, L, C))

    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: Optional[int] = None) -> torch.Tensor:
        """Pooling of packed sequences: ``x`` (total, D) holds the tokens of ``len(cu_seqlens) - 1``
        images end to end; each image's ``latent_len`` queries attend to its own tokens (one varlen
        attention call). Returns what :meth:`forward` returns for each image, batched."""
        if x.dim() != 2 or x.shape[-1] != self.latent_dim:
            raise ValueError(f"AttentionPoolLatent: packed x must have shape (total, {self.latent_dim}), "
                             f"got {tuple(x.shape)}")
        n = cu_seqlens.numel() - 1
        H, d, L = self.num_heads, self.head_dim, self.latent_len
        q = linear(self.latent[0], self.q.weight, self.q.bias).reshape(1, L, H, d).expand(n, L, H, d)
        kv = linear(x, self.kv.weight, self.kv.bias).reshape(-1, 2, H, d)
        cu_q = torch.arange(0, (n + 1) * L, L, device=x.device, dtype=torch.int32)
        o = attention_varlen(q.reshape(n * L, H, d), kv[:, 0], kv[:, 1], cu_q, cu_seqlens,
                             max_seqlen_q=L, max_seqlen_k=max_seqlen)
        return _pool_head(self, o.reshape(n, L, H * d))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, latent_len={self.latent_len}, pool={self.pool!r}"


def _pool_head(self: nn.Module, o: torch.Tensor) -> torch.Tensor:
    # projection, the MLP with its residual add in fc2's epilogue, the pool over the latents; a
    # function, not a method: the forward is also bound on timm's AttentionPoolLatent instances
    if self.training and self.proj_drop.p > 0:
        y = self.proj_drop(linear(o, self.proj.weight, self.proj.bias))
    else:
        y = linear(o, self.proj.weight, self.proj.bias)
    if isinstance(self.mlp, Mlp):  # the residual add in fc2's epilogue
        y = self.mlp(apply_pre_norm(self.norm, y), residual=y)
    else:  # timm's Mlp on a patched timm AttentionPoolLatent (itself patched or not)
        y = y + self.mlp(apply_pre_norm(self.norm, y))
    if self.pool == "token":
        return y[:, 0]
    if self.pool == "avg":
        return y.mean(1)
    return y
