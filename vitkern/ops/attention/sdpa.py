"""Drop-in ``torch.nn.functional.scaled_dot_product_attention`` backed by vitkern's attention.

:func:`scaled_dot_product_attention` routes each call (:func:`_sdpa_route`): the calls vitkern's
attention takes run as op ``"attention"`` of the current backend (a key-padding ``attn_mask``
becomes the additive ``(B or 1, H or 1, Tk)`` bias that op takes); every other call goes to
torch's own SDPA, with a warning once per distinct reason.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch

from vitkern._backend import get_backend, select_impl, triton_interpreting
from vitkern.ops._common import FLOAT_DTYPES, autocast_dtype, cast_floating
from vitkern.ops.attention.configs import _attn_head_dim_reason

# torch's own SDPA, saved at import so that patching
# ``F.scaled_dot_product_attention = vitkern.scaled_dot_product_attention`` never recurses. This is
# the builtin that ``torch.nn.functional.scaled_dot_product_attention`` is bound to, so an earlier
# patch of the functional module cannot leak in either.
_torch_sdpa = torch._C._nn.scaled_dot_product_attention

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


def _triton_would_run(device: torch.device) -> bool:
    """Whether the current backend choice sends attention on ``device`` to the Triton kernels."""
    if get_backend() in ("reference", "torch"):
        return False
    return device.type == "cuda" or triton_interpreting()


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
    if _attn_head_dim_reason(d) is not None and _triton_would_run(query.device):
        return _attn_head_dim_reason(d)
    if hkv != h and not (enable_gqa and hkv > 0 and h % hkv == 0):
        return "key/value head counts that differ from query's without enable_gqa"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal"
        if not isinstance(attn_mask, torch.Tensor):
            return "an attn_mask that is not a tensor"
        if attn_mask.requires_grad and torch.is_grad_enabled() and _triton_would_run(query.device):
            return "an attn_mask that requires grad (the Triton kernels do not differentiate the mask)"
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
    query's, a mask that requires grad when the Triton kernels would run, ...) calls torch's SDPA,
    with a warning once per distinct reason; invalid calls therefore raise torch's own errors,
    except a mask on another device than ``query``: a ValueError (torch's SDPA does not always
    check it).

    Under the "reference" backend the result equals torch's SDPA up to floating-point rounding
    (the reference computes in fp32). Under autocast, query/key/value are cast to the autocast
    dtype as torch does.
    """
    if (isinstance(attn_mask, torch.Tensor) and isinstance(query, torch.Tensor)
            and attn_mask.device != query.device):
        # torch's SDPA does not always check this (a meta mask with CPU inputs reads garbage)
        raise ValueError(
            f"attn_mask is on {attn_mask.device} but query is on {query.device}; the mask must be on the "
            "inputs' device"
        )
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
