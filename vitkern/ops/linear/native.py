"""Linear's "torch" backend: ``F.linear``, ``F.gelu`` and the residual epilogue as timm writes it,
each a separate PyTorch op in the compute dtype: the PyTorch-native fast path that "auto" measures
the fused kernels against. Differentiable through torch's autograd; any device, any dtype torch's
ops take. :func:`residual_epilogue` is shared with ``mlp``'s torch backend.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vitkern.ops.activation import Activation

__all__ = ["activation_torch", "linear_torch", "residual_epilogue"]


def activation_torch(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """The activation in ``y``'s dtype: ``F.gelu(approximate="none" / "tanh")``, QuickGELU
    (``y * sigmoid(1.702 y)``, as timm's ``QuickGELU``) or the identity."""
    return Activation.parse(activation).apply(y)


def residual_epilogue(
    branch: torch.Tensor,
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """``residual + row_scale[:, None] * residual_scale * branch``, as timm's blocks compute it.

    LayerScale and the drop-path row scale multiply the branch in its own dtype (timm's
    ``x * gamma`` and ``x * random_tensor``: ``row_scale`` is cast to it); the add promotes, so a
    float32 residual with a bf16 branch gives float32. The result has the residual's dtype.
    ``row_scale`` is ``(M,)`` over the flattened leading dims (or the leading dims themselves).
    Without a residual: the scaled branch.
    """
    if residual_scale is not None:
        branch = branch * residual_scale
    if row_scale is not None:
        branch = branch * row_scale.to(branch.dtype).reshape(branch.shape[:-1] + (1,))
    return branch if residual is None else residual + branch


def linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Op ``"linear"`` in PyTorch ops: ``F.linear``, the activation, :func:`residual_epilogue`."""
    y = activation_torch(F.linear(x, weight, bias), activation)
    return residual_epilogue(y, residual, residual_scale, row_scale)
