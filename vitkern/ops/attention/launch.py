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
from vitkern.ops.qk_prologue.launch import _tables

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


class TilePrologue(NamedTuple):
    """The QK-norm / RoPE the kernels apply to the tile a program keeps (the q tile of the forward
    and the dQ kernel, the k tile of the dK/dV kernel; :mod:`~vitkern.ops.attention.prologue`).

    ``norm``: 0 none, 1 LayerNorm, 2 RMSNorm, with ``weight`` / ``bias`` (None when absent) and
    ``eps``; ``rope``: ``prologue.ROPE_CODES`` with the ``sin`` / ``cos`` tables ((N, D), or per head
    (H, N, D)) of the tokens after the first ``prefix``. ``need``: the backward's parameter
    gradients asked for, ``(weight, bias, tables)``."""

    norm: int
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    sin: Optional[torch.Tensor]
    cos: Optional[torch.Tensor]
    rope: int
    prefix: int
    need: tuple[bool, bool, bool] = (False, False, False)


class PrologueGrads(NamedTuple):
    """The prologue's parameter gradients from a backward (None where not asked for): q's and k's
    norm weight / bias, and the tables' (q's and k's shares summed)."""

    q_weight: Optional[torch.Tensor] = None
    q_bias: Optional[torch.Tensor] = None
    k_weight: Optional[torch.Tensor] = None
    k_bias: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None
    cos: Optional[torch.Tensor] = None


_NO_PROLOGUE_META = dict(NORM=0, ROPE=0)


def _prologue_args(p: Optional[TilePrologue]) -> tuple[tuple, dict]:
    """A kernel's ``NW, NB, SIN, COS, stride_rh, stride_rt, PREFIX, norm_eps`` and its NORM / ROPE."""
    if p is None:
        return (None, None, None, None, 0, 0, 0, 0.0), _NO_PROLOGUE_META
    sin, cos, stride_rh, stride_rt = _tables(p.sin, p.cos)
    return ((p.weight, p.bias, sin, cos, stride_rh, stride_rt, p.prefix, float(p.eps)),
            dict(NORM=p.norm, ROPE=p.rope))


class _PrologueGradBuffers(NamedTuple):
    dw: Optional[torch.Tensor]
    db: Optional[torch.Tensor]
    dsin: Optional[torch.Tensor]
    dcos: Optional[torch.Tensor]


def _prologue_grad_buffers(p: Optional[TilePrologue], programs: int, width: int, slices: int,
                           device: torch.device) -> _PrologueGradBuffers:
    """The fp32 partial sums a backward kernel writes for ``p``'s parameter gradients: one row of
    ``width`` per program for the weight / bias, one ``(N, D)`` table per (batch, head) slice
    for the tables; zeroed (rows a program has nothing for stay 0)."""
    if p is None:
        return _PrologueGradBuffers(None, None, None, None)
    need_w, need_b, need_t = p.need
    f32 = dict(dtype=torch.float32, device=device)
    part = lambda need: torch.zeros((programs, width), **f32) if need else None  # noqa: E731
    tables = need_t and p.sin is not None
    shape = (slices, *p.sin.shape[-2:]) if tables else None
    return _PrologueGradBuffers(part(need_w and p.weight is not None), part(need_b and p.bias is not None),
                                torch.zeros(shape, **f32) if tables else None,
                                torch.zeros(shape, **f32) if tables else None)


