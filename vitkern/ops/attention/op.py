"""Attention's Triton backend: the registered ops, their fakes and autograd, and the backend's
implementation functions with their ``supports`` predicates.

``vitkern::attention_fwd`` / ``attention_bwd`` / ``attention_qkvpacked_fwd`` /
``attention_qkvpacked_bwd`` and their packed variable-length forms ``attention_varlen_fwd`` /
``attention_varlen_bwd`` / ``attention_qkvpacked_varlen_fwd`` / ``attention_qkvpacked_varlen_bwd``
are ``torch.library`` custom ops, so torch.compile sees each kernel
launch as one opaque op. The kernels are reached through :mod:`vitkern.ops.attention.launch`,
imported where an op runs them: this module imports without Triton.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vitkern.ops._autograd import kernel_op
from vitkern.ops._common import FLOAT_DTYPES
from vitkern.ops._index import fits_int32
from vitkern.ops.attention.configs import _attn_head_dim_reason


def _unit_last(t: torch.Tensor, t_dim: Optional[int] = -2) -> torch.Tensor:
    """Kernels read rows with unit stride: a last dim with another stride is copied. So is a view
    whose token offsets ``(T - 1) * stride_t`` (int32 in the kernels) pass 2^31 - 1 when a copy
    fixes that (``t_dim``: the token dim; None for packed qkv, whose contiguous layout it is)."""
    if (t.stride(-1) == 1 or t.shape[-1] == 1) and (t_dim is None or fits_int32((t.shape[t_dim], t.stride(t_dim)))):
        return t
    return t.contiguous()


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


@kernel_op("vitkern::attention_bwd", fake=_attention_bwd_fake)
def _attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], key_padding_bias: Optional[torch.Tensor], causal: bool, scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.attention import launch as _launch

    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _launch._attention_bwd(dout, q, k, v, out, lse, dlse, key_padding_bias, causal, scale, deterministic, dq, dk, dv)
    return dq, dk, dv


def _attention_save(inputs, output):
    q, k, v, key_padding_bias, causal, scale, deterministic = inputs
    out, lse = output
    return (q, k, v, out, lse, key_padding_bias), (causal, scale, deterministic)


def _attention_backward(state, saved, grads, need):
    causal, scale, deterministic = state
    q, k, v, out, lse, key_padding_bias = saved
    dout, dlse = grads
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, dlse, key_padding_bias, causal, scale, deterministic)
    return dq, dk, dv, None, None, None, None


@kernel_op("vitkern::attention_fwd", fake=_attention_fwd_fake, save=_attention_save, backward=_attention_backward)
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_bias: Optional[torch.Tensor], causal: bool,
    scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Tq, D) contiguous, lse fp32 (B, H, Tq); ``deterministic`` is for the backward."""
    from vitkern.ops.attention import launch as _launch

    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, tq, d = q.shape
    out = torch.empty((b, h, tq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    _launch._attention_fwd(q, k, v, key_padding_bias, causal, scale, out, lse)
    return out, lse


def _qkvpacked_fwd_fake(qkv, causal, scale, deterministic):
    b, t, _, h, d = qkv.shape
    return qkv.new_empty((b, t, h, d)), qkv.new_empty((b, h, t), dtype=torch.float32)


def _qkvpacked_bwd_fake(dout, qkv, out, lse, dlse, causal, scale, deterministic):
    return qkv.new_empty(qkv.shape)


@kernel_op("vitkern::attention_qkvpacked_bwd", fake=_qkvpacked_bwd_fake)
def _attention_qkvpacked_bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
    causal: bool, scale: float, deterministic: bool,
) -> torch.Tensor:
    """dqkv (B, T, 3, H, D) contiguous; dq, dk, dv are written straight into its slices."""
    from vitkern.ops.attention import launch as _launch

    qkv = _unit_last(qkv, None)
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    q, k, v = _packed_views(qkv)
    dq, dk, dv = _packed_views(dqkv)
    _launch._attention_bwd(_unit_last(dout, 1).transpose(1, 2), q, k, v, out.transpose(1, 2), lse, dlse, None,
                           causal, scale, deterministic, dq, dk, dv)
    return dqkv


def _qkvpacked_save(inputs, output):
    qkv, causal, scale, deterministic = inputs
    out, lse = output
    return (qkv, out, lse), (causal, scale, deterministic)


def _qkvpacked_backward(state, saved, grads, need):
    causal, scale, deterministic = state
    qkv, out, lse = saved
    dout, dlse = grads
    if dout is None:
        dout = torch.zeros_like(out)
    return _attention_qkvpacked_bwd_op(dout, qkv, out, lse, dlse, causal, scale, deterministic), None, None, None


@kernel_op("vitkern::attention_qkvpacked_fwd", fake=_qkvpacked_fwd_fake, save=_qkvpacked_save,
           backward=_qkvpacked_backward)
def _attention_qkvpacked_fwd_op(
    qkv: torch.Tensor, causal: bool, scale: float, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, T, H, D) contiguous (ready for the output projection), lse fp32 (B, H, T)."""
    from vitkern.ops.attention import launch as _launch

    qkv = _unit_last(qkv, None)
    b, t, _, h, d = qkv.shape
    out = torch.empty((b, t, h, d), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((b, h, t), device=qkv.device, dtype=torch.float32)
    q, k, v = _packed_views(qkv)
    _launch._attention_fwd(q, k, v, None, causal, scale, out.transpose(1, 2), lse)
    return out, lse


# --------------------------------------------------------------------------------------------
# Packed (variable-length) sequences: (total, H, D) tensors and int32 cu_seqlens
# --------------------------------------------------------------------------------------------
# The kernels see a (total, H, D) tensor as a (1, H, total, D) view and each sequence through
# cu_seqlens (launch.PackedSeqs); lse is (H, total_q). Nothing on these paths reads a device value
# on the host: the grid comes from the shapes (and max_seqlen when given).


def _seq_view(t: torch.Tensor) -> torch.Tensor:
    """A (total, H, D) tensor as the (1, H, total, D) view the launchers take."""
    return t.unsqueeze(0).transpose(1, 2)


def _packed_seqs(cu_q, cu_k, max_q, max_k):
    from vitkern.ops.attention.launch import PackedSeqs

    return PackedSeqs(cu_q, cu_k, max_q, max_k)


def _varlen_fwd(q, k, v, seqs, causal, scale, out):
    """Forward of packed q / k / v (total, heads, D) into ``out``'s (total_q, H, D) view; returns lse."""
    from vitkern.ops.attention import launch as _launch

    lse = torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32)
    _launch._attention_fwd(_seq_view(q), _seq_view(k), _seq_view(v), None, causal, scale, _seq_view(out),
                           lse.unsqueeze(0), seqs=seqs)
    return lse


