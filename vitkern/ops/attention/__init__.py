"""Scaled dot-product attention: flash-style kernels, the reference, and a drop-in SDPA.

Public functions (re-exported from ``vitkern``):

- ``attention(q, k, v, *, causal, scale, return_lse, deterministic, ..., key_padding_mask)``:
  ``(B, H, T, D)`` layout, grouped-query attention when k / v have fewer heads; a ``(B, Tk)``
  bool key-padding mask for padded batches.
- ``attention_qkvpacked(qkv, ...)``: reads q / k / v out of the ``(B, T, 3, H, D)`` output of a
  fused qkv projection and returns ``(B, T, H, D)``, so neither side needs a permute.
- ``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)`` and
  ``attention_qkvpacked_varlen(qkv, cu_seqlens, ...)``: packed variable-length sequences (a
  mixed-resolution batch as one ``(total, H, D)`` tensor and int32 cumulative lengths), without
  padding and without a host sync.
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
``(out, lse)`` as the public functions do. Ops ``"attention_varlen"`` / ``"attention_qkvpacked_varlen"``
take exactly their public function's arguments.

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
  (see its docstring; ``native.SDPA_BACKENDS`` pins torch's SDPA kernels); for packed sequences
  torch's ``varlen_attn`` where it applies, else a per-sequence SDPA loop.
- ``sdpa.py``: the drop-in ``scaled_dot_product_attention`` and its routing.
- ``configs.py``: the kernel config tables and the head-dim split.
- ``tiles.py``, ``forward.py``, ``backward.py``: the ``@triton.jit`` kernels and their helpers;
  ``prologue.py``: the QK-norm / RoPE prologue applied inside them (op ``"attention_prologue"``,
  which ``attention`` calls when a prologue is given).
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
    attention_qkvpacked_varlen_torch,
    attention_qkvpacked_varlen_torch_supports,
    attention_torch,
    attention_torch_supports,
    attention_varlen_torch,
    attention_varlen_torch_supports,
)
from vitkern.ops.attention.op import (
    _attention_prologue_triton,
    _attention_prologue_triton_supports,
    _attention_qkvpacked_triton,
    _attention_qkvpacked_triton_supports,
    _attention_qkvpacked_varlen_triton,
    _attention_qkvpacked_varlen_triton_supports,
    _attention_triton,
    _attention_triton_supports,
    _attention_varlen_triton,
    _attention_varlen_triton_supports,
    TRITON_DTYPES,
)
from vitkern.ops.attention.reference import (
    attention_qkvpacked_ref,
    attention_qkvpacked_varlen_ref,
    attention_ref,
    attention_varlen_ref,
)
from vitkern.ops.attention.sdpa import scaled_dot_product_attention
from vitkern.ops.qk_prologue import QKNorm, RopeTables, check_prologue, prologue_requested, qk_prologue_ref

__all__ = [
    "attention",
    "attention_qkvpacked",
    "attention_varlen",
    "attention_qkvpacked_varlen",
    "scaled_dot_product_attention",
    "attention_ref",
    "attention_qkvpacked_ref",
    "attention_varlen_ref",
    "attention_qkvpacked_varlen_ref",
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


def _key_padding_bias(key_padding_mask, b: int, tk: int, device: torch.device) -> Optional[torch.Tensor]:
    """A ``(B, Tk)`` bool key-padding mask (True = a valid key) as the ``(B, 1, Tk)`` float32
    additive bias the attention ops take (0 / -inf): ``B * Tk`` values, never a ``(T, T)`` mask;
    the kernels read one row of it per key block."""
    if key_padding_mask is None:
        return None
    check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), shape=(b, tk))
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but the inputs are on {device}")
    return torch.where(key_padding_mask, 0.0, float("-inf")).to(torch.float32).unsqueeze(1)


def _prologue_call(q, k, q_norm, k_norm, rope, num_prefix_tokens) -> tuple[tuple, dict]:
    """The checked prologue arguments flattened for op "attention_prologue": the tensors
    ``(q_weight, q_bias, k_weight, k_bias, sin, cos)`` and the keywords (kinds, eps, layout,
    prefix); see :mod:`vitkern.ops.qk_prologue`."""
    b, h, t, d = q.shape
    if rope is not None and k.shape[2] != t:
        raise ValueError(f"rope needs self-attention (Tq == Tk); q has {t} tokens, k {k.shape[2]}")
    q_norm, k_norm, rope, n = check_prologue(q_norm, k_norm, rope, num_prefix_tokens, heads=h, tokens=t,
                                             head_dim=d, device=q.device)
    if rope is not None and k.shape[1] != h and rope.sin.dim() == 3:
        raise ValueError(f"rope: per-head tables need as many k heads as q heads ({k.shape[1]} vs {h})")

    def norm_parts(norm):
        if norm is None:
            return (None, None), dict(kind=None, eps=0.0)
        return (norm.weight, norm.bias), dict(kind=norm.kind, eps=float(norm.eps))

    (qw, qb), qn = norm_parts(q_norm)
    (kw, kb), kn = norm_parts(k_norm)
    tensors = (qw, qb, kw, kb, rope.sin if rope is not None else None, rope.cos if rope is not None else None)
    return tensors, dict(q_norm=qn["kind"], q_eps=qn["eps"], k_norm=kn["kind"], k_eps=kn["eps"],
                         rope_layout=rope.layout if rope is not None else None, num_prefix_tokens=n)


def _composed_prologue(attention_fn):
    """An "attention_prologue" implementation: the reference prologue (PyTorch ops) on q and k,
    then ``attention_fn``."""

    def impl(q, k, v, q_weight, q_bias, k_weight, k_bias, sin, cos, *, q_norm, q_eps, k_norm, k_eps, rope_layout,
             num_prefix_tokens, **kwargs):
        layout = rope_layout or "interleaved"
        q = qk_prologue_ref(q, q_weight, q_bias, sin, cos, q_norm, q_eps, layout, num_prefix_tokens)
        k = qk_prologue_ref(k, k_weight, k_bias, sin, cos, k_norm, k_eps, layout, num_prefix_tokens)
        return attention_fn(q, k, v, **kwargs)

    return impl


def _composed_supports(supports):
    def check(q, k, v, q_weight, q_bias, k_weight, k_bias, sin, cos, *, q_norm, q_eps, k_norm, k_eps, rope_layout,
              num_prefix_tokens, **kwargs):
        return supports(q, k, v, **kwargs)

    return check


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
    key_padding_mask: Optional[torch.Tensor] = None,
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
        dtype out; gradients flow to q, k, the norms' weights and the tables. Backend "triton"
        applies q's inside the forward kernels' q loads and k's in one pass over k, and both
        inverses in the backward kernels' epilogues (:mod:`vitkern.ops.attention.prologue`;
        "half" rotations whose head dim is not one power-of-two tile, and negative scales, run
        the prologue's own kernels before the attention kernels instead).
        key_padding_mask: ``(B, Tk)`` bool, True for the keys each batch element may attend to
            (a padded batch of mixed-length sequences). The kernels read it as one ``(Tk,)`` row
            per batch element (an additive 0 / -inf bias), never a ``(B, 1, Tq, Tk)`` mask. A
            query row whose keys are all masked gets out 0 and lse -inf, and zero gradients.

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
        causal=causal, scale=scale, return_lse=return_lse, deterministic=deterministic,
        key_padding_bias=_key_padding_bias(key_padding_mask, b, tk, device),
    )
    if prologue_requested(q_norm, k_norm, rope):
        tensors, flags = _prologue_call(q, k, q_norm, k_norm, rope, num_prefix_tokens)
        impl = select_impl("attention_prologue", device, q, k, v, *tensors, **flags, **kwargs)
        return impl(q, k, v, *tensors, **flags, **kwargs)
    if num_prefix_tokens != 0:
        check_prologue(None, None, None, num_prefix_tokens, heads=h, tokens=q.shape[2], head_dim=d, device=device)
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
    key_padding_mask: Optional[torch.Tensor] = None,
):
    """Self-attention on the packed output of a fused qkv projection.

    ``qkv`` is ``(B, T, 3, H, D)``: the ``(B, T, 3 * H * D)`` output of ``x @ Wqkv.T`` viewed
    without a permute (timm / torchvision qkv weight layout). Equals
    ``attention(q, k, v).transpose(1, 2)`` with ``q, k, v = qkv.unbind(2)`` each transposed to
    ``(B, H, T, D)``.

    Args:
        qkv: ``(B, T, 3, H, D)`` float32 / float16 / bfloat16, any strides.
        causal, scale, return_lse, deterministic, q_norm, k_norm, rope, num_prefix_tokens,
            key_padding_mask: as in :func:`attention` (``key_padding_mask`` ``(B, T)``; with it,
            or with a prologue, the call runs :func:`attention` on ``(B, H, T, D)`` views and the
            output is a ``(B, T, H, D)`` view of a ``(B, H, T, D)`` tensor).

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
    if prologue_requested(q_norm, k_norm, rope) or num_prefix_tokens != 0 or key_padding_mask is not None:
        # The prologue rewrites q and k, the packed op takes no mask: run the unpacked op on
        # (B, H, T, D) views.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        res = attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse, deterministic=deterministic,
                        q_norm=q_norm, k_norm=k_norm, rope=rope, num_prefix_tokens=num_prefix_tokens,
                        key_padding_mask=key_padding_mask)
        return (res[0].transpose(1, 2), res[1]) if return_lse else res.transpose(1, 2)
    kwargs = dict(causal=causal, scale=scale, return_lse=return_lse, deterministic=deterministic)
    impl = select_impl("attention_qkvpacked", device, qkv, **kwargs)
    return impl(qkv, **kwargs)


