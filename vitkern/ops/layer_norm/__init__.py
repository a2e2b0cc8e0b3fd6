"""LayerNorm over the last dimension, and the fused residual add + LayerNorm.

Public functions (re-exported as ``vitkern.layer_norm`` / ``vitkern.add_layer_norm``):

- ``layer_norm(x, weight=None, bias=None, eps=1e-5, *, out_dtype=None)``: ``F.layer_norm(x,
  (x.shape[-1],), ...)``, optionally written in another dtype (``out_dtype``: a pre-norm's output
  in the GEMM's compute dtype under autocast, so the next GEMM reads 16 bits with no cast pass).
- ``add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, *, out_dtype=None) -> (y, s)``:
  ``s = x + residual`` and ``y = layer_norm(s)``, for models whose residual add is not already
  fused into a GEMM epilogue (vitkern's own ViT puts it in the proj / fc2 epilogues instead).

Backends are registered at the bottom of this module (``register_impl``). Every implementation is
called with the public function's arguments after its argument checks and autocast casts:
``impl(x, weight, bias, eps, out_dtype)`` and ``impl(x, residual, weight, bias, eps, out_dtype)``.

Numerics: statistics (mean, variance) in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64 inputs of
the references), biased variance, ``rstd = 1 / sqrt(var + eps)``, one cast on output. The add
variant rounds ``s`` to its dtype before normalising, so ``y`` is exactly the LayerNorm of the
returned ``s``.

The package, one file per layer:

- ``reference``: ``layer_norm_ref`` / ``add_layer_norm_ref``, the "reference" backend.
- ``native``: ``layer_norm_torch`` / ``add_layer_norm_torch``, the "torch" backend (``F.layer_norm``,
  and the add then ``F.layer_norm``), the PyTorch-native fast path "auto" measures the kernels
  against.
- ``kernels``: the Triton kernels. Forward: a register path (whole rows, up to 8192 wide) and a
  looped path for wider rows. Backward: the same two paths write dX in one pass and keep dW / dB
  partial sums per program over a persistent grid (SM count x programs per SM on the GPU, a
  fixed count under the interpreter), which a third kernel reduces.
- ``configs``: the config tables and the rules that pick one per width.
- ``launch``: the launchers ``_layer_norm_fwd`` / ``_layer_norm_bwd``.
- ``op``: the registered ops ``vitkern::layer_norm_fwd``, ``vitkern::add_layer_norm_fwd`` and
  ``vitkern::layer_norm_bwd``, their autograd, and the Triton backend.
- ``compile_cases``: the launches the static compile check (``vitkern.testing.compile_check``) runs.
- this module: the public functions (argument checks, autocast, backend dispatch).

Cost per row of width N, element size e bytes (minimum HBM traffic; all far below 1 FLOP/byte,
so memory bound: the floor is bytes / copy bandwidth):

- forward: read N*e, write N*e, + 8 bytes (mean, rstd); ~8 FLOP per element;
- add forward: read 2*N*e (x, residual), write 2*N*e (y, s), + 8 bytes;
- backward: read 2*N*e (x or s, dy) + 8 bytes, write N*e (dx); the add variant also reads the
  gradient of ``s`` (N*e); ~14 FLOP per element; plus the dW / dB partials, 2 * N * 4 bytes per
  program written once and read once by the reduction (programs = a few per SM).
The looped kernels (N > 8192) read each row twice; the second read mostly hits L2.
"""

from __future__ import annotations

import numbers
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
)
from vitkern.ops.layer_norm.configs import MAX_WIDTH  # noqa: F401  (public: the widest row of the Triton backend)
from vitkern.ops.layer_norm.op import (
    _add_layer_norm_triton,
    _add_layer_norm_triton_supports,
    _layer_norm_triton,
    _layer_norm_triton_supports,
)
from vitkern.ops.layer_norm.native import add_layer_norm_torch, layer_norm_torch
from vitkern.ops.layer_norm.reference import add_layer_norm_ref, layer_norm_ref

__all__ = ["layer_norm", "add_layer_norm", "layer_norm_ref", "add_layer_norm_ref"]


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return float(eps)


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {out_dtype!r}")


