"""Scaled dot-product attention: flash-style kernels, the reference, and a drop-in SDPA.

Public functions (re-exported from ``vitkern``):

- ``attention(q, k, v, *, causal, scale, return_lse, deterministic)``: ``(B, H, T, D)`` layout,
  grouped-query attention when k / v have fewer heads.
- ``attention_qkvpacked(qkv, ...)``: reads q / k / v out of the ``(B, T, 3, H, D)`` output of a
  fused qkv projection and returns ``(B, T, H, D)``, so neither side needs a permute.
- ``scaled_dot_product_attention(...)``: the signature and semantics of
  ``torch.nn.functional.scaled_dot_product_attention``; calls vitkern's attention where it can
  (see its docstring for the routing) and torch's SDPA otherwise. Safe to patch in as
  ``F.scaled_dot_product_attention``.

Conventions:

- ``lse`` is the natural-log logsumexp of the scaled (and masked) scores, float32, ``(B, H, Tq)``.
  A row whose keys are all masked out (possible only through a key-padding mask) has
  ``lse = -inf`` (the logsumexp of nothing; it is the neutral element when merging partial
  attentions) and output 0, which is what torch's SDPA returns for such rows.
- ``causal`` masks are top-left aligned when ``Tq != Tk``, as SDPA's ``is_causal``: query ``i``
  sees keys ``j <= i``. Every row then sees at least key 0, so causal masking alone never empties a
  row (no NaN rows, also when ``Tq > Tk``).

Backends are registered at the bottom of this file. Op ``"attention"`` implementations are called
as ``impl(q, k, v, causal=..., scale=..., return_lse=..., deterministic=...,
key_padding_bias=...)``: the public arguments plus ``key_padding_bias``, None or an additive float32
bias of shape ``(B or 1, H or 1, Tk)`` (0 where a key is visible, -inf where masked) that SDPA's
key-padding masks become. An implementation that cannot take it yet says so through its
``supports`` predicate. Op ``"attention_qkvpacked"`` implementations are called as
``impl(qkv, causal=..., scale=..., return_lse=..., deterministic=...)``. Both return ``out`` or
``(out, lse)`` as the public functions do.

Backend "triton": flash-attention forward and backward kernels, their launchers, the registered
ops ``vitkern::attention_fwd`` / ``attention_bwd`` / ``attention_qkvpacked_fwd`` /
``attention_qkvpacked_bwd`` with autograd, and the config tables.
It takes head dims that are multiples of 8 from 16 to 256 and float32 / float16 / bfloat16 (its
``supports`` predicate names any other: "auto" then runs the reference, an explicit "triton"
raises BackendUnavailableError, and the drop-in SDPA sends such calls to torch's SDPA). ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)``) computes dQ in its own kernel, bit-reproducibly;
otherwise dQ is accumulated with fp32 atomics where that variant compiles without spills.

Files (this one: the public functions and the backend registration):

- ``reference.py``: the pure-PyTorch references (backend "reference").
- ``native.py``: backend "torch", torch's own SDPA (saved at import), the PyTorch-native fast path
  "auto" measures the kernels against; it refuses ``return_lse`` and zeroes fully masked rows
  (see its docstring; ``native.SDPA_BACKENDS`` pins torch's SDPA kernels).
- ``sdpa.py``: the drop-in ``scaled_dot_product_attention`` and its routing.
- ``configs.py``: the kernel config tables and the head-dim split.
- ``tiles.py``, ``forward.py``, ``backward.py``: the ``@triton.jit`` kernels and their helpers.
- ``launch.py``: the launchers (config, grid, launch).
- ``op.py``: the registered ops with autograd, and backend "triton"'s implementation functions.
- ``compile_cases.py``: the static compile check's cases.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import autocast_dtype, cast_floating, check_same_device, check_same_dtype, check_tensor
from vitkern.ops.attention.configs import ATTENTION_HEAD_DIMS  # noqa: F401  (public: the Triton kernels' head dims)
from vitkern.ops.attention.native import (
    attention_qkvpacked_torch,
    attention_qkvpacked_torch_supports,
    attention_torch,
    attention_torch_supports,
)
from vitkern.ops.attention.op import (
    _attention_qkvpacked_triton,
    _attention_qkvpacked_triton_supports,
    _attention_triton,
    _attention_triton_supports,
    TRITON_DTYPES,
)
from vitkern.ops.attention.reference import attention_qkvpacked_ref, attention_ref
from vitkern.ops.attention.sdpa import scaled_dot_product_attention
from vitkern.ops.qk_prologue import QKNorm, RopeTables, check_prologue, prologue_requested, qk_prologue

__all__ = [
    "attention",
    "attention_qkvpacked",
    "scaled_dot_product_attention",
    "attention_ref",
    "attention_qkvpacked_ref",
    "QKNorm",
    "RopeTables",
]


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    return float(scale)


def _apply_prologue(q, k, q_norm, k_norm, rope, num_prefix_tokens):
    """q / k through the QK-norms and the rotation (see :mod:`vitkern.ops.attention.prologue`)."""
    b, h, t, d = q.shape
    if rope is not None and k.shape[2] != t:
        raise ValueError(f"rope needs self-attention (Tq == Tk); q has {t} tokens, k {k.shape[2]}")
    if rope is not None and k.shape[1] != h and getattr(rope, "sin", None) is not None and rope.sin.dim() == 3:
        raise ValueError(f"rope: per-head tables need as many k heads as q heads ({k.shape[1]} vs {h})")
    q_norm, k_norm, rope, n = check_prologue(q_norm, k_norm, rope, num_prefix_tokens, heads=h, tokens=t,
                                             head_dim=d, device=q.device)
    return qk_prologue(q, q_norm, rope, n), qk_prologue(k, k_norm, rope, n)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    q_norm: Optional[QKNorm] = None,
    k_norm: Optional[QKNorm] = None,
    rope=None,
    num_prefix_tokens: int = 0,
):
    """Scaled dot-product attention, flash-style (the ``T x T`` scores are never materialised).

    Equals ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
    enable_gqa=(Hkv != H))``.

    Args:
        q: ``(B, H, Tq, D)`` float32 / float16 / bfloat16, any strides.
        k, v: ``(B, Hkv, Tk, D)`` with ``H % Hkv == 0`` (grouped-query attention when
            ``Hkv < H``: query head ``h`` uses key/value head ``h // (H // Hkv)``), ``Tk >= 1``.
        causal: mask keys after the query position, top-left aligned when ``Tq != Tk`` (as SDPA).
        scale: score scale; None means ``1 / sqrt(D)``.
        return_lse: also return the logsumexp of the scaled scores.
        deterministic: ask for a deterministic backward (kernels may otherwise accumulate with
            atomics); the reference is always deterministic.
        q_norm, k_norm: a :class:`vitkern.QKNorm` applied to q / k over the head dim first (QK-norm).
        rope: a :class:`vitkern.Rope2D` (its tables for its grid) or :class:`vitkern.RopeTables`
            (``(Tq - num_prefix_tokens, D)`` or per head ``(H, ..., D)``) rotating q and k after the
            norms; needs ``Tq == Tk`` (self-attention).
        num_prefix_tokens: the leading tokens (class / register) that the rotation skips.
        The prologue (norms, rotation) follows ``vitkern.ops.qk_prologue``: float32 inside, q / k's
        dtype out; gradients flow to q, k, the norms' weights and the tables. It runs as its own
        pass over q and k (one kernel each way) before the attention kernel, not yet inside the
        attention kernels' q / k loads.

    Returns:
        ``out`` ``(B, H, Tq, D)`` in the compute dtype, or ``(out, lse)`` with ``lse`` float32
        ``(B, H, Tq)`` (natural log).

    Autocast: q, k, v are cast to the autocast dtype; outside autocast they must share one dtype.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mismatched dtype, a non-bool flag.
        ValueError: wrong ranks or shapes (the message names the argument), ``H % Hkv != 0``, no
            keys, a head dim of 0, a non-finite scale, tensors on different devices.
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("q", q, ndim=4)
    b, h, _, d = q.shape
    check_tensor("k", k, ndim=4)
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k must have shape ({b}, Hkv, Tk, {d}) (q is (B, H, Tq, D) = {tuple(q.shape)}), got {tuple(k.shape)}"
        )
    hkv, tk = k.shape[1], k.shape[2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"k has {hkv} heads, which must divide q's {h} heads (grouped-query attention)")
    if tk == 0:
        raise ValueError(f"k must have at least one key (Tk >= 1), got shape {tuple(k.shape)}")
    if d == 0:
        raise ValueError(f"q must have a head dim D >= 1, got shape {tuple(q.shape)}")
    check_tensor("v", v, shape=tuple(k.shape))
    causal = _check_flag("causal", causal)
    return_lse = _check_flag("return_lse", return_lse)
    deterministic = _check_flag("deterministic", deterministic)
    scale = _check_scale(scale)
    device = check_same_device(q=q, k=k, v=v)
    ac = autocast_dtype(device)
    if ac is not None:
        q, k, v = cast_floating(ac, q, k, v)
    else:
        check_same_dtype(q=q, k=k, v=v)
    if prologue_requested(q_norm, k_norm, rope):
        q, k = _apply_prologue(q, k, q_norm, k_norm, rope, num_prefix_tokens)
    elif num_prefix_tokens != 0:
        check_prologue(None, None, None, num_prefix_tokens, heads=h, tokens=q.shape[2], head_dim=d, device=device)
    kwargs = dict(
        causal=causal, scale=scale, return_lse=return_lse, deterministic=deterministic, key_padding_bias=None
    )
    impl = select_impl("attention", device, q, k, v, **kwargs)
    return impl(q, k, v, **kwargs)


