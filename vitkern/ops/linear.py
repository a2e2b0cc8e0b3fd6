"""Linear layer with a fused epilogue: bias, activation, LayerScale, drop-path row scale, residual.

Public function (re-exported as ``vitkern.linear``)::

    y = act(x @ weight.T + bias)                                             # no residual
    y = residual + row_scale[:, None] * residual_scale * act(x @ weight.T + bias)

``residual_scale`` is LayerScale's gamma (per output feature), ``row_scale`` a per-row multiplier
of the branch (drop path: 0 or 1/keep_prob per sample, repeated over its tokens).

Backends are registered at the bottom of the module. Every implementation is called as
``impl(x, weight, bias, activation=..., residual=..., residual_scale=..., row_scale=...)`` with the
arguments after the public function's checks and autocast casts; ``activation`` is one of
:data:`ACTIVATIONS` and ``row_scale`` is None or flattened to ``(M,)``, ``M = x.numel() // K``.

This module also owns the activation table (:data:`ACTIVATIONS`, :func:`apply_activation`) that
``mlp`` and the kernels' epilogues share.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import (
    autocast_dtype,
    cast_floating,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

__all__ = [
    "ACTIVATIONS",
    "apply_activation",
    "check_activation",
    "linear",
    "linear_ref",
]

# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------

# name -> the ``approximate`` argument of F.gelu. None is the identity.
#   "gelu":      erf GELU (torch.nn.GELU(), timm's and torchvision's default)
#   "gelu_tanh": tanh approximation (jax.nn.gelu's default, HF "gelu_new" / "gelu_pytorch_tanh")
ACTIVATIONS: dict[Optional[str], Optional[str]] = {
    None: None,
    "gelu": "none",
    "gelu_tanh": "tanh",
}


def check_activation(activation) -> Optional[str]:
    """Validate an activation name (None, "gelu" or "gelu_tanh")."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or a string, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"activation must be one of ({names}), got {activation!r}")
    return activation


def apply_activation(x: torch.Tensor, name: Optional[str]) -> torch.Tensor:
    """Apply the named activation (see :data:`ACTIVATIONS`) to ``x``."""
    if name is None:
        return x
    return F.gelu(x, approximate=ACTIVATIONS[name])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def epilogue_ref(
    y: torch.Tensor,
    activation: Optional[str],
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
) -> torch.Tensor:
    """The GEMM epilogue after the bias: activation, then the scaled residual add.

    ``y`` is the ``(..., N)`` GEMM + bias output in the compute dtype. The epilogue computes in fp32
    (fp64 for fp64) and casts once, to the residual's dtype when there is a residual, else to
    ``y``'s dtype. ``row_scale`` is ``(M,)`` over the flattened leading dims of ``y``.
    """
    if residual is None and activation is None:
        return y
    acc = _acc_dtype(y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype))
    out = apply_activation(y.to(acc), activation)
    if residual is None:
        return out.to(y.dtype)
    if residual_scale is not None:
        out = out * residual_scale.to(acc)
    if row_scale is not None:
        out = out * row_scale.to(acc).reshape(y.shape[:-1] + (1,))
    return (residual.to(acc) + out).to(residual.dtype)


# --------------------------------------------------------------------------------------------
# Reference implementation
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Argument checks shared with mlp
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_epilogue(
    x: torch.Tensor,
    n_out: int,
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
) -> Optional[torch.Tensor]:
    """Shape checks of the residual epilogue's arguments; returns row_scale flattened to (M,)."""
    if residual is None:
        if residual_scale is not None:
            raise ValueError("residual_scale was given without residual; it scales the branch added to residual")
        if row_scale is not None:
            raise ValueError("row_scale was given without residual; it scales the branch added to residual")
        return None
    out_shape = tuple(x.shape[:-1]) + (n_out,)
    check_tensor("residual", residual, shape=out_shape)
    check_optional_tensor("residual_scale", residual_scale, shape=(n_out,))
    if row_scale is not None:
        check_tensor("row_scale", row_scale)
        m = math.prod(x.shape[:-1])
        if tuple(row_scale.shape) not in ((m,), tuple(x.shape[:-1])):
            raise ValueError(
                f"row_scale must have shape ({m},) (one value per row of the flattened leading "
                f"dims) or {tuple(x.shape[:-1])} (x's leading dims), got {tuple(row_scale.shape)}"
            )
        row_scale = row_scale.reshape(m)
    return row_scale


