"""MLP's "torch" backend: fc1, the activation, fc2 and the residual epilogue as separate PyTorch
ops in the compute dtype (``timm.layers.Mlp`` and timm's block residual), the PyTorch-native fast
path that "auto" measures the fused kernels against. Differentiable through torch's autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops.linear.native import activation_torch, residual_epilogue

__all__ = ["mlp_torch"]


def mlp_torch(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Op ``"mlp"`` in PyTorch ops: ``F.linear``, ``F.gelu``, ``F.linear``, then
    :func:`vitkern.ops.linear.native.residual_epilogue`."""
    h = activation_torch(F.linear(x, fc1_weight, fc1_bias), activation)
    y = F.linear(h, fc2_weight, fc2_bias)
    return residual_epilogue(y, residual, residual_scale, row_scale)
