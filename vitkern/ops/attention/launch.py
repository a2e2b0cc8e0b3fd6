"""Attention's launchers: pick the config for the call, compute the grid, launch the kernels.

They write into outputs the caller allocated (views with unit last stride, so the packed qkv path
reads and writes its slices in place) and allocate only the backward's small temporaries. The
registered ops in :mod:`vitkern.ops.attention.op` and the compile cases call them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton

from vitkern.ops._config import device_arch, num_sms
from vitkern.ops._index import check_int32
from vitkern.ops._triton import ensure_scratch_allocator, launch
from vitkern.ops.attention.backward import (
    DQ_ATOMIC,
    DQ_NONE,
    _attention_bwd_dkdv_kernel,
    _attention_bwd_dq_kernel,
    _attention_bwd_fused_kernel,
    _attention_bwd_preprocess_kernel,
)
from vitkern.ops.attention.configs import (
    _ATTN_MERGE_CONFIGS,
    _ATTN_PRE_CONFIGS,
    _attn_bwd_plan,
    _attn_fwd_plan,
    _attn_pieces,
    _attn_precision,
    _next_pow2,
    ATTN_TK_BUCKETS,
    ATTN_TMA_ARCHS,
)
from vitkern.ops.attention.forward import (
    _attention_fwd_kernel,
    _attention_fwd_merge_kernel,
    _attention_fwd_split_kernel,
)

_LOG2E = 1.4426950408889634
# The forward's scale runs as at least the smallest normal fp32: a zero scale becomes a scale that
# rounds every score product to 0 beside the row max (the softmax of all-zero scores, exactly),
# while the -inf of masked scores stays -inf (0 * -inf would be NaN).
_FP32_TINY = 2.0 ** -126


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


class PackedSeqs(NamedTuple):
    """The sequences of a packed (variable-length) launch: q / k / v and the outputs are
    ``(1, H, total, D)`` views of ``(total, H, D)`` tensors, lse / delta ``(1, H, total_q)``.

    ``cu_q`` / ``cu_k``: int32 ``(num_seqs + 1,)`` cumulative lengths on the device (read by the
    kernels only: nothing here syncs); ``max_q`` / ``max_k``: the longest lengths when the caller
    knows them (python ints), else None."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: Optional[int] = None
    max_k: Optional[int] = None

    @property
    def num_seqs(self) -> int:
        return self.cu_q.shape[0] - 1


def _seq_strides(t: torch.Tensor, seqs: Optional[PackedSeqs]) -> tuple[int, int, int]:
    """The kernels' (batch, head, token) strides: a packed launch offsets each sequence by its first
    token, so its "batch" stride is the token stride."""
    return _strides3(t) if seqs is None else (t.stride(2), t.stride(1), t.stride(2))


def _seq_grid(seqs: Optional[PackedSeqs], batch: int, heads: int, rows: int, block: int, dummy: torch.Tensor,
              keys: bool = False) -> tuple[int, tuple, int]:
    """``(programs, (CU_Q, CU_K, NUM_SEQS, SEQ_BLOCKS), VARLEN)`` of a launch over row blocks of
    ``block`` rows (``keys``: the rows are the keys, dK / dV). Dense: ``cdiv(rows, block)`` per
    (batch, head). Packed: ``cdiv(max_rows, block)`` per (sequence, head) where the longest
    sequence is known and that grid is the smaller (VARLEN 1), else ``rows // block + num_seqs``
    block slots per head, found by the kernels on the device (VARLEN 2; see
    :func:`~vitkern.ops.attention.tiles._attn_seq_program`)."""
    if seqs is None:
        return triton.cdiv(rows, block) * batch * heads, (dummy, dummy, 0, 0), 0
    n = seqs.num_seqs
    args = (seqs.cu_q, seqs.cu_k, n)
    slots = rows // block + n
    max_rows = seqs.max_k if keys else seqs.max_q
    if max_rows and n * triton.cdiv(max_rows, block) <= slots:
        per_seq = triton.cdiv(max_rows, block)
        return per_seq * n * heads, (*args, per_seq), 1
    return slots * heads, (*args, 0), 2