def _check_affine(x: torch.Tensor, weight, bias) -> None:
    n = x.shape[-1]
    check_optional_tensor("weight", weight, shape=(n,))
    check_optional_tensor("bias", bias, shape=(n,))


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``.

    Equals ``torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)``.

    Args:
        x: ``(..., N)`` float32 / float16 / bfloat16 tensor, any leading shape and strides.
        weight: optional ``(N,)`` scale (gamma).
        bias: optional ``(N,)`` shift (beta).
        eps: non-negative number added to the variance (default 1e-5 like torch; timm's ViT uses
            1e-6, Hugging Face's 1e-12).
        out_dtype: optional dtype of ``y`` (float32, float16 or bfloat16): the fp32 result is
            rounded to it once, so ``layer_norm(x, out_dtype=torch.bfloat16)`` equals
            ``layer_norm(x).to(torch.bfloat16)`` without the second pass. The gradient of ``x``
            keeps ``x``'s dtype.

    Returns:
        ``y`` with ``x``'s shape, in ``out_dtype`` (default ``x``'s dtype). Statistics are
        computed in fp32.

    Autocast: like torch's ``layer_norm`` on CUDA, the op runs in float32 under autocast (inputs are
    cast to float32 and ``y`` is float32), on every device type. Outside autocast, ``x``, ``weight``
    and ``bias`` must share one dtype.

    Raises:
        TypeError: a non-tensor argument, or an unsupported / mismatched dtype.
        ValueError: ``weight`` or ``bias`` not of shape ``(N,)``, a negative ``eps``, tensors on
            different devices.
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("x", x, min_ndim=1)
    _check_affine(x, weight, bias)
    eps = _check_eps(eps)
    _check_out_dtype(out_dtype)
    device = check_same_device(x=x, weight=weight, bias=bias)
    if autocast_dtype(device) is not None:
        x, weight, bias = cast_floating(torch.float32, x, weight, bias)
    else:
        check_same_dtype(x=x, weight=weight, bias=bias)
    impl = select_impl("layer_norm", device, x, weight, bias, eps, out_dtype=out_dtype)
    return impl(x, weight, bias, eps, out_dtype)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by LayerNorm: returns ``(layer_norm(x + residual), x + residual)``.

    Both outputs are new tensors (``residual`` is not updated in place).

    Args:
        x: ``(..., N)`` float32 / float16 / bfloat16 tensor (typically a block's branch output).
        residual: tensor of ``x``'s shape: the residual stream. It may have a higher precision than
            ``x`` (float32 with a float16 / bfloat16 ``x``); otherwise the dtypes must match.
        weight, bias: optional ``(N,)`` affine parameters, in ``x``'s dtype or the sum's dtype.
        eps: non-negative number added to the variance.
        out_dtype: optional dtype of ``y`` (float32, float16 or bfloat16; ``s`` keeps its own).

    Returns:
        ``(y, s)``: ``s = x + residual`` in the promoted dtype of ``x`` and ``residual``; ``y`` the
        LayerNorm of ``s``, in ``out_dtype`` (default ``s``'s dtype).

    Autocast: like torch's ``layer_norm``, the op runs in float32 under autocast: all inputs are
    cast to float32 and both outputs are float32 (with timm's float32 residual stream this is
    exactly what eager timm computes).

    Raises:
        TypeError: a non-tensor argument, or an unsupported / mismatched dtype.
        ValueError: ``residual`` of another shape, ``weight`` / ``bias`` not ``(N,)``, a negative
            ``eps``, tensors on different devices.
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("residual", residual, shape=tuple(x.shape))
    _check_affine(x, weight, bias)
    eps = _check_eps(eps)
    _check_out_dtype(out_dtype)
    device = check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    if autocast_dtype(device) is not None:
        x, residual, weight, bias = cast_floating(torch.float32, x, residual, weight, bias)
    else:
        if residual.dtype != x.dtype and not (residual.dtype == torch.float32 and x.dtype != torch.float32):
            raise TypeError(
                f"residual has dtype {str(residual.dtype).replace('torch.', '')} but x has "
                f"{str(x.dtype).replace('torch.', '')}; residual must have x's dtype or float32 "
                "(a higher-precision residual stream), or run under torch.autocast"
            )
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype not in (x.dtype, residual.dtype):
                raise TypeError(
                    f"{name} has dtype {str(t.dtype).replace('torch.', '')}; it must have x's dtype "
                    f"({str(x.dtype).replace('torch.', '')}) or residual's "
                    f"({str(residual.dtype).replace('torch.', '')})"
                )
    impl = select_impl("add_layer_norm", device, x, residual, weight, bias, eps, out_dtype=out_dtype)
    return impl(x, residual, weight, bias, eps, out_dtype)


register_impl("layer_norm", "reference", layer_norm_ref)
register_impl("add_layer_norm", "reference", add_layer_norm_ref)
register_impl("layer_norm", "torch", layer_norm_torch)
register_impl("add_layer_norm", "torch", add_layer_norm_torch)
register_impl("layer_norm", "triton", _layer_norm_triton, supports=_layer_norm_triton_supports)
register_impl("add_layer_norm", "triton", _add_layer_norm_triton, supports=_add_layer_norm_triton_supports)
