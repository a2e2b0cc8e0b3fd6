"""Vision Transformer built from the vitkern ops, with timm's ``VisionTransformer`` constructor
keywords, methods and state_dict keys. The named configurations and ``create_model`` are in
``vitkern.models.registry``; weight conversion is in ``vitkern.models.convert``, imported by the
conversion methods when they run (convert builds on this module, not the other way round).

The forward is DESIGN.md's: one ``patch_embed`` call (patchify GEMM + bias + position embedding +
class/register tokens), ``depth`` blocks of LN -> qkv GEMM -> flash attention -> proj GEMM with the
residual/LayerScale/drop-path epilogue -> LN -> fused MLP with the same epilogue, then pooling, norm
and head.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitkern.ops.patch_embed import resample_pos_embed
from vitkern.nn.attention_pool import AttentionPoolLatent
from vitkern.nn.block import Block, can_defer_residuals, run_blocks
from vitkern.nn.layer_norm import LayerNorm, apply_norm
from vitkern.nn.linear import Linear, resolve_activation
from vitkern.nn.patch_embed import PatchEmbed

__all__ = ["ViT", "CONFIG_KEYS", "feature_take_indices"]

GLOBAL_POOLS = ("", "token", "avg", "avgmax", "max", "map")


def global_pool_nlc(
    x: torch.Tensor, pool_type: str, num_prefix_tokens: int, include_prefix: bool = False
) -> torch.Tensor:
    """timm's pooling of (B, T, D) tokens: class token, mean / max / avgmax over the patch tokens."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    x = x if include_prefix else x[:, num_prefix_tokens:]
    if pool_type == "avg":
        return x.mean(dim=1)
    if pool_type == "avgmax":
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))
    if pool_type == "max":
        return x.amax(dim=1)
    raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {pool_type!r}")