def _varlen_bwd(dout, q, k, v, out, lse, dlse, seqs, causal, scale, deterministic, dq, dk, dv):
    from vitkern.ops.attention import launch as _launch

    _launch._attention_bwd(_seq_view(dout), _seq_view(q), _seq_view(k), _seq_view(v), _seq_view(out),
                           lse.unsqueeze(0), None if dlse is None else dlse.unsqueeze(0), None, causal, scale,
                           deterministic, _seq_view(dq), _seq_view(dk), _seq_view(dv), seqs=seqs)


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     causal, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@kernel_op("vitkern::attention_varlen_bwd", fake=_varlen_bwd_fake)
def _attention_varlen_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], causal: bool, scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, dout = _unit_last(q, 0), _unit_last(k, 0), _unit_last(v, 0), _unit_last(dout, 0)
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    _varlen_bwd(dout, q, k, v, out, lse, dlse, _packed_seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                causal, scale, deterministic, dq, dk, dv)
    return dq, dk, dv


def _varlen_save(inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale = inputs
    out, lse = output
    return (q, k, v, out, lse, cu_q, cu_k), (max_q, max_k, causal, scale)


def _varlen_backward(state, saved, grads, need):
    max_q, max_k, causal, scale = state
    q, k, v, out, lse, cu_q, cu_k = saved
    dout, dlse = grads
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_varlen_bwd_op(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, causal, scale,
                                          torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, None, None, None, None, None, None


@kernel_op("vitkern::attention_varlen_fwd", fake=_varlen_fwd_fake, save=_varlen_save, backward=_varlen_backward)
def _attention_varlen_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, H, D) contiguous, lse fp32 (H, total_q)."""
    q, k, v = _unit_last(q, 0), _unit_last(k, 0), _unit_last(v, 0)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = _varlen_fwd(q, k, v, _packed_seqs(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), causal, scale,
                      out)
    return out, lse


def _qkvpacked_varlen_fwd_fake(qkv, cu_seqlens, max_seqlen, causal, scale):
    t, _, h, d = qkv.shape
    return qkv.new_empty((t, h, d)), qkv.new_empty((h, t), dtype=torch.float32)


def _qkvpacked_varlen_bwd_fake(dout, qkv, out, lse, dlse, cu_seqlens, max_seqlen, causal, scale, deterministic):
    return qkv.new_empty(qkv.shape)


@kernel_op("vitkern::attention_qkvpacked_varlen_bwd", fake=_qkvpacked_varlen_bwd_fake)
def _attention_qkvpacked_varlen_bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor, max_seqlen: Optional[int], causal: bool, scale: float, deterministic: bool,
) -> torch.Tensor:
    """dqkv (total, 3, H, D) contiguous; dq, dk, dv are written straight into its slices."""
    qkv = _unit_last(qkv, None)
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    _varlen_bwd(_unit_last(dout, 0), *qkv.unbind(1), out, lse, dlse,
                _packed_seqs(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen), causal, scale, deterministic,
                *dqkv.unbind(1))
    return dqkv


def _qkvpacked_varlen_save(inputs, output):
    qkv, cu, max_seqlen, causal, scale = inputs
    out, lse = output
    return (qkv, out, lse, cu), (max_seqlen, causal, scale)


def _qkvpacked_varlen_backward(state, saved, grads, need):
    max_seqlen, causal, scale = state
    qkv, out, lse, cu = saved
    dout, dlse = grads
    if dout is None:
        dout = torch.zeros_like(out)
    dqkv = _attention_qkvpacked_varlen_bwd_op(dout, qkv, out, lse, dlse, cu, max_seqlen, causal, scale,
                                              torch.are_deterministic_algorithms_enabled())
    return dqkv, None, None, None, None


@kernel_op("vitkern::attention_qkvpacked_varlen_fwd", fake=_qkvpacked_varlen_fwd_fake,
           save=_qkvpacked_varlen_save, backward=_qkvpacked_varlen_backward)
def _attention_qkvpacked_varlen_fwd_op(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: Optional[int], causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total, H, D) contiguous, lse fp32 (H, total); q / k / v read in place from (total, 3, H, D)."""
    qkv = _unit_last(qkv, None)
    t, _, h, d = qkv.shape
    out = torch.empty((t, h, d), device=qkv.device, dtype=qkv.dtype)
    lse = _varlen_fwd(*qkv.unbind(1), _packed_seqs(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen), causal, scale,
                      out)
    return out, lse


# --------------------------------------------------------------------------------------------
# The "triton" backend of ops "attention" and "attention_qkvpacked"
# --------------------------------------------------------------------------------------------


#: What the kernels take, as data (the backend registry checks every floating tensor argument).
TRITON_DTYPES = FLOAT_DTYPES


def _attention_triton_supports(q, k, v, *, causal, scale, return_lse, deterministic, key_padding_bias=None):
    reason = _attn_head_dim_reason(q.shape[-1])
    if (reason is None and key_padding_bias is not None and key_padding_bias.requires_grad
            and torch.is_grad_enabled()):
        reason = "a key-padding mask that requires grad (the kernels do not differentiate the mask)"
    return reason


def _attention_qkvpacked_triton_supports(qkv, *, causal, scale, return_lse, deterministic):
    return _attn_head_dim_reason(qkv.shape[-1])


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


def _attention_varlen_triton_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, **_):
    return _attn_head_dim_reason(q.shape[-1])


