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
    contiguous_vectors,
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
    # every backend reads the vectors as contiguous
    bias, residual_scale, row_scale = contiguous_vectors(bias, residual_scale, row_scale)
    kwargs = dict(activation=activation, residual=residual, residual_scale=residual_scale, row_scale=row_scale)
    impl = select_impl("linear", device, x, weight, bias, **kwargs)
    return impl(x, weight, bias, **kwargs)


register_impl("linear", "reference", linear_ref)


# --------------------------------------------------------------------------------------------
# Triton backend: the GEMM core of vitkern.ops._gemm with the epilogue fused, forward and backward
# --------------------------------------------------------------------------------------------
#
# Forward: one GEMM, ``y = residual + row_scale * gamma * act(x @ W^T + b)``; with an activation
# and autograd recording, the epilogue also stores the pre-activation ``x @ W^T + b`` (one extra
# write of the output's size, cheaper than recomputing the GEMM in backward).
#
# Backward, with g = dY (any strides; the residual's grad is g itself, returned without a copy):
#   no activation (proj / fc2 style; gamma and row_scale are folded into the GEMMs):
#     dX = row_scale * (g @ (gamma * W))                 epilogue row scale; gamma * W is (N, K)
#     dW = gamma * (g^T @ (row_scale * x))               reduction-axis scale in the A load,
#                                                        epilogue row scale (rows of dW are n)
#     db = gamma * S,  S[n] = sum_m row_scale * g        row sums of the dW GEMM's A operand
#     dgamma = rowdot(g^T @ (row_scale * x), W) + b * S  ROW_DOT in the dW epilogue: no pass
#                                                        over the branch output, which is not kept
#     drow_scale = rowdot(g @ (gamma * W), x) + g @ (gamma * b)   (only when it requires grad)
#   with an activation: dPre = g * row_scale * gamma * act'(pre) in one elementwise pass (which
#     also reduces dgamma), then dX = dPre @ W, dW = dPre^T @ x with db from the row sums. (The
#     MLP fuses act' into the epilogue of its dU GEMM instead; see vitkern.ops.mlp.)
# The dW GEMMs split K (the token count) when the weight-sized output has too few tiles.

from vitkern.ops import _gemm  # noqa: E402
from vitkern.ops._common import kernel_op  # noqa: E402


