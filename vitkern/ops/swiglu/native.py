"""The "torch" backend of ``swiglu`` / ``swiglu_mlp``: timm's ``GluMlp`` (SiLU, gate first) /
``SwiGLU`` as PyTorch ops in the compute dtype (``F.linear``, ``chunk``, ``F.silu`` and a
multiply, ``F.linear``, timm's residual epilogue), the PyTorch-native path "auto" measures the
fused kernels against. Differentiable through torch's autograd."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops.linear.native import residual_epilogue
from vitkern.ops.swiglu.reference import gate_value

__all__ = ["swiglu_torch", "swiglu_mlp_torch"]


def swiglu_torch(x, fc1_weight, fc1_bias=None, *, value_weight=None, value_bias=None) -> torch.Tensor:
    g, v = gate_value(x, fc1_weight, fc1_bias, value_weight, value_bias)
    return F.silu(g) * v


def swiglu_mlp_torch(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    value_weight: Optional[torch.Tensor] = None,
    value_bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    h = swiglu_torch(x, fc1_weight, fc1_bias, value_weight=value_weight, value_bias=value_bias)
    return residual_epilogue(F.linear(h, fc2_weight, fc2_bias), residual, residual_scale, row_scale)
