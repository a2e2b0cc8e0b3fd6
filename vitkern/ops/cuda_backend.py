"""The "cuda" backend of ``linear``, ``mlp`` and ``patch_embed``: the C++/CUDA extension ``vitkern._C``.

The ops (``torch.ops.vitkern_cuda.*``, schemas and fakes in ``vitkern._extension``, CUDA kernels
in ``vitkern._C``) run their GEMMs on cuBLASLt with fused epilogues and add what cuBLASLt
cannot express in one small elementwise pass (``csrc/dense_epilogue.cu``):

- ``linear`` -> ``fused_dense_fwd``: bias and the tanh GELU in the GEMM's epilogue (GELU_AUX_BIAS
  also stores the pre-activation for backward); a plain residual through cuBLASLt's C matrix
  (beta = 1); the exact erf GELU (``"gelu"``; cuBLASLt's GELU is the tanh approximation and is never
  substituted for it), LayerScale, the drop-path row scale and a residual under them in one pass
  after a BIAS-epilogue GEMM. Backward (``fused_dense_bwd``): ``dT = g * row_scale * gamma *
  act'(pre)`` in one pass (none when it is ``g`` itself), ``dX = dT W``, ``dW = dT^T X`` with the
  BGRADB epilogue producing ``db``.
- ``mlp`` -> ``mlp_fwd`` (fc1 and fc2 as above); backward (``mlp_bwd``) computes the hidden
  gradient with the DGELU_BGRAD epilogue (GELU derivative and ``db1`` inside fc2's dX GEMM) for
  ``"gelu_tanh"``, with a plain GEMM and the exact erf derivative in one pass for ``"gelu"``.
- ``patch_embed`` -> ``patch_embed_fwd``: patchify (NCHW or channels_last) + one strided-batched
  GEMM straight into the ``(B, K + N, D)`` token buffer at row offset K, bias in the epilogue and
  the patch tokens' position embedding as the C matrix with batch stride 0; class / register tokens
  written by a small kernel. Backward: ``patch_embed_bwd`` for the image / weight / bias
  gradients, batch sums here for ``pos_embed`` and ``prefix_tokens``.

Numerics: fp16 / bf16 accumulate in fp32, fp32 follows torch's matmul precision (TF32 when
``torch.backends.cuda.matmul.fp32_precision`` allows it); epilogue math in fp32 with one rounding per
store. Where cuBLASLt has no algorithm for a fused epilogue (some dtype / layout combinations) the
op runs the unfused equivalent and :func:`cublaslt_stats` counts it.

The implementations are registered with :func:`vitkern._backend.register_impl` when this module is
imported, whether or not the extension is built (``use_backend("cuda")`` then raises
``BackendUnavailableError`` naming the reason). Their autograd formulas are registered once the
extension loads (``vitkern._extension._on_load``), so importing this module never loads it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch

from vitkern import _extension
from vitkern._extension import allow_tf32
from vitkern._backend import register_impl
from vitkern.ops._common import FLOAT_DTYPES

__all__ = [
    "ACTIVATION_IDS",
    "linear_cuda",
    "mlp_cuda",
    "patch_embed_cuda",
    "cublaslt_stats",
    "cublaslt_fallbacks",
    "force_unfused_epilogues",
]

# Activation name -> the integer the ops take (csrc/dense_epilogue.h: ActCode).
ACTIVATION_IDS: dict[Optional[str], int] = {None: 0, "gelu": 1, "gelu_tanh": 2}


def _requires_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------
# supports predicates: None when the extension can run the call, else the reason
# --------------------------------------------------------------------------------------------


def _tensor_reason(**tensors: Optional[torch.Tensor]) -> Optional[str]:
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"{name} is on {t.device}; the CUDA extension needs CUDA tensors"
        if t.dtype not in FLOAT_DTYPES:
            return (
                f"{name} has dtype {str(t.dtype).replace('torch.', '')}; the CUDA extension takes "
                "float32, float16 and bfloat16"
            )
    return None


def _activation_reason(activation) -> Optional[str]:
    if activation not in ACTIVATION_IDS:
        return f"activation {activation!r} is not one of {tuple(ACTIVATION_IDS)}"
    return None


def _linear_supports(x, weight, bias=None, *, activation=None, residual=None, residual_scale=None, row_scale=None):
    return _activation_reason(activation) or _tensor_reason(
        x=x, weight=weight, bias=bias, residual=residual, residual_scale=residual_scale, row_scale=row_scale
    )


def _mlp_supports(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, activation="gelu", residual=None,
                  residual_scale=None, row_scale=None):
    return _activation_reason(activation) or _tensor_reason(
        x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
        residual=residual, residual_scale=residual_scale, row_scale=row_scale,
    )


def _patch_embed_supports(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None):
    return _tensor_reason(images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)


# --------------------------------------------------------------------------------------------
# Implementations (called by the public functions after their checks and autocast casts)
# --------------------------------------------------------------------------------------------


def linear_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The "cuda" backend of :func:`vitkern.linear` (``vitkern_cuda::fused_dense_fwd``)."""
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)  # not reshape(-1, k): that is ambiguous for k = 0
    x2 = x.reshape(m, k)
    res2 = residual.reshape(m, n) if residual is not None else None
    # pre: the pre-activation for act' in backward, or the unscaled branch for the LayerScale /
    # row-scale gradients.
    save_pre = (activation is not None and _requires_grad(x, weight, bias, residual_scale, row_scale)) or (
        _requires_grad(residual_scale, row_scale)
    )
    out, _ = torch.ops.vitkern_cuda.fused_dense_fwd(
        x2, weight, bias, ACTIVATION_IDS[activation], res2, residual_scale, row_scale, save_pre, allow_tf32()
    )
    return out.reshape(*lead, n)


