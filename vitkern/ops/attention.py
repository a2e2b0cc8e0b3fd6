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

Backends are registered at the bottom of the module. Op ``"attention"`` implementations are called
as ``impl(q, k, v, causal=..., scale=..., return_lse=..., deterministic=...,
key_padding_bias=...)``: the public arguments plus ``key_padding_bias``, None or an additive float32
bias of shape ``(B or 1, H or 1, Tk)`` (0 where a key is visible, -inf where masked) that SDPA's
key-padding masks become. An implementation that cannot take it yet says so through its
``supports`` predicate. Op ``"attention_qkvpacked"`` implementations are called as
``impl(qkv, causal=..., scale=..., return_lse=..., deterministic=...)``. Both return ``out`` or
``(out, lse)`` as the public functions do.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import (
    FLOAT_DTYPES,
    autocast_disabled,
    autocast_dtype,
    cast_floating,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

__all__ = [
    "attention",
    "attention_qkvpacked",
    "scaled_dot_product_attention",
    "attention_ref",
    "attention_qkvpacked_ref",
]

# torch's own SDPA, saved at import so that patching
# ``F.scaled_dot_product_attention = vitkern.scaled_dot_product_attention`` never recurses. This is
# the builtin that ``torch.nn.functional.scaled_dot_product_attention`` is bound to, so an earlier
# patch of the functional module cannot leak in either.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention


# --------------------------------------------------------------------------------------------
# Reference implementations (pure PyTorch, differentiable, any device, float64 accepted)
# --------------------------------------------------------------------------------------------


def _attention_core(q, k, v, key_padding_bias, causal, scale):
    """Attention in fp32 (fp64 for fp64): returns ``(out in q's dtype, lse in the compute dtype)``."""
    heads, tq, d = q.shape[1], q.shape[2], q.shape[3]
    kv_heads, tk = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    with autocast_disabled(q.device):
        qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
        if kv_heads != heads:
            group = heads // kv_heads
            kf = kf.repeat_interleave(group, dim=1)
            vf = vf.repeat_interleave(group, dim=1)
        s = torch.matmul(qf, kf.transpose(-2, -1)) * scale
        if key_padding_bias is not None:
            s = s + key_padding_bias.to(acc).unsqueeze(-2)
        if causal:
            visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
            s = s.masked_fill(~visible, float("-inf"))
        # Softmax through the logsumexp. The row max is a constant shift (softmax and lse do not
        # depend on it), so it is detached; rows with every key masked (max = -inf) use 0 instead,
        # which gives p = 0, out = 0, lse = -inf and finite gradients.
        m = s.amax(dim=-1, keepdim=True).detach()
        m = m.masked_fill(torch.isneginf(m), 0.0)
        e = torch.exp(s - m)
        total = e.sum(dim=-1, keepdim=True)
        empty = total == 0
        total = total.masked_fill(empty, 1.0)
        p = e / total
        out = torch.matmul(p, vf)
        lse = (m + torch.log(total)).masked_fill(empty, float("-inf")).squeeze(-1)
    return out.to(q.dtype), lse


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    key_padding_bias: Optional[torch.Tensor] = None,
):
    """Reference attention (no argument checks; float64 accepted; always deterministic).

    Materialises the ``(Tq, Tk)`` scores in fp32 (fp64 for fp64 inputs), softmax via the
    logsumexp, one cast of the output to ``q``'s dtype. ``lse`` is float32 (float64 for float64
    inputs). See the module docstring for ``key_padding_bias`` and fully masked rows.
    """
    out, lse = _attention_core(q, k, v, key_padding_bias, causal, scale)
    return (out, lse) if return_lse else out