def _check_cu_seqlens(name: str, cu, device: torch.device) -> torch.Tensor:
    """Shape, dtype and device of a cu_seqlens argument: its values stay on the device unread."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.shape[0] == 0:
        raise ValueError(f"{name} must hold num_seqs + 1 >= 1 offsets (starting at 0), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}; cu_seqlens must be on the inputs' device")
    return cu


def _check_max_seqlen(name: str, value, total: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or a python int, got {type(value).__name__}")
    if not 0 <= value <= total:
        raise ValueError(f"{name} must be in [0, {total}] (the total token count), got {value}")
    return value


def _check_varlen_flags(causal, scale, return_lse):
    return _check_flag("causal", causal), _check_scale(scale), _check_flag("return_lse", return_lse)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Attention over packed variable-length sequences (a mixed-resolution batch without padding).

    Sequence ``i`` is query rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of ``q`` attending to key
    rows ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]`` of ``k`` / ``v``; equals SDPA on each sequence
    alone. No value of ``cu_seqlens`` is read on the host (no device sync), so
    ``torch.compile(fullgraph=True)`` traces the call without a graph break.

    Args:
        q: ``(total_q, H, D)`` float32 / float16 / bfloat16, any strides.
        k, v: ``(total_k, Hkv, D)`` with ``H % Hkv == 0`` (grouped-query attention).
        cu_seqlens_q, cu_seqlens_k: int32 ``(num_seqs + 1,)`` on q's device: nondecreasing, from 0
            to ``total_q`` / ``total_k``. Sequences of length 0 are allowed (a query sequence with
            no keys gets out 0, lse -inf). The values are not checked (that would need a host
            sync): values that break this contract give unspecified results, but the kernels
            clamp every sequence to the tensors and never access memory outside them.
        max_seqlen_q, max_seqlen_k: optional python ints, the longest sequence (an upper bound is
            fine, a smaller value leaves rows uncomputed). Without them the kernels' grid is sized
            from the total token count (``total // block + num_seqs`` row blocks a head, the idle
            ones exit at once); with them, the smaller of that and ``num_seqs * ceil(max /
            block)``. "torch" runs torch's ``varlen_attn`` only when they are given.
        causal: per sequence, query ``i`` sees keys ``j <= i`` of its own sequence (top-left
            aligned, as :func:`attention`).
        scale: score scale; None means ``1 / sqrt(D)``.
        return_lse: also return the natural-log logsumexp of the scaled scores.

    Returns:
        ``out`` ``(total_q, H, D)`` in the compute dtype, or ``(out, lse)`` with ``lse`` float32
        ``(H, total_q)`` (head-major, as flash-attn's and torch's varlen paths).

    Autocast: q, k, v are cast to the autocast dtype; outside autocast they must share one dtype.
    The backward (dq, dk, dv) is bit-reproducible under ``torch.use_deterministic_algorithms``.

    Raises:
        TypeError / ValueError naming the argument: ranks, shapes, dtypes (cu_seqlens must be
        int32), devices, ``H % Hkv``, head dims, cu_seqlens of different lengths, a shared
        cu_seqlens with q and k of different totals, a max_seqlen past the total.
    """
    check_tensor("q", q, ndim=3)
    total_q, h, d = q.shape
    check_tensor("k", k, ndim=3)
    if k.shape[2] != d:
        raise ValueError(f"k must have shape (total_k, Hkv, {d}) (q is (total_q, H, D) = {tuple(q.shape)}), "
                         f"got {tuple(k.shape)}")
    total_k, hkv = k.shape[0], k.shape[1]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"k has {hkv} heads, which must divide q's {h} heads (grouped-query attention)")
    if d == 0:
        raise ValueError(f"q must have a head dim D >= 1, got shape {tuple(q.shape)}")
    check_tensor("v", v, shape=tuple(k.shape))
    device = check_same_device(q=q, k=k, v=v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have the shape of cu_seqlens_q (one offset per sequence + 1), got "
                         f"{tuple(cu_seqlens_k.shape)} and {tuple(cu_seqlens_q.shape)}")
    if cu_seqlens_q is cu_seqlens_k and total_q != total_k:
        raise ValueError(f"q has {total_q} tokens and k {total_k}, but they share one cu_seqlens (which must end "
                         "at both totals)")
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, total_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, total_k)
    causal, scale, return_lse = _check_varlen_flags(causal, scale, return_lse)
    ac = autocast_dtype(device)
    if ac is not None:
        q, k, v = cast_floating(ac, q, k, v)
    else:
        check_same_dtype(q=q, k=k, v=v)
    kwargs = dict(max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, causal=causal, scale=scale,
                  return_lse=return_lse)
    impl = select_impl("attention_varlen", device, q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)
    return impl(q, k, v, cu_seqlens_q, cu_seqlens_k, **kwargs)