def _attention_qkvpacked_varlen_triton_supports(qkv, cu_seqlens, **_):
    return _attn_head_dim_reason(qkv.shape[-1])


def _attention_varlen_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None,
                             causal=False, scale=None, return_lse=False):
    """Backend "triton" of op "attention_varlen": (total_q, H, D) out, lse (H, total_q)."""
    _check_triton_head_dim("q", q.shape[-1])
    scale, _ = _resolved(scale, q.shape[-1], False)
    out, lse = _attention_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                        scale)
    return (out, lse) if return_lse else out


def _attention_qkvpacked_varlen_triton(qkv, cu_seqlens, *, max_seqlen=None, causal=False, scale=None,
                                       return_lse=False):
    """Backend "triton" of op "attention_qkvpacked_varlen": reads (total, 3, H, D), writes (total, H, D)."""
    _check_triton_head_dim("qkv", qkv.shape[-1])
    scale, _ = _resolved(scale, qkv.shape[-1], False)
    out, lse = _attention_qkvpacked_varlen_fwd_op(qkv, cu_seqlens, max_seqlen, causal, scale)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# Attention with the QK-norm / RoPE prologue fused into the kernels (op "attention_prologue")
# --------------------------------------------------------------------------------------------
# The backends take the prologue flattened, as the qk_prologue op does (the backend machinery sees
# tensors): q_norm / k_norm kinds None, "layer" or "rms" with their eps; rope_layout None,
# "interleaved" or "half". The Triton backend normalises and rotates q as the forward kernels load
# it, k in one pass of the prologue's own kernel (the streamed operand: see prologue.py), and runs
# both inverses in the epilogues of the dQ and dK/dV kernels.