def attention_qkvpacked_ref(
    qkv: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """Reference packed attention: ``(B, T, 3, H, D)`` in, ``(B, T, H, D)`` (contiguous) out."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    out, lse = _attention_core(q, k, v, None, causal, scale)
    out = out.transpose(1, 2).contiguous()
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
    deterministic: bool = False,
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

    Returns:
        ``out`` ``(B, H, Tq, D)`` in the compute dtype, or ``(out, lse)`` with ``lse`` float32
        ``(B, H, Tq)`` (natural log).

    Autocast: q, k, v are cast to the autocast dtype; outside autocast they must share one dtype.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mismatched dtype, a non-bool flag.
        ValueError: wrong ranks or shapes (the message names the argument), ``H % Hkv != 0``, no
            keys, a non-finite scale, tensors on different devices.
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
):
    """Self-attention on the packed output of a fused qkv projection.

    ``qkv`` is ``(B, T, 3, H, D)``: the ``(B, T, 3 * H * D)`` output of ``x @ Wqkv.T`` viewed
    without a permute (timm / torchvision qkv weight layout). Equals
    ``attention(q, k, v).transpose(1, 2)`` with ``q, k, v = qkv.unbind(2)`` each transposed to
    ``(B, H, T, D)``.

    Args:
        qkv: ``(B, T, 3, H, D)`` float32 / float16 / bfloat16, any strides.
        causal, scale, return_lse, deterministic: as in :func:`attention`.

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
    causal = _check_flag("causal", causal)
    return_lse = _check_flag("return_lse", return_lse)
    deterministic = _check_flag("deterministic", deterministic)
    scale = _check_scale(scale)
    device = qkv.device
    ac = autocast_dtype(device)
    if ac is not None:
        (qkv,) = cast_floating(ac, qkv)
    kwargs = dict(causal=causal, scale=scale, return_lse=return_lse, deterministic=deterministic)
    impl = select_impl("attention_qkvpacked", device, qkv, **kwargs)
    return impl(qkv, **kwargs)


# --------------------------------------------------------------------------------------------
# Drop-in torch.nn.functional.scaled_dot_product_attention
# --------------------------------------------------------------------------------------------

_warned_reasons: set[str] = set()


def _warn_fallback(reason: str) -> None:
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(
            f"vitkern.scaled_dot_product_attention: {reason}; using torch's scaled_dot_product_attention",
            stacklevel=3,
        )


def _attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_bias: Optional[torch.Tensor],
    causal: bool,
    scale: Optional[float],
) -> torch.Tensor:
    """Attention with an optional additive key-padding bias (float32, ``(B or 1, H or 1, Tk)``).

    Inputs are already checked (and cast for autocast) by the caller; dispatched as op
    ``"attention"``.
    """
    kwargs = dict(
        causal=causal, scale=scale, return_lse=False, deterministic=False, key_padding_bias=key_padding_bias
    )
    impl = select_impl("attention", q.device, q, k, v, **kwargs)
    return impl(q, k, v, **kwargs)


def _key_padding_shape(attn_mask: torch.Tensor, b: int, h: int, tk: int) -> Optional[tuple[int, int, int]]:
    """``(b', h', tk')`` when attn_mask broadcasts as ``(B or 1, H or 1, 1, Tk or 1)``, else None."""
    if not 2 <= attn_mask.dim() <= 4:  # torch's SDPA rejects 0-D and 1-D masks
        return None
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    if shape[0] not in (1, b) or shape[1] not in (1, h) or shape[2] != 1 or shape[3] not in (1, tk):
        return None
    return shape[0], shape[1], shape[3]