def attention_qkvpacked(
    qkv: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    q_norm: Optional[QKNorm] = None,
    k_norm: Optional[QKNorm] = None,
    rope=None,
    num_prefix_tokens: int = 0,
):
    """Self-attention on the packed output of a fused qkv projection.

    ``qkv`` is ``(B, T, 3, H, D)``: the ``(B, T, 3 * H * D)`` output of ``x @ Wqkv.T`` viewed
    without a permute (timm / torchvision qkv weight layout). Equals
    ``attention(q, k, v).transpose(1, 2)`` with ``q, k, v = qkv.unbind(2)`` each transposed to
    ``(B, H, T, D)``.

    Args:
        qkv: ``(B, T, 3, H, D)`` float32 / float16 / bfloat16, any strides.
        causal, scale, return_lse, deterministic, q_norm, k_norm, rope, num_prefix_tokens: as in
            :func:`attention`.

    Returns:
        ``out`` ``(B, T, H, D)`` (ready for ``reshape(B, T, H * D)`` and the output projection), or
        ``(out, lse)`` with ``lse`` float32 ``(B, H, T)``.

    Autocast: qkv is cast to the autocast dtype.

    Raises:
        TypeError / ValueError naming ``qkv`` or the flag; vitkern.BackendUnavailableError.
    """
    check_tensor("qkv", qkv, ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, T, 3, H, D), got {tuple(qkv.shape)} (dim 2 must be 3)")
    if qkv.shape[1] == 0:
        raise ValueError(f"qkv must have at least one token (T >= 1), got shape {tuple(qkv.shape)}")
    if qkv.shape[4] == 0:
        raise ValueError(f"qkv must have a head dim D >= 1, got shape {tuple(qkv.shape)}")
    causal = _check_flag("causal", causal)
    return_lse = _check_flag("return_lse", return_lse)
    deterministic = _check_flag("deterministic", deterministic)
    scale = _check_scale(scale)
    device = qkv.device
    ac = autocast_dtype(device)
    if ac is not None:
        (qkv,) = cast_floating(ac, qkv)
    if prologue_requested(q_norm, k_norm, rope) or num_prefix_tokens != 0:
        # The prologue rewrites q and k: run it on (B, H, T, D) views and the unpacked op.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        res = attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse, deterministic=deterministic,
                        q_norm=q_norm, k_norm=k_norm, rope=rope, num_prefix_tokens=num_prefix_tokens)
        return (res[0].transpose(1, 2), res[1]) if return_lse else res.transpose(1, 2)
    kwargs = dict(causal=causal, scale=scale, return_lse=return_lse, deterministic=deterministic)
    impl = select_impl("attention_qkvpacked", device, qkv, **kwargs)
    return impl(qkv, **kwargs)


# --------------------------------------------------------------------------------------------
# Backend registration
# --------------------------------------------------------------------------------------------

register_impl("attention", "reference", attention_ref)
register_impl("attention_qkvpacked", "reference", attention_qkvpacked_ref)
register_impl("attention", "torch", attention_torch, attention_torch_supports)
register_impl("attention_qkvpacked", "torch", attention_qkvpacked_torch, attention_qkvpacked_torch_supports)
register_impl("attention", "triton", _attention_triton, _attention_triton_supports, dtypes=TRITON_DTYPES)
register_impl("attention_qkvpacked", "triton", _attention_qkvpacked_triton, _attention_qkvpacked_triton_supports,
              dtypes=TRITON_DTYPES)