def _seq_config_tk(tk: int, seqs: Optional[PackedSeqs]) -> int:
    """The key length the forward's config is chosen for: a packed launch's longest key sequence,
    or without it the total up to the short-sequence bucket (packed images are short sequences)."""
    if seqs is None:
        return tk
    return seqs.max_k if seqs.max_k is not None else min(tk, ATTN_TK_BUCKETS[-1])


def _attn_tma_ok(*tensors: torch.Tensor, pieces: tuple[int, int]) -> bool:
    """Every ``(B, H, T, D)`` view addressable by the kernels' TMA descriptors
    (:func:`~vitkern.ops.attention.tiles._attn_descs`): unit last stride, 16-byte aligned data and
    (batch, head, token) strides, so each program's slice base is 16-byte aligned (a packed
    launch's sequence bases are token offsets), and every head-dim piece at least 16 bytes wide
    (the copy engine's smallest box row)."""
    for t in tensors:
        es = t.element_size()
        if t.stride(3) != 1 or t.data_ptr() % 16 or any((t.stride(i) * es) % 16 for i in range(3)):
            return False
        if any(0 < p * es < 16 for p in pieces):
            return False
    return True


def _attn_use_tma(tma: Optional[bool], arch: int, precision: str, *tensors: torch.Tensor,
                  pieces: tuple[int, int]) -> bool:
    """Whether a launch reads (and writes) through TMA descriptors: ``tma`` None takes them on the
    arches of :data:`ATTN_TMA_ARCHS` for tensor-core dots (16-bit, TF32) where every tensor is
    addressable; True insists (a ValueError where they are not), False never. fp32 with IEEE
    dots keeps pointer loads: its FMA dots read registers, and its 16 x 16 tiles spilled 250..4456
    bytes from the descriptors' shared-memory tiles (sm_90, D = 72..256, Triton 3.6)."""
    if tma is False:
        return False
    ok = _attn_tma_ok(*tensors, pieces=pieces)
    if tma and not ok:
        raise ValueError("attention (triton): tma=True needs 16-byte aligned data and batch / head / token strides, "
                         "unit last stride and head-dim pieces of at least 16 bytes")
    use = ok and (tma or (arch in ATTN_TMA_ARCHS and precision != "ieee"))
    if use:
        ensure_scratch_allocator()  # the descriptors live in per-launch global scratch (per thread)
    return use


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


