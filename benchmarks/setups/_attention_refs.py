"""The attention references beside ``torch_fn``: SDPA restricted to one backend at a time, and the
flash-attn and xformers libraries when they are installed.

Each becomes a provider row of the attention setups (:data:`benchmarks.cases.ATTENTION_PROVIDERS`):

- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``: the setup's own ``torch_fn``
  (so the same permutes and copies around the SDPA call) under
  ``torch.nn.attention.sdpa_kernel(<that backend>)``. A backend that refuses the shape, dtype or
  device gives a "skipped" row with torch's reason (its "... not used because ..." warnings);
  cuDNN and memory-efficient attention have no CPU kernels and are skipped on the CPU up front.
- ``flash-attn``: ``flash_attn_func`` / ``flash_attn_qkvpacked_func`` (fp16 / bf16, CUDA only).
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only).

A library that is not installed gives a "skipped" row saying so.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from benchmarks.cases import SDPA_BACKENDS
from benchmarks.setups import Reference, Unavailable

_CUDA_ONLY_SDPA = ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
# What torch raises when every allowed backend refused the call (the wording differs by version).
_REFUSALS = ("No available kernel", "No viable backend")


def is_sdpa_refusal(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _REFUSALS)


def _refusal_reason(fn: Callable, backend, args) -> str:
    """Torch's reasons for refusing: run the call again with its warnings recorded."""
    from torch.nn.attention import sdpa_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(backend):
                fn(*args)
        except RuntimeError:
            pass
    reasons = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if text and text not in reasons:
            reasons.append(text)
    return "; ".join(reasons) or "torch gave no reason"


def with_sdpa_backend(fn: Callable, backend, name: str) -> Callable:
    """``fn`` run under ``sdpa_kernel(backend)``; a refusal raises :class:`Unavailable`."""
    from torch.nn.attention import sdpa_kernel

    def call(*args):
        try:
            with sdpa_kernel(backend):
                return fn(*args)
        except RuntimeError as exc:
            if not is_sdpa_refusal(exc):
                raise
            raise Unavailable(
                f"{name}: SDPA backend {getattr(backend, 'name', backend)} refused this call: "
                f"{_refusal_reason(fn, backend, args)}"
            ) from None

    return call


def sdpa_references(torch_fn: Callable, device: torch.device) -> dict:
    """One :class:`Reference` per SDPA backend, each running ``torch_fn`` under that backend only."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as exc:  # torch < 2.3
        return {
            name: Reference(None, f"torch.nn.attention.sdpa_kernel is not available ({exc})") for name in SDPA_BACKENDS
        }
    refs = {}
    for name, member in SDPA_BACKENDS.items():
        backend = getattr(SDPBackend, member, None)
        if backend is None:
            refs[name] = Reference(None, f"this torch has no SDPBackend.{member}")
        elif device.type != "cuda" and member in _CUDA_ONLY_SDPA:
            refs[name] = Reference(None, f"SDPBackend.{member} has no CPU kernel (CUDA only)")
        else:
            refs[name] = Reference(with_sdpa_backend(torch_fn, backend, name), f"SDPA, {member} backend only")
    return refs


def _import(module: str) -> tuple[Optional[object], Optional[str]]:
    try:
        import importlib

        return importlib.import_module(module), None
    except Exception as exc:  # not installed, or built against another torch
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _library_reason(name: str, module: str, device: torch.device, dtype: torch.dtype, *, half_only: bool):
    """``(module, None)``, or ``(None, why the library provider is skipped here)``."""
    mod, err = _import(module)
    if mod is None:
        return None, (
            f"{name} is not installed ({err})" if "No module named" in (err or "")
            else f"import {module} failed ({err})"
        )
    if device.type != "cuda":
        return None, f"{name} needs a CUDA device"
    if half_only and dtype not in (torch.float16, torch.bfloat16):
        return None, f"{name} supports fp16 / bf16 only"
    return mod, None


def _library_references(device: torch.device, dtype: torch.dtype, flash: Callable, xformers: Callable) -> dict:
    """The flash-attn and xformers references: ``flash(flash_attn)`` / ``xformers(xformers.ops)`` build
    each from its module; a library that cannot run here gets a :class:`Reference` saying why."""
    refs = {}
    for name, module, half_only, make in (
        ("flash-attn", "flash_attn", True, flash),
        ("xformers", "xformers.ops", False, xformers),
    ):
        mod, why = _library_reason(name, module, device, dtype, half_only=half_only)
        refs[name] = Reference(None, why) if mod is None else make(mod)
    return refs


def bhtd_library_references(device: torch.device, dtype: torch.dtype, *, causal: bool = False) -> dict:
    """flash-attn and xformers for q, k, v of shape (B, H, T, d) (they take (B, T, H, d): transposed views)."""

    def t(x):
        return x.transpose(1, 2)

    def flash(fa):
        def fn(q, k, v):
            return fa.flash_attn_func(t(q), t(k), t(v), causal=causal).transpose(1, 2)

        return Reference(fn, f"flash_attn.flash_attn_func ({getattr(fa, '__version__', '?')})")

    def xformers(xf):
        def fn(q, k, v):
            bias = xf.LowerTriangularMask() if causal else None
            return xf.memory_efficient_attention(t(q), t(k), t(v), attn_bias=bias).transpose(1, 2)

        return Reference(fn, "xformers.ops.memory_efficient_attention")

    return _library_references(device, dtype, flash, xformers)


def packed_library_references(device: torch.device, dtype: torch.dtype, b: int, t: int, h: int, d: int) -> dict:
    """flash-attn and xformers from a packed (B, T, 3*H*d) qkv to (B, T, H*d)."""

    def flash(fa):
        def fn(qkv):
            return fa.flash_attn_qkvpacked_func(qkv.view(b, t, 3, h, d)).reshape(b, t, h * d)

        return Reference(fn, f"flash_attn.flash_attn_qkvpacked_func ({getattr(fa, '__version__', '?')})")

    def xformers(xf):
        def fn(qkv):
            q, k, v = qkv.view(b, t, 3, h, d).unbind(2)
            return xf.memory_efficient_attention(q, k, v).reshape(b, t, h * d)

        return Reference(fn, "xformers.ops.memory_efficient_attention")

    return _library_references(device, dtype, flash, xformers)