def mlp_cuda(
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
    """The "cuda" backend of :func:`vitkern.mlp` (``vitkern_cuda::mlp_fwd``)."""
    k = x.shape[-1]
    n = fc2_weight.shape[0]
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    res2 = residual.reshape(m, n) if residual is not None else None
    save_pre = activation is not None and _requires_grad(x, fc1_weight, fc1_bias)
    save_branch = _requires_grad(residual_scale, row_scale)
    out, _, _, _ = torch.ops.vitkern_cuda.mlp_fwd(
        x2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ACTIVATION_IDS[activation], res2, residual_scale,
        row_scale, save_pre, save_branch, allow_tf32(),
    )
    return out.reshape(*lead, n)


def patch_embed_cuda(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The "cuda" backend of :func:`vitkern.patch_embed` (``vitkern_cuda::patch_embed_fwd``)."""
    return torch.ops.vitkern_cuda.patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens, allow_tf32())


register_impl("linear", "cuda", linear_cuda, _linear_supports)
register_impl("mlp", "cuda", mlp_cuda, _mlp_supports)
register_impl("patch_embed", "cuda", patch_embed_cuda, _patch_embed_supports)


# --------------------------------------------------------------------------------------------
# Autograd (each backward is another registered op, so torch.compile sees opaque kernels)
# --------------------------------------------------------------------------------------------


def _dense_setup(ctx, inputs, output) -> None:
    x, weight, bias, activation, residual, residual_scale, row_scale, _save_pre, tf32 = inputs
    ctx.activation = activation
    ctx.allow_tf32 = tf32  # backward GEMMs at the forward's precision
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, residual_scale, row_scale, output[1])


def _dense_backward(ctx, grad, _grad_pre):
    x, weight, residual_scale, row_scale, pre = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dw = bool(need[0]), bool(need[1])
    need_db = bool(need[2] and ctx.has_bias)
    need_dscale = bool(need[5] and residual_scale is not None)
    need_drs = bool(need[6] and row_scale is not None)
    dx = dw = db = dscale = drs = None
    if need_dx or need_dw or need_db or need_dscale or need_drs:
        dx, dw, db, dscale, drs = torch.ops.vitkern_cuda.fused_dense_bwd(
            grad, x, weight, residual_scale, row_scale, pre, ctx.activation,
            need_dx, need_dw, need_db, need_dscale, need_drs, ctx.allow_tf32,
        )
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db if need_db else None,
        None,
        grad if need[4] and ctx.has_residual else None,
        dscale if need_dscale else None,
        drs if need_drs else None,
        None,
        None,
    )


def _mlp_setup(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, activation, residual, residual_scale, row_scale, _save_pre, _save_branch, tf32 = inputs
    _, pre, h, branch = output
    ctx.activation = activation
    ctx.allow_tf32 = tf32
    ctx.has_b1 = b1 is not None
    ctx.has_b2 = b2 is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, w1, w2, residual_scale, row_scale, pre, h, branch)


def _mlp_backward(ctx, grad, _grad_pre, _grad_h, _grad_branch):
    x, w1, w2, residual_scale, row_scale, pre, h, branch = ctx.saved_tensors
    need = ctx.needs_input_grad
    flags = (
        bool(need[0]),
        bool(need[1]),
        bool(need[2] and ctx.has_b1),
        bool(need[3]),
        bool(need[4] and ctx.has_b2),
        bool(need[7] and residual_scale is not None),
        bool(need[8] and row_scale is not None),
    )
    outs = (None,) * 7
    if any(flags):
        outs = torch.ops.vitkern_cuda.mlp_bwd(
            grad, x, w1, w2, residual_scale, row_scale, pre, h, branch, ctx.activation, *flags, ctx.allow_tf32
        )
    dx, dw1, db1, dw2, db2, dscale, drs = (o if f else None for o, f in zip(outs, flags))
    return (
        dx, dw1, db1, dw2, db2, None,
        grad if need[6] and ctx.has_residual else None,
        dscale, drs, None, None, None,
    )


def _patch_embed_setup(ctx, inputs, output) -> None:
    images, weight, bias, pos_embed, prefix_tokens, tf32 = inputs
    ctx.allow_tf32 = tf32
    ctx.num_prefix = prefix_tokens.shape[1] if prefix_tokens is not None else 0
    ctx.prefix_dtype = prefix_tokens.dtype if prefix_tokens is not None else None
    ctx.pos_len = pos_embed.shape[1] if pos_embed is not None else 0
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None
    ctx.has_bias = bias is not None
    ctx.save_for_backward(images, weight)


def _patch_embed_backward(ctx, grad):
    images, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    k = ctx.num_prefix
    need_dimages, need_dw = bool(need[0]), bool(need[1])
    need_db = bool(need[2] and ctx.has_bias)
    dimages = dw = db = dpos = dprefix = None
    if need_dimages or need_dw or need_db:
        dimages, dw, db = torch.ops.vitkern_cuda.patch_embed_bwd(
            grad, images, weight, k, need_dimages, need_dw, need_db, ctx.allow_tf32
        )
    if need[3] and ctx.pos_dtype is not None:
        g = grad if ctx.pos_len == grad.shape[1] else grad[:, k:]
        dpos = g.sum(0, keepdim=True, dtype=torch.float32).to(ctx.pos_dtype)
    if need[4] and ctx.prefix_dtype is not None:
        dprefix = grad[:, :k].sum(0, keepdim=True, dtype=torch.float32).to(ctx.prefix_dtype)
    return (
        dimages if need_dimages else None,
        dw if need_dw else None,
        db if need_db else None,
        dpos,
        dprefix,
        None,
    )


def _register_autograd() -> None:
    torch.library.register_autograd("vitkern_cuda::fused_dense_fwd", _dense_backward, setup_context=_dense_setup)
    torch.library.register_autograd("vitkern_cuda::mlp_fwd", _mlp_backward, setup_context=_mlp_setup)
    torch.library.register_autograd(
        "vitkern_cuda::patch_embed_fwd", _patch_embed_backward, setup_context=_patch_embed_setup
    )


_extension._on_load(_register_autograd)


# --------------------------------------------------------------------------------------------
# Introspection (benchmarks, tests)
# --------------------------------------------------------------------------------------------


def cublaslt_stats() -> Optional[dict[str, int]]:
    """Counters of the extension's cuBLASLt wrapper, or None without the extension.

    ``fused_matmuls`` / ``plain_matmuls``: GEMMs run with / without a fused epilogue or C matrix;
    ``unfused_fallbacks``: fused GEMMs that cuBLASLt had no algorithm for, run as plain GEMM +
    elementwise pass instead; ``heuristic_queries`` / ``cached_algorithms``: the per device, dtype
    and shape algorithm cache.
    """
    module = _extension.load()
    return None if module is None else dict(module._cublaslt_stats())


def cublaslt_fallbacks() -> list[str]:
    """The most recent GEMMs (up to 32, each distinct one once) that cuBLASLt had no fused algorithm
    for, as ``"op: status for GEMM"``; empty without the extension."""
    module = _extension.load()
    return [] if module is None else list(module._cublaslt_fallback_log())


@contextlib.contextmanager
def force_unfused_epilogues() -> Iterator[None]:
    """Within the block, run every fused cuBLASLt epilogue / C-matrix GEMM through its unfused path.

    For testing the paths taken where cuBLASLt has no algorithm for an epilogue. Needs the
    extension (raises RuntimeError naming the reason otherwise).
    """
    module = _extension.load()
    if module is None:
        raise RuntimeError(f"the vitkern CUDA extension is not available: {_extension.extension_error()}")
    previous = module._cublaslt_set_force_unfused(True)
    try:
        yield
    finally:
        module._cublaslt_set_force_unfused(previous)