_NORM_CODES = {None: 0, "layer": 1, "rms": 2}
_NORM_KINDS = {v: k for k, v in _NORM_CODES.items()}


def _tile_prologue(norm: int, weight, bias, eps: float, sin, cos, rope: int, prefix: int, need=(False,) * 3):
    from vitkern.ops.attention.launch import TilePrologue

    if norm == 0 and rope == 0:
        return None
    return TilePrologue(norm, weight, bias, eps, sin if rope else None, cos if rope else None, rope, prefix, need)


def _prologue_fwd_fake(q, k, v, key_padding_bias, q_weight, q_bias, k_weight, k_bias, sin, cos, q_norm, k_norm,
                       q_eps, k_eps, rope, prefix, causal, scale, deterministic, save_rot):
    b, h, tq, d = q.shape
    q_rot = (b, h, tq, d) if save_rot and (q_norm or rope) else (0,)
    k_rot = tuple(k.shape) if k_norm or rope else (0,)
    return (q.new_empty((b, h, tq, d)), q.new_empty((b, h, tq), dtype=torch.float32), q.new_empty(q_rot),
            k.new_empty(k_rot))


def _prologue_bwd_fakes(q, k, v, q_weight, q_bias, k_weight, k_bias, sin, cos):
    def like(t):
        return t.new_empty(t.shape) if t is not None else q.new_empty((0,))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(q_weight), like(q_bias),
            like(k_weight), like(k_bias), like(sin), like(cos))


def _prologue_bwd_fake(dout, q, k, v, out, lse, dlse, q_rot, k_rot, key_padding_bias, q_weight, q_bias, k_weight,
                       k_bias, sin, cos, q_norm, k_norm, q_eps, k_eps, rope, prefix, causal, scale, deterministic,
                       need):
    return _prologue_bwd_fakes(q, k, v, q_weight, q_bias, k_weight, k_bias, sin, cos)


