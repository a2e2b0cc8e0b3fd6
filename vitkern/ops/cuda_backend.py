"""What the ops' "cuda" backends share (their ``supports`` reasons and numerics), and the
introspection of the extension's cuBLASLt wrapper.

The ops (``torch.ops.vitkern_cuda.*``, schemas and fakes in ``vitkern._extension``, CUDA kernels
in ``vitkern._C``) run their GEMMs on cuBLASLt with fused epilogues and add what cuBLASLt
cannot express in one small elementwise pass (``csrc/dense_epilogue.cu``). Each backend lives with
its op: :mod:`vitkern.ops.linear.cuda`, :mod:`vitkern.ops.mlp.cuda`, :mod:`vitkern.ops.patch_embed.cuda`.

Numerics (every "cuda" backend): fp16 / bf16 accumulate in fp32, fp32 follows torch's matmul
precision (TF32 when ``torch.backends.cuda.matmul.fp32_precision`` allows it); epilogue math in
fp32 with one rounding per store. Where cuBLASLt has no algorithm for a fused epilogue (some dtype
/ layout combinations) the op runs the unfused equivalent and :func:`cublaslt_stats` counts it.

Each op package registers its "cuda" implementation whether or not the extension is built
(``use_backend("cuda")`` then raises ``BackendUnavailableError`` naming the reason); its autograd
formula is registered once the extension loads (``vitkern._extension._on_load``), so importing an
op never loads the extension.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from vitkern import _extension
from vitkern.ops._common import FLOAT_DTYPES
from vitkern.ops.activation import Activation

__all__ = [
    "activation_reason",
    "scales_reason",
    "tensor_reason",
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


def scales_reason(residual, residual_scale, row_scale) -> Optional[str]:
    """The extension's epilogues apply LayerScale and drop path only with a residual add."""
    if residual is None and (residual_scale is not None or row_scale is not None):
        return "the CUDA extension applies residual_scale / row_scale only with a residual"
    return None


def activation_reason(activation) -> Optional[str]:
    """Why the extension cannot compute ``activation`` (not a public activation name, or one its
    cuBLASLt epilogues have no counterpart for), or None."""
    names = tuple(a.public_name for a in Activation)
    if activation not in names:
        return f"activation {activation!r} is not one of {names}"
    supported = tuple(a.public_name for a in _extension.EXTENSION_ACTIVATIONS)
    if activation not in supported:
        return (f"activation {activation!r}: the CUDA extension's epilogues compute only {supported} "
                "(cuBLASLt has no QuickGELU epilogue); the Triton and torch backends compute it")
    return None


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