def _attention_fwd(q, k, v, bias, causal: bool, scale: float, out: torch.Tensor, lse: torch.Tensor,
                   kv_splits: Optional[int] = None, seqs: Optional[PackedSeqs] = None,
                   tma: Optional[bool] = None) -> None:
    """Forward into ``out`` (B, H, Tq, D), any strides with unit last stride, and ``lse``
    (contiguous fp32 (B, H, Tq)). q (B, H, Tq, D), k / v (B, Hkv, Tk, D) views with unit last
    stride; ``bias`` None or fp32 broadcastable to (B, H, Tk). Allocates nothing, except for a
    negative scale: the kernel takes the row max on raw scores, which needs a positive scale, so
    it runs on a negated copy of q with ``-scale``; and for the split-KV path.

    Split-KV, fp16 / bf16 only (``kv_splits``: None picks by ``_attn_fwd_plan``, 1 never
    splits): where the grid leaves SMs idle (batch 1), each query block runs against several key
    splits at once into fp32 partial outputs and lses ((splits, B * H, Tq, D) and (splits, B * H, Tq)), and a
    merge kernel combines them through their lse into ``out`` and ``lse`` (the lse the backward
    reads, exact up to fp32 rounding).

    ``seqs``: a packed launch (:class:`PackedSeqs`; no bias, never split). ``tma``: q / k / v
    (and out) through TMA descriptors (:func:`_attn_use_tma`: None where the arch takes them and
    the tensors are addressable)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if b * h * tq == 0:
        return
    _check_index_range(q=q, k=k, v=v, out=out, key_padding_bias=None if bias is None else bias.expand(b, h, tk))
    if scale < 0:
        q, scale = -q, -scale
    da, db = _attn_pieces(d, split=q.dtype != torch.float32)
    precision = _attn_precision(q.dtype)
    arch = device_arch(q.device if q.is_cuda else None)
    if seqs is not None:
        kv_splits = 1
    sms = num_sms(q.device if q.is_cuda else None) if kv_splits is None and precision == "16bit" else None
    config, kv_splits, per_split = _attn_fwd_plan(arch, precision, da + db, d != da + db, b * h, tq,
                                                  _seq_config_tk(tk, seqs), sms, kv_splits)
    programs = triton.cdiv(tq, config.meta["BLOCK_M"]) * b * h
    bias_args = _bias_args(bias, b, h, tk, q)
    use_tma = _attn_use_tma(tma, arch, precision, q, k, v, *(() if kv_splits > 1 else (out,)), pieces=(da, db))
    if kv_splits > 1:
        o_part = torch.empty((kv_splits, b * h, tq, d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((kv_splits, b * h, tq), device=q.device, dtype=torch.float32)
        launch(_attention_fwd_split_kernel, (programs, kv_splits), q, k, v, bias_args[0], o_part, lse_part,
               *_strides3(q), *_strides3(k), *_strides3(v), *bias_args[1:], o_part.stride(0), lse_part.stride(0),
               h, h // hkv, tq, tk, max(scale, _FP32_TINY) * _LOG2E, per_split,
               HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None,
               PRECISION="ieee" if precision == "16bit" else precision, TMA=use_tma, config=config)
        merge = _ATTN_MERGE_CONFIGS[128 if _next_pow2(d) <= 128 else 256]
        launch(_attention_fwd_merge_kernel, (triton.cdiv(tq, merge.meta["BLOCK_M"]) * b * h,),
               o_part, lse_part, out, lse, o_part.stride(0), lse_part.stride(0), *_strides3(out), h, tq, kv_splits,
               HEAD_DIM=d, BLOCK_D=_next_pow2(d), config=merge)
        return
    programs, seq_args, varlen = _seq_grid(seqs, b, h, tq, config.meta["BLOCK_M"], q)
    st = lambda t: _seq_strides(t, seqs)  # noqa: E731
    launch(_attention_fwd_kernel, (programs,), q, k, v, bias_args[0], out, lse,
           *st(q), *st(k), *st(v), *bias_args[1:], *st(out),
           h, h // hkv, tq, tk, max(scale, _FP32_TINY) * _LOG2E, *seq_args,
           HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None,
           PRECISION="ieee" if precision == "16bit" else precision, VARLEN=varlen, TMA=use_tma, config=config)


def _attention_bwd(dout, q, k, v, out, lse, dlse, bias, causal: bool, scale: float, deterministic: bool,
                   dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, mode: Optional[str] = None,
                   seqs: Optional[PackedSeqs] = None) -> None:
    """Gradients into ``dq`` (B, H, Tq, D) and ``dk`` / ``dv`` (B, Hkv, Tk, D) (views with unit last
    stride, e.g. slices of one packed dqkv). ``dlse``: None or the gradient of lse. ``mode``: None
    picks by ``_attn_bwd_plan`` (the fused kernel where it fits, else the dQ kernel when
    ``deterministic``, else atomics); "fused", "atomic" or "dq_kernel" forces one. Temporaries:
    delta (B, H, Tq) fp32; the fused kernel's fp32 scratch (programs x group x Tq x D, its grid
    being at most 2 programs a SM); for the atomic dQ path an fp32 (B, H, Tq, D) buffer unless dq
    is fp32 itself: nothing of size Tq x Tk. ``seqs``: a packed launch (:class:`PackedSeqs`; never
    fused: its grid walks dense (batch, kv head) pairs), whose delta is computed as one sequence of
    all the tokens (a row statistic)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if b * h * tq == 0 or tk == 0:  # no queries: nothing reaches k and v; no keys: nothing at all
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
    if seqs is not None and mode == "fused":
        raise ValueError("backward mode 'fused' takes dense batches, not packed sequences")
    # no SM count, no fused plan: a packed launch's grids are its sequences' blocks (_seq_grid)
    sms = num_sms(q.device if q.is_cuda else None) if mode is None and seqs is None else None
    plan = _attn_bwd_plan(arch, precision, da + db, d != da + db, b, h, hkv, tq, tk, sms, deterministic,
                          q.element_size(), mode)

    delta = torch.empty((b, h, tq), device=q.device, dtype=torch.float32)
    pre = _ATTN_PRE_CONFIGS[64 if _next_pow2(d) <= 64 else 256]
    launch(_attention_bwd_preprocess_kernel, (triton.cdiv(tq, pre.meta["BLOCK_M"]) * b * h,), out, dout, delta,
           *_strides3(out), *_strides3(dout), h, tq, HEAD_DIM=d, BLOCK_D=_next_pow2(d), config=pre)
    if dlse is not None:
        # d lse / d s = p: the lse gradient enters as dS = P * (dP - (delta - dlse))
        delta.sub_(dlse)

    bias_args = _bias_args(bias, b, h, tk, q)
    st = lambda t: _seq_strides(t, seqs)  # noqa: E731
    args = (*st(q), *st(k), *st(v), *bias_args[1:], *st(dout))
    meta = dict(HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None,
                PRECISION=dot_precision)
    if plan.mode == "fused":
        block_m = plan.config.meta["BLOCK_M"]
        # a program's scratch offsets (query head of the group, row, column) are int32
        check_int32("attention (triton)", "the fused backward's dQ scratch (group x Tq x head dim)",
                    ((h // hkv) * triton.cdiv(tq, block_m) * block_m, da + db))
        scratch = torch.empty((plan.programs, h // hkv, triton.cdiv(tq, block_m) * block_m, da + db),
                              device=q.device, dtype=torch.float32)
        launch(_attention_bwd_fused_kernel, (plan.programs,), q, k, v, bias_args[0], dout, lse, delta, dk, dv, dq,
               scratch, *args, *_strides3(dk), *_strides3(dv), *_strides3(dq), h, hkv, h // hkv, tq, tk, scale,
               b * hkv, scratch.stride(0), **meta, config=plan.config)
        return
    atomic = plan.mode == "atomic"
    if atomic:
        dq_acc = dq if dq.dtype == torch.float32 else torch.empty((b, h, tq, d), device=q.device, dtype=torch.float32)
        dq_acc.zero_()
    else:
        dq_acc = dq
    programs, seq_args, varlen = _seq_grid(seqs, b, hkv, tk, plan.config.meta["BLOCK_N"], q, keys=True)
    launch(_attention_bwd_dkdv_kernel, (programs,), q, k, v, bias_args[0], dout, lse, delta, dk, dv, dq_acc,
           *args, *st(dk), *st(dv), *st(dq_acc), h, hkv, h // hkv, tq, tk, scale, *seq_args,
           DQ_MODE=DQ_ATOMIC if atomic else DQ_NONE, VARLEN=varlen, **meta, config=plan.config)
    if atomic:
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return
    programs, seq_args, varlen = _seq_grid(seqs, b, h, tq, plan.dq_config.meta["BLOCK_M"], q)
    launch(_attention_bwd_dq_kernel, (programs,),
           q, k, v, bias_args[0], dout, lse, delta, dq, *args, *st(dq), h, h // hkv, tq, tk, scale, *seq_args,
           VARLEN=varlen, **meta, config=plan.dq_config)
