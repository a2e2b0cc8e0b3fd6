"""The pure-PyTorch references of LayerNorm and residual add + LayerNorm: differentiable, any
device, float64 accepted. They are the "reference" backend and what the kernels are tested
against."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops._common import cast_floating


def layer_norm_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Reference LayerNorm over the last dimension (no argument checks): ``F.layer_norm``."""
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference residual add + LayerNorm (no argument checks): ``(layer_norm(x + residual), x + residual)``.

    The sum has the promoted dtype of ``x`` and ``residual``; weight and bias are cast to it.
    """
    s = x + residual
    weight, bias = cast_floating(s.dtype, weight, bias)
    y = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return (y if out_dtype is None else y.to(out_dtype)), s
