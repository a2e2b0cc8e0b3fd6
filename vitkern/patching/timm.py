"""timm's ViT family: which modules the fused forwards of :mod:`vitkern.nn` can run, and why not.

timm's ``Attention``, ``Mlp``, ``Block`` and ``LayerScale`` / ``DropPath`` have the attributes of
:class:`vitkern.nn.Attention`, :class:`vitkern.nn.Mlp` and :class:`vitkern.nn.Block` (vitkern's
modules were built with timm's names and state_dict keys), so a patch binds vitkern's forward to
timm's instance: no parameter is copied or moved. ``PatchEmbed`` gets the fused patchify GEMM.
Every check runs at patch time; what can change at run time (training with dropout) is handled by
the vitkern forwards' own unfused branches.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitkern.nn.attention import Attention as _VkAttention
from vitkern.nn.attention_pool import AttentionPoolLatent as _VkAttentionPool
from vitkern.nn.block import Block as _VkBlock
from vitkern.nn.layer_norm import apply_norm
from vitkern.nn.linear import Mlp as _VkMlp, SwiGLUPacked as _VkSwiGLUPacked, resolve_activation
from vitkern.models.eva import SwiGLU as _VkSwiGLU, eva_attention
from vitkern.ops.patch_embed import patch_embed
from vitkern.ops.qk_prologue import QKNorm, RopeTables
from vitkern.patching.core import PatchReport, install, is_patched

__all__ = ["patch_timm_modules"]


def _classes():
    try:
        from timm.layers import Attention, DropPath, GluMlp, LayerScale, Mlp, PatchEmbed, SwiGLU
        from timm.models.vision_transformer import Block
    except ImportError:
        return None
    return dict(Attention=Attention, Mlp=Mlp, Block=Block, PatchEmbed=PatchEmbed, LayerScale=LayerScale,
                DropPath=DropPath, GluMlp=GluMlp, SwiGLU=SwiGLU)


def _attention_reason(m) -> Optional[str]:
    if getattr(m, "gate", None) is not None:
        return "gated attention (a sigmoid gate on the output) is not fused"
    if not isinstance(m.qkv, nn.Linear) or not isinstance(m.proj, nn.Linear):
        return "qkv / proj are not nn.Linear"
    dim = m.num_heads * m.head_dim
    if m.qkv.out_features != 3 * dim or getattr(m, "attn_dim", dim) != dim or m.proj.in_features != dim:
        return f"an attention width ({getattr(m, 'attn_dim', dim)}) other than num_heads x head_dim"
    if abs(m.scale - m.head_dim**-0.5) > 1e-12 * m.scale:
        return f"a score scale ({m.scale}) other than head_dim ** -0.5"
    if not hasattr(m, "norm"):
        return "no scale-norm attribute (timm before scale_norm)"
    return None


def _mlp_reason(m) -> tuple[Optional[str], Optional[str]]:
    try:
        activation = resolve_activation(m.act)
    except ValueError:
        return None, (f"activation {type(m.act).__name__}: the fused epilogues compute GELU (erf / tanh), "
                      "QuickGELU or none")
    if not isinstance(m.fc1, nn.Linear) or not isinstance(m.fc2, nn.Linear):
        return None, "fc1 / fc2 are not nn.Linear (a conv MLP)"
    return activation, None


def _swiglu_reason(m, packed: bool) -> Optional[str]:
    """Why timm's ``GluMlp`` (``packed``) / ``SwiGLU`` cannot run vitkern's fused SwiGLU forward, or None."""
    if type(m.act) is not nn.SiLU:
        return f"a {type(m.act).__name__} gate (the SwiGLU epilogue computes SiLU)"
    linears = (m.fc1, m.fc2) if packed else (m.fc1_g, m.fc1_x, m.fc2)
    if not all(isinstance(lin, nn.Linear) for lin in linears):
        return "its projections are not nn.Linear (a conv MLP)"
    if packed and (m.gate_last or m.chunk_dim not in (-1, 1) or m.fc1.out_features % 2):
        return "gate_last=True (the gate in the second half; the epilogue takes the gate first)"
    if not packed and (m.fc1_g.bias is None) != (m.fc1_x.bias is None):
        return "a bias on one of fc1_g / fc1_x only"
    return None


def _glu_mlp_forward(self, x: torch.Tensor, residual=None, residual_scale=None, row_scale=None) -> torch.Tensor:
    return _VkSwiGLUPacked.forward(self, x, residual, residual_scale, row_scale)


def _swiglu_forward(self, x: torch.Tensor, residual=None, residual_scale=None, row_scale=None) -> torch.Tensor:
    return _VkSwiGLU.forward(self, x, residual=residual, residual_scale=residual_scale, row_scale=row_scale)


def _attn_pool_reason(m) -> Optional[str]:
    """Why timm's MAP head cannot run vitkern's AttentionPoolLatent forward, or None."""
    if not isinstance(m.q, nn.Linear) or not isinstance(m.kv, nn.Linear) or not isinstance(m.proj, nn.Linear):
        return "no query / output projection (q_proj=False or out_features=0)"
    if not (isinstance(m.q_norm, nn.Identity) and isinstance(m.k_norm, nn.Identity)):
        return "qk-norm in the pooling attention is not fused"
    if m.pos_embed is not None:
        return "a position embedding in the pooling head"
    if getattr(m, "mlp", None) is None:
        return "no MLP (out_features=0)"
    if m.pool not in ("token", "avg", ""):
        return f"pool_type {m.pool!r}"
    if m.latent_dim != m.num_heads * m.head_dim:
        return "a latent width other than num_heads x head_dim"
    return None


def _attn_pool_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    # a mask runs timm's own forward (vitkern's pooling attention takes none)
    if attn_mask is not None or x.dim() != 3:
        return type(self).forward(self, x, attn_mask)
    return _VkAttentionPool.forward(self, x)


def _layer_scale_reason(ls, classes) -> Optional[str]:
    if isinstance(ls, nn.Identity):
        return None
    if type(ls) is not classes["LayerScale"] or ls.inplace:
        return f"{type(ls).__name__} (only timm's out-of-place LayerScale is fused)"
    return None


def _drop_path_reason(dp, classes) -> Optional[str]:
    if isinstance(dp, nn.Identity) or type(dp) is classes["DropPath"]:
        return None
    return f"{type(dp).__name__} (only timm's DropPath is fused)"


def _eva_attention_reason(m) -> Optional[str]:
    if getattr(m, "gate", None) is not None:
        return "gated attention (a sigmoid gate on the output) is not fused"
    if abs(m.scale - m.head_dim**-0.5) > 1e-12 * m.scale:
        return f"a score scale ({m.scale}) other than head_dim ** -0.5"
    for what in ("q_norm", "k_norm"):
        try:
            QKNorm.from_module(getattr(m, what))
        except ValueError as e:
            return f"{what}: {e}"
    return None


def _eva_attention_forward(self, x, rope=None, attn_mask=None, is_causal=False):
    # timm's EvaAttention / AttentionRope with the QK-norms and the rotation in the attention op's
    # prologue; a mask, causal attention, dropout in training and batched RoPE tables (patch
    # dropout) run timm's forward
    dropping = self.training and (self.attn_drop.p > 0 or self.proj_drop.p > 0)
    if attn_mask is not None or is_causal or dropping or (rope is not None and rope.dim() not in (2, 3)):
        return type(self).forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    tables = None
    if rope is not None:
        tables = RopeTables.from_cat(rope, "half" if getattr(self, "rotate_half", False) else "interleaved")
    return eva_attention(self, x, tables)


def _patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    # The fused patchify GEMM where timm's own forward would take the plain path; anything else
    # (a size that timm rejects, padding) runs timm's forward, which raises or pads as it does.
    _, _, h, w = x.shape
    ph, pw = self.patch_size
    if h % ph or w % pw or (self.strict_img_size and self.img_size is not None and (h, w) != tuple(self.img_size)):
        return type(self).forward(self, x)
    return apply_norm(self.norm, patch_embed(x, self.proj.weight, self.proj.bias))


def _patch_embed_reason(m) -> Optional[str]:
    conv = m.proj
    if not isinstance(conv, nn.Conv2d):
        return f"proj is {type(conv).__name__}, not a Conv2d"
    if (tuple(conv.kernel_size) != tuple(m.patch_size) or tuple(conv.stride) != tuple(m.patch_size)
            or conv.padding not in ((0, 0), 0, "valid") or tuple(conv.dilation) != (1, 1) or conv.groups != 1):
        return "a conv that is not one non-overlapping patch per output (kernel = stride = patch size)"
    if getattr(m, "dynamic_img_pad", False):
        return "dynamic_img_pad (padded images) runs timm's conv"
    if not getattr(m, "flatten", True):
        return f"output_fmt {getattr(m, 'output_fmt', '?')} (only the flattened NLC tokens are fused)"
    return None


def patch_timm_modules(model: nn.Module, report: PatchReport, *, attention: bool, mlp: bool, patch_embed: bool,
                       residual_fusion: bool) -> None:
    """Patch the timm modules of ``model`` (in place), recording each in ``report``."""
    classes = _classes()
    if classes is None:
        return
    for name, m in model.named_modules():
        kind = type(m)
        if is_patched(m):
            continue
        if kind is classes["Attention"] and attention:
            reason = _attention_reason(m)
            if reason is None:
                install(m, "forward", _VkAttention.forward)
                report.add(name, "timm Attention", True, "fused qkv GEMM, flash attention, proj GEMM")
            else:
                report.add(name, "timm Attention", False, reason)
        elif kind is classes["Mlp"] and mlp:
            activation, reason = _mlp_reason(m)
            if reason is None:
                install(m, "forward", _VkMlp.forward, extra={"activation": activation})
                report.add(name, "timm Mlp", True, f"fused mlp (fc1 + {activation or 'no activation'} + fc2)")
            else:
                report.add(name, "timm Mlp", False, reason)
        elif kind in (classes["GluMlp"], classes["SwiGLU"]) and mlp:
            packed = kind is classes["GluMlp"]
            label = "timm GluMlp" if packed else "timm SwiGLU"
            reason = _swiglu_reason(m, packed)
            if reason is None:
                install(m, "forward", _glu_mlp_forward if packed else _swiglu_forward)
                report.add(name, label, True, "fused SwiGLU MLP (fc1 + silu(gate) * value in one GEMM, fc2)")
            else:
                report.add(name, label, False, reason)
        elif kind is classes["PatchEmbed"] and patch_embed:
            reason = _patch_embed_reason(m)
            if reason is None:
                install(m, "forward", _patch_embed_forward)
                report.add(name, "timm PatchEmbed", True, "patchify + projection in one GEMM")
            else:
                report.add(name, "timm PatchEmbed", False, reason)
        elif kind.__module__.startswith("timm.") and kind.__name__ in ("EvaAttention", "AttentionRope") and attention:
            reason = _eva_attention_reason(m)
            if reason is None:
                install(m, "forward", _eva_attention_forward)
                report.add(name, f"timm {kind.__name__}", True,
                           "qkv GEMM, QK-norm + RoPE prologue, flash attention, proj GEMM")
            else:
                report.add(name, f"timm {kind.__name__}", False, reason)
        elif kind.__module__.startswith("timm.") and kind.__name__ == "AttentionPoolLatent" and attention:
            reason = _attn_pool_reason(m)
            if reason is None:
                install(m, "forward", _attn_pool_forward)
                report.add(name, "timm AttentionPoolLatent", True,
                           "MAP head: latent-query GEMM, kv GEMM, flash attention, proj GEMM")
            else:
                report.add(name, "timm AttentionPoolLatent", False, reason)
        elif kind.__module__.startswith("timm.") and kind.__name__.endswith(("Attention", "Block", "Mlp", "Embed")) \
                and kind not in {classes[k] for k in ("Attention", "Mlp", "Block", "PatchEmbed", "GluMlp", "SwiGLU")}:
            report.add(name, f"timm {kind.__name__}", False, "a variant vitkern does not fuse (runs timm's forward)")
    if not residual_fusion:
        return
    for name, m in model.named_modules():
        if type(m) is not classes["Block"] or is_patched(m):
            continue
        reason = None
        if not (is_patched(m.attn) and is_patched(m.mlp)):
            reason = "its attention or MLP is not patched, so the residual adds cannot ride in their GEMMs"
        reason = reason or _layer_scale_reason(m.ls1, classes) or _layer_scale_reason(m.ls2, classes)
        reason = reason or _drop_path_reason(m.drop_path1, classes) or _drop_path_reason(m.drop_path2, classes)
        if reason is None:
            install(m, "forward", _VkBlock.forward)
            report.add(name, "timm Block", True, "residual, LayerScale and drop path in the proj / fc2 epilogues")
        else:
            report.add(name, "timm Block", False, reason)