def _table_grad(part: Optional[torch.Tensor], table: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
    """A table's gradient from its per-(batch, head) partials: summed over the batch (per-head
    tables) or over batch and heads (shared)."""
    if part is None:
        return None
    if table.dim() == 3:
        return part.view(batch, -1, *part.shape[1:]).sum(0)
    return part.sum(0)


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
                   tma: Optional[bool] = None, q_prologue: Optional[TilePrologue] = None,
                   q_rot: Optional[torch.Tensor] = None) -> None:
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

    ``seqs``: a packed launch (:class:`PackedSeqs`; no bias). It splits too, on the grid of its
    sequences, with each sequence's keys split alike (a bound on their count: ``max_k``, else the
    total), and merges as one batch of ``total`` rows. ``tma``: q / k / v
    (and out) through TMA descriptors (:func:`_attn_use_tma`: None where the arch takes them and
    the tensors are addressable).

    ``q_prologue``: the kernels normalise / rotate q as they load it (dense batches, a positive
    scale); ``q_rot`` (contiguous ``(B, H, Tq, D)``) receives that q' for the backward."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if b * h * tq == 0:
        return
    _check_index_range(q=q, k=k, v=v, out=out, key_padding_bias=None if bias is None else bias.expand(b, h, tk))
    if q_prologue is not None and (seqs is not None or scale < 0):
        raise ValueError("attention (triton): the fused q prologue takes dense batches and a scale >= 0")
    if q_rot is not None and (q_prologue is None or not q_rot.is_contiguous() or q_rot.shape != q.shape):
        raise ValueError("attention (triton): q_rot must be a contiguous (B, H, Tq, D) tensor, with q_prologue")
    if scale < 0:
        q, scale = -q, -scale
    da, db = _attn_pieces(d, split=q.dtype != torch.float32)
    precision = _attn_precision(q.dtype)
    arch = device_arch(q.device if q.is_cuda else None)
    sms = num_sms(q.device if q.is_cuda else None) if kv_splits is None and precision == "16bit" else None
    grid = None if seqs is None else (lambda block_m: _seq_grid(seqs, b, h, tq, block_m, q)[0])
    config, kv_splits, per_split = _attn_fwd_plan(
        arch, precision, da + db, d != da + db, b * h, tq, _seq_config_tk(tk, seqs), sms, kv_splits, grid=grid,
        max_keys=None if seqs is None else (seqs.max_k if seqs.max_k is not None else tk),
        variant=None if seqs is None else "packed")
    programs, seq_args, varlen = _seq_grid(seqs, b, h, tq, config.meta["BLOCK_M"], q)
    st = lambda t: _seq_strides(t, seqs)  # noqa: E731
    bias_args = _bias_args(bias, b, h, tk, q)
    use_tma = _attn_use_tma(tma, arch, precision, q, k, v, *(() if kv_splits > 1 else (out,)), pieces=(da, db))
    p_args, p_meta = _prologue_args(q_prologue)
    p_args = (q_rot, *p_args)
    if kv_splits > 1:
        # partials in the lse's row layout: (B * H, Tq) dense, (H, total) packed
        o_part = torch.empty((kv_splits, b * h, tq, d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((kv_splits, b * h, tq), device=q.device, dtype=torch.float32)
        launch(_attention_fwd_split_kernel, (programs, kv_splits), q, k, v, bias_args[0], o_part, lse_part,
               *st(q), *st(k), *st(v), *bias_args[1:], o_part.stride(0), lse_part.stride(0),
               h, h // hkv, tq, tk, max(scale, _FP32_TINY) * _LOG2E, per_split, *seq_args, *p_args,
               HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None,
               PRECISION="ieee" if precision == "16bit" else precision, VARLEN=varlen, TMA=use_tma, **p_meta,
               config=config)
        merge = _ATTN_MERGE_CONFIGS[128 if _next_pow2(d) <= 128 else 256]
        launch(_attention_fwd_merge_kernel, (triton.cdiv(tq, merge.meta["BLOCK_M"]) * b * h,),
               o_part, lse_part, out, lse, o_part.stride(0), lse_part.stride(0), *_strides3(out), h, tq, kv_splits,
               HEAD_DIM=d, BLOCK_D=_next_pow2(d), config=merge)
        return
    launch(_attention_fwd_kernel, (programs,), q, k, v, bias_args[0], out, lse,
           *st(q), *st(k), *st(v), *bias_args[1:], *st(out),
           h, h // hkv, tq, tk, max(scale, _FP32_TINY) * _LOG2E, *seq_args, *p_args,
           HEAD_DIM=d, BLOCK_DA=da, BLOCK_DB=db, CAUSAL=causal, HAS_BIAS=bias is not None,
           PRECISION="ieee" if precision == "16bit" else precision, VARLEN=varlen, TMA=use_tma, **p_meta,
           config=config)


def _attention_bwd(dout, q, k, v, out, lse, dlse, bias, causal: bool, scale: float, deterministic: bool,
                   dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, mode: Optional[str] = None,
                   seqs: Optional[PackedSeqs] = None, q_prologue: Optional[TilePrologue] = None,
                   k_prologue: Optional[TilePrologue] = None, q_raw: Optional[torch.Tensor] = None,
                   k_raw: Optional[torch.Tensor] = None) -> PrologueGrads:
    """Gradients into ``dq`` (B, H, Tq, D) and ``dk`` / ``dv`` (B, Hkv, Tk, D) (views with unit last
    stride, e.g. slices of one packed dqkv). ``dlse``: None or the gradient of lse. ``mode``: None
    picks by ``_attn_bwd_plan`` (the fused kernel where it fits, else the dQ kernel when
    ``deterministic``, else atomics); "fused", "atomic" or "dq_kernel" forces one. Temporaries:
    delta (B, H, Tq) fp32; the fused kernel's fp32 scratch (programs x group x Tq x D, its grid
    being at most 2 programs a SM); for the atomic dQ path an fp32 (B, H, Tq, D) buffer unless dq
    is fp32 itself: nothing of size Tq x Tk. ``seqs``: a packed launch (:class:`PackedSeqs`; never
    fused: its grid walks dense (batch, kv head) pairs), whose delta is computed as one sequence of
    all the tokens (a row statistic).

    ``q_prologue`` / ``k_prologue`` (dense batches): ``q`` / ``k`` are the prologue's outputs and
    ``q_raw`` / ``k_raw`` its inputs; dq / dk come out through its inverse (the dQ and dK/dV
    kernels' epilogues, so the mode is the dQ kernel's), and the parameter gradients asked for
    in ``need`` are returned (:class:`PrologueGrads`, zeros where no query / key exists)."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    prologues = q_prologue is not None or k_prologue is not None
    if prologues:
        if seqs is not None or mode not in (None, "dq_kernel"):
            raise ValueError("attention (triton): the fused prologue's backward takes dense batches and the dQ kernel")
        if (q_prologue is not None and q_raw is None) or (k_prologue is not None and k_raw is None):
            raise ValueError("attention (triton): a prologue's backward needs its raw input (q_raw / k_raw)")
        mode = "dq_kernel"
    if b * h * tq == 0 or tk == 0:  # no queries: nothing reaches k and v; no keys: nothing at all
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return _zero_prologue_grads(q_prologue, k_prologue)
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
                          q.element_size(), mode,
                          variant="prologue" if prologues else "packed" if seqs is not None else None, causal=causal)

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
        return PrologueGrads()
    atomic = plan.mode == "atomic"
    if atomic:
        dq_acc = dq if dq.dtype == torch.float32 else torch.empty((b, h, tq, d), device=q.device, dtype=torch.float32)
        dq_acc.zero_()
    else:
        dq_acc = dq
    programs, seq_args, varlen = _seq_grid(seqs, b, hkv, tk, plan.config.meta["BLOCK_N"], q, keys=True)
    k_args, k_meta, k_parts = _prologue_bwd_args(k_prologue, k_raw, k, programs, da + db, b * hkv)
    launch(_attention_bwd_dkdv_kernel, (programs,), q, k, v, bias_args[0], dout, lse, delta, dk, dv, dq_acc,
           *args, *st(dk), *st(dv), *st(dq_acc), h, hkv, h // hkv, tq, tk, scale, *seq_args, *k_args,
           DQ_MODE=DQ_ATOMIC if atomic else DQ_NONE, VARLEN=varlen, **meta, **k_meta, config=plan.config)
    if atomic:
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return PrologueGrads()
    programs, seq_args, varlen = _seq_grid(seqs, b, h, tq, plan.dq_config.meta["BLOCK_M"], q)
    q_args, q_meta, q_parts = _prologue_bwd_args(q_prologue, q_raw, q, programs, da + db, b * h)
    launch(_attention_bwd_dq_kernel, (programs,),
           q, k, v, bias_args[0], dout, lse, delta, dq, *args, *st(dq), h, h // hkv, tq, tk, scale, *seq_args,
           *q_args, VARLEN=varlen, **meta, **q_meta, config=plan.dq_config)
    if not prologues:
        return PrologueGrads()
    return _reduce_prologue_grads(q_prologue, q_parts, k_prologue, k_parts, d, b)


def _prologue_bwd_args(p: Optional[TilePrologue], raw: Optional[torch.Tensor], dummy: torch.Tensor, programs: int,
                       width: int, slices: int) -> tuple[tuple, dict, _PrologueGradBuffers]:
    """A backward kernel's prologue arguments (``XRAW`` and its strides, the parameters, the
    partial-sum buffers), its NORM / ROPE, and those buffers."""
    f_args, meta = _prologue_args(p)
    parts = _prologue_grad_buffers(p, programs, width, slices, dummy.device)
    if p is None:
        return (dummy, 0, 0, 0, *f_args, *parts), meta, parts
    _check_index_range(prologue_input=raw)
    return (raw, *_strides3(raw), *f_args, *parts), meta, parts


def _reduce_prologue_grads(q_p, q_parts, k_p, k_parts, d: int, batch: int) -> PrologueGrads:
    """The parameter gradients from the kernels' partial sums (fixed-order sums: deterministic)."""
    def param(part, t):
        return None if part is None else part.sum(0)[:d].to(t.dtype)

    out = {}
    for name, p, parts in (("q", q_p, q_parts), ("k", k_p, k_parts)):
        if p is not None:
            out[f"{name}_weight"] = param(parts.dw, p.weight)
            out[f"{name}_bias"] = param(parts.db, p.bias)
    tables = None
    for p, parts in ((q_p, q_parts), (k_p, k_parts)):
        if p is not None and parts.dsin is not None:
            pair = (_table_grad(parts.dsin, p.sin, batch), _table_grad(parts.dcos, p.cos, batch))
            tables = pair if tables is None else (tables[0] + pair[0], tables[1] + pair[1])
    if tables is not None:
        p = q_p if q_p is not None and q_p.sin is not None else k_p
        out["sin"], out["cos"] = tables[0].to(p.sin.dtype), tables[1].to(p.cos.dtype)
    return PrologueGrads(**out)


def _zero_prologue_grads(q_p: Optional[TilePrologue], k_p: Optional[TilePrologue]) -> PrologueGrads:
    """The parameter gradients of a backward with no queries or no keys: zeros where asked."""
    out = {}
    for name, p in (("q", q_p), ("k", k_p)):
        if p is not None:
            out[f"{name}_weight"] = torch.zeros_like(p.weight) if p.need[0] and p.weight is not None else None
            out[f"{name}_bias"] = torch.zeros_like(p.bias) if p.need[1] and p.bias is not None else None
    p = next((p for p in (q_p, k_p) if p is not None and p.sin is not None and p.need[2]), None)
    if p is not None:
        out["sin"], out["cos"] = torch.zeros_like(p.sin), torch.zeros_like(p.cos)
    return PrologueGrads(**out)