@kernel_op("vitkern::attention_prologue_bwd", fake=_prologue_bwd_fake)
def _attention_prologue_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor], q_rot: torch.Tensor, k_rot: torch.Tensor, key_padding_bias: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor], q_bias: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor], sin: Optional[torch.Tensor], cos: Optional[torch.Tensor], q_norm: int,
    k_norm: int, q_eps: float, k_eps: float, rope: int, prefix: int, causal: bool, scale: float,
    deterministic: bool, need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """dq, dk, dv and the prologue's parameter gradients (``need``: q's weight, q's bias, k's
    weight, k's bias, the tables); empty tensors for those not asked for."""
    from vitkern.ops._autograd import fill_outputs
    from vitkern.ops.attention import launch as _launch

    q, k, v, dout = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout)
    q_p = _tile_prologue(q_norm, q_weight, q_bias, q_eps, sin, cos, rope, prefix, (need[0], need[1], need[4]))
    k_p = _tile_prologue(k_norm, k_weight, k_bias, k_eps, sin, cos, rope, prefix, (need[2], need[3], need[4]))
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    grads = _launch._attention_bwd(dout, q_rot if q_p is not None else q, k_rot if k_p is not None else k, v, out,
                                   lse, dlse, key_padding_bias, causal, scale, deterministic, dq, dk, dv,
                                   q_prologue=q_p, k_prologue=k_p, q_raw=q, k_raw=k)
    return fill_outputs((dq, dk, dv, *grads), _prologue_bwd_fakes(q, k, v, q_weight, q_bias, k_weight, k_bias,
                                                                 sin, cos))


def _prologue_save(inputs, output):
    (q, k, v, key_padding_bias, q_weight, q_bias, k_weight, k_bias, sin, cos, q_norm, k_norm, q_eps, k_eps, rope,
     prefix, causal, scale, deterministic, save_rot) = inputs
    out, lse, q_rot, k_rot = output
    return ((q, k, v, out, lse, q_rot, k_rot, key_padding_bias, q_weight, q_bias, k_weight, k_bias, sin, cos),
            (q_norm, k_norm, q_eps, k_eps, rope, prefix, causal, scale, deterministic))


def _prologue_backward(state, saved, grads, need):
    q, k, v, out, lse, q_rot, k_rot, key_padding_bias, q_weight, q_bias, k_weight, k_bias, sin, cos = saved
    q_norm, k_norm, q_eps, k_eps, rope, prefix, causal, scale, deterministic = state
    dout, dlse = grads[0], grads[1]
    if dout is None:
        dout = torch.zeros_like(out)
    wanted = [need[4], need[5], need[6], need[7], need[8] or need[9]]
    dq, dk, dv, dqw, dqb, dkw, dkb, dsin, dcos = _attention_prologue_bwd_op(
        dout, q, k, v, out, lse, dlse, q_rot, k_rot, key_padding_bias, q_weight, q_bias, k_weight, k_bias, sin, cos,
        q_norm, k_norm, q_eps, k_eps, rope, prefix, causal, scale, deterministic, wanted)
    return (dq, dk, dv, None, dqw, dqb, dkw, dkb, dsin, dcos) + (None,) * 10


@kernel_op("vitkern::attention_prologue_fwd", fake=_prologue_fwd_fake, save=_prologue_save,
           backward=_prologue_backward, non_differentiable=(2, 3))
