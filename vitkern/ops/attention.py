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

Backend "triton" (the second half of this module): flash-attention forward and backward kernels,
their launchers, the registered ops ``vitkern::attention_fwd`` / ``attention_bwd`` /
``attention_qkvpacked_fwd`` / ``attention_qkvpacked_bwd`` with autograd, and the config tables.
It takes head dims that are multiples of 8 from 16 to 256 and float32 / float16 / bfloat16 (its
``supports`` predicate names any other: "auto" then runs the reference, an explicit "triton"
raises BackendUnavailableError, and the drop-in SDPA sends such calls to torch's SDPA). ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)``) computes dQ in its own kernel, bit-reproducibly;
otherwise dQ is accumulated with fp32 atomics where that variant compiles without spills.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from vitkern._backend import get_backend, register_impl, select_impl, triton_interpreting
from vitkern.ops._common import (
    FLOAT_DTYPES,
    autocast_disabled,
    autocast_dtype,
    cast_floating,
    check_same_device,
    check_same_dtype,
    check_tensor,
    kernel_op,
)
from vitkern.ops._config import device_arch, KernelConfig, TRITON_36
from vitkern.ops._triton import dot_operand, launch, register_helper, register_kernel, round_to
from vitkern.testing.compile_check import compile_cases
from vitkern.ops._index import check_int32, fits_int32

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


def _triton_would_run(device: torch.device) -> bool:
    """Whether the current backend choice sends attention on ``device`` to the Triton kernels."""
    if get_backend() == "reference":
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


# ============================================================================================
# Triton backend: flash-attention kernels, launchers, registered ops, autograd
# ============================================================================================
#
# Forward (one program per (query block, batch * head)): online softmax over key blocks in fp32,
# exp2 with log2(e) folded into the score scale, the row logsumexp saved for the backward. Key
# blocks that every row of the query block sees run without masks; the causal diagonal and the Tk
# tail run a masked copy of the same loop. Grouped-query attention maps query head h to kv head
# h // (H // Hkv). q / k / v / out are read and written through their strides (last dim unit
# stride), so the packed (B, T, 3, H, D) qkv is read in place and (B, T, H, D) written directly.
#
# Head dims: Triton tiles are powers of two, so D is split into two power-of-two pieces, each with
# its own dots and accumulator (80 = 64 + 16, 96 = 64 + 32, 72 = 64 + 16 with the last 8 columns
# masked) rather than padded to the next power of two (80 -> 128 is 60% more MMA work); a split
# that saves nothing over padding (e.g. 112 -> 64 + 64) pads instead, and fp32 always pads. Tiles
# loaded inside the loops take no masks: rows past T and columns past D repeat a valid row /
# column, and the other operand's zero tail (loaded once, masked) or the score mask cancels them
# (masked loads in the loops cost registers that spilled for head dims like 72 and 104).
#
# Backward: delta = rowsum(dO * O) (a small kernel); dK / dV per key block of a kv head, looping
# over query blocks and over the query heads of its group (GQA gradients summed in registers,
# no atomics); dQ either by a separate kernel per query block (bit-reproducible: deterministic=True)
# or accumulated by the dK/dV kernel with fp32 atomics (deterministic=False, for head dims without
# a masked tail). Which of the two is faster on a GPU is still to be measured.
#
# Configs are data (_ATTN_CONFIGS, _ATTN_MASKED_CONFIGS), per kernel, arch family, precision class
# and padded head width; each entry compiles for its arch without spills (the static check,
# vitkern.testing.compile_check, compiles every entry through the slow compile cases).

_LOG2E = 1.4426950408889634


def _wgmma_rule(operand: str, block: str):
    """wgmma expected on sm_90: 16-bit operands (or fp32 with TF32), ``block`` (the M of the main
    dots) >= 64 and num_warps a multiple of 4."""

    def rule(spec) -> bool:
        ty = str(spec.get(operand, ""))
        tensor_core = ty in ("*bf16", "*fp16") or (ty == "*fp32" and spec.get("PRECISION") == "tf32")
        return tensor_core and int(spec.get(block, 0)) >= 64 and spec["num_warps"] % 4 == 0

    return rule


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@register_helper
@triton.jit
def _attn_load(ptrs, offs_r, n_r, offs_c, n_c, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """A 2-D tile; rows >= n_r / columns >= n_c read as 0 where the flags ask for a mask."""
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_r, other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=offs_c[None, :] < n_c, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@register_helper
@triton.jit
def _attn_store(ptrs, x, offs_r, n_r, offs_c, n_c, MASK_C: tl.constexpr):
    if MASK_C:
        tl.store(ptrs, round_to(x, ptrs.dtype.element_ty), mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c))
    else:
        tl.store(ptrs, round_to(x, ptrs.dtype.element_ty), mask=offs_r[:, None] < n_r)


@register_helper
@triton.jit
def _attn_cols(offs_da, offs_db, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """Column offsets for mask-free loads: columns past the head dim repeat the last one."""
    if BLOCK_DA > HEAD_DIM:
        cols_a = tl.minimum(offs_da, HEAD_DIM - 1)
    else:
        cols_a = offs_da
    if BLOCK_DA + BLOCK_DB > HEAD_DIM:
        cols_b = tl.minimum(offs_db, HEAD_DIM - 1)
    else:
        cols_b = offs_db
    return cols_a, cols_b


@register_helper
@triton.jit
def _attn_fwd_inner(
    acc_a, acc_b, l_i, m_i, q_a, q_b,
    k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt,
    offs_m, cols_a, cols_b, lo, hi, Tk, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Key blocks [lo, hi) of the online softmax; MASKED: the causal diagonal / Tk tail.

    Loads take no masks: ``cols_*`` repeat the last column past the head dim (q's tail is zero,
    so those products vanish, and the output's tail columns are never stored) and rows past Tk
    repeat row Tk - 1 (their scores are masked to -inf), which keeps the loop's registers for
    the dots."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            rows = tl.minimum(offs_n, Tk - 1)
        else:
            rows = offs_n
        k_a = tl.load(k_base + rows[:, None] * stride_kt + cols_a[None, :])
        qk = tl.dot(q_a, tl.trans(dot_operand(k_a)), input_precision=PRECISION)
        if BLOCK_DB > 0:
            k_b = tl.load(k_base + rows[:, None] * stride_kt + cols_b[None, :])
            qk = tl.dot(q_b, tl.trans(dot_operand(k_b)), qk, input_precision=PRECISION)
        qk = qk * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + rows * stride_bt)
            qk = qk + bias[None, :] * 1.4426950408889634
        if MASKED:
            valid = offs_n[None, :] < Tk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if HAS_BIAS:
            # a row whose keys so far are all masked keeps m = -inf; shift by 0 so p = alpha = 0
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = dot_operand(round_to(p, k_base.dtype.element_ty))
        v_a = tl.load(v_base + rows[:, None] * stride_vt + cols_a[None, :])
        acc_a = tl.dot(p, dot_operand(v_a), acc_a * alpha[:, None], input_precision=PRECISION)
        if BLOCK_DB > 0:
            v_b = tl.load(v_base + rows[:, None] * stride_vt + cols_b[None, :])
            acc_b = tl.dot(p, dot_operand(v_b), acc_b * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@register_kernel(expects_wgmma=_wgmma_rule("Q", "BLOCK_M"))
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, BIAS, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_ob, stride_oh, stride_ot,
    H, GROUP, Tq, Tk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """out, lse for one query block of one (batch, head). qk_scale = scale * log2(e)."""
    # 1-D grid (no 65535 limit on B * H); the query blocks of one head are adjacent (K / V stay
    # in L2); causal runs the longest (last) query blocks first
    pid = tl.program_id(0)
    num_m = tl.cdiv(Tq, BLOCK_M)
    pid_bh = (pid // num_m).to(tl.int64)
    pid_m = pid % num_m
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_da = tl.arange(0, BLOCK_DA)

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh

    q_a = dot_operand(_attn_load(q_base + offs_m[:, None] * stride_qt + offs_da[None, :], offs_m, Tq,
                                 offs_da, HEAD_DIM, True, BLOCK_DA > HEAD_DIM))
    acc_a = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
    if BLOCK_DB > 0:
        offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
        q_b = dot_operand(_attn_load(q_base + offs_m[:, None] * stride_qt + offs_db[None, :], offs_m, Tq,
                                     offs_db, HEAD_DIM, True, BLOCK_DA + BLOCK_DB > HEAD_DIM))
        acc_b = tl.zeros([BLOCK_M, BLOCK_DB], dtype=tl.float32)
    else:  # placeholders, never used
        offs_db = offs_da
        q_b = q_a
        acc_b = acc_a
    cols_a, cols_b = _attn_cols(offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    if CAUSAL:
        n_end = tl.minimum(start_m + BLOCK_M, Tk)
        n_full = tl.minimum(start_m, Tk) // BLOCK_N * BLOCK_N
    else:
        n_end = Tk
        n_full = Tk // BLOCK_N * BLOCK_N
    acc_a, acc_b, l_i, m_i = _attn_fwd_inner(
        acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt,
        offs_m, cols_a, cols_b, 0, n_full, Tk, qk_scale,
        BLOCK_N, BLOCK_DB, CAUSAL, False, HAS_BIAS, PRECISION)
    acc_a, acc_b, l_i, m_i = _attn_fwd_inner(
        acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt,
        offs_m, cols_a, cols_b, n_full, n_end, Tk, qk_scale,
        BLOCK_N, BLOCK_DB, CAUSAL, True, HAS_BIAS, PRECISION)

    if HAS_BIAS:
        l_div = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows: out 0, lse -inf
    else:
        l_div = l_i
    inv_l = 1.0 / l_div
    o_base = O + b * stride_ob + h * stride_oh
    _attn_store(o_base + offs_m[:, None] * stride_ot + offs_da[None, :], acc_a * inv_l[:, None],
                offs_m, Tq, offs_da, HEAD_DIM, BLOCK_DA > HEAD_DIM)
    if BLOCK_DB > 0:
        _attn_store(o_base + offs_m[:, None] * stride_ot + offs_db[None, :], acc_b * inv_l[:, None],
                    offs_m, Tq, offs_db, HEAD_DIM, BLOCK_DA + BLOCK_DB > HEAD_DIM)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=offs_m < Tq)


@register_kernel
@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O), fp32 (B, H, Tq)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Tq, BLOCK_M)
    pid_bh = (pid // num_m).to(tl.int64)
    pid_m = pid % num_m
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _attn_load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                   offs_m, Tq, offs_d, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    do = _attn_load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    offs_m, Tq, offs_d, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * Tq + offs_m, delta, mask=offs_m < Tq)


@register_helper
@triton.jit
def _attn_bwd_dkdv_inner(
    dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, bias_n,
    q_base, do_base, lse_base, delta_base, dq_base,
    stride_qt, stride_dot, stride_dqt,
    offs_n, offs_da, offs_db, cols_a, cols_b, lo, hi, Tq, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, USE_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    """Query blocks [lo, hi) against one key block, in the transposed orientation (S^T = K Q^T).

    Mask-free loads as in the forward: rows past Tq repeat row Tq - 1 (their P is masked to 0),
    columns past the head dim repeat the last one (k's and v's tails are zero; the tails of dK
    and dV are never stored)."""
    in_dtype = q_base.dtype.element_ty
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        if MASKED:
            rows = tl.minimum(offs_m, Tq - 1)
        else:
            rows = offs_m
        q_a = dot_operand(tl.load(q_base + rows[:, None] * stride_qt + cols_a[None, :]))
        do_a = dot_operand(tl.load(do_base + rows[:, None] * stride_dot + cols_a[None, :]))
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
        if HAS_BIAS:
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: p = 0
        qkT = tl.dot(k_a, tl.trans(q_a), input_precision=PRECISION)
        if BLOCK_DB > 0:
            q_b = dot_operand(tl.load(q_base + rows[:, None] * stride_qt + cols_b[None, :]))
            do_b = dot_operand(tl.load(do_base + rows[:, None] * stride_dot + cols_b[None, :]))
            qkT = tl.dot(k_b, tl.trans(q_b), qkT, input_precision=PRECISION)
        # P = exp(s - lse) as exp2((s - lse) * log2(e)): the rounding scales with s - lse (small
        # where P matters), not with |s| + |lse| as exp2(s * log2(e) - lse * log2(e)) would
        if USE_BIAS:
            pT = tl.math.exp2((qkT * sm_scale + bias_n[:, None] - lse[None, :]) * 1.4426950408889634)
        else:
            pT = tl.math.exp2((qkT * sm_scale - lse[None, :]) * 1.4426950408889634)
        if MASKED:
            valid = offs_m[None, :] < Tq
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            pT = tl.where(valid, pT, 0.0)
        pT_in = dot_operand(round_to(pT, in_dtype))
        dv_a = tl.dot(pT_in, do_a, dv_a, input_precision=PRECISION)
        dpT = tl.dot(v_a, tl.trans(do_a), input_precision=PRECISION)
        if BLOCK_DB > 0:
            dv_b = tl.dot(pT_in, do_b, dv_b, input_precision=PRECISION)
            dpT = tl.dot(v_b, tl.trans(do_b), dpT, input_precision=PRECISION)
        dsT = dot_operand(round_to(pT * (dpT - delta[None, :]), in_dtype))
        dk_a = tl.dot(dsT, q_a, dk_a, input_precision=PRECISION)
        if BLOCK_DB > 0:
            dk_b = tl.dot(dsT, q_b, dk_b, input_precision=PRECISION)
        if ATOMIC_DQ:
            ds = tl.trans(dsT)
            dq_a = tl.dot(ds, k_a, input_precision=PRECISION) * sm_scale
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_da[None, :], dq_a,
                          mask=(offs_m[:, None] < Tq) & (offs_da[None, :] < HEAD_DIM), sem="relaxed")
            if BLOCK_DB > 0:
                dq_b = tl.dot(ds, k_b, input_precision=PRECISION) * sm_scale
                tl.atomic_add(dq_base + offs_m[:, None] * stride_dqt + offs_db[None, :], dq_b,
                              mask=(offs_m[:, None] < Tq) & (offs_db[None, :] < HEAD_DIM), sem="relaxed")
    return dk_a, dk_b, dv_a, dv_b


@register_kernel(expects_wgmma=_wgmma_rule("K", "BLOCK_N"))
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_dqb, stride_dqh, stride_dqt,
    H, HKV, GROUP, Tq, Tk, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one kv head, summed over the query heads of its group. With
    ATOMIC_DQ it also adds this block's share of dQ (times the scale) into the fp32 buffer DQ."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(Tk, BLOCK_N)
    pid_bh = (pid // num_n).to(tl.int64)
    pid_n = pid % num_n
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, BLOCK_DA)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    k_a = dot_operand(_attn_load(k_base + offs_n[:, None] * stride_kt + offs_da[None, :], offs_n, Tk,
                                 offs_da, HEAD_DIM, True, BLOCK_DA > HEAD_DIM))
    v_a = dot_operand(_attn_load(v_base + offs_n[:, None] * stride_vt + offs_da[None, :], offs_n, Tk,
                                 offs_da, HEAD_DIM, True, BLOCK_DA > HEAD_DIM))
    dk_a = tl.zeros([BLOCK_N, BLOCK_DA], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, BLOCK_DA], dtype=tl.float32)
    if BLOCK_DB > 0:
        offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
        k_b = dot_operand(_attn_load(k_base + offs_n[:, None] * stride_kt + offs_db[None, :], offs_n, Tk,
                                     offs_db, HEAD_DIM, True, BLOCK_DA + BLOCK_DB > HEAD_DIM))
        v_b = dot_operand(_attn_load(v_base + offs_n[:, None] * stride_vt + offs_db[None, :], offs_n, Tk,
                                     offs_db, HEAD_DIM, True, BLOCK_DA + BLOCK_DB > HEAD_DIM))
        dk_b = tl.zeros([BLOCK_N, BLOCK_DB], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, BLOCK_DB], dtype=tl.float32)
    else:  # placeholders, never used
        offs_db = offs_da
        k_b = k_a
        v_b = v_a
        dk_b = dk_a
        dv_b = dv_a
    cols_a, cols_b = _attn_cols(offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)

    # query blocks: [m_lo, m_diag) the causal diagonal (masked), [m_diag, m_full) unmasked,
    # [m_full, tq_ceil) the Tq tail (masked)
    tq_ceil = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        m_lo = start_n // BLOCK_M * BLOCK_M
        m_diag = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, tq_ceil)
    else:
        m_lo = 0
        m_diag = 0
    m_full = tl.maximum(Tq // BLOCK_M * BLOCK_M, m_diag)

    for g in range(0, GROUP):
        h = hk * GROUP + g
        if HAS_BIAS:
            bias_n = tl.load(BIAS + b * stride_bb + h * stride_bh + offs_n * stride_bt, mask=offs_n < Tk,
                             other=float("-inf"))
        elif ATOMIC_DQ:
            bias_n = tl.where(offs_n < Tk, 0.0, float("-inf"))  # keys past Tk must not reach dQ
        else:
            bias_n = 0.0  # rows of keys past Tk are never stored
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        lse_base = LSE + (b * H + h) * Tq
        delta_base = DELTA + (b * H + h) * Tq
        dk_a, dk_b, dv_a, dv_b = _attn_bwd_dkdv_inner(
            dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, bias_n, q_base, do_base, lse_base, delta_base,
            dq_base, stride_qt, stride_dot, stride_dqt, offs_n, offs_da, offs_db, cols_a, cols_b, m_lo, m_diag,
            Tq, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_DB, CAUSAL, True,
            HAS_BIAS or ATOMIC_DQ, HAS_BIAS, ATOMIC_DQ, PRECISION)
        dk_a, dk_b, dv_a, dv_b = _attn_bwd_dkdv_inner(
            dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, bias_n, q_base, do_base, lse_base, delta_base,
            dq_base, stride_qt, stride_dot, stride_dqt, offs_n, offs_da, offs_db, cols_a, cols_b, m_diag, m_full,
            Tq, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_DB, CAUSAL, False,
            HAS_BIAS or ATOMIC_DQ, HAS_BIAS, ATOMIC_DQ, PRECISION)
        dk_a, dk_b, dv_a, dv_b = _attn_bwd_dkdv_inner(
            dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, bias_n, q_base, do_base, lse_base, delta_base,
            dq_base, stride_qt, stride_dot, stride_dqt, offs_n, offs_da, offs_db, cols_a, cols_b, m_full, tq_ceil,
            Tq, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_DB, CAUSAL, True,
            HAS_BIAS or ATOMIC_DQ, HAS_BIAS, ATOMIC_DQ, PRECISION)

    dk_base = DK + b * stride_dkb + hk * stride_dkh
    dv_base = DV + b * stride_dvb + hk * stride_dvh
    _attn_store(dk_base + offs_n[:, None] * stride_dkt + offs_da[None, :], dk_a * sm_scale,
                offs_n, Tk, offs_da, HEAD_DIM, BLOCK_DA > HEAD_DIM)
    _attn_store(dv_base + offs_n[:, None] * stride_dvt + offs_da[None, :], dv_a,
                offs_n, Tk, offs_da, HEAD_DIM, BLOCK_DA > HEAD_DIM)
    if BLOCK_DB > 0:
        _attn_store(dk_base + offs_n[:, None] * stride_dkt + offs_db[None, :], dk_b * sm_scale,
                    offs_n, Tk, offs_db, HEAD_DIM, BLOCK_DA + BLOCK_DB > HEAD_DIM)
        _attn_store(dv_base + offs_n[:, None] * stride_dvt + offs_db[None, :], dv_b,
                    offs_n, Tk, offs_db, HEAD_DIM, BLOCK_DA + BLOCK_DB > HEAD_DIM)


@register_helper
@triton.jit
def _attn_bwd_dq_inner(
    dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta,
    k_base, v_base, bias_base, stride_kt, stride_vt, stride_bt,
    offs_m, cols_a, cols_b, lo, hi, Tk, sm_scale,
    BLOCK_N: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Key blocks [lo, hi) for one query block's dQ (mask-free loads as in the forward)."""
    in_dtype = k_base.dtype.element_ty
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            rows = tl.minimum(offs_n, Tk - 1)
        else:
            rows = offs_n
        k_a = dot_operand(tl.load(k_base + rows[:, None] * stride_kt + cols_a[None, :]))
        v_a = dot_operand(tl.load(v_base + rows[:, None] * stride_vt + cols_a[None, :]))
        qk = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=PRECISION)
        if BLOCK_DB > 0:
            k_b = dot_operand(tl.load(k_base + rows[:, None] * stride_kt + cols_b[None, :]))
            v_b = dot_operand(tl.load(v_base + rows[:, None] * stride_vt + cols_b[None, :]))
            qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=PRECISION)
            dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=PRECISION)
        qk = qk * sm_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + rows * stride_bt)
            qk = qk + bias[None, :]
        p = tl.math.exp2((qk - lse[:, None]) * 1.4426950408889634)  # as in the dK/dV kernel
        if MASKED:
            valid = offs_n[None, :] < Tk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        ds = dot_operand(round_to(p * (dp - delta[:, None]), in_dtype))
        dq_a = tl.dot(ds, k_a, dq_a, input_precision=PRECISION)
        if BLOCK_DB > 0:
            dq_b = tl.dot(ds, k_b, dq_b, input_precision=PRECISION)
    return dq_a, dq_b


