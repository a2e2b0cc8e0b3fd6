"""The "cuda" backend of ``patch_embed``, what every "cuda" backend shares (its ``supports``
reasons), and the introspection of the extension's cuBLASLt wrapper.

The ops (``torch.ops.vitkern_cuda.*``, schemas and fakes in ``vitkern._extension``, CUDA kernels
in ``vitkern._C``) run their GEMMs on cuBLASLt with fused epilogues and add what cuBLASLt
cannot express in one small elementwise pass (``csrc/dense_epilogue.cu``). The backends of
``linear`` and ``mlp`` live with their ops (:mod:`vitkern.ops.linear.cuda`,
:mod:`vitkern.ops.mlp.cuda`); here:

- ``patch_embed`` -> ``patch_embed_fwd``: patchify (NCHW or channels_last) + one strided-batched
  GEMM straight into the ``(B, K + N, D)`` token buffer at row offset K, bias in the epilogue and
  the patch tokens' position embedding as the C matrix with batch stride 0; class / register tokens
  written by a small kernel. Backward: ``patch_embed_bwd`` for the image / weight / bias
  gradients, batch sums here for ``pos_embed`` and ``prefix_tokens``.

Numerics (every "cuda" backend): fp16 / bf16 accumulate in fp32, fp32 follows torch's matmul
precision (TF32 when ``torch.backends.cuda.matmul.fp32_precision`` allows it); epilogue math in
fp32 with one rounding per store. Where cuBLASLt has no algorithm for a fused epilogue (some dtype
/ layout combinations) the op runs the unfused equivalent and :func:`cublaslt_stats` counts it.

The implementation is registered with :func:`vitkern._backend.register_impl` when this module is
imported, whether or not the extension is built (``use_backend("cuda")`` then raises
``BackendUnavailableError`` naming the reason). Its autograd formula is registered once the
extension loads (``vitkern._extension._on_load``), so importing this module never loads it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch

from vitkern import _extension
from vitkern._extension import allow_tf32
from vitkern._backend import register_impl
from vitkern.ops._autograd import register_autograd
from vitkern.ops._common import FLOAT_DTYPES
from vitkern.ops.activation import Activation

__all__ = [
    "activation_reason",
    "tensor_reason",
    "patch_embed_cuda",
    "cublaslt_stats",
    "cublaslt_fallbacks",
    "force_unfused_epilogues",
]


# --------------------------------------------------------------------------------------------
# supports predicates: None when the extension can run the call, else the reason
# --------------------------------------------------------------------------------------------


def tensor_reason(**tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why the extension cannot take these tensors (not on CUDA, an unsupported dtype), or None."""
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


def activation_reason(activation) -> Optional[str]:
    """Why the extension cannot compute ``activation`` (not a public activation name), or None."""
    names = tuple(a.public_name for a in Activation)
    if activation not in names:
        return f"activation {activation!r} is not one of {names}"
    return None


def _patch_embed_supports(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None):
    return tensor_reason(images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)


# --------------------------------------------------------------------------------------------
# Implementation (called by the public function after its checks and autocast casts)
# --------------------------------------------------------------------------------------------


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


register_impl("patch_embed", "cuda", patch_embed_cuda, _patch_embed_supports)


# --------------------------------------------------------------------------------------------
# Autograd (the backward is another registered op, so torch.compile sees opaque kernels)
# --------------------------------------------------------------------------------------------


class _PatchEmbedState(NamedTuple):
    allow_tf32: bool  # backward GEMMs at the forward's precision
    num_prefix: int
    prefix_dtype: Optional[torch.dtype]
    pos_len: int
    pos_dtype: Optional[torch.dtype]


def _patch_embed_save(inputs, outputs):
    images, weight, _bias, pos_embed, prefix_tokens, tf32 = inputs
    state = _PatchEmbedState(
        tf32,
        prefix_tokens.shape[1] if prefix_tokens is not None else 0,
        prefix_tokens.dtype if prefix_tokens is not None else None,
        pos_embed.shape[1] if pos_embed is not None else 0,
        pos_embed.dtype if pos_embed is not None else None,
    )
    return (images, weight), state


def _patch_embed_backward(state: _PatchEmbedState, saved, grads, need):
    images, weight = saved
    (grad,) = grads
    k = state.num_prefix
    dimages = dw = db = dpos = dprefix = None
    if need[0] or need[1] or need[2]:
        dimages, dw, db = torch.ops.vitkern_cuda.patch_embed_bwd(
            grad, images, weight, k, need[0], need[1], need[2], state.allow_tf32
        )
    if need[3]:
        g = grad if state.pos_len == grad.shape[1] else grad[:, k:]
        dpos = g.sum(0, keepdim=True, dtype=torch.float32).to(state.pos_dtype)
    if need[4]:
        dprefix = grad[:, :k].sum(0, keepdim=True, dtype=torch.float32).to(state.prefix_dtype)
    return dimages, dw, db, dpos, dprefix, None


_extension._on_load(
    lambda: register_autograd("vitkern_cuda::patch_embed_fwd", save=_patch_embed_save, backward=_patch_embed_backward)
)


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
