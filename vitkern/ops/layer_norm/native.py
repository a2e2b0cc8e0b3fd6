"""LayerNorm's "torch" backend: ``F.layer_norm``, and the add followed by ``F.layer_norm`` (two
PyTorch ops, as a model without the fused op runs them): the PyTorch-native fast path that "auto"
measures the kernels against. Differentiable through torch's autograd.

torch's LayerNorm already computes its statistics in fp32 for fp16 / bf16 inputs, so these equal
the references (:mod:`vitkern.ops.layer_norm.reference`); they are their own backend so that
"auto" can weigh torch's kernels against vitkern's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops._common import cast_floating

__all__ = ["add_layer_norm_torch", "layer_norm_torch"]


def layer_norm_torch(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Op ``"layer_norm"``: ``F.layer_norm(x, (N,), weight, bias, eps)``."""
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_layer_norm_torch(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Op ``"add_layer_norm"``: ``s = x + residual`` (the promoted dtype), ``(F.layer_norm(s), s)``
    with weight and bias cast to ``s``'s dtype."""
    s = x + residual
    weight, bias = cast_floating(s.dtype, weight, bias)
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return (y if out_dtype is None else y.to(out_dtype)), s