@register_kernel(expects_wgmma=_wgmma_rule("Q", "BLOCK_M"))
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_bb, stride_bh, stride_bt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, GROUP, Tq, Tk, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of one query block of one head, without atomics (bit-reproducible)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Tq, BLOCK_M)
    pid_bh = (pid // num_m).to(tl.int64)
    pid_m = pid % num_m
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_da = tl.arange(0, BLOCK_DA)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    q_a = dot_operand(_attn_load(q_base + offs_m[:, None] * stride_qt + offs_da[None, :], offs_m, Tq,
                                 offs_da, HEAD_DIM, True, BLOCK_DA > HEAD_DIM))
    do_a = dot_operand(_attn_load(do_base + offs_m[:, None] * stride_dot + offs_da[None, :], offs_m, Tq,
                                  offs_da, HEAD_DIM, True, BLOCK_DA > HEAD_DIM))
    dq_a = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
    if BLOCK_DB > 0:
        offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
        q_b = dot_operand(_attn_load(q_base + offs_m[:, None] * stride_qt + offs_db[None, :], offs_m, Tq,
                                     offs_db, HEAD_DIM, True, BLOCK_DA + BLOCK_DB > HEAD_DIM))
        do_b = dot_operand(_attn_load(do_base + offs_m[:, None] * stride_dot + offs_db[None, :], offs_m, Tq,
                                      offs_db, HEAD_DIM, True, BLOCK_DA + BLOCK_DB > HEAD_DIM))
        dq_b = tl.zeros([BLOCK_M, BLOCK_DB], dtype=tl.float32)
    else:  # placeholders, never used
        offs_db = offs_da
        q_b = q_a
        do_b = do_a
        dq_b = dq_a
    cols_a, cols_b = _attn_cols(offs_da, offs_db, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    if HAS_BIAS:
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: p = 0
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = BIAS + b * stride_bb + h * stride_bh
    if CAUSAL:
        n_end = tl.minimum(start_m + BLOCK_M, Tk)
        n_full = tl.minimum(start_m, Tk) // BLOCK_N * BLOCK_N
    else:
        n_end = Tk
        n_full = Tk // BLOCK_N * BLOCK_N
    dq_a, dq_b = _attn_bwd_dq_inner(
        dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, bias_base, stride_kt, stride_vt,
        stride_bt, offs_m, cols_a, cols_b, 0, n_full, Tk, sm_scale,
        BLOCK_N, BLOCK_DB, CAUSAL, False, HAS_BIAS, PRECISION)
    dq_a, dq_b = _attn_bwd_dq_inner(
        dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, bias_base, stride_kt, stride_vt,
        stride_bt, offs_m, cols_a, cols_b, n_full, n_end, Tk, sm_scale,
        BLOCK_N, BLOCK_DB, CAUSAL, True, HAS_BIAS, PRECISION)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    _attn_store(dq_base + offs_m[:, None] * stride_dqt + offs_da[None, :], dq_a * sm_scale,
                offs_m, Tq, offs_da, HEAD_DIM, BLOCK_DA > HEAD_DIM)
    if BLOCK_DB > 0:
        _attn_store(dq_base + offs_m[:, None] * stride_dqt + offs_db[None, :], dq_b * sm_scale,
                    offs_m, Tq, offs_db, HEAD_DIM, BLOCK_DA + BLOCK_DB > HEAD_DIM)


# --------------------------------------------------------------------------------------------
# Configs (data): per kernel, arch family and precision class, (max padded head width, config)
# --------------------------------------------------------------------------------------------
# Each entry compiles without spills for the head dims of its class on its arch (the register,
# spill and shared-memory figures are in the static compile check's rows). Precision classes:
# "16bit" (fp16 / bf16), "tf32" and "ieee" (fp32 following torch's matmul precision; IEEE fp32
# dots run on FMA units and need small tiles). Padded head width = the two pieces' sum.
# Both Triton versions the project runs on (3.8 here, 3.6 on the GPU machines) allocate registers
# differently; the entries marked "3.6" replace tiles that spilled there (figures: registers under
# 3.6 / 3.8 for the causal, key-padding variant, the heaviest).


def _attn_cfg(arch: int, block_m: int, block_n: int, warps: int, stages: int) -> KernelConfig:
    return KernelConfig({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages, archs=(arch,))


_ATTN_CONFIGS: dict[tuple[str, int, str], tuple[tuple[int, KernelConfig], ...]] = {
    # ---- sm_90 (H100 / H200): wgmma for 16-bit and TF32 dots with 64+ rows per warp group
    # 3.6: 48 (40 = 32 + 16) spilled 16 bytes with 128 x 128 tiles, 256 spilled 8 with 128 x 64
    ("fwd", 90, "16bit"): ((48, _attn_cfg(90, 128, 64, 8, 3)), (64, _attn_cfg(90, 128, 128, 8, 3)),
                           (128, _attn_cfg(90, 128, 64, 8, 3)), (256, _attn_cfg(90, 128, 32, 8, 2))),
    # 3.6: 48 spilled 12 bytes with 64 x 128 tiles
    ("dkdv", 90, "16bit"): ((48, _attn_cfg(90, 64, 64, 8, 2)), (64, _attn_cfg(90, 64, 128, 8, 2)),
                            (128, _attn_cfg(90, 32, 128, 8, 2)), (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "16bit"): ((64, _attn_cfg(90, 128, 64, 8, 2)), (128, _attn_cfg(90, 128, 64, 8, 2)),
                          (256, _attn_cfg(90, 128, 32, 8, 2))),
    ("fwd", 90, "tf32"): ((64, _attn_cfg(90, 64, 64, 4, 2)), (128, _attn_cfg(90, 64, 32, 4, 2)),
                          (256, _attn_cfg(90, 16, 32, 4, 1))),
    ("dkdv", 90, "tf32"): ((64, _attn_cfg(90, 32, 32, 4, 1)), (128, _attn_cfg(90, 16, 32, 4, 1)),
                           (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "tf32"): ((64, _attn_cfg(90, 64, 32, 4, 1)), (128, _attn_cfg(90, 32, 32, 4, 1)),
                         (256, _attn_cfg(90, 32, 16, 4, 1))),
    ("fwd", 90, "ieee"): ((64, _attn_cfg(90, 16, 32, 4, 1)), (256, _attn_cfg(90, 16, 16, 4, 1))),
    # 3.6: 16 warps (128 registers a thread) spilled 4 bytes at 128, 8 warps 8 bytes at 256 (a
    # causal, key-padding variant, where 16 warps hold: 84..106); 4 warps spill on both
    ("dkdv", 90, "ieee"): ((128, _attn_cfg(90, 16, 16, 8, 1)), (256, _attn_cfg(90, 16, 16, 16, 1))),
    ("dq", 90, "ieee"): ((64, _attn_cfg(90, 32, 16, 4, 1)), (256, _attn_cfg(90, 16, 16, 4, 1))),
    # ---- sm_80 (A100) and the other non-sm_90 parts: mma.sync, operands in registers
    ("fwd", 80, "16bit"): ((64, _attn_cfg(80, 128, 64, 8, 3)), (128, _attn_cfg(80, 128, 32, 8, 2)),
                           (256, _attn_cfg(80, 32, 16, 8, 2))),
    # 3.6: 256 spilled 12 bytes with 8 warps (128 registers a thread at 16 x 16)
    ("dkdv", 80, "16bit"): ((64, _attn_cfg(80, 32, 128, 8, 2)), (128, _attn_cfg(80, 16, 64, 8, 2)),
                            (256, _attn_cfg(80, 16, 16, 4, 1))),
    ("dq", 80, "16bit"): ((64, _attn_cfg(80, 128, 64, 8, 2)), (128, _attn_cfg(80, 128, 32, 8, 2)),
                          (256, _attn_cfg(80, 32, 32, 8, 2))),
    ("fwd", 80, "tf32"): ((64, _attn_cfg(80, 64, 64, 4, 2)), (128, _attn_cfg(80, 32, 32, 4, 1)),
                          (256, _attn_cfg(80, 16, 32, 4, 1))),
    # 3.6: 64 spilled 16 bytes with 4 warps
    ("dkdv", 80, "tf32"): ((64, _attn_cfg(80, 32, 32, 8, 1)), (128, _attn_cfg(80, 16, 32, 4, 1)),
                           (256, _attn_cfg(80, 16, 16, 8, 1))),
    ("dq", 80, "tf32"): ((64, _attn_cfg(80, 64, 32, 4, 1)), (128, _attn_cfg(80, 32, 16, 4, 1)),
                         (256, _attn_cfg(80, 16, 16, 4, 1))),
    ("fwd", 80, "ieee"): ((64, _attn_cfg(80, 16, 32, 4, 1)), (128, _attn_cfg(80, 16, 16, 4, 1)),
                          (256, _attn_cfg(80, 16, 16, 8, 1))),
    # Up to 128 no 16 x 16 tile holds on both versions: 16 warps spill 12 bytes at 72 under 3.6, 8
    # warps 8-16 bytes at 72 / 128 under 3.8, 4 warps 4 bytes at 64 under 3.8. At 256, 32 x 16
    # tiles with 8 warps hold on both (128..176 / 128..255 registers).
    ("dkdv", 80, "ieee"): ((128, _attn_cfg(80, 16, 16, 8 if TRITON_36 else 16, 1)),
                           (256, _attn_cfg(80, 32, 16, 8, 1))),
    ("dq", 80, "ieee"): ((64, _attn_cfg(80, 32, 16, 4, 1)), (256, _attn_cfg(80, 16, 16, 4, 1))),
}

# Head dims whose last tile has a masked tail (72 = 64 + 16 with 8 masked, 88, 104..120, 136..152,
# 168..184, 200..248) need more registers for the same tiles: where a table is given here it
# replaces the one above for them (every width listed).
_ATTN_MASKED_CONFIGS: dict[tuple[str, int, str], tuple[tuple[int, KernelConfig], ...]] = {
    # 3.6: 256 (200) spilled 140 bytes with 64 x 16 tiles; 48 (40 = 32 + 16, 8 masked) 16 with 128 x 128
    ("fwd", 90, "16bit"): ((48, _attn_cfg(90, 128, 64, 8, 3)), (64, _attn_cfg(90, 128, 128, 8, 3)),
                           (128, _attn_cfg(90, 128, 64, 8, 3)), (256, _attn_cfg(90, 32, 16, 8, 2))),
    # 3.6: 48 (40) spilled 12 bytes with 64 x 128 tiles
    ("dkdv", 90, "16bit"): ((48, _attn_cfg(90, 64, 64, 8, 2)), (64, _attn_cfg(90, 64, 128, 8, 2)),
                            (96, _attn_cfg(90, 16, 64, 8, 2)),
                            (128, _attn_cfg(90, 32, 32, 8, 2)), (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "16bit"): ((64, _attn_cfg(90, 128, 64, 8, 2)), (128, _attn_cfg(90, 64, 32, 8, 2)),
                          (160, _attn_cfg(90, 16, 32, 8, 1)), (256, _attn_cfg(90, 32, 32, 8, 2))),
    ("fwd", 80, "16bit"): ((64, _attn_cfg(80, 128, 32, 8, 2)), (128, _attn_cfg(80, 64, 32, 8, 2)),
                           (256, _attn_cfg(80, 32, 16, 8, 2))),
    # 3.6: 128 (72 = 64 + 16) spilled 24 bytes with 2 stages
    ("dkdv", 80, "16bit"): ((64, _attn_cfg(80, 16, 64, 8, 2)), (128, _attn_cfg(80, 16, 64, 8, 1)),
                            (256, _attn_cfg(80, 16, 16, 8, 1))),
    ("dq", 80, "16bit"): ((64, _attn_cfg(80, 64, 32, 8, 2)), (128, _attn_cfg(80, 64, 32, 8, 2)),
                          (160, _attn_cfg(80, 16, 16, 8, 1)), (256, _attn_cfg(80, 32, 32, 8, 2))),
    # fp32 pads the head dim to one masked tile (no split): 72 -> 128, 200 -> 256. IEEE dK/dV at
    # 200..248: the unmasked table's 32 x 16 tiles spilled 48 bytes under 3.6; 16 x 16 tiles with
    # 4 warps (3.6) / 16 warps (3.8) hold
    ("dkdv", 80, "ieee"): ((128, _attn_cfg(80, 16, 16, 8 if TRITON_36 else 16, 1)),
                           (256, _attn_cfg(80, 16, 16, 4 if TRITON_36 else 16, 1))),
    ("fwd", 80, "tf32"): ((64, _attn_cfg(80, 64, 64, 4, 2)), (128, _attn_cfg(80, 64, 32, 4, 2)),
                          (256, _attn_cfg(80, 16, 16, 4, 1))),
}

# delta = rowsum(dO * O): BLOCK_M rows per program (16 for padded head dims of 128 and more)
_ATTN_PRE_CONFIGS = {64: KernelConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1),
                     256: KernelConfig({"BLOCK_M": 16}, num_warps=4, num_stages=1)}

#: Head dims the kernels take.
ATTENTION_HEAD_DIMS = tuple(range(16, 257, 8))


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _attn_head_dim_reason(d: int) -> Optional[str]:
    if d % 8 or not 16 <= d <= 256:
        return f"head dim {d} (the Triton kernels take multiples of 8 from 16 to 256)"
    return None


def _attn_pieces(d: int, split: bool = True) -> tuple[int, int]:
    """The head dim as two power-of-two tiles ``(BLOCK_DA, BLOCK_DB)``, BLOCK_DB = 0 for one tile:
    80 -> (64, 16), 96 -> (64, 32), 72 -> (64, 16) with 8 columns masked, 64 -> (64, 0); where a
    split would cover as many columns as padding (112 -> 64 + 64) it pads (112 -> (128, 0)).
    ``split=False`` pads (one masked tile): fp32, whose dots are not the fast path and whose split
    variants spill on sm_80."""
    da = 1 << (d.bit_length() - 1)
    if da == d:
        return d, 0
    if not split:
        return _next_pow2(d), 0
    # 16-bit dots need K >= 16; next to a 128-wide tile a 16-wide one costs more registers than it
    # saves (136 and 144 compile to spills), so the small tile is at least 32 there
    db = max(16 if da < 128 else 32, _next_pow2(d - da))
    if da + db >= _next_pow2(d):
        return _next_pow2(d), 0
    return da, db


def _attn_precision(dtype: torch.dtype) -> str:
    """Precision class of a dtype: "16bit", or torch's fp32 matmul precision ("tf32" / "ieee")."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def _attn_config(kernel: str, arch: int, precision: str, width: int, masked: bool = False) -> KernelConfig:
    """The config for a padded head width; ``masked``: the head dim leaves a masked tail in its
    last tile (72, 88, 200, ...), which costs registers: _ATTN_MASKED_CONFIGS overrides there."""
    key = (kernel, arch, precision)
    table = _ATTN_MASKED_CONFIGS[key] if masked and key in _ATTN_MASKED_CONFIGS else _ATTN_CONFIGS[key]
    for max_width, config in table:
        if width <= max_width:
            return config
    raise AssertionError(f"no {kernel} config for head width {width}")


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor, t_dim: Optional[int] = -2) -> torch.Tensor:
    """Kernels read rows with unit stride: a last dim with another stride is copied. So is a view
    whose token offsets ``(T - 1) * stride_t`` (int32 in the kernels) pass 2^31 - 1 when a copy
    fixes that (``t_dim``: the token dim; None for packed qkv, whose contiguous layout it is)."""
    if (t.stride(-1) == 1 or t.shape[-1] == 1) and (t_dim is None or fits_int32((t.shape[t_dim], t.stride(t_dim)))):
        return t
    return t.contiguous()


def _check_index_range(**tensors: Optional[torch.Tensor]) -> None:
    """Within one (batch, head) slice the kernels offset tokens in int32 (``offs * stride_t``; the
    batch and head offsets are int64): raise before launch where that would wrap."""
    for name, t in tensors.items():
        if t is not None:
            check_int32("attention (triton)", f"{name} (token offsets within one (batch, head) slice)",
                        (t.shape[2], t.stride(2)))


def _bias_args(bias: Optional[torch.Tensor], b: int, h: int, tk: int, dummy: torch.Tensor) -> tuple:
    if bias is None:
        return (dummy, 0, 0, 0)
    bias = bias.expand(b, h, tk)
    return (bias, *_strides3(bias))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _attention_fwd(q, k, v, bias, causal: bool, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Forward into ``out`` (B, H, Tq, D), any strides with unit last stride, and ``lse``
    (contiguous fp32 (B, H, Tq)). q (B, H, Tq, D), k / v (B, Hkv, Tk, D) views with unit last
    stride; ``bias`` None or fp32 broadcastable to (B, H, Tk). Allocates nothing."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if b * h * tq == 0:
        return
    _check_index_range(q=q, k=k, v=v, out=out, key_padding_bias=None if bias is None else bias.expand(b, h, tk))
    da, db = _attn_pieces(d, split=q.dtype != torch.float32)
    precision = _attn_precision(q.dtype)
    config = _attn_config("fwd", device_arch(q.device if q.is_cuda else None), precision, da + db, d != da + db)
    grid = (triton.cdiv(tq, config.meta["BLOCK_M"]) * b * h,)
    bias_args = _bias_args(bias, b, h, tk, q)
    launch(_attention_fwd_kernel, grid, q, k, v, bias_args[0], out, lse,
           *_strides3(q), *_strides3(k), *_strides3(v), *bias_args[1:], *_strides3(out),
           h, h // hkv, tq, tk, scale * _LOG2E,
           HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None,
           PRECISION="ieee" if precision == "16bit" else precision, config=config)


def _attention_bwd(dout, q, k, v, out, lse, dlse, bias, causal: bool, scale: float, deterministic: bool,
                   dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Gradients into ``dq`` (B, H, Tq, D) and ``dk`` / ``dv`` (B, Hkv, Tk, D) (views with unit last
    stride, e.g. slices of one packed dqkv). ``dlse``: None or the gradient of lse. Temporaries:
    delta (B, H, Tq) fp32, and for the atomic dQ path an fp32 (B, H, Tq, D) buffer unless dq is
    fp32 itself: nothing of size Tq x Tk."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if b * h * tq == 0:  # no queries: nothing reaches k and v
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    _check_index_range(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk, dv=dv,
                       key_padding_bias=None if bias is None else bias.expand(b, h, tk))
    da, db = _attn_pieces(d, split=q.dtype != torch.float32)
    precision = _attn_precision(q.dtype)
    arch = device_arch(q.device if q.is_cuda else None)
    dot_precision = "ieee" if precision == "16bit" else precision

    delta = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    pre = _ATTN_PRE_CONFIGS[64 if _next_pow2(d) <= 64 else 256]
    launch(_attention_bwd_preprocess_kernel, (triton.cdiv(tq, pre.meta["BLOCK_M"]) * b * h,), out, dout, delta,
           *_strides3(out), *_strides3(dout), h, tq, HEAD_DIM=d, BLOCK_D=_next_pow2(d), config=pre)
    if dlse is not None:
        # d lse / d s = p: the lse gradient enters as dS = P * (dP - (delta - dlse))
        delta.sub_(dlse)

    # dQ through fp32 atomics from the dK/dV kernel unless asked to be deterministic, or where the
    # head dim has a masked tail (those variants spill with the atomic epilogue)
    atomic = not deterministic and d == da + db
    if atomic:
        dq_acc = dq if dq.dtype == torch.float32 else torch.empty((b, h, tq, d), device=q.device, dtype=torch.float32)
        dq_acc.zero_()
    else:
        dq_acc = dq
    bias_args = _bias_args(bias, b, h, tk, q)
    config = _attn_config("dkdv", arch, precision, da + db, d != da + db)
    launch(_attention_bwd_dkdv_kernel, (triton.cdiv(tk, config.meta["BLOCK_N"]) * b * hkv,),
           q, k, v, bias_args[0], dout, lse, delta, dk, dv, dq_acc,
           *_strides3(q), *_strides3(k), *_strides3(v), *bias_args[1:], *_strides3(dout), *_strides3(dk),
           *_strides3(dv), *_strides3(dq_acc), h, hkv, h // hkv, tq, tk, scale,
           HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None, ATOMIC_DQ=atomic,
           PRECISION=dot_precision, config=config)
    if atomic:
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return
    config = _attn_config("dq", arch, precision, da + db, d != da + db)
    launch(_attention_bwd_dq_kernel, (triton.cdiv(tq, config.meta["BLOCK_M"]) * b * h,),
           q, k, v, bias_args[0], dout, lse, delta, dq,
           *_strides3(q), *_strides3(k), *_strides3(v), *bias_args[1:], *_strides3(dout), *_strides3(dq),
           h, h // hkv, tq, tk, scale,
           HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None,
           PRECISION=dot_precision, config=config)


def _packed_views(qkv: torch.Tensor):
    """q, k, v as (B, H, T, D) views of a (B, T, 3, H, D) tensor."""
    q, k, v = qkv.unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Registered ops (torch.library custom ops with fakes) and their autograd
# --------------------------------------------------------------------------------------------


def _attention_fwd_fake(q, k, v, key_padding_bias, causal, scale, deterministic):
    b, h, tq, d = q.shape
    return q.new_empty((b, h, tq, d)), q.new_empty((b, h, tq), dtype=torch.float32)


def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, key_padding_bias, causal, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("vitkern::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], key_padding_bias: Optional[torch.Tensor], causal: bool, scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _attention_bwd(dout, q, k, v, out, lse, dlse, key_padding_bias, causal, scale, deterministic, dq, dk, dv)
    return dq, dk, dv


_attention_bwd_op.register_fake(_attention_bwd_fake)


def _attention_setup(ctx, inputs, output):
    q, k, v, key_padding_bias, causal, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_bias)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, dlse, key_padding_bias, ctx.causal, ctx.scale,
                                   ctx.deterministic)
    return dq, dk, dv, None, None, None, None


@kernel_op("vitkern::attention_fwd", fake=_attention_fwd_fake, setup_context=_attention_setup,
           backward=_attention_backward)
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_bias: Optional[torch.Tensor], causal: bool,
    scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Tq, D) contiguous, lse fp32 (B, H, Tq); ``deterministic`` is for the backward."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, tq, d = q.shape
    out = torch.empty((b, h, tq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    _attention_fwd(q, k, v, key_padding_bias, causal, scale, out, lse)
    return out, lse


def _qkvpacked_fwd_fake(qkv, causal, scale, deterministic):
    b, t, _, h, d = qkv.shape
    return qkv.new_empty((b, t, h, d)), qkv.new_empty((b, h, t), dtype=torch.float32)


def _qkvpacked_bwd_fake(dout, qkv, out, lse, dlse, causal, scale, deterministic):
    return qkv.new_empty(qkv.shape)


@torch.library.custom_op("vitkern::attention_qkvpacked_bwd", mutates_args=())
def _attention_qkvpacked_bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
    causal: bool, scale: float, deterministic: bool,
) -> torch.Tensor:
    """dqkv (B, T, 3, H, D) contiguous; dq, dk, dv are written straight into its slices."""
    qkv = _unit_last(qkv, None)
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    q, k, v = _packed_views(qkv)
    dq, dk, dv = _packed_views(dqkv)
    _attention_bwd(_unit_last(dout, 1).transpose(1, 2), q, k, v, out.transpose(1, 2), lse, dlse, None, causal,
                   scale, deterministic, dq, dk, dv)
    return dqkv


_attention_qkvpacked_bwd_op.register_fake(_qkvpacked_bwd_fake)


def _qkvpacked_setup(ctx, inputs, output):
    qkv, causal, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic


def _qkvpacked_backward(ctx, dout, dlse):
    qkv, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dqkv = _attention_qkvpacked_bwd_op(dout, qkv, out, lse, dlse, ctx.causal, ctx.scale, ctx.deterministic)
    return dqkv, None, None, None


@kernel_op("vitkern::attention_qkvpacked_fwd", fake=_qkvpacked_fwd_fake, setup_context=_qkvpacked_setup,
           backward=_qkvpacked_backward)
def _attention_qkvpacked_fwd_op(
    qkv: torch.Tensor, causal: bool, scale: float, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, T, H, D) contiguous (ready for the output projection), lse fp32 (B, H, T)."""
    qkv = _unit_last(qkv, None)
    b, t, _, h, d = qkv.shape
    out = torch.empty((b, t, h, d), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((b, h, t), device=qkv.device, dtype=torch.float32)
    q, k, v = _packed_views(qkv)
    _attention_fwd(q, k, v, None, causal, scale, out.transpose(1, 2), lse)
    return out, lse


# --------------------------------------------------------------------------------------------
# The "triton" backend of ops "attention" and "attention_qkvpacked"
# --------------------------------------------------------------------------------------------


def _triton_dtype_reason(dtype: torch.dtype) -> Optional[str]:
    if dtype not in FLOAT_DTYPES:
        return f"dtype {str(dtype).replace('torch.', '')} (the Triton kernels take float32, float16, bfloat16)"
    return None


def _attention_triton_supports(q, k, v, *, causal, scale, return_lse, deterministic, key_padding_bias=None):
    reason = _triton_dtype_reason(q.dtype) or _attn_head_dim_reason(q.shape[-1])
    if (reason is None and key_padding_bias is not None and key_padding_bias.requires_grad
            and torch.is_grad_enabled()):
        reason = "a key-padding mask that requires grad (the kernels do not differentiate the mask)"
    return reason


def _attention_qkvpacked_triton_supports(qkv, *, causal, scale, return_lse, deterministic):
    return _triton_dtype_reason(qkv.dtype) or _attn_head_dim_reason(qkv.shape[-1])


def _check_triton_head_dim(name: str, d: int) -> None:
    reason = _attn_head_dim_reason(d)
    if reason is not None:
        raise ValueError(f"{name}: unsupported {reason}")


def _resolved(scale: Optional[float], d: int, deterministic: bool) -> tuple[float, bool]:
    # torch.use_deterministic_algorithms(True) also selects the bit-reproducible backward
    return (1.0 / math.sqrt(d) if scale is None else float(scale),
            bool(deterministic or torch.are_deterministic_algorithms_enabled()))


def _attention_triton(q, k, v, *, causal=False, scale=None, return_lse=False, deterministic=False,
                      key_padding_bias=None):
    """Backend "triton" of op "attention" (inputs already checked by the public function)."""
    _check_triton_head_dim("q", q.shape[-1])
    scale, deterministic = _resolved(scale, q.shape[-1], deterministic)
    if key_padding_bias is not None and key_padding_bias.dtype != torch.float32:
        key_padding_bias = key_padding_bias.float()
    out, lse = _attention_fwd_op(q, k, v, key_padding_bias, causal, scale, deterministic)
    return (out, lse) if return_lse else out


def _attention_qkvpacked_triton(qkv, *, causal=False, scale=None, return_lse=False, deterministic=False):
    """Backend "triton" of op "attention_qkvpacked": reads (B, T, 3, H, D), writes (B, T, H, D)."""
    _check_triton_head_dim("qkv", qkv.shape[-1])
    scale, deterministic = _resolved(scale, qkv.shape[-1], deterministic)
    out, lse = _attention_qkvpacked_fwd_op(qkv, causal, scale, deterministic)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# Static compile cases (vitkern.testing.compile_check): CPU tensors, nothing runs under capture
# --------------------------------------------------------------------------------------------


def _case_run(dtype, b, h, hkv, tq, tk, d, *, causal=False, bias=False, packed=False, deterministic=False,
              backward=True, precision="ieee"):
    """Call the launchers the way the ops do (dtype "tf32" = fp32 with TF32 dots)."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if dtype == "tf32" else "ieee"
    try:
        dtype = torch.float32 if dtype == "tf32" else dtype
        if packed:
            qkv = torch.empty((b, tq, 3, h, d), dtype=dtype)
            q, k, v = _packed_views(qkv)
            out = torch.empty((b, tq, h, d), dtype=dtype).transpose(1, 2)
            dq, dk, dv = _packed_views(torch.empty_like(qkv))
        else:
            q = torch.empty((b, h, tq, d), dtype=dtype)
            k, v = (torch.empty((b, hkv, tk, d), dtype=dtype) for _ in range(2))
            out = torch.empty_like(q)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        key_bias = torch.empty((b, 1, tk), dtype=torch.float32) if bias else None
        lse = torch.empty((b, h, tq), dtype=torch.float32)
        _attention_fwd(q, k, v, key_bias, causal, d ** -0.5, out, lse)
        if backward:
            _attention_bwd(out, q, k, v, out, lse, None, key_bias, causal, d ** -0.5, deterministic, dq, dk, dv)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


@compile_cases
def _attention_compile_cases():
    # the benchmark shapes (ViT-B/16 and ViT-H/14 through the packed path), default backward
    _case_run(torch.bfloat16, 2, 12, 12, 197, 197, 64, packed=True)
    _case_run(torch.bfloat16, 2, 16, 16, 257, 257, 80, packed=True)
    # every other variant once: causal + key padding + GQA, ragged Tq != Tk, a masked head-dim
    # tail, the deterministic dQ kernel; fp32 with IEEE and with TF32 dots
    _case_run(torch.float16, 2, 8, 2, 100, 197, 72, causal=True, bias=True, deterministic=True)
    _case_run(torch.float32, 2, 4, 4, 197, 197, 64, deterministic=True)
    _case_run("tf32", 2, 4, 4, 197, 197, 64)


@compile_cases(slow=True)
def _attention_compile_cases_all():
    # every config of the tables: head dims of every width class, with and without a masked tail,
    # both dQ paths (the atomic one only runs without a masked tail), every precision class
    for dtype, dims in ((torch.bfloat16, (32, 40, 56, 64, 72, 80, 88, 96, 104, 128, 136, 160, 176, 192, 200, 256)),
                        (torch.float32, (64, 72, 128, 200, 256)), ("tf32", (64, 72, 128, 200, 256))):
        for d in dims:
            da, db = _attn_pieces(d, split=dtype == torch.bfloat16)
            for deterministic in (True, False) if d == da + db else (True,):
                _case_run(dtype, 2, 4, 4, 197, 197, d, causal=True, bias=True, deterministic=deterministic)


# --------------------------------------------------------------------------------------------
# Backend registration
# --------------------------------------------------------------------------------------------

register_impl("attention", "reference", attention_ref)
register_impl("attention_qkvpacked", "reference", attention_qkvpacked_ref)
register_impl("attention", "triton", _attention_triton, supports=_attention_triton_supports)
register_impl(
    "attention_qkvpacked", "triton", _attention_qkvpacked_triton, supports=_attention_qkvpacked_triton_supports
)
