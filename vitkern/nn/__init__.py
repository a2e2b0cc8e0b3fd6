"""``nn.Module`` s over the vitkern ops, with the parameters, defaults and state_dict keys of their
torch / timm counterparts."""

from vitkern.nn.layer_norm import LayerNorm
from vitkern.nn.linear import Linear, Mlp, SwiGLUPacked, resolve_activation
from vitkern.nn.attention import Attention
from vitkern.nn.attention_pool import AttentionPoolLatent
from vitkern.nn.patch_embed import PatchEmbed
from vitkern.nn.block import Block, DropPath, LayerScale
from vitkern.nn.rope import Rope2D

__all__ = [
    "LayerNorm",
    "Linear",
    "Mlp",
    "SwiGLUPacked",
    "Attention",
    "AttentionPoolLatent",
    "PatchEmbed",
    "Block",
    "LayerScale",
    "DropPath",
    "Rope2D",
    "resolve_activation",
]