def _attention_prologue_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_bias: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor], q_bias: Optional[torch.Tensor], k_weight: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor], sin: Optional[torch.Tensor], cos: Optional[torch.Tensor], q_norm: int,
    k_norm: int, q_eps: float, k_eps: float, rope: int, prefix: int, causal: bool, scale: float,
    deterministic: bool, save_rot: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """out (B, H, Tq, D), lse fp32 (B, H, Tq), and for the backward q' (contiguous, when
    ``save_rot`` and q has a prologue) and k' (when k has one); empty tensors otherwise. q's
    prologue runs inside the forward kernels, k's in one pass of the prologue's kernel first."""
    from vitkern.ops.attention import launch as _launch
    from vitkern.ops.qk_prologue import launch as _pl_launch

    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, h, tq, d = q.shape
    q_p = _tile_prologue(q_norm, q_weight, q_bias, q_eps, sin, cos, rope, prefix)
    if k_norm or rope:
        k_rot = _pl_launch._qk_prologue_fwd(k, k_weight, k_bias, sin if rope else None, cos if rope else None,
                                            _NORM_KINDS[k_norm], k_eps, rope == 2, prefix)
    else:
        k_rot = k.new_empty((0,))
    q_rot = torch.empty((b, h, tq, d), device=q.device, dtype=q.dtype) if save_rot and q_p is not None else None
    out = torch.empty((b, h, tq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    _launch._attention_fwd(q, k_rot if k_norm or rope else k, v, key_padding_bias, causal, scale, out, lse,
                           q_prologue=q_p, q_rot=q_rot)
    return out, lse, q_rot if q_rot is not None else q.new_empty((0,)), k_rot


def _attention_prologue_triton_supports(q, k, v, q_weight, q_bias, k_weight, k_bias, sin, cos, *, causal, scale,
                                        return_lse, deterministic, key_padding_bias=None, **_):
    return _attention_triton_supports(q, k, v, causal=causal, scale=scale, return_lse=return_lse,
                                      deterministic=deterministic, key_padding_bias=key_padding_bias)


def _attention_prologue_triton(q, k, v, q_weight, q_bias, k_weight, k_bias, sin, cos, *, q_norm, q_eps, k_norm,
                               k_eps, rope_layout, num_prefix_tokens, causal=False, scale=None, return_lse=False,
                               deterministic=False, key_padding_bias=None):
    """Backend "triton" of op "attention_prologue": the fused kernels where the layout allows
    (:func:`~vitkern.ops.attention.prologue.prologue_fusable`) and the scale is >= 0, else the
    prologue's kernels composed with the attention kernels."""
    from vitkern.ops._autograd import requires_grad
    from vitkern.ops.attention.configs import _attn_pieces
    from vitkern.ops.attention.prologue import ROPE_CODES, prologue_fusable

    _check_triton_head_dim("q", q.shape[-1])
    d = q.shape[-1]
    resolved_scale, deterministic = _resolved(scale, d, deterministic)
    pieces = _attn_pieces(d, split=q.dtype != torch.float32)
    if resolved_scale < 0 or not prologue_fusable(d, pieces, rope_layout):
        from vitkern.ops.qk_prologue import QKNorm, RopeTables, qk_prologue

        tables = RopeTables(sin, cos, rope_layout) if rope_layout is not None else None
        q = qk_prologue(q, QKNorm(q_norm, q_weight, q_bias, q_eps) if q_norm else None, tables, num_prefix_tokens)
        k = qk_prologue(k, QKNorm(k_norm, k_weight, k_bias, k_eps) if k_norm else None, tables, num_prefix_tokens)
        return _attention_triton(q, k, v, causal=causal, scale=scale, return_lse=return_lse,
                                 deterministic=deterministic, key_padding_bias=key_padding_bias)
    if key_padding_bias is not None and key_padding_bias.dtype != torch.float32:
        key_padding_bias = key_padding_bias.float()
    save_rot = requires_grad(q, k, v, q_weight, q_bias, k_weight, k_bias, sin, cos)
    out, lse, _, _ = _attention_prologue_fwd_op(
        q, k, v, key_padding_bias, q_weight, q_bias, k_weight, k_bias, sin, cos, _NORM_CODES[q_norm],
        _NORM_CODES[k_norm], float(q_eps), float(k_eps), ROPE_CODES[rope_layout], int(num_prefix_tokens), causal,
        resolved_scale, deterministic, save_rot)
    return (out, lse) if return_lse else out