def attention_qkvpacked_varlen(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: Optional[int] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Self-attention over packed variable-length sequences from a fused qkv projection.

    ``qkv`` is ``(total, 3, H, D)`` (the ``(total, 3 * H * D)`` qkv GEMM output of the packed
    tokens, viewed); equals :func:`attention_varlen` on ``qkv.unbind(1)`` with one ``cu_seqlens``
    for queries and keys, reading q / k / v in place and returning ``(total, H, D)`` (and lse
    ``(H, total)``). Arguments as in :func:`attention_varlen`.
    """
    check_tensor("qkv", qkv, ndim=4)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (total, 3, H, D), got {tuple(qkv.shape)} (dim 1 must be 3)")
    if qkv.shape[3] == 0 or qkv.shape[2] == 0:
        raise ValueError(f"qkv must have H >= 1 heads and a head dim D >= 1, got shape {tuple(qkv.shape)}")
    device = qkv.device
    _check_cu_seqlens("cu_seqlens", cu_seqlens, device)
    max_seqlen = _check_max_seqlen("max_seqlen", max_seqlen, qkv.shape[0])
    causal, scale, return_lse = _check_varlen_flags(causal, scale, return_lse)
    ac = autocast_dtype(device)
    if ac is not None:
        (qkv,) = cast_floating(ac, qkv)
    kwargs = dict(max_seqlen=max_seqlen, causal=causal, scale=scale, return_lse=return_lse)
    impl = select_impl("attention_qkvpacked_varlen", device, qkv, cu_seqlens, **kwargs)
    return impl(qkv, cu_seqlens, **kwargs)


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

register_impl("attention_prologue", "reference", _composed_prologue(attention_ref))
register_impl("attention_prologue", "torch", _composed_prologue(attention_torch),
              _composed_supports(attention_torch_supports))
register_impl("attention_prologue", "triton", _attention_prologue_triton, _attention_prologue_triton_supports,
              dtypes=TRITON_DTYPES)

register_impl("attention_varlen", "reference", attention_varlen_ref)
register_impl("attention_qkvpacked_varlen", "reference", attention_qkvpacked_varlen_ref)
register_impl("attention_varlen", "torch", attention_varlen_torch, attention_varlen_torch_supports)
register_impl("attention_qkvpacked_varlen", "torch", attention_qkvpacked_varlen_torch,
              attention_qkvpacked_varlen_torch_supports)
register_impl("attention_varlen", "triton", _attention_varlen_triton, _attention_varlen_triton_supports,
              dtypes=TRITON_DTYPES)
register_impl("attention_qkvpacked_varlen", "triton", _attention_qkvpacked_varlen_triton,
              _attention_qkvpacked_varlen_triton_supports, dtypes=TRITON_DTYPES)
