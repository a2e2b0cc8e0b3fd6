"""``Eva``: timm's EVA family (EVA-02, the RoPE ViTs, DINOv3-style models) on vitkern's ops, with
timm's module names, so a timm ``Eva`` state_dict loads as it is.

What it covers of ``timm.models.eva.Eva``: both attention classes (``EvaAttention``: the fused
qkv projection with timm's q / v biases, k has none, or separate q / k / v projections;
``AttentionRope``: qkv with its bias, or separate projections with grouped-query attention);
QK-norm (LayerNorm or RMSNorm over the head dim),
2-D RoPE of the "cat" (axial, with ``ref_feat_shape``), "mixed" (learnable per-block
frequencies) and "dinov3" kinds, applied by the attention op's q / k prologue
(:mod:`vitkern.ops.qk_prologue`) with the class / register tokens left unrotated; the inner
attention norm (``scale_attn_inner``); LayerScale (``gamma_1`` / ``gamma_2``, in the proj / fc2
GEMMs' residual epilogues); the GELU MLP (with its optional norm, ``scale_mlp``) and the SwiGLU
MLPs (timm's packed ``GluMlp``, :class:`vitkern.nn.SwiGLUPacked`, and its ``SwiGLU`` with separate
gate / value projections and optional norm); class and register tokens, absolute position embeddings with or without the
prefix tokens, pre / post / fc norms and timm's global pools. The SwiGLU gate
(``silu(gate) * value``) runs in fc1's GEMM epilogue (``vitkern.swiglu_mlp``, or ``vitkern.swiglu``
before the sub-LN norm).

``dynamic_img_size=True`` takes any input size divisible by the patch: the RoPE tables are built for
its grid and the position embedding resampled as timm does (antialiased bicubic).

Refused by name (``Eva.from_timm`` raises a ValueError): gated attention, the post-norm block, the
multimodal "mrope", patch dropout, dynamic padding, MAP pooling. RoPE coordinate augmentation
(a training-time regulariser of timm's and DINOv3's RoPE) is not implemented: converting a model
that has it warns, and its training then runs without it.

``Eva.from_hf`` converts Hugging Face's ``DINOv3ViTModel`` (registers, LayerScale, GELU or gated
SiLU MLP, the DINOv3 RoPE) to timm's key names.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from vitkern.models.registry import register_model
from vitkern.models.vit import global_pool_nlc, GLOBAL_POOLS
from vitkern.nn.block import DropPath, drop_path_row_scale, run_blocks
from vitkern.nn.layer_norm import add_pre_norm, apply_norm, apply_pre_norm
from vitkern.nn.linear import Linear, Mlp, SwiGLUPacked, swiglu_forward
from vitkern.nn.patch_embed import PatchEmbed
from vitkern.nn.rope import Rope2D
from vitkern.ops.attention import attention, attention_qkvpacked
from vitkern.ops.linear import linear
from vitkern.ops.patch_embed import resample_pos_embed
from vitkern.ops.qk_prologue import QKNorm, RopeTables

__all__ = ["Eva", "EvaAttention", "EvaBlock", "SwiGLU"]


def _layer_norm(dim: int, **dd) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **dd)


def _norm_or_identity(norm_layer, dim: int, use: bool, **dd) -> nn.Module:
    return norm_layer(dim, **dd) if use else nn.Identity()


class EvaAttention(nn.Module):
    """timm's ``EvaAttention`` (``attn_type="eva"``: keys ``qkv`` + ``q_bias`` / ``v_bias`` (k has no
    bias), or ``q_proj`` / ``k_proj`` / ``v_proj``) and ``AttentionRope`` (``attn_type="rope"``: ``qkv``
    with its bias, or the three projections with biases and ``num_kv_heads`` for grouped-query
    attention), both with ``q_norm`` / ``k_norm``, ``norm`` and ``proj``. One qkv GEMM, then one
    attention call whose q / k prologue applies the QK-norms and the rotation."""

    def __init__(self, dim: int, num_heads: int, *, attn_type: str = "eva", qkv_bias: bool = True,
                 qkv_fused: bool = True, num_prefix_tokens: int = 1, head_dim: Optional[int] = None,
                 num_kv_heads: Optional[int] = None, qk_norm: bool = False, scale_norm: bool = False,
                 proj_bias: bool = True, rotate_half: bool = False, norm_layer=_layer_norm, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_type not in ("eva", "rope"):
            raise ValueError(f"EvaAttention: attn_type must be 'eva' or 'rope', got {attn_type!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"EvaAttention: num_kv_heads ({self.num_kv_heads}) must divide num_heads ({num_heads})")
        if self.num_kv_heads != num_heads and (attn_type != "rope" or qkv_fused):
            raise ValueError("EvaAttention: grouped-query attention needs attn_type='rope' and qkv_fused=False")
        self.head_dim = head_dim or dim // num_heads
        attn_dim = self.head_dim * num_heads
        kv_dim = self.head_dim * self.num_kv_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.q_proj = self.k_proj = self.v_proj = self.qkv = None
        if qkv_fused:
            self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias and attn_type == "rope", **dd)
        if qkv_fused and qkv_bias and attn_type == "eva":
            self.q_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
            self.register_buffer("k_bias", torch.zeros(attn_dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(attn_dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if not qkv_fused:
            self.q_proj = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, kv_dim, bias=qkv_bias and attn_type == "rope", **dd)
            self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias, **dd)
        self.q_norm = _norm_or_identity(norm_layer, self.head_dim, qk_norm, **dd)
        self.k_norm = _norm_or_identity(norm_layer, self.head_dim, qk_norm, **dd)
        self.norm = _norm_or_identity(norm_layer, attn_dim, scale_norm, **dd)
        self.proj = Linear(attn_dim, dim, bias=proj_bias, **dd)

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables] = None, *,
                residual: Optional[torch.Tensor] = None, residual_scale: Optional[torch.Tensor] = None,
                row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return eva_attention(self, x, rope, residual=residual, residual_scale=residual_scale, row_scale=row_scale)


def _qkv(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the q, k and v projections of ``m`` as one GEMM: ``(B, T, (H + 2 Hkv) D)``."""
    if m.qkv is not None:
        bias = m.qkv.bias
        if getattr(m, "q_bias", None) is not None:
            bias = torch.cat((m.q_bias, m.k_bias, m.v_bias))
        return linear(x, m.qkv.weight, bias)
    projs = (m.q_proj, m.k_proj, m.v_proj)
    weight = torch.cat([p.weight for p in projs])
    bias = None
    if any(p.bias is not None for p in projs):
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])
    return linear(x, weight, bias)


