"""The SwiGLU MLP: ``fc2(silu(g) * v)`` with ``(g, v)`` fc1's gate and value outputs, the gate in
fc1's GEMM epilogue and linear's residual epilogue on fc2.

Public functions (re-exported as ``vitkern.swiglu`` / ``vitkern.swiglu_mlp``)::

    g, v = (x @ W1^T + b1).chunk(2, -1)                   # packed fc1: gate rows first (timm GluMlp)
    g, v = x @ W1^T + b1, x @ Wv^T + bv                   # or two weights (timm SwiGLU's fc1_g, fc1_x)
    h = silu(g) * v                                       # swiglu: stored in the compute dtype
    y = residual + row_scale[:, None] * residual_scale * (h @ fc2_weight.T + fc2_bias)   # swiglu_mlp

Layers as in :mod:`vitkern.ops.mlp`: ``reference.py`` (:func:`swiglu_ref`,
:func:`swiglu_mlp_ref`), ``native.py`` (backend "torch": timm's modules as PyTorch ops),
``launch.py`` (the Triton launchers on :mod:`vitkern.ops.gemm`: the SwiGLU GEMM forward, the dH
GEMM with the SwiGLU-gradient epilogue backward), ``op.py`` (the registered ops and autograd).
Every implementation is called with the public function's arguments after its checks and
autocast casts (``row_scale`` None or flattened to ``(M,)``).
"""

from __future__ import annotations

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
from vitkern.ops.linear import check_epilogue, check_epilogue_dtypes
from vitkern.ops.swiglu.native import swiglu_mlp_torch, swiglu_torch
from vitkern.ops.swiglu.op import swiglu_mlp_triton, swiglu_triton
from vitkern.ops.swiglu.reference import swiglu_mlp_ref, swiglu_ref

__all__ = ["swiglu", "swiglu_mlp", "swiglu_ref", "swiglu_mlp_ref"]


def _check_fc1(x, fc1_weight, fc1_bias, value_weight, value_bias) -> int:
    """Shape checks of fc1's gate / value operands; returns the hidden width H."""
    check_tensor("x", x, min_ndim=1)
    k = x.shape[-1]
    check_tensor("fc1_weight", fc1_weight, ndim=2)
    if fc1_weight.shape[1] != k:
        raise ValueError(f"fc1_weight must have shape (rows, {k}) (nn.Linear layout, K = x.shape[-1] = {k}), "
                         f"got {tuple(fc1_weight.shape)}")
    if value_weight is None:
        if value_bias is not None:
            raise ValueError("value_bias was given without value_weight (the packed fc1_bias holds both halves)")
        if fc1_weight.shape[0] % 2:
            raise ValueError(f"fc1_weight must have an even number of rows (the gate half, then the value half) "
                             f"when value_weight is None, got {tuple(fc1_weight.shape)}")
        hidden = fc1_weight.shape[0] // 2
        check_optional_tensor("fc1_bias", fc1_bias, shape=(2 * hidden,))
        return hidden
    hidden = fc1_weight.shape[0]
    check_tensor("value_weight", value_weight, shape=(hidden, k))
    check_optional_tensor("fc1_bias", fc1_bias, shape=(hidden,))
    check_optional_tensor("value_bias", value_bias, shape=(hidden,))
    return hidden


