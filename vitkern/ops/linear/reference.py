"""The differentiable pure-PyTorch reference of ``linear`` and of the GEMM epilogue after the bias
(activation, LayerScale, drop-path row scale, residual), which ``mlp``'s reference shares."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops.activation import Activation

__all__ = ["acc_dtype", "epilogue_ref", "linear_ref"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The epilogue's compute dtype: fp32, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def epilogue_ref(
    y: torch.Tensor,
    activation: Optional[str],
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """The GEMM epilogue after the bias: activation, then the scaled residual add (without a
    residual, the scaled branch).

    ``y`` is the ``(..., N)`` GEMM + bias output in the compute dtype. The epilogue computes in fp32
    (fp64 for fp64) and casts once, to the residual's dtype when there is a residual, else to
    ``y``'s dtype. ``row_scale`` is ``(M,)`` over the flattened leading dims of ``y``.
    """
    if residual is None and activation is None and residual_scale is None and row_scale is None:
        return y
    acc = acc_dtype(y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype))
    out = Activation.parse(activation).apply(y.to(acc))
    if residual_scale is not None:
        out = out * residual_scale.to(acc)
    if row_scale is not None:
        out = out * row_scale.to(acc).reshape(y.shape[:-1] + (1,))
    if residual is None:  # the scaled branch alone (its residual add runs later)
        return out.to(y.dtype)
    return (residual.to(acc) + out).to(residual.dtype)


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference fused linear (no argument checks; float64 accepted).

    ``F.linear`` in the operands' dtype (fp32 accumulation for fp16/bf16), then the epilogue in
    fp32 with one cast (see :func:`epilogue_ref`). ``row_scale`` may be ``(M,)`` or
    ``x.shape[:-1]``.
    """
    y = F.linear(x, weight, bias)
    return epilogue_ref(y, activation, residual, residual_scale, row_scale)