def feature_take_indices(
    num_features: int, indices: Optional[Union[int, Sequence[int]]] = None
) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices``: the absolute block indices to take and the largest one.
    None takes all ``num_features``; an int ``n`` the last n; a sequence those indices (a negative
    one counts from the end). An index out of range raises ValueError naming it."""
    if indices is None:
        indices = num_features
    if isinstance(indices, bool):
        raise TypeError("indices must be None, an int or a sequence of ints, got a bool")
    if isinstance(indices, numbers.Integral):
        n = int(indices)
        if not 0 < n <= num_features:
            raise ValueError(f"last-n indices ({n}) is out of range (1 to {num_features})")
        take = [num_features - n + i for i in range(n)]
    else:
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"indices must hold ints, got {i!r}")
            idx = num_features + int(i) if i < 0 else int(i)
            if not 0 <= idx < num_features:
                raise ValueError(
                    f"feature index {i} is out of range (0 to {num_features - 1}, or negative from the end)"
                )
            take.append(idx)
        if not take:
            raise ValueError("indices must not be empty")
    return take, max(take)


def _trunc_normal_(t: torch.Tensor, std: float) -> None:
    # Through fp32: truncated normal sampling is not implemented for every low-precision CPU dtype.
    with torch.no_grad():
        if t.dtype in (torch.float16, torch.bfloat16):
            t.copy_(nn.init.trunc_normal_(torch.empty_like(t, dtype=torch.float32), std=std))
        else:
            nn.init.trunc_normal_(t, std=std)


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2020) on vitkern's fused ops.

    Constructor keywords, attributes, methods (``forward_features``, ``forward_head``,
    ``reset_classifier``, ``set_grad_checkpointing``, ``group_matcher`` for timm's layer-wise lr
    decay, ``num_features``, ...) and state_dict keys
    follow timm's ``VisionTransformer`` for the same configuration, so a timm checkpoint loads with
    ``load_state_dict`` and ``ViT.from_timm(model)`` converts a timm model. timm's dense-feature
    and fine-tuning API is here with timm 1.0's signatures and results: :meth:`forward_intermediates`,
    :meth:`get_intermediate_layers`, :meth:`prune_intermediate_layers`, ``feature_info`` (so
    ``timm.models.FeatureGetterNet`` wraps a ViT) and :meth:`set_input_size` with ``patch_size``
    (FlexiViT kernel resampling). Extra keywords:

    - ``global_pool="map"``: SigLIP's multihead attention pooling head (``attn_pool``, a
      :class:`vitkern.nn.AttentionPoolLatent` with timm's keys, ``num_heads`` heads and an MLP of
      ``mlp_ratio``) over the patch tokens after the final norm.
    - ``mlp_layer``: "mlp" (fc1 -> act -> fc2, one fused ``mlp`` call) or "swiglu_packed"
      (timm's ``SwiGLUPacked``, DINOv2 giant: ``fc2(silu(gate) * value)`` with both halves from
      fc1; one fused ``swiglu_mlp`` call: the gate in fc1's GEMM epilogue; ``act`` is unused).
    - ``norm_eps``: the eps of every LayerNorm (timm 1e-6, Hugging Face ViT 1e-12).
    - ``act``: the MLP activation, "gelu" (erf, timm/torchvision) or "gelu_tanh" (the tanh
      approximation the original JAX checkpoints were trained with; Hugging Face "gelu_new") or
      "quick_gelu" (OpenAI CLIP's ``x * sigmoid(1.702 x)``), each fused in the fc1 epilogue.

    ``dynamic_img_size=True`` accepts any input size divisible by the patch size (or any size with
    ``dynamic_img_pad``) and resamples the position embedding at run time (bicubic, as timm).
    ``pos_embed_antialias`` is that resampling's (and :meth:`set_input_size`'s) antialias flag: True
    as timm's ``resample_abs_pos_embed``; :meth:`from_hf` sets False, Hugging Face's rule
    (``interpolate_pos_encoding``: bicubic to the new grid size, no antialias), so a converted
    model resamples as its source does (PyTorch's antialiased bicubic is another kernel even when
    upsampling).
    Drop path (``drop_path_rate``, linear over depth) is a per-sample row scale in the proj / fc2
    epilogues. Weight conversion: :meth:`from_timm`, :meth:`from_torchvision`, :meth:`from_hf`,
    :meth:`from_npz` / :meth:`load_npz`, :meth:`save_safetensors` / :meth:`load_safetensors`.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_attn_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        pos_embed: str = "learn",
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        distilled: bool = False,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        pool_include_prefix: bool = False,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        pos_embed_antialias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act: Any = "gelu",
        mlp_layer: str = "mlp",
        weight_init: str = "",
        device=None,
        dtype=None,
    ) -> None:
        arguments = dict(locals())  # first, so that it holds the arguments and nothing else
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if pos_embed not in ("", "none", "learn"):
            raise ValueError(f"pos_embed must be 'learn', 'none' or '', got {pos_embed!r}")
        if not isinstance(pos_embed_antialias, bool):
            raise TypeError(f"pos_embed_antialias must be a bool, got {type(pos_embed_antialias).__name__}")
        if weight_init not in ("", "jax", "jax_nlhb", "skip", "reset"):
            raise ValueError(f"weight_init must be '', 'jax', 'jax_nlhb', 'reset' or 'skip', got {weight_init!r}")
        if distilled and (not class_token or global_pool != "token" or reg_tokens):
            raise ValueError("distilled=True (DeiT's distillation token) needs class_token=True, "
                             "global_pool='token' and no register tokens")
        act_name = resolve_activation(act)
        if act_name is None:
            raise ValueError("act must be 'gelu', 'gelu_tanh' or 'quick_gelu'")
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm

        # The constructor arguments (JSON-friendly), stored with safetensors checkpoints.
        self.config: Dict[str, Any] = {name: arguments[name] for name in CONFIG_KEYS}
        self.config.update(
            img_size=list(img_size) if isinstance(img_size, (tuple, list)) else img_size,
            patch_size=list(patch_size) if isinstance(patch_size, (tuple, list)) else patch_size,
            act=act_name,
        )

        def norm_layer(dim: int, **kw) -> LayerNorm:
            return LayerNorm(dim, eps=norm_eps, **kw)

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + (1 if distilled else 0) + reg_tokens
        self.distilled = distilled
        # timm's VisionTransformerDistilled: both heads' logits in training only when asked
        self.distilled_training = False
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_antialias = pos_embed_antialias
        self.norm_eps = norm_eps
        self.act = act_name
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=not pre_norm,  # as timm: no patch bias when a pre-norm follows (CLIP)
            strict_img_size=not dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.empty(1, embed_len, embed_dim, **dd))
        else:
            self.pos_embed = None
        # after pos_embed: timm's parameter order (VisionTransformerDistilled adds it last)
        self.dist_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if distilled else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.norm_pre = norm_layer(embed_dim, **dd) if pre_norm else nn.Identity()

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")] if depth > 0 else []
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    scale_attn_norm=scale_attn_norm,
                    scale_mlp_norm=scale_mlp_norm,
                    proj_bias=proj_bias,
                    init_values=init_values,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=act_name,
                    mlp_layer=mlp_layer,
                    **dd,
                )
                for i in range(depth)
            ]
        )
        # timm's ViT feature_info: one entry per block, the reduction is the patch size.
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim, **dd) if final_norm and use_fc_norm else nn.Identity()
        # SigLIP's MAP head, between the final norm and fc_norm / head (as timm's attn_pool)
        self.attn_pool = (
            AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer,
                                act_layer=act_name, **dd)
            if global_pool == "map"
            else None
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head = Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if distilled:  # DeiT's distillation head, on the distillation token
            self.head_dist = Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)

    # ------------------------------------------------------------------------------------------
    # Initialisation (timm's schemes)
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's ViT init: trunc-normal(0.02) position embedding and Linear weights, zero biases,
        N(0, 1e-6) class/register tokens; ``mode="jax"`` uses the JAX scheme (xavier Linear, lecun
        patch projection, zero head; "jax_nlhb" sets the head bias to -log(num_classes))."""
        mode = mode or self.weight_init_mode
        if mode not in ("", "jax", "jax_nlhb", "reset"):
            raise ValueError(f"init mode must be '', 'jax', 'jax_nlhb' or 'reset', got {mode!r}")
        if self.pos_embed is not None:
            _trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.dist_token is not None:
            _trunc_normal_(self.dist_token, std=0.02)  # timm's VisionTransformerDistilled
        head_bias = -math.log(self.num_classes) if "nlhb" in mode and self.num_classes > 0 else 0.0
        for name, m in self.named_modules():
            if m is self:
                continue
            if mode == "reset":
                if needs_reset and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            elif isinstance(m, nn.Linear):
                if mode.startswith("jax"):
                    if name.startswith("head"):
                        nn.init.zeros_(m.weight)
                        nn.init.constant_(m.bias, head_bias)
                    else:
                        nn.init.xavier_uniform_(m.weight)
                        if m.bias is not None:
                            if "mlp" in name:
                                nn.init.normal_(m.bias, std=1e-6)
                            else:
                                nn.init.zeros_(m.bias)
                else:
                    _trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and mode.startswith("jax"):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                _trunc_normal_(m.weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif needs_reset and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if self.attn_pool is not None:
            self.attn_pool.init_weights()

    # ------------------------------------------------------------------------------------------
    # timm's utility API
    # ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}  # timm's set, for every ViT

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's ``VisionTransformer.group_matcher`` (the names are timm's): the embeddings and the
        pre-norm as the stem, one group per block, the final norm last; the head and fc_norm fall
        in the last layer. timm's layer-wise lr decay (``param_groups_layer_decay``,
        ``create_optimizer_v2(model, layer_decay=...)``) groups this model as it groups timm's.
        ``coarse`` is accepted for timm's signature and, as there, changes nothing."""
        return dict(
            # VisionTransformerDistilled's own stem pattern for the distilled DeiT
            stem=r"^cls_token|pos_embed|patch_embed|dist_token" if self.distilled
            else r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """timm's ``VisionTransformerDistilled.set_distilled_training``: a distilled model in
        training returns both heads' logits ``(head, head_dist)`` (for the distillation loss)
        instead of their mean."""
        if not self.distilled:
            raise ValueError("set_distilled_training needs a distilled model (distilled=True)")
        self.distilled_training = enable

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return (self.head, self.head_dist) if self.distilled else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs (0: none)."""
        ref = self.patch_embed.proj.weight
        self.num_classes = num_classes
        self.config["num_classes"] = num_classes
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs the class token")
            # as timm: attention pooling is kept or removed, never added here
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("reset_classifier cannot add attention pooling (global_pool='map') to a model "
                                 "built without it")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
            self.config["global_pool"] = global_pool
            self.config["fc_norm"] = not isinstance(self.fc_norm, nn.Identity)
        self.head = (
            Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)
        if self.distilled:
            self.head_dist = (
                Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                if num_classes > 0
                else nn.Identity()
            )
            self.head_dist.train(self.training)

    def set_input_size(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        patch_size: Optional[Union[int, Tuple[int, int]]] = None,
    ) -> None:
        """timm's ``set_input_size``: change the nominal input size and / or the patch size (None
        keeps the current one). A new patch size resamples the patch-embedding kernel
        (:func:`vitkern.resample_patch_embed`, FlexiViT's pseudo-inverse resize); a new grid
        resamples the learned position embedding (bicubic, ``pos_embed_antialias``). The config
        records the new sizes and ``feature_info`` the new reduction."""
        prev = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        self.config["img_size"] = list(self.patch_embed.img_size)
        self.config["patch_size"] = list(self.patch_embed.patch_size)
        reduction = self.patch_embed.feat_ratio()
        for info in self.feature_info:
            info["reduction"] = reduction
        if self.pos_embed is not None:
            num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            num_new = self.patch_embed.num_patches + num_prefix
            if num_new != self.pos_embed.shape[1] or self.patch_embed.grid_size != prev:
                with torch.no_grad():
                    new = resample_pos_embed(
                        self.pos_embed,
                        new_size=self.patch_embed.grid_size,
                        old_size=prev,
                        num_prefix_tokens=num_prefix,
                        antialias=self.pos_embed_antialias,
                    )
                self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)

    def prune_intermediate_layers(
        self,
        indices: Union[int, Sequence[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """timm's ``prune_intermediate_layers``: keep the blocks up to the last of ``indices`` (as
        :meth:`forward_intermediates` takes them) and drop the rest; ``prune_norm`` replaces the
        final norm by an identity, ``prune_head`` the fc_norm and the classifier (``num_classes``
        0, no pooling). Returns the absolute indices kept. ``feature_info`` is left as it was (as
        timm); the config records the new depth and norms, so a saved pruned model rebuilds."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.config["depth"] = len(self.blocks)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        has_norm, has_fc_norm = not isinstance(self.norm, nn.Identity), not isinstance(self.fc_norm, nn.Identity)
        self.config["final_norm"] = has_norm or has_fc_norm
        self.config["fc_norm"] = has_fc_norm
        return take

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def _prefix_tokens(self) -> Optional[torch.Tensor]:
        if self.dist_token is not None:
            return torch.cat([self.cls_token, self.dist_token], dim=1)  # timm's order: class, distillation
        if self.cls_token is not None and self.reg_token is not None:
            return torch.cat([self.cls_token, self.reg_token], dim=1)
        if self.cls_token is not None:
            return self.cls_token
        return self.reg_token

    def _pos_embed_for(self, height: int, width: int) -> Optional[torch.Tensor]:
        pos = self.pos_embed
        if pos is None or not self.dynamic_img_size:
            return pos
        grid = self.patch_embed.dynamic_feat_size((height, width))
        if tuple(grid) == tuple(self.patch_embed.grid_size):
            return pos
        return resample_pos_embed(
            pos,
            new_size=grid,
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            antialias=self.pos_embed_antialias,  # timm's resample_abs_pos_embed: True; Hugging Face: False
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, K + N, D): one ``patch_embed`` call (patch GEMM, bias,
        position embedding, class/register tokens), then position dropout and the pre-norm."""
        if x.dim() != 4:
            raise ValueError(f"ViT: images must have shape (B, C, H, W), got {tuple(x.shape)}")
        pos = self._pos_embed_for(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x, pos_embed=pos, prefix_tokens=self._prefix_tokens())
        if self.training and self.pos_drop.p > 0:
            x = self.pos_drop(x)
        return apply_norm(self.norm_pre, x)

    def _block(self, blk: nn.Module, x: torch.Tensor, attn_mask, is_causal: bool) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, attn_mask, is_causal, use_reentrant=False)
        return blk(x, attn_mask, is_causal)

    def _defer_residuals(self) -> bool:
        """Whether the blocks run with their residual adds deferred into the next norm
        (:func:`vitkern.nn.block.can_defer_residuals`)."""
        return can_defer_residuals(self.blocks, grad_checkpointing=self.grad_checkpointing)

    def forward_features(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """All tokens (B, K + N, D) after the blocks and the final norm. Each block's residual adds
        run in the norm after them (:meth:`vitkern.nn.Block.forward_deferred`, the last one in the
        final norm), unless :meth:`_defer_residuals` says no (:func:`vitkern.nn.block.run_blocks`)."""
        return run_blocks(self.blocks, self.embed(x), self.norm, block_args=lambda i: (attn_mask, is_causal),
                          plain_call=self._block, grad_checkpointing=self.grad_checkpointing)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]], Dict[str, Any]]:
        """timm's ``forward_intermediates``: the outputs of the blocks ``indices`` selects (None:
        all; an int n: the last n; a sequence: those, negative from the end), through the same
        embed / block / norm code as :meth:`forward_features`.

        Each intermediate is the block's output, through the final norm with ``norm``, without its
        prefix (class / register) tokens: ``(B, D, H', W')`` for ``output_fmt="NCHW"`` (the patch
        grid of this input), ``(B, N, D)`` for "NLC". ``return_prefix_tokens`` makes each a
        ``(spatial, prefix)`` pair, prefix ``(B, K, D)`` (when the model has prefix tokens).
        ``stop_early`` runs no block after the last one taken. Returns ``(final, intermediates)``,
        ``final`` as :meth:`forward_features` returns it, or the list alone with
        ``intermediates_only``; ``output_dict`` returns timm's dict instead ("image_intermediates",
        "image_intermediates_prefix" with ``return_prefix_tokens``, "image_features" unless
        ``intermediates_only``)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        take_set = set(take)
        if x.dim() != 4:
            raise ValueError(f"ViT: images must have shape (B, C, H, W), got {tuple(x.shape)}")
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        x = self.embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._block(blk, x, attn_mask, is_causal)
            if i in take_set:
                intermediates.append(apply_norm(self.norm, x) if norm else x)

        k = self.num_prefix_tokens
        prefix = [y[:, :k] for y in intermediates] if k else None
        if k:
            intermediates = [y[:, k:] for y in intermediates]
        if output_fmt == "NCHW":
            gh, gw = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            out: Dict[str, Any] = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = apply_norm(self.norm, x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return apply_norm(self.norm, x), intermediates

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> List[Any]:
        """The DINO-style interface of timm (``forward_intermediates(x, n, ...,
        intermediates_only=True)``): the last ``n`` blocks' outputs (or the blocks ``n`` names),
        ``(B, D, H', W')`` with ``reshape``, else ``(B, N, D)``."""
        return self.forward_intermediates(
            x,
            n,
            return_prefix_tokens=return_prefix_tokens,
            norm=norm,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
            attn_mask=attn_mask,
        )

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        if self.attn_pool is not None:
            return self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type, self.num_prefix_tokens, self.pool_include_prefix)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, fc_norm, head dropout and the classifier (skipped with ``pre_logits``). A distilled
        model (timm's ``VisionTransformerDistilled``) averages ``head`` on the class token and
        ``head_dist`` on the distillation token (``pre_logits``: the mean of the two tokens); in
        training with :meth:`set_distilled_training` it returns both logits."""
        if self.distilled:
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(x), self.head_dist(x_dist)
            if self.distilled_training and self.training:
                return x, x_dist
            return (x + x_dist) / 2
        x = self.pool(x)
        x = apply_norm(self.fc_norm, x)
        if self.training and self.head_drop.p > 0:
            x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask, is_causal))

    def extra_repr(self) -> str:
        return f"act={self.act}, norm_eps={self.norm_eps}"

    # ------------------------------------------------------------------------------------------
    # Weights (see vitkern.models.convert)
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_timm(cls, model: nn.Module, **overrides) -> "ViT":
        """Build from a ``timm`` ``VisionTransformer`` (config inferred, weights copied)."""
        from vitkern.models.convert import from_timm

        return from_timm(model, **overrides)

    @classmethod
    def from_torchvision(cls, model: nn.Module, **overrides) -> "ViT":
        """Build from a ``torchvision.models.VisionTransformer``."""
        from vitkern.models.convert import from_torchvision

        return from_torchvision(model, **overrides)

    @classmethod
    def from_hf(cls, model, state_dict: Optional[Dict[str, torch.Tensor]] = None, **overrides) -> "ViT":
        """Build from a Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (or a ``ViTConfig``
        plus a state_dict in the 4.x or 5.x naming)."""
        from vitkern.models.convert import from_hf

        return from_hf(model, state_dict=state_dict, **overrides)

    def to_hf(self, hf_model: nn.Module) -> nn.Module:
        """Copy this model's weights into a Hugging Face vision encoder of the same configuration
        (the inverse of :meth:`from_hf`, in ``hf_model``'s own naming); returns ``hf_model``."""
        from vitkern.models.convert import to_hf

        return to_hf(self, hf_model)

    def to_torchvision(self, tv_model: nn.Module) -> nn.Module:
        """Copy this model's weights into a ``torchvision.models.VisionTransformer`` of the same
        configuration (the inverse of :meth:`from_torchvision`); returns ``tv_model``."""
        from vitkern.models.convert import to_torchvision

        return to_torchvision(self, tv_model)

    @classmethod
    def from_npz(cls, path, **config) -> "ViT":
        """Build from an original google-research/vision_transformer ``.npz`` checkpoint; the
        config is inferred from the arrays, ``config`` keywords override it."""
        from vitkern.models.convert import from_npz

        return from_npz(path, **config)

    def load_npz(self, path, prefix: Optional[str] = None) -> "ViT":
        """Load an original JAX ``.npz`` checkpoint into this model (``np.load(allow_pickle=False)``);
        returns the model."""
        from vitkern.models.convert import load_npz

        return load_npz(self, path, prefix=prefix)

    def save_npz(self, path) -> None:
        """Write this model as an original JAX ``.npz`` checkpoint (the inverse of
        :meth:`load_npz`; big_vision's naming when it has a MAP head)."""
        from vitkern.models.convert import save_npz

        save_npz(self, path)

    def save_safetensors(self, path, metadata: Optional[Dict[str, str]] = None) -> None:
        """Save the state_dict (timm's keys) and the constructor config to a safetensors file."""
        from vitkern.models.convert import save_safetensors

        save_safetensors(self, path, metadata=metadata)

    @classmethod
    def load_safetensors(cls, path, device=None, dtype=None, **config) -> "ViT":
        """Build a model from a safetensors file written by :meth:`save_safetensors` (the stored
        config, updated by ``config``; a file without one needs the full config)."""
        from vitkern.models.convert import load_safetensors

        return load_safetensors(path, device=device, dtype=dtype, **config)

    def load_checkpoint(self, path, strict: bool = True) -> "ViT":
        """Load weights into this model from ``.safetensors``, ``.npz`` (JAX layout) or a torch
        file (``torch.load(weights_only=True)``, timm-format keys); returns the model. A checkpoint
        of another class count or image size is adapted as timm adapts pretrained weights: the head
        dropped (this model's kept as initialised, with a warning), ``pos_embed`` resampled
        (bicubic, antialiased); see :func:`vitkern.models.convert.load_checkpoint`."""
        from vitkern.models.convert import load_checkpoint

        return load_checkpoint(self, path, strict=strict)


# The keywords ``ViT.config`` records and a stored config may set: every constructor argument but
# the init scheme and the placement.
CONFIG_KEYS: Tuple[str, ...] = tuple(
    name
    for name in inspect.signature(ViT.__init__).parameters
    if name not in ("self", "weight_init", "device", "dtype")
)