def swiglu(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor] = None,
    *,
    value_weight: Optional[torch.Tensor] = None,
    value_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SwiGLU's first layer with the gate in its GEMM epilogue: ``silu(g) * v``.

    Args:
        x: ``(..., K)`` float32 / float16 / bfloat16 tensor, any leading shape and strides.
        fc1_weight: the packed ``(2H, K)`` weight, gate rows first (timm's ``GluMlp`` /
            ``SwiGLUPacked`` ``fc1``), or with ``value_weight`` the ``(H, K)`` gate weight (timm
            ``SwiGLU``'s ``fc1_g``).
        fc1_bias: ``(2H,)`` packed, or ``(H,)`` with ``value_weight``; or None.
        value_weight: ``(H, K)`` (timm ``SwiGLU``'s ``fc1_x``) or None; value_bias: ``(H,)`` or None.

    Returns:
        ``(..., H)`` in the compute dtype.

    Autocast: the floating operands are cast to the autocast dtype; outside autocast they must
    share one dtype.

    Raises:
        TypeError / ValueError naming the offending argument; vitkern.BackendUnavailableError when
        the explicitly selected backend cannot run this call.
    """
    _check_fc1(x, fc1_weight, fc1_bias, value_weight, value_bias)
    device = check_same_device(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, value_weight=value_weight,
                               value_bias=value_bias)
    ac = autocast_dtype(device)
    if ac is not None:
        x, fc1_weight, fc1_bias, value_weight, value_bias = cast_floating(
            ac, x, fc1_weight, fc1_bias, value_weight, value_bias)
    else:
        check_same_dtype(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, value_weight=value_weight,
                         value_bias=value_bias)
    fc1_bias, value_bias = contiguous_vectors(fc1_bias, value_bias)
    args = (x, fc1_weight, fc1_bias)
    kwargs = dict(value_weight=value_weight, value_bias=value_bias)
    impl = select_impl("swiglu", device, *args, **kwargs)
    return impl(*args, **kwargs)


def swiglu_mlp(
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
    """The SwiGLU MLP ``fc2(silu(g) * v)`` with ``linear``'s residual epilogue on fc2.

    Equals timm's ``SwiGLUPacked`` (``GluMlp`` with SiLU, gate first) and, with ``value_weight``,
    timm's ``SwiGLU`` (no dropout, no norm); with a residual,
    ``residual + row_scale[:, None] * residual_scale * swiglu_mlp(x)``.

    Args:
        x, fc1_weight, fc1_bias, value_weight, value_bias: as in :func:`swiglu`.
        fc2_weight: ``(N, H)``; fc2_bias: ``(N,)`` or None.
        residual, residual_scale, row_scale: as in :func:`vitkern.linear` (output features ``N``).

    Returns:
        ``(..., N)`` tensor in the residual's dtype, else the compute dtype.

    Autocast: as :func:`vitkern.mlp` (``residual`` and ``row_scale`` keep their dtypes).

    Raises:
        TypeError / ValueError naming the offending argument; vitkern.BackendUnavailableError when
        the explicitly selected backend cannot run this call.
    """
    hidden = _check_fc1(x, fc1_weight, fc1_bias, value_weight, value_bias)
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    if fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight must have shape (N, {hidden}) (its input width is the gate's width "
                         f"{hidden}), got {tuple(fc2_weight.shape)}")
    n = fc2_weight.shape[0]
    check_optional_tensor("fc2_bias", fc2_bias, shape=(n,))
    row_scale = check_epilogue(x, n, residual, residual_scale, row_scale)
    device = check_same_device(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, value_weight=value_weight,
                               value_bias=value_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias, residual=residual,
                               residual_scale=residual_scale, row_scale=row_scale)
    ac = autocast_dtype(device)
    if ac is not None:
        x, fc1_weight, fc1_bias, value_weight, value_bias, fc2_weight, fc2_bias, residual_scale = cast_floating(
            ac, x, fc1_weight, fc1_bias, value_weight, value_bias, fc2_weight, fc2_bias, residual_scale)
    else:
        check_same_dtype(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, value_weight=value_weight,
                         value_bias=value_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
                         residual_scale=residual_scale)
    check_epilogue_dtypes(x.dtype, residual, row_scale)
    fc1_bias, value_bias, fc2_bias, residual_scale, row_scale = contiguous_vectors(
        fc1_bias, value_bias, fc2_bias, residual_scale, row_scale)
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    kwargs = dict(value_weight=value_weight, value_bias=value_bias, residual=residual, residual_scale=residual_scale,
                  row_scale=row_scale)
    impl = select_impl("swiglu_mlp", device, *args, **kwargs)
    return impl(*args, **kwargs)


register_impl("swiglu", "reference", swiglu_ref)
register_impl("swiglu", "torch", swiglu_torch)
register_impl("swiglu", "triton", swiglu_triton)
register_impl("swiglu_mlp", "reference", swiglu_mlp_ref)
register_impl("swiglu_mlp", "torch", swiglu_mlp_torch)
register_impl("swiglu_mlp", "triton", swiglu_mlp_triton)