def check_epilogue_dtypes(
    compute: torch.dtype, residual: Optional[torch.Tensor], row_scale: Optional[torch.Tensor]
) -> None:
    """residual: the compute dtype or float32; row_scale: float32 or the compute dtype."""
    allowed = (compute, torch.float32)
    if residual is not None and residual.dtype not in allowed:
        raise TypeError(
            f"residual must have the compute dtype ({_dtype_name(compute)}) or float32, got "
            f"{_dtype_name(residual.dtype)}"
        )
    if row_scale is not None and row_scale.dtype not in allowed:
        raise TypeError(
            f"row_scale must have dtype float32 or the compute dtype ({_dtype_name(compute)}), got "
            f"{_dtype_name(row_scale.dtype)}"
        )


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linear layer with a fused bias / activation / LayerScale / drop-path / residual epilogue.

    Without ``residual``: ``act(x @ weight.T + bias)``. With it:
    ``residual + row_scale[:, None] * residual_scale * act(x @ weight.T + bias)`` (rows over the
    flattened leading dims; an absent scale means 1).

    Args:
        x: ``(..., K)`` float32 / float16 / bfloat16 tensor, any leading shape and strides.
        weight: ``(N, K)`` (``nn.Linear`` layout).
        bias: optional ``(N,)``.
        activation: None, ``"gelu"`` (erf) or ``"gelu_tanh"`` (tanh approximation).
        residual: optional ``(..., N)`` tensor (``x``'s leading shape) added to the branch. It keeps
            its own dtype, which sets the output's: the compute dtype or float32 (a float32
            residual stream with a bf16 branch gives a float32 result, as timm under autocast).
        residual_scale: optional ``(N,)`` LayerScale gamma; needs ``residual``.
        row_scale: optional per-row multiplier of the branch, shape ``(M,)`` with
            ``M = x.numel() // K`` or ``x.shape[:-1]``; float32 or the compute dtype; needs
            ``residual``.

    Returns:
        ``(..., N)`` tensor in the residual's dtype, else the compute dtype.

    Autocast: ``x``, ``weight``, ``bias`` and ``residual_scale`` are cast to the autocast dtype (the
    compute dtype); ``residual`` and ``row_scale`` keep theirs. Outside autocast those four must
    share one dtype. fp16/bf16 accumulate in fp32; the epilogue runs in fp32 with one cast on
    output.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mismatched dtype, a bad activation type.
        ValueError: a wrong shape (the message names the argument and the expected shape), an
            unknown activation, ``residual_scale`` / ``row_scale`` without ``residual``, tensors on
            different devices.
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("x", x, min_ndim=1)
    k = x.shape[-1]
    check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != k:
        raise ValueError(
            f"weight must have shape (N, {k}) (nn.Linear layout, K = x.shape[-1] = {k}), got {tuple(weight.shape)}"
        )
    n = weight.shape[0]
    check_optional_tensor("bias", bias, shape=(n,))
    activation = check_activation(activation)
    row_scale = check_epilogue(x, n, residual, residual_scale, row_scale)
    device = check_same_device(
        x=x, weight=weight, bias=bias, residual=residual, residual_scale=residual_scale, row_scale=row_scale
    )
    ac = autocast_dtype(device)
    if ac is not None:
        x, weight, bias, residual_scale = cast_floating(ac, x, weight, bias, residual_scale)
    else:
        check_same_dtype(x=x, weight=weight, bias=bias, residual_scale=residual_scale)
    check_epilogue_dtypes(x.dtype, residual, row_scale)
    kwargs = dict(activation=activation, residual=residual, residual_scale=residual_scale, row_scale=row_scale)
    impl = select_impl("linear", device, x, weight, bias, **kwargs)
    return impl(x, weight, bias, **kwargs)


register_impl("linear", "reference", linear_ref)