def eva_attention(m: nn.Module, x: torch.Tensor, rope: Optional[RopeTables] = None, *,
                  residual: Optional[torch.Tensor] = None, residual_scale: Optional[torch.Tensor] = None,
                  row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The forward of :class:`EvaAttention` on ``m``: vitkern's module, or timm's ``EvaAttention`` /
    ``AttentionRope`` (same attributes; :func:`vitkern.patch_model` binds it there)."""
    B, T, _ = x.shape
    H, D = m.num_heads, m.head_dim
    Hkv = getattr(m, "num_kv_heads", H)
    prologue = dict(q_norm=QKNorm.from_module(m.q_norm), k_norm=QKNorm.from_module(m.k_norm), rope=rope,
                    num_prefix_tokens=m.num_prefix_tokens if rope is not None else 0)
    qkv = _qkv(m, x)
    if Hkv == H:
        o = attention_qkvpacked(qkv.view(B, T, 3, H, D), **prologue)
    else:
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        o = attention(q, k, v, **prologue).transpose(1, 2)
    o = apply_pre_norm(m.norm, o.reshape(B, T, -1))
    return linear(o, m.proj.weight, m.proj.bias, residual=residual, residual_scale=residual_scale,
                  row_scale=row_scale)


class SwiGLU(nn.Module):
    """timm's ``SwiGLU`` (``fc1_g``, ``fc1_x``, ``norm``, ``fc2``): ``fc2(norm(silu(fc1_g(x)) * fc1_x(x)))``.

    The two first projections are one SwiGLU GEMM (each tile accumulates the gate and the value
    rows of its columns from the two weights, no concatenated copy), writing
    ``silu(gate) * value`` from its epilogue. Without a norm the MLP is one ``swiglu_mlp`` call
    (fc2's residual / LayerScale / drop-path epilogue, the gate's gradient in the backward's dH GEMM
    epilogue); with timm's sub-LN ``norm`` the fused gate (``swiglu``), the norm, and fc2 as a
    fused ``linear``: the gate's backward is then one elementwise pass on the norm's dH."""

    def __init__(self, in_features: int, hidden_features: int, *, norm_layer=None, align_to: int = 0,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if align_to:
            hidden_features = hidden_features + (-hidden_features % align_to)
        self.fc1_g = nn.Linear(in_features, hidden_features, **dd)
        self.fc1_x = nn.Linear(in_features, hidden_features, **dd)
        self.drop1 = nn.Dropout(0.0)
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, **dd)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x, *, residual=None, residual_scale=None, row_scale=None):
        return swiglu_forward(self, x, self.fc1_g.weight, self.fc1_g.bias, self.fc1_x.weight, self.fc1_x.bias,
                              residual, residual_scale, row_scale)


class EvaBlock(nn.Module):
    """timm's pre-norm ``EvaBlock`` (``norm1``, ``attn``, ``gamma_1``, ``norm2``, ``mlp``, ``gamma_2``);
    the residual adds and LayerScale run in the proj / fc2 epilogues."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, swiglu_mlp: bool = False,
                 swiglu_align_to: int = 0, scale_mlp: bool = False, init_values: Optional[float] = None,
                 attn_only_layer_scale: bool = False, norm_layer=_layer_norm, mlp_hidden_features: Optional[int] = None,
                 drop_path: float = 0.0, device=None, dtype=None, **attn_kwargs):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = EvaAttention(dim, num_heads, norm_layer=norm_layer, **attn_kwargs, **dd)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values), **dd)) if init_values is not None else None
        self.norm2 = norm_layer(dim, **dd)
        hidden = mlp_hidden_features or int(dim * mlp_ratio)
        mlp_norm = norm_layer if scale_mlp else None
        if swiglu_mlp and (scale_mlp or swiglu_align_to):
            # timm's rule: a norm or an alignment takes the separate-projection layout
            self.mlp = SwiGLU(dim, hidden, norm_layer=mlp_norm, align_to=swiglu_align_to, **dd)
        elif swiglu_mlp:
            self.mlp = SwiGLUPacked(dim, hidden * 2, **dd)
        else:
            self.mlp = Mlp(dim, hidden, norm_layer=mlp_norm, **dd)
        use_mlp_ls = init_values is not None and not attn_only_layer_scale
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values), **dd)) if use_mlp_ls else None
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Optional[RopeTables] = None, *,
                pending: Optional[torch.Tensor] = None, defer_residual: bool = False):
        """The block on the stream ``x`` (plus ``pending``, a branch not yet added); with
        ``defer_residual`` :meth:`forward_deferred`'s ``(x, pending)`` pair."""
        if defer_residual:
            return self.forward_deferred(x, pending, rope)
        if pending is not None:
            x = x + pending
        x = self.attn(apply_pre_norm(self.norm1, x), rope, residual=x, residual_scale=self.gamma_1,
                      row_scale=drop_path_row_scale(self.drop_path1, x))
        return self.mlp(apply_pre_norm(self.norm2, x), residual=x, residual_scale=self.gamma_2,
                        row_scale=drop_path_row_scale(self.drop_path2, x))

    def forward_deferred(self, x: torch.Tensor, pending: Optional[torch.Tensor] = None,
                         rope: Optional[RopeTables] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The block with its residual adds deferred into the norm after each (as
        :meth:`vitkern.nn.Block.forward_deferred`): returns ``(x', pending')``, the output being
        ``x' + pending'``."""
        x, h = add_pre_norm(self.norm1, x, pending)
        b = self.attn(h, rope, residual_scale=self.gamma_1, row_scale=drop_path_row_scale(self.drop_path1, x))
        x, h = add_pre_norm(self.norm2, x, b)
        return x, self.mlp(h, residual_scale=self.gamma_2, row_scale=drop_path_row_scale(self.drop_path2, x))


class Eva(nn.Module):
    """The EVA / RoPE ViT (see the module docstring), timm's ``Eva`` constructor keywords for what
    it covers and its state_dict keys. ``rope_type``: "cat", "mixed" or "dinov3"; ``attn_type``:
    "eva" (``EvaAttention``) or "rope" (``AttentionRope``, with ``num_kv_heads`` per block or one
    for all)."""

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, qkv_bias: bool = True, qkv_fused: bool = True, qk_norm: bool = False,
                 mlp_ratio: float = 4.0, swiglu_mlp: bool = False, swiglu_align_to: int = 0,
                 scale_mlp: bool = False, scale_attn_inner: bool = False, norm_layer=None, norm_eps: float = 1e-6,
                 init_values: Optional[float] = None, attn_only_layer_scale: bool = False,
                 class_token: bool = True, num_reg_tokens: int = 0, no_embed_class: bool = False,
                 use_abs_pos_emb: bool = True, use_rot_pos_emb: bool = False, rope_type: str = "cat",
                 rope_grid_offset: float = 0.0, rope_grid_indexing: str = "ij", rope_temperature: float = 10000.0,
                 rope_rotate_half: bool = False, use_pre_transformer_norm: bool = False,
                 use_post_transformer_norm: Optional[bool] = None, use_fc_norm: Optional[bool] = None,
                 ref_feat_shape=None, head_dim: Optional[int] = None, mlp_hidden_features: Optional[int] = None,
                 rope_normalize_coords: str = "separate", rope_min_period: Optional[float] = None,
                 rope_max_period: Optional[float] = None, dynamic_img_size: bool = False, attn_type: str = "eva",
                 proj_bias: bool = True, num_kv_heads=None, drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if norm_layer is None:  # timm's LayerNorm with the config's eps
            def norm_layer(dim, **kw):
                return nn.LayerNorm(dim, eps=norm_eps, **kw)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"Eva: global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("Eva: global_pool='token' needs the class token")
        if rope_type not in ("cat", "mixed", "dinov3"):
            raise ValueError(f"Eva: rope_type must be 'cat', 'mixed' or 'dinov3', got {rope_type!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + num_reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        fc_norm = global_pool == "avg" if use_fc_norm is None else use_fc_norm
        post_norm = (not fc_norm) if use_post_transformer_norm is None else use_post_transformer_norm
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not use_pre_transformer_norm,
                                      strict_img_size=not dynamic_img_size, **dd)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_reg_tokens, embed_dim, **dd)) if num_reg_tokens else None
        n_pos = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim, **dd)) if use_abs_pos_emb else None
        hd = head_dim or embed_dim // num_heads
        self.rope_mixed = use_rot_pos_emb and rope_type == "mixed"
        if not use_rot_pos_emb:
            self.rope = None
        elif rope_type == "cat":
            self.rope = Rope2D(hd, kind="axial", grid_size=grid, temperature=rope_temperature, in_pixels=False,
                               ref_grid_size=ref_feat_shape, grid_offset=rope_grid_offset,
                               grid_indexing=rope_grid_indexing, layout="half" if rope_rotate_half else "interleaved")
        elif rope_type == "mixed":
            self.rope = Rope2D(hd, kind="mixed", grid_size=grid, temperature=rope_temperature,
                               grid_indexing=rope_grid_indexing, depth=depth, num_heads=num_heads)
        else:
            self.rope = Rope2D(hd, kind="dinov3", grid_size=grid, temperature=rope_temperature,
                               grid_offset=rope_grid_offset, grid_indexing=rope_grid_indexing,
                               normalize_coords=rope_normalize_coords, min_period=rope_min_period,
                               max_period=rope_max_period, layout="half" if rope_rotate_half else "interleaved")
        self.norm_pre = norm_layer(embed_dim, **dd) if use_pre_transformer_norm else nn.Identity()
        if num_kv_heads is None or isinstance(num_kv_heads, int):
            num_kv_heads = (num_kv_heads,) * depth
        if len(num_kv_heads) != depth:
            raise ValueError(f"Eva: num_kv_heads needs one entry per block ({depth}), got {len(num_kv_heads)}")
        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]  # timm's per-block schedule
        self.blocks = nn.ModuleList([
            EvaBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, swiglu_mlp=swiglu_mlp, swiglu_align_to=swiglu_align_to,
                     scale_mlp=scale_mlp, init_values=init_values, attn_only_layer_scale=attn_only_layer_scale,
                     norm_layer=norm_layer, mlp_hidden_features=mlp_hidden_features, qkv_bias=qkv_bias,
                     qkv_fused=qkv_fused,
                     num_prefix_tokens=self.num_prefix_tokens, head_dim=head_dim, qk_norm=qk_norm,
                     scale_norm=scale_attn_inner, rotate_half=rope_rotate_half, attn_type=attn_type,
                     proj_bias=proj_bias, num_kv_heads=num_kv_heads[i],
                     drop_path=dpr[i], **dd)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim, **dd) if post_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim, **dd) if fc_norm else nn.Identity()
        self.head = Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def _rope_tables(self, layer: int, grid) -> Optional[RopeTables]:
        if self.rope is None:
            return None
        return self.rope.tables(grid, layer=layer if self.rope_mixed else None)

    def _pos_embed(self, grid) -> Optional[torch.Tensor]:
        """The position embedding for a ``grid`` of patches: timm's antialiased bicubic resampling
        when it differs from the model's (dynamic image sizes)."""
        if self.pos_embed is None or tuple(grid) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, old_size=self.patch_embed.grid_size,
                                  num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
                                  antialias=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_embed.patch_size
        grid = (x.shape[-2] // p[0], x.shape[-1] // p[1]) if self.dynamic_img_size else self.patch_embed.grid_size
        prefix = [t for t in (self.cls_token, self.reg_token) if t is not None]
        prefix = torch.cat(prefix, dim=1) if prefix else None
        x = self.patch_embed(x, pos_embed=self._pos_embed(grid), prefix_tokens=prefix)
        x = apply_norm(self.norm_pre, x)
        shared = None if self.rope_mixed else self._rope_tables(0, grid)
        # each block's residual adds in the norm after them where allowed (EvaBlock.forward_deferred)
        return run_blocks(self.blocks, x, self.norm,
                          block_args=lambda i: (self._rope_tables(i, grid) if self.rope_mixed else shared,))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool_nlc(x, self.global_pool, self.num_prefix_tokens)
        x = apply_norm(self.fc_norm, x)
        return x if pre_logits or isinstance(self.head, nn.Identity) else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set:
        names = {"pos_embed", "cls_token", "reg_token"}
        if self.rope_mixed:
            names.add("rope.freqs")
        return names

    def load_checkpoint(self, path, strict: bool = True) -> "Eva":
        """Load timm-format weights (``.safetensors`` or a torch file) into this model; returns it.
        A classifier of another class count is dropped (this model's kept as initialised, with a
        warning, as timm's pretrained loading adapts a head); any other missing, unexpected or
        mis-shaped key raises a ValueError naming it before anything is copied (``strict=False``
        allows missing and unexpected keys)."""
        from vitkern.models.convert import load_timm_checkpoint

        return load_timm_checkpoint(self, path, strict)

    @classmethod
    def from_timm(cls, model: nn.Module) -> "Eva":
        """A vitkern ``Eva`` with ``model``'s (a ``timm.models.eva.Eva``) configuration and weights;
        what it does not cover raises a ValueError naming it (nothing is loaded partly)."""
        config = _config_from_timm(model)
        p = next(model.parameters())
        out = cls(**config, device=p.device, dtype=p.dtype)
        try:
            out.load_state_dict(model.state_dict(), strict=True)
        except RuntimeError as e:
            raise ValueError(f"Eva.from_timm: the state_dict of {type(model).__name__} does not map: {e}") from None
        return out.train(model.training)

    @classmethod
    def from_hf(cls, model: nn.Module) -> "Eva":
        """A vitkern ``Eva`` (no classifier, class-token pooling) with the configuration and weights
        of a Hugging Face ``DINOv3ViTModel``: ``forward_features`` gives its ``last_hidden_state``,
        ``forward`` its ``pooler_output``. Parameters that do not map raise a ValueError naming them
        (the mask token, used only to replace masked patches in pretraining, is not needed)."""
        if type(model).__name__ != "DINOv3ViTModel":
            raise ValueError(f"Eva.from_hf: expected a transformers DINOv3ViTModel, got {type(model).__name__}")
        cfg, state = _hf_dinov3(model)
        c = model.config
        if any(getattr(c, n, None) is not None for n in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")):
            _warn_rope_augmentation("from_hf")
        p = next(model.parameters())
        out = cls(**cfg, device=p.device, dtype=p.dtype)
        try:
            out.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"Eva.from_hf: the state_dict of {type(model).__name__} does not map: {e}") from None
        return out.train(model.training)


def _hf_dinov3(model: nn.Module) -> tuple[dict, dict]:
    """``(Eva keywords, state_dict)`` of a Hugging Face ``DINOv3ViTModel`` (in timm's key names)."""
    c = model.config
    attn_biases = (c.query_bias, c.key_bias, c.value_bias)
    if attn_biases == (True, False, True):
        attn = dict(attn_type="eva", qkv_bias=True)
    elif all(attn_biases) or not any(attn_biases):
        attn = dict(attn_type="rope", qkv_bias=all(attn_biases))
    else:
        raise ValueError(f"Eva.from_hf: attention biases (query, key, value) = {attn_biases} are not supported")
    if c.hidden_act not in (("silu",) if c.use_gated_mlp else ("gelu",)):
        raise ValueError(f"Eva.from_hf: hidden_act {c.hidden_act!r} with use_gated_mlp={c.use_gated_mlp} is not "
                         "supported (gelu, or silu gated)")
    if not c.mlp_bias:
        raise ValueError("Eva.from_hf: an MLP without biases (mlp_bias=False) is not supported")
    eps = c.layer_norm_eps
    patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
    cfg = dict(img_size=c.image_size, patch_size=patch, in_chans=c.num_channels, num_classes=0, global_pool="token",
               embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
               qkv_fused=False, proj_bias=c.proj_bias, swiglu_mlp=c.use_gated_mlp, swiglu_align_to=1,
               mlp_hidden_features=c.intermediate_size, init_values=1.0, num_reg_tokens=c.num_register_tokens,
               use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="dinov3", rope_temperature=c.rope_theta,
               rope_rotate_half=True, use_fc_norm=False, use_post_transformer_norm=True, dynamic_img_size=True,
               norm_layer=lambda dim, **dd: nn.LayerNorm(dim, eps=eps, **dd), **attn)
    src = model.state_dict()
    state = {"cls_token": src["embeddings.cls_token"],
             "patch_embed.proj.weight": src["embeddings.patch_embeddings.weight"],
             "patch_embed.proj.bias": src["embeddings.patch_embeddings.bias"],
             "norm.weight": src["norm.weight"], "norm.bias": src["norm.bias"]}
    if c.num_register_tokens:
        state["reg_token"] = src["embeddings.register_tokens"]
    used = {"embeddings.cls_token", "embeddings.patch_embeddings.weight", "embeddings.patch_embeddings.bias",
            "norm.weight", "norm.bias", "embeddings.register_tokens",
            "embeddings.mask_token"}  # the mask token only replaces masked patches in pretraining
    mlp_names = ({"gate_proj": "fc1_g", "up_proj": "fc1_x", "down_proj": "fc2"} if c.use_gated_mlp
                 else {"up_proj": "fc1", "down_proj": "fc2"})
    for i in range(c.num_hidden_layers):
        hf, tm = f"model.layer.{i}.", f"blocks.{i}."
        names = {"norm1": "norm1", "norm2": "norm2", "attention.q_proj": "attn.q_proj",
                 "attention.k_proj": "attn.k_proj", "attention.v_proj": "attn.v_proj", "attention.o_proj": "attn.proj",
                 **{f"mlp.{a}": f"mlp.{b}" for a, b in mlp_names.items()}}
        for a, b in names.items():
            for leaf in ("weight", "bias"):
                if hf + a + "." + leaf in src:
                    state[tm + b + "." + leaf] = src[hf + a + "." + leaf]
                    used.add(hf + a + "." + leaf)
        state[tm + "gamma_1"] = src[hf + "layer_scale1.lambda1"]
        state[tm + "gamma_2"] = src[hf + "layer_scale2.lambda1"]
        used.update({hf + "layer_scale1.lambda1", hf + "layer_scale2.lambda1"})
    unmapped = sorted(k for k in src if k not in used)
    if unmapped:
        raise ValueError(f"Eva.from_hf: parameters that do not map: {unmapped}")
    return cfg, state


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _warn_rope_augmentation(source: str) -> None:
    warnings.warn(f"Eva.{source}: the source model augments RoPE coordinates in training (shift / jitter / rescale); "
                  "vitkern's Eva does not (inference is unaffected)", stacklevel=3)


def _norm_factory(norm: nn.Module):
    """A ``norm_layer`` building ``norm``'s kind with its eps (LayerNorm or RMSNorm)."""
    name = type(norm).__name__
    eps = float(getattr(norm, "eps", 1e-6) or 1e-6)
    if isinstance(norm, nn.LayerNorm) or name in ("LayerNorm", "LayerNormFp32"):
        return lambda dim, **dd: nn.LayerNorm(dim, eps=eps, **dd)
    if name in ("RmsNorm", "RMSNorm", "RmsNormFp32"):
        return lambda dim, **dd: nn.RMSNorm(dim, eps=eps, **dd)
    raise ValueError(f"Eva.from_timm: norm layer {name} is not supported (LayerNorm or RMSNorm)")


def _config_from_timm(model: nn.Module) -> dict:
    """The :class:`Eva` keywords of a timm ``Eva`` instance, refusing what vitkern's does not cover."""
    if type(model).__name__ != "Eva":
        raise ValueError(f"Eva.from_timm: expected a timm.models.eva.Eva, got {type(model).__name__}")

    def refuse(what):
        raise ValueError(f"Eva.from_timm: {what} is not supported by vitkern's Eva")

    blk = model.blocks[0]
    if type(blk).__name__ != "EvaBlock":
        refuse(f"the {type(blk).__name__} block")
    attn = blk.attn
    attn_kind = type(attn).__name__
    if attn_kind not in ("EvaAttention", "AttentionRope"):
        refuse(f"the {attn_kind} attention")
    if getattr(attn, "gate", None) is not None:
        refuse("gated attention")
    if getattr(model, "patch_drop", None) is not None:
        refuse("patch dropout")
    if getattr(model.patch_embed, "dynamic_img_pad", False):
        refuse("dynamic_img_pad")
    if getattr(model, "attn_pool", None) is not None:
        refuse("MAP pooling (global_pool='map')")
    dim = model.embed_dim
    pe = model.patch_embed
    cfg = dict(img_size=pe.img_size, patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
               num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=dim,
               depth=len(model.blocks), num_heads=attn.num_heads, norm_layer=_norm_factory(blk.norm1),
               dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)))
    last = getattr(model.blocks[-1], "drop_path1", None)
    if last is not None and not _is_identity(last):
        cfg["drop_path_rate"] = float(last.drop_prob)
    if pe.patch_size[0] != pe.patch_size[1]:
        refuse(f"a non-square patch {pe.patch_size}")
    if attn.head_dim != dim // attn.num_heads:
        cfg["head_dim"] = attn.head_dim
    cfg["attn_type"] = "rope" if attn_kind == "AttentionRope" else "eva"
    cfg["qkv_fused"] = attn.qkv is not None
    if attn.qkv is not None:
        cfg["qkv_bias"] = (attn.qkv.bias is not None) if attn_kind == "AttentionRope" else attn.q_bias is not None
    else:
        cfg["qkv_bias"] = attn.q_proj.bias is not None
    cfg["proj_bias"] = attn.proj.bias is not None
    if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
        cfg["num_kv_heads"] = tuple(b.attn.num_kv_heads for b in model.blocks)
    if not all(type(b.attn).__name__ == attn_kind for b in model.blocks):
        refuse("blocks with different attention classes")
    cfg["qk_norm"] = not _is_identity(attn.q_norm)
    cfg["scale_attn_inner"] = not _is_identity(attn.norm)
    mlp = blk.mlp
    kind = type(mlp).__name__
    if kind == "SwiGLU":
        cfg.update(swiglu_mlp=True, scale_mlp=not _is_identity(mlp.norm), mlp_hidden_features=mlp.fc1_g.out_features)
        if _is_identity(mlp.norm):
            cfg["swiglu_align_to"] = 1  # the separate-projection layout without a norm
    elif kind == "GluMlp":
        if getattr(mlp, "gate_last", False) or not isinstance(mlp.act, nn.SiLU):
            refuse("a GluMlp other than SwiGLU with the gate first")
        if not _is_identity(mlp.norm):
            refuse("a packed GluMlp with a norm")
        cfg.update(swiglu_mlp=True, mlp_hidden_features=mlp.fc1.out_features // 2)
    elif kind == "Mlp":
        if not isinstance(mlp.act, nn.GELU) or mlp.act.approximate != "none":
            refuse(f"the MLP activation {type(mlp.act).__name__}")
        cfg.update(scale_mlp=not _is_identity(mlp.norm), mlp_hidden_features=mlp.fc1.out_features)
    else:
        refuse(f"the {kind} MLP")
    if blk.gamma_1 is not None:
        cfg["init_values"] = 1.0
        cfg["attn_only_layer_scale"] = blk.gamma_2 is None
    cfg.update(class_token=model.cls_token is not None,
               num_reg_tokens=model.reg_token.shape[1] if model.reg_token is not None else 0,
               no_embed_class=model.no_embed_class, use_abs_pos_emb=model.pos_embed is not None,
               use_pre_transformer_norm=not _is_identity(model.norm_pre),
               use_post_transformer_norm=not _is_identity(model.norm), use_fc_norm=not _is_identity(model.fc_norm))
    rope = model.rope
    if rope is not None:
        if getattr(rope, "aug_active", False):
            _warn_rope_augmentation("from_timm")
        rkind = type(rope).__name__
        cfg["use_rot_pos_emb"] = True
        if rkind == "RotaryEmbeddingCat":
            if rope.in_pixels or rope.grid_type != "index":
                refuse("a pixel-grid RotaryEmbeddingCat")
            cfg.update(rope_type="cat", rope_temperature=rope.temperature, ref_feat_shape=rope.ref_feat_shape,
                       rope_grid_offset=rope.grid_offset, rope_grid_indexing=rope.grid_indexing,
                       rope_rotate_half=rope.rotate_half)
        elif rkind == "RotaryEmbeddingMixed":
            cfg.update(rope_type="mixed", rope_temperature=rope.temperature, rope_grid_indexing=rope.grid_indexing)
        elif rkind == "RotaryEmbeddingDinoV3":
            cfg.update(rope_type="dinov3", rope_temperature=rope.temperature or 100.0,
                       rope_min_period=rope.min_period, rope_max_period=rope.max_period,
                       rope_normalize_coords=rope.normalize_coords, rope_grid_offset=rope.grid_offset,
                       rope_grid_indexing=rope.grid_indexing, rope_rotate_half=rope.rotate_half)
        else:
            refuse(f"the {rkind} position embedding")
    return cfg


# ----------------------------------------------------------------------------------------------
# The named configurations (timm's names and values; create_model builds an Eva for them)
# ----------------------------------------------------------------------------------------------

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pcfg(tag, size, mean, std, crop_pct, num_classes, license, crop_mode="center"):
    return dict(tag=tag, input_size=(3, size, size), mean=mean, std=std, crop_pct=crop_pct, crop_mode=crop_mode,
                interpolation="bicubic", num_classes=num_classes, license=license, fixed_input_size=True,
                first_conv="patch_embed.proj", classifier="head", pool_size=None)


def _eva02(size, width, depth, heads, hidden, *, large=False):
    cfg = dict(img_size=size, patch_size=14, embed_dim=width, depth=depth, num_heads=heads, swiglu_mlp=True,
               mlp_hidden_features=hidden, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
    if large:  # base and large: separate q / k / v projections and the SwiGLU's norm (sub-LN)
        cfg.update(qkv_fused=False, scale_mlp=True)
    return cfg


def _eva02_pcfg(size):
    if size == 224:
        return _pcfg("mim_in22k", 224, _CLIP_MEAN, _CLIP_STD, 0.9, 0, "mit")
    if size == 336:
        return _pcfg("mim_in22k_ft_in1k", 336, _CLIP_MEAN, _CLIP_STD, 1.0, 1000, "mit")
    return _pcfg("mim_in22k_ft_in22k_in1k", size, _CLIP_MEAN, _CLIP_STD, 1.0, 1000, "mit", crop_mode="squash")


def _register(name, config, pretrained_cfg, doc):
    def config_fn():
        return dict(config)

    config_fn.__name__ = config_fn.__qualname__ = name
    config_fn.__doc__ = doc
    globals()[name] = register_model(config_fn, pretrained_cfg=pretrained_cfg, model_cls=Eva)


for _size, _sizes in ((224, ("tiny", "small", "base", "large")), (336, ("tiny", "small")), (448, ("base", "large"))):
    for _s in _sizes:
        _w, _d, _h, _hid = {"tiny": (192, 12, 3, 512), "small": (384, 12, 6, 1024), "base": (768, 12, 12, 2048),
                            "large": (1024, 24, 16, 2730)}[_s]
        _cfg = _eva02(_size, _w, _d, _h, _hid, large=_s in ("base", "large"))
        if _size == 224:
            _cfg["num_classes"] = 0
        _register(f"eva02_{_s}_patch14_{_size}", _cfg, _eva02_pcfg(_size),
                  f"EVA-02-{_s.capitalize()}/14 at {_size} px (2-D RoPE, SwiGLU).")

_ROPE_VIT = dict(patch_size=16, global_pool="token", attn_type="rope", init_values=1e-5, use_abs_pos_emb=False,
                 use_fc_norm=False, use_rot_pos_emb=True, rope_temperature=100.0, rope_grid_indexing="xy")
for _s, (_w, _d, _h) in {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}.items():
    for _kind, _extra in (("rope", {}), ("rope_mixed", dict(rope_type="mixed", rope_temperature=10.0)),
                          ("rope_ape", dict(use_abs_pos_emb=True, no_embed_class=True))):
        if _kind == "rope_ape" and _s == "large":
            continue
        _register(f"vit_{_s}_patch16_{_kind}_224", dict(_ROPE_VIT, img_size=224, embed_dim=_w, depth=_d, num_heads=_h,
                                                        **_extra),
                  _pcfg("naver_in1k", 224, _IMAGENET_MEAN, _IMAGENET_STD, 0.9, 1000, "apache-2.0"),
                  f"RoPE-ViT-{_s.capitalize()}/16 ({_kind.replace('_', ' ')}), 224 px.")

_SBB = dict(patch_size=16, img_size=256, init_values=1e-5, class_token=False, use_abs_pos_emb=False,
            use_rot_pos_emb=True, ref_feat_shape=(16, 16))
for _name, (_w, _h, _reg, _mean, _std) in {
        "vit_medium_patch16_rope_reg1_gap_256": (512, 8, 1, (0.5,) * 3, (0.5,) * 3),
        "vit_base_patch16_rope_reg1_gap_256": (768, 12, 1, (0.5,) * 3, (0.5,) * 3),
        "vit_betwixt_patch16_rope_reg4_gap_256": (640, 10, 4, _CLIP_MEAN, _CLIP_STD)}.items():
    _register(_name, dict(_SBB, embed_dim=_w, depth=12, num_heads=_h, num_reg_tokens=_reg),
              _pcfg("sbb_in1k", 256, _mean, _std, 0.95, 1000, "mit"),
              "RoPE ViT with register tokens and average pooling, 256 px.")

_DINOV3 = dict(patch_size=16, img_size=256, num_classes=0, dynamic_img_size=True, init_values=1e-5, num_reg_tokens=4,
               use_abs_pos_emb=False, use_fc_norm=False, use_rot_pos_emb=True, rope_type="dinov3",
               rope_temperature=100.0, rope_rotate_half=True, norm_eps=1e-5)
for _name, (_w, _d, _h, _qkvb) in {"vit_small_patch16_dinov3": (384, 12, 6, False),
                                    "vit_small_patch16_dinov3_qkvb": (384, 12, 6, True),
                                    "vit_base_patch16_dinov3": (768, 12, 12, False),
                                    "vit_large_patch16_dinov3": (1024, 24, 16, False)}.items():
    _register(_name, dict(_DINOV3, embed_dim=_w, depth=_d, num_heads=_h, qkv_bias=_qkvb),
              _pcfg("lvd1689m", 256, _IMAGENET_MEAN, _IMAGENET_STD, 1.0, 0, "dinov3-license"),
              "DINOv3 ViT/16 (registers, LayerScale, DINOv3 RoPE), any image size.")
