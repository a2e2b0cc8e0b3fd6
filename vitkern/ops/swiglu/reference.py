"""The differentiable pure-PyTorch references of ``swiglu`` and ``swiglu_mlp``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops.linear.reference import acc_dtype, epilogue_ref

__all__ = ["swiglu_ref", "swiglu_mlp_ref", "gate_value"]


def gate_value(x, fc1_weight, fc1_bias, value_weight, value_bias):
    """``(g, v)``: fc1's gate and value outputs, from the packed ``(2H, K)`` weight (gate rows
    first; ``value_weight`` None) or from the two ``(H, K)`` weights."""
    if value_weight is None:
        return F.linear(x, fc1_weight, fc1_bias).chunk(2, dim=-1)
    return F.linear(x, fc1_weight, fc1_bias), F.linear(x, value_weight, value_bias)


def swiglu_ref(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor] = None,
    *,
    value_weight: Optional[torch.Tensor] = None,
    value_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference SwiGLU gate ``silu(g) * v`` (no argument checks; float64 accepted): fc1 in the
    operands' dtype, the gate in fp32 (fp64 for fp64), stored once in the compute dtype."""
    g, v = gate_value(x, fc1_weight, fc1_bias, value_weight, value_bias)
    acc = acc_dtype(g.dtype)
    return (F.silu(g.to(acc)) * v.to(acc)).to(x.dtype)


def swiglu_mlp_ref(
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
    """Reference SwiGLU MLP: :func:`swiglu_ref`, fc2, then :func:`vitkern.ops.linear.epilogue_ref`."""
    h = swiglu_ref(x, fc1_weight, fc1_bias, value_weight=value_weight, value_bias=value_bias)
    y = F.linear(h, fc2_weight, fc2_bias)
    return epilogue_ref(y, None, residual, residual_scale, row_scale)
