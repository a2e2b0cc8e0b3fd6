"""Reference attention: differentiable pure PyTorch on any device, float64 accepted.

The scores are materialised (``(Tq, Tk)`` per head) in fp32 (fp64 for fp64 inputs). These are the
"reference" backend of ops ``"attention"`` and ``"attention_qkvpacked"`` and the ground truth the
kernels are tested against; the conventions (``lse``, ``key_padding_bias``, fully masked rows,
causal alignment) are in :mod:`vitkern.ops.attention`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from vitkern.ops._common import autocast_disabled


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
    inputs). See :mod:`vitkern.ops.attention` for ``key_padding_bias`` and fully masked rows.
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


def _seq_slices(cu: torch.Tensor, total: int, name: str) -> list[tuple[int, int]]:
    """``[(first, end)]`` of each packed sequence (reads ``cu`` on the host: the reference syncs)."""
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must be nondecreasing from 0 to the total token count {total}, got {bounds}")
    return list(zip(bounds, bounds[1:]))


def _varlen_core(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale):
    """Packed attention as a loop of :func:`_attention_core` over the sequences: ``(out (total_q, H,
    D), lse (H, total_q))``; a sequence without keys gives out 0, lse -inf."""
    heads = q.shape[1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(_seq_slices(cu_seqlens_q, q.shape[0], "cu_seqlens_q"),
                                  _seq_slices(cu_seqlens_k, k.shape[0], "cu_seqlens_k")):
        if k1 == k0:
            outs.append(torch.zeros_like(q[q0:q1]))
            lses.append(torch.full((heads, q1 - q0), float("-inf"), dtype=lse_dtype, device=q.device))
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        out, lse = _attention_core(qs, ks, vs, None, causal, scale)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].to(lse_dtype))
    if not outs:
        return q.new_empty(q.shape), q.new_empty((heads, 0), dtype=lse_dtype)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def attention_varlen_ref(
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
    """Reference packed (variable-length) attention: each sequence through the dense reference.

    q ``(total_q, H, D)``, k / v ``(total_k, Hkv, D)``; returns out ``(total_q, H, D)`` (and lse
    ``(H, total_q)``). It reads ``cu_seqlens`` on the host (a device sync, and a graph break under
    torch.compile) and checks their values, which the kernels cannot; ``max_seqlen_*`` are unused.
    """
    out, lse = _varlen_core(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)
    return (out, lse) if return_lse else out


def attention_qkvpacked_varlen_ref(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: Optional[int] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Reference packed-qkv variable-length attention: ``(total, 3, H, D)`` in, ``(total, H, D)`` out."""
    q, k, v = qkv.unbind(1)
    out, lse = _varlen_core(q, k, v, cu_seqlens, cu_seqlens, causal, scale)
    return (out, lse) if return_lse else out