def _key_padding_bias(attn_mask: torch.Tensor, shape: tuple[int, int, int], tk: int) -> torch.Tensor:
    """SDPA's key-padding mask as an additive float32 bias ``(B or 1, H or 1, Tk)``.

    A bool mask means True = attend: False becomes -inf. A float mask is added to the scores as is.
    """
    mask = attn_mask.reshape(shape)
    if mask.dtype == torch.bool:
        bias = torch.zeros(shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(torch.float32)
    if shape[2] != tk:
        bias = bias.expand(shape[0], shape[1], tk)
    return bias


def _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[str]:
    """None when vitkern's attention can serve the SDPA call, else the reason it cannot."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "non-tensor query/key/value"
    if any(t.is_nested for t in tensors):
        return "nested-tensor inputs"
    if any(t.dim() != 4 for t in tensors):
        return "inputs that are not 4-D (B, H, T, D)"
    if not isinstance(dropout_p, numbers.Real) or dropout_p != 0.0:
        return "dropout_p > 0"
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return "non-bool is_causal / enable_gqa"
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)
    ):
        return "a scale that is not a finite number"
    if query.device != key.device or query.device != value.device:
        return "inputs on different devices"
    ac = autocast_dtype(query.device)
    dtypes = {t.dtype for t in tensors}
    if not dtypes.issubset(FLOAT_DTYPES) or (ac is None and len(dtypes) > 1):
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"dtype(s) {names} (vitkern attention takes one of float32, float16, bfloat16)"
    b, h, _, d = query.shape
    if key.shape[0] != b or value.shape[0] != b or key.shape[3] != d:
        return "mismatched batch size or head dim of query and key"
    if value.shape[:3] != key.shape[:3]:
        return "value's (B, H, T) differs from key's"
    if value.shape[3] != d:
        return "a value head dim different from query's"
    hkv, tk = key.shape[1], key.shape[2]
    if tk == 0 or query.shape[2] == 0 or d == 0:
        return "empty sequence or head dim"
    if hkv != h and not (enable_gqa and hkv > 0 and h % hkv == 0):
        return "key/value head counts that differ from query's without enable_gqa"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal"
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != query.device:
            return "an attn_mask that is not a tensor on the inputs' device"
        if attn_mask.dtype != torch.bool and (
            attn_mask.dtype not in FLOAT_DTYPES or (ac is None and attn_mask.dtype != query.dtype)
        ):
            return f"an attn_mask of dtype {str(attn_mask.dtype).replace('torch.', '')}"
        if _key_padding_shape(attn_mask, b, h, tk) is None:
            return "an attn_mask that is not a key-padding mask (broadcastable as (B, 1, 1, Tk) or (B, H, 1, Tk))"
    return None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in ``torch.nn.functional.scaled_dot_product_attention`` backed by vitkern's attention.

    Same signature and semantics as torch's. Patch it into a model with
    ``torch.nn.functional.scaled_dot_product_attention = vitkern.scaled_dot_product_attention``
    (torch's own function is saved at import, so the patch never recurses).

    Routing: 4-D ``(B, H, T, D)`` inputs of one supported dtype (float32 / float16 / bfloat16, or
    any of them under autocast) with matching head dims, ``dropout_p == 0``, and either no mask,
    ``is_causal``, or a key-padding ``attn_mask`` run through vitkern's ``attention`` (op
    ``"attention"`` of the current backend). A key-padding mask is a bool (True = attend) or
    additive float mask broadcastable as ``(B or 1, H or 1, 1, Tk)``; it is recognised from its
    shape and turned into a ``(B, H, Tk)`` float32 bias, never a ``T x T`` mask. Everything else
    (dropout, general masks, non-4-D or nested inputs, float64, a value head dim different from the
    query's, ...) calls torch's SDPA, with a warning once per distinct reason; invalid calls
    therefore raise torch's own errors.

    Under the "reference" backend the result equals torch's SDPA up to floating-point rounding
    (the reference computes in fp32). Under autocast, query/key/value are cast to the autocast
    dtype as torch does.
    """
    reason = _sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is not None:
        _warn_fallback(reason)
        return _torch_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    bias = None
    if attn_mask is not None:
        b, h, tk = query.shape[0], query.shape[1], key.shape[2]
        bias = _key_padding_bias(attn_mask, _key_padding_shape(attn_mask, b, h, tk), tk)
    ac = autocast_dtype(query.device)
    if ac is not None:
        query, key, value = cast_floating(ac, query, key, value)
    return _attention_impl(query, key, value, bias, is_causal, None if scale is None else float(scale))


register_impl("attention", "reference", attention_ref)
register_impl("attention_qkvpacked", "reference", attention_qkvpacked_ref)
