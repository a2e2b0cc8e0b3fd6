"""The q / k prologue of attention: per-head normalisation (QK-norm) and 2-D rotary position
embeddings (RoPE), as the data the attention ops take.

Modern ViTs (EVA-02, timm's RoPE ViTs, DINOv3, Qwen-VL vision towers) normalise q and k over the
head dim and rotate them by position before the scores. Both act on one token's head vector at a
time, which is what a q / k tile of the attention kernels holds, so the kernels can apply them as
the tile is loaded (and their inverses in the backward) instead of the separate passes over q and
k that the models' own code makes. This file is the contract both sides share:

- :class:`QKNorm`: ``kind`` "layer" (LayerNorm: mean and variance) or "rms" (RMSNorm), an optional
  weight and (LayerNorm only) bias of shape ``(head_dim,)``, ``eps``. Statistics are float32.
- :class:`RopeTables`: the sine and cosine tables of a rotation, ``(N, head_dim)`` (shared by the
  heads) or ``(H, N, head_dim)`` (per head: the "mixed" learnable-frequency RoPE), one row per
  rotated token, in the ``layout`` of the model: "interleaved" (pairs ``(x0, x1), (x2, x3), ...``
  rotate together; timm's default) or "half" (``x_i`` with ``x_{i + D/2}``; DINOv3, Qwen). timm's
  concatenated ``[sin | cos]`` embedding converts with :meth:`RopeTables.from_cat`.
- ``num_prefix_tokens``: the first tokens (class, register tokens) are normalised but not rotated;
  the tables' ``N`` is the number of tokens after them.

Order and precision follow timm (``eva.EvaAttention``): normalise in float32, rotate in float32
with float32 tables, cast the result back to the input's dtype once.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["QKNorm", "RopeTables", "check_prologue", "prologue_requested", "ROPE_LAYOUTS", "QK_NORM_KINDS"]

ROPE_LAYOUTS = ("interleaved", "half")
QK_NORM_KINDS = ("layer", "rms")


@dataclasses.dataclass(frozen=True, eq=False)
class QKNorm:
    """A per-head normalisation of q or k over the head dim (see the module docstring).

    ``weight`` / ``bias`` are ordinary tensors (typically a module's parameters): gradients flow
    to them through the attention ops.
    """

    kind: str = "layer"
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 1e-6

    def __post_init__(self):
        if self.kind not in QK_NORM_KINDS:
            raise ValueError(f"QKNorm: kind must be one of {QK_NORM_KINDS}, got {self.kind!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0 and self.eps < float("inf")):
            raise ValueError(f"QKNorm: eps must be a positive finite number, got {self.eps!r}")
        if self.kind == "rms" and self.bias is not None:
            raise ValueError("QKNorm: an RMSNorm has no bias (kind='rms' with a bias given)")
        for name in ("weight", "bias"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, Tensor) or t.dim() != 1 or not t.is_floating_point()):
                raise ValueError(f"QKNorm: {name} must be a 1-D floating tensor of size head_dim, got "
                                 f"{type(t).__name__ if not isinstance(t, Tensor) else tuple(t.shape)}")

    @classmethod
    def from_module(cls, module: Optional[nn.Module]) -> Optional["QKNorm"]:
        """The QKNorm of a model's q / k norm module: ``nn.LayerNorm``, ``nn.RMSNorm`` or timm's
        ``LayerNorm`` / ``RmsNorm`` (anything with their attributes); ``None`` or ``nn.Identity``
        give ``None`` (no normalisation). Other modules are refused by class name."""
        if module is None or isinstance(module, nn.Identity):
            return None
        shape = getattr(module, "normalized_shape", None)
        if shape is not None and len(tuple(shape)) != 1:
            raise ValueError(f"QKNorm.from_module: {type(module).__name__} normalises over {tuple(shape)}, "
                             "not one head dim")
        name = type(module).__name__.lower()
        if isinstance(module, nn.LayerNorm) or name in ("layernorm", "layernormfp32"):
            kind = "layer"
        elif (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)) or name in ("rmsnorm", "rmsnormfp32"):
            kind = "rms"
        else:
            raise ValueError(f"QKNorm.from_module: {type(module).__name__} is not a LayerNorm or RMSNorm")
        eps = getattr(module, "eps", None)
        if eps is None:  # nn.RMSNorm(eps=None) uses the dtype's machine epsilon
            eps = torch.finfo(torch.get_default_dtype()).eps
        affine = getattr(module, "weight", None)
        bias = getattr(module, "bias", None) if kind == "layer" else None
        return cls(kind=kind, weight=affine, bias=bias, eps=float(eps))

    def check(self, head_dim: int, device: torch.device, what: str) -> None:
        """Raise a ValueError naming ``what`` (e.g. "q_norm") if this does not fit ``head_dim`` /
        ``device``."""
        for name in ("weight", "bias"):
            t = getattr(self, name)
            if t is None:
                continue
            if t.numel() != head_dim:
                raise ValueError(f"{what}.{name} has {t.numel()} elements; the head dim is {head_dim}")
            if t.device != device:
                raise ValueError(f"{what}.{name} is on {t.device}, the inputs on {device}")


@dataclasses.dataclass(frozen=True, eq=False)
class RopeTables:
    """Sine and cosine tables of a 2-D rotary embedding (see the module docstring)."""

    sin: Tensor
    cos: Tensor
    layout: str = "interleaved"

    def __post_init__(self):
        if self.layout not in ROPE_LAYOUTS:
            raise ValueError(f"RopeTables: layout must be one of {ROPE_LAYOUTS}, got {self.layout!r}")
        for name in ("sin", "cos"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() not in (2, 3):
                raise ValueError(f"RopeTables: {name} must be a floating (N, D) or (H, N, D) tensor")
        if self.sin.shape != self.cos.shape:
            raise ValueError(f"RopeTables: sin {tuple(self.sin.shape)} and cos {tuple(self.cos.shape)} differ in shape")
        if self.sin.shape[-1] % 2:
            raise ValueError(f"RopeTables: the rotated dim must be even, got {self.sin.shape[-1]}")

    @classmethod
    def from_cat(cls, emb: Tensor, layout: str = "interleaved") -> "RopeTables":
        """From timm's concatenated ``[sin | cos]`` embedding (``get_embed()``: ``(N, 2 D)``, or
        ``(H, N, 2 D)`` for one block of the mixed RoPE)."""
        if not isinstance(emb, Tensor) or emb.dim() not in (2, 3) or emb.shape[-1] % 2:
            raise ValueError("RopeTables.from_cat: emb must be an (N, 2 D) or (H, N, 2 D) tensor")
        sin, cos = emb.chunk(2, dim=-1)
        return cls(sin=sin, cos=cos, layout=layout)

    @property
    def tokens(self) -> int:
        return self.sin.shape[-2]

    @property
    def dim(self) -> int:
        return self.sin.shape[-1]

    def check(self, heads: int, tokens: int, head_dim: int, device: torch.device, what: str = "rope") -> None:
        """Raise a ValueError naming ``what`` if the tables do not fit ``heads`` heads, ``tokens``
        rotated tokens of ``head_dim``, on ``device``."""
        if self.dim != head_dim:
            raise ValueError(f"{what}: the tables rotate {self.dim} dims; the head dim is {head_dim}")
        if self.tokens != tokens:
            raise ValueError(f"{what}: the tables have {self.tokens} rows; the inputs have {tokens} tokens "
                             "after the prefix tokens")
        if self.sin.dim() == 3 and self.sin.shape[0] != heads:
            raise ValueError(f"{what}: per-head tables for {self.sin.shape[0]} heads; the input has {heads}")
        if self.sin.device != device or self.cos.device != device:
            raise ValueError(f"{what}: the tables are on {self.sin.device}, the inputs on {device}")


def check_prologue(q_norm, k_norm, rope, num_prefix_tokens, *, heads: int, tokens: int, head_dim: int,
                   device: torch.device) -> tuple[Optional[QKNorm], Optional[QKNorm], Optional[RopeTables], int]:
    """Validate the attention ops' prologue arguments against q / k of ``heads`` heads (of q; per-head
    tables must match it and k's heads when they differ are refused), ``tokens`` tokens, ``head_dim``
    on ``device``; returns them with a ``Rope2D`` resolved to its tables. Errors name the argument."""
    for what, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
        if norm is not None:
            if not isinstance(norm, QKNorm):
                raise TypeError(f"{what} must be a vitkern.QKNorm or None, got {type(norm).__name__}")
            norm.check(head_dim, device, what)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    if num_prefix_tokens > tokens:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} exceeds the {tokens} tokens of q")
    if rope is not None:
        if not isinstance(rope, RopeTables):
            tables = getattr(rope, "tables", None)
            if tables is None or not callable(tables):
                raise TypeError(f"rope must be a vitkern.Rope2D, a RopeTables or None, got {type(rope).__name__}")
            if getattr(rope, "kind", None) == "mixed":
                raise ValueError("rope: a mixed Rope2D has tables per block; pass rope.tables(layer=i)")
            rope = tables()
        rope.check(heads, tokens - num_prefix_tokens, head_dim, device)
    return q_norm, k_norm, rope, num_prefix_tokens


def prologue_requested(q_norm, k_norm, rope) -> bool:
    return q_norm is not None or k_norm is not None or rope is not None