def _placeholder(ref: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An empty tensor standing for an output that was not computed (custom ops return tensors)."""
    return torch.empty(0, device=ref.device, dtype=dtype or ref.dtype)


def _linear_fwd_fake(x, weight, bias, residual, residual_scale, row_scale, activation, save_pre):
    m, n = x.shape[0], weight.shape[0]
    y = x.new_empty((m, n), dtype=residual.dtype if residual is not None else x.dtype)
    pre = x.new_empty((m, n) if save_pre else (0,))
    return y, pre


def _linear_setup(ctx, inputs, output):
    x, weight, bias, residual, residual_scale, row_scale, activation, save_pre = inputs
    ctx.activation = activation
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, bias, residual_scale, row_scale, output[1])


def _linear_backward(ctx, grad, _grad_pre):
    x, weight, bias, residual_scale, row_scale, pre = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dgamma, drs = torch.ops.vitkern.linear_bwd(
        grad, x, weight, bias, residual_scale, row_scale, pre, ctx.activation,
        need[0], need[1], bool(need[2] and bias is not None),
        bool(need[4] and residual_scale is not None), bool(need[5] and row_scale is not None),
    )
    return (
        dx if need[0] else None,
        dw if need[1] else None,
        db if need[2] and bias is not None else None,
        grad if need[3] and ctx.has_residual else None,
        dgamma if need[4] and residual_scale is not None else None,
        drs if need[5] and row_scale is not None else None,
        None,
        None,
    )


@kernel_op("vitkern::linear_fwd", fake=_linear_fwd_fake, setup_context=_linear_setup, backward=_linear_backward)
def _linear_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    activation: Optional[str],
    save_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=residual.dtype if residual is not None else x.dtype)
    pre = torch.empty((m, n) if save_pre else (0,), device=x.device, dtype=x.dtype)
    _gemm.gemm(
        x, weight, y, bias=bias, activation=_gemm.ACTIVATION_IDS[activation], col_scale=residual_scale,
        row_scale=row_scale, residual=residual, pre=pre if save_pre else None,
    )
    return y, pre


def _linear_bwd_fake(grad, x, weight, bias, residual_scale, row_scale, pre, activation,
                     need_dx, need_dw, need_db, need_dscale, need_drs):
    m, k = x.shape
    n = weight.shape[0]
    return (
        x.new_empty((m, k) if need_dx else (0,)),
        weight.new_empty((n, k) if need_dw else (0,)),
        x.new_empty((n,) if need_db else (0,), dtype=bias.dtype if bias is not None else x.dtype),
        x.new_empty((n,) if need_dscale else (0,),
                    dtype=residual_scale.dtype if residual_scale is not None else x.dtype),
        x.new_empty((m,) if need_drs else (0,), dtype=row_scale.dtype if row_scale is not None else x.dtype),
    )


def linear_backward(grad, x, weight, bias, residual_scale, row_scale, pre, activation,
                    need_dx=True, need_dw=True, need_db=True, need_dscale=True, need_drs=False,
                    split_k=None):
    """The gradients of :func:`linear`'s branch, on the GEMM core (see the section comment).

    ``grad`` is dY ``(M, N)`` of the output's dtype (the residual's grad is ``grad`` itself).
    Returns ``(dx, dw, db, dgamma, drow_scale)``, None for those not asked for.
    """
    m, k = x.shape
    n = weight.shape[0]
    dev, cdt = x.device, x.dtype
    act = _gemm.ACTIVATION_IDS[activation]
    gamma = residual_scale
    dx = dw = db = dgamma = drs = None
    if act != _gemm.ACT_NONE:
        a, dgamma32 = _gemm.act_bwd(grad, pre, act, cdt, col_scale=gamma, row_scale=row_scale,
                                    want_dscale=need_dscale)
        w_eff, dx_rs, red, dw_rs = weight, None, None, None
        if need_dscale:
            dgamma = dgamma32.to(gamma.dtype)
        if need_drs:
            z = apply_activation(pre.float(), activation)
            gs = grad.float() * (gamma.float() if gamma is not None else 1.0)
            drs = (gs * z).sum(1).to(row_scale.dtype)
    else:
        a = grad
        w_eff = weight if gamma is None else (weight.float() * gamma.float()[:, None]).to(cdt)
        dx_rs, red, dw_rs = row_scale, row_scale, gamma
    if need_dx or (need_drs and act == _gemm.ACT_NONE):
        dx = torch.empty((m, k), device=dev, dtype=cdt)
        _, _, rdot = _gemm.gemm(a, w_eff.t(), dx, row_scale=dx_rs,
                                row_dot=x if need_drs and act == _gemm.ACT_NONE else None)
        if need_drs and act == _gemm.ACT_NONE:
            if bias is not None:
                gb = bias.float() * (gamma.float() if gamma is not None else 1.0)
                rdot = rdot + grad.float() @ gb
            drs = rdot.to(row_scale.dtype)
    need_gemm_dw = need_dw or (need_dscale and act == _gemm.ACT_NONE)
    s = None
    if need_gemm_dw:
        dw = torch.empty((n, k), device=dev, dtype=weight.dtype)
        want_sum = need_db or (need_dscale and bias is not None and act == _gemm.ACT_NONE)
        _, s, rdot = _gemm.gemm(a.t(), x.t(), dw, red_scale=red, row_scale=dw_rs, row_sum=want_sum,
                                row_dot=weight if need_dscale and act == _gemm.ACT_NONE else None,
                                split_k=split_k)
        if need_dscale and act == _gemm.ACT_NONE:
            dg = rdot if bias is None else rdot + bias.float() * s
            dgamma = dg.to(gamma.dtype)
    elif need_db:  # a frozen weight with a trainable bias: the column sums alone
        a32 = a.float() if red is None else a.float() * red.float()[:, None]
        s = a32.sum(0)
    if need_db:
        db = (s if dw_rs is None else s * dw_rs.float()).to(bias.dtype)
    return dx if need_dx else None, dw if need_dw else None, db, dgamma, drs


@kernel_op("vitkern::linear_bwd", fake=_linear_bwd_fake)
def _linear_bwd_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual_scale: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    pre: torch.Tensor,
    activation: Optional[str],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_dscale: bool,
    need_drs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = linear_backward(grad, x, weight, bias, residual_scale, row_scale, pre, activation,
                           need_dx, need_dw, need_db, need_dscale, need_drs)
    fakes = _linear_bwd_fake(grad, x, weight, bias, residual_scale, row_scale, pre, activation,
                             need_dx, need_dw, need_db, need_dscale, need_drs)
    return tuple(o if o is not None else torch.empty_like(f) for o, f in zip(outs, fakes))


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The "triton" backend of :func:`linear` (arguments already checked and cast)."""
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)  # not reshape(-1, k): that is ambiguous for k = 0
    x2 = x.reshape(m, k)
    res2 = residual.reshape(m, n) if residual is not None else None
    save_pre = activation is not None and _needs_grad(x, weight, bias, residual_scale, row_scale)
    y, _ = torch.ops.vitkern.linear_fwd(x2, weight, bias, res2, residual_scale, row_scale, activation, save_pre)
    return y.reshape(*lead, n)


register_impl("linear", "triton", linear_triton)
