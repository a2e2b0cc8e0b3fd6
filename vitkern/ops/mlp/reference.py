"""The differentiable pure-PyTorch reference of ``mlp``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops.activation import Activation
from vitkern.ops.linear.reference import acc_dtype, epilogue_ref

__all__ = ["mlp_ref"]


def mlp_ref(
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
    """Reference MLP (no argument checks; float64 accepted).

    fc1 in the operands' dtype, the activation in fp32 (fp64 for fp64) with the hidden activations
    stored once in the compute dtype, fc2, then :func:`vitkern.ops.linear.epilogue_ref`.
    """
    h = F.linear(x, fc1_weight, fc1_bias)
    if activation is not None:
        h = Activation.parse(activation).apply(h.to(acc_dtype(h.dtype))).to(x.dtype)
    y = F.linear(h, fc2_weight, fc2_bias)
    return epilogue_ref(y, None, residual, residual_scale, row_scale)
