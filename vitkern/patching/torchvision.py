"""torchvision's ``VisionTransformer``: its ``EncoderBlock`` (an ``nn.MultiheadAttention`` and an
``MLPBlock``) run as vitkern's fused block, and its patchify conv as one GEMM.

The encoder block's patched forward reads the modules' own parameters (``in_proj_weight`` is the
fused qkv weight in the ``(3, H, d)`` row order that ``attention_qkvpacked`` reads), so nothing is
copied. A block in training with active dropout runs torchvision's own forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitkern.nn.layer_norm import apply_pre_norm
from vitkern.nn.linear import resolve_activation
from vitkern.ops.attention import attention_qkvpacked
from vitkern.ops.linear import linear
from vitkern.ops.mlp import mlp
from vitkern.ops.patch_embed import patch_embed
from vitkern.patching.core import PatchReport, install, is_patched

__all__ = ["patch_torchvision_modules"]


def _classes():
    try:
        from torchvision.models.vision_transformer import EncoderBlock, MLPBlock, VisionTransformer
    except ImportError:
        return None
    return dict(EncoderBlock=EncoderBlock, MLPBlock=MLPBlock, VisionTransformer=VisionTransformer)


def _dropout_active(block) -> bool:
    if not block.training:
        return False
    mlp_drops = [m.p for m in block.mlp if isinstance(m, nn.Dropout)]
    return block.self_attention.dropout > 0 or block.dropout.p > 0 or any(p > 0 for p in mlp_drops)


def _encoder_block_forward(self, input: torch.Tensor) -> torch.Tensor:
    if input.dim() != 3 or _dropout_active(self):
        return type(self).forward(self, input)
    attention, fused_mlp, fuse_residual = self._vitkern_options
    b, t, c = input.shape
    mha = self.self_attention
    h = apply_pre_norm(self.ln_1, input)
    if attention:
        qkv = linear(h, mha.in_proj_weight, mha.in_proj_bias).reshape(b, t, 3, mha.num_heads, c // mha.num_heads)
        o = attention_qkvpacked(qkv).reshape(b, t, c)
        if fuse_residual:
            x = linear(o, mha.out_proj.weight, mha.out_proj.bias, residual=input)
        else:
            x = linear(o, mha.out_proj.weight, mha.out_proj.bias) + input
    else:
        x = mha(h, h, h, need_weights=False)[0] + input
    h = apply_pre_norm(self.ln_2, x)
    if not fused_mlp:
        return x + self.mlp(h)
    fc1, fc2 = self.mlp[0], self.mlp[3]
    activation = self._vitkern_activation
    if fuse_residual:
        return mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=activation, residual=x)
    return x + mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=activation)


def _block_reason(block) -> tuple[Optional[str], Optional[str]]:
    mha = block.self_attention
    if not isinstance(mha, nn.MultiheadAttention):
        return None, f"self_attention is {type(mha).__name__}"
    if not (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn):
        return None, "a MultiheadAttention with separate q/k/v widths, bias_k/v, zero attention or seq-first inputs"
    seq = list(block.mlp)
    if len(seq) != 5 or not (isinstance(seq[0], nn.Linear) and isinstance(seq[3], nn.Linear)):
        return None, "an MLPBlock other than Linear, activation, Dropout, Linear, Dropout"
    try:
        activation = resolve_activation(seq[1])
    except ValueError:
        return None, f"activation {type(seq[1]).__name__}: the fused epilogues compute GELU (erf / tanh) or none"
    return activation, None


def _process_input(self, x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    conv = self.conv_proj
    if h != self.image_size or w != self.image_size or not isinstance(conv, nn.Conv2d):
        return type(self)._process_input(self, x)  # raises as torchvision does
    return patch_embed(x, conv.weight, conv.bias)


def patch_torchvision_modules(model: nn.Module, report: PatchReport, *, attention: bool, mlp: bool,
                              patch_embed: bool, residual_fusion: bool) -> None:
    """Patch the torchvision ViT modules of ``model`` (in place), recording each in ``report``."""
    classes = _classes()
    if classes is None:
        return
    for name, m in model.named_modules():
        if is_patched(m) or is_patched(m, "_process_input"):
            continue
        if type(m) is classes["EncoderBlock"]:
            if not (attention or mlp or residual_fusion):
                continue
            activation, reason = _block_reason(m)
            if reason is None:
                install(m, "forward", _encoder_block_forward, extra={
                    "_vitkern_options": (attention, mlp, residual_fusion), "_vitkern_activation": activation})
                parts = [p for p, on in (("flash attention", attention), ("fused mlp", mlp),
                                         ("residual adds in the epilogues", residual_fusion)) if on]
                report.add(name, "torchvision EncoderBlock", True, ", ".join(parts))
            else:
                report.add(name, "torchvision EncoderBlock", False, reason)
        elif type(m) is classes["VisionTransformer"] and patch_embed:
            conv = m.conv_proj
            if isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == tuple(conv.stride) == (m.patch_size,) * 2:
                install(m, "_process_input", _process_input)
                report.add(name, "torchvision VisionTransformer", True, "patchify + projection in one GEMM")
            else:
                report.add(name, "torchvision VisionTransformer", False,
                           "conv_proj is not one non-overlapping patch per output (a conv stem)")
