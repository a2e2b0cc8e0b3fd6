"""Linear layer with a fused epilogue: bias, activation, LayerScale, drop-path row scale, residual.

Public function (re-exported as ``vitkern.linear``)::

    y = act(x @ weight.T + bias)                                             # no residual
    y = residual + row_scale[:, None] * residual_scale * act(x @ weight.T + bias)

``residual_scale`` is LayerScale's gamma (per output feature), ``row_scale`` a per-row multiplier
of the branch (drop path: 0 or 1/keep_prob per sample, repeated over its tokens).

Layers: ``reference.py`` (:func:`linear_ref`, and the epilogue reference ``mlp`` shares),
``native.py`` (backend "torch": ``F.linear``, ``F.gelu`` and timm's residual epilogue in the
compute dtype, the PyTorch-native fast path "auto" measures the kernels against), ``launch.py``
(the Triton launchers on :mod:`vitkern.ops.gemm`), ``op.py`` (the Triton backend's registered ops
and autograd), ``cuda.py`` (the CUDA extension's backend), ``rows.py`` (the 2-D
view the backends of linear and mlp compute on). Every implementation is called as
``impl(x, weight, bias, activation=..., residual=..., residual_scale=..., row_scale=...)`` with
the arguments after the public function's checks and autocast casts; ``activation`` is a public
name (None, "gelu", "gelu_tanh", "quick_gelu": :class:`vitkern.ops.activation.Activation`) and ``row_scale`` is
None or flattened to ``(M,)``, ``M = x.numel() // K``. This module also holds the epilogue's
argument checks that ``mlp`` shares.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import (
    autocast_dtype,
    cast_floating,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
    contiguous_vectors,
)
from vitkern.ops.activation import Activation
from vitkern.ops.linear import cuda as _cuda
from vitkern.ops.linear.native import linear_torch
from vitkern.ops.linear.op import linear_triton
from vitkern.ops.linear.reference import epilogue_ref, linear_ref

__all__ = [
    "check_epilogue",
    "check_epilogue_dtypes",
    "epilogue_ref",
    "linear",
    "linear_ref",
]


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
    """Shape checks of the residual epilogue's arguments; returns row_scale flattened to (M,).
    ``residual_scale`` / ``row_scale`` without ``residual`` scale the branch itself (a block whose
    residual add runs later, in ``add_layer_norm``)."""
    out_shape = tuple(x.shape[:-1]) + (n_out,)
    if residual is not None:
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

    ``residual + row_scale[:, None] * residual_scale * act(x @ weight.T + bias)`` (rows over the
    flattened leading dims; an absent scale means 1, an absent residual 0: without it the result
    is the scaled branch, for a block whose residual add runs later, in ``add_layer_norm``).

    Args:
        x: ``(..., K)`` float32 / float16 / bfloat16 tensor, any leading shape and strides.
        weight: ``(N, K)`` (``nn.Linear`` layout).
        bias: optional ``(N,)``.
        activation: None, ``"gelu"`` (erf), ``"gelu_tanh"`` (tanh approximation) or
            ``"quick_gelu"`` (``x * sigmoid(1.702 x)``, OpenAI CLIP).
        residual: optional ``(..., N)`` tensor (``x``'s leading shape) added to the branch. It keeps
            its own dtype, which sets the output's: the compute dtype or float32 (a float32
            residual stream with a bf16 branch gives a float32 result, as timm under autocast).
        residual_scale: optional ``(N,)`` LayerScale gamma.
        row_scale: optional per-row multiplier of the branch (drop path), shape ``(M,)`` with
            ``M = x.numel() // K`` or ``x.shape[:-1]``; float32 or the compute dtype.

    Returns:
        ``(..., N)`` tensor in the residual's dtype, else the compute dtype.

    Autocast: ``x``, ``weight``, ``bias`` and ``residual_scale`` are cast to the autocast dtype (the
    compute dtype); ``residual`` and ``row_scale`` keep theirs. Outside autocast those four must
    share one dtype. fp16/bf16 accumulate in fp32; the epilogue runs in fp32 with one cast on
    output.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mismatched dtype, a bad activation type.
        ValueError: a wrong shape (the message names the argument and the expected shape), an
            unknown activation, tensors on different devices.
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
    activation = Activation.parse(activation).public_name
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
    # every backend reads the vectors as contiguous
    bias, residual_scale, row_scale = contiguous_vectors(bias, residual_scale, row_scale)
    kwargs = dict(activation=activation, residual=residual, residual_scale=residual_scale, row_scale=row_scale)
    impl = select_impl("linear", device, x, weight, bias, **kwargs)
    return impl(x, weight, bias, **kwargs)


register_impl("linear", "reference", linear_ref)
register_impl("linear", "torch", linear_torch)
register_impl("linear", "triton", linear_triton)
register_impl("linear", "cuda", _cuda.linear_cuda, _cuda._linear_supports)
