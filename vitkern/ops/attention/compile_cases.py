"""Attention's static compile cases (vitkern.testing.compile_check): CPU tensors, nothing runs
under capture.

The cases call the launchers the way the registered ops do, so the check compiles exactly the
specialisations a run launches: the default set every kernel variant once plus the benchmark
shapes, the slow set every config of the tables.
"""

from __future__ import annotations

import contextlib

import torch

from vitkern.ops.attention.configs import _ATTN_FUSED_CONFIGS, _attn_pieces
from vitkern.ops.attention.launch import PackedSeqs, TilePrologue, _attention_bwd, _attention_fwd
from vitkern.ops.attention.prologue import ROPE_CODES
from vitkern.ops.attention.op import _packed_views, _seq_view
from vitkern.testing.compile_check import compile_cases


@contextlib.contextmanager
def _case_dtype(dtype):
    """The torch dtype of a case's dtype ("tf32": fp32 with TF32 dots, torch's matmul precision
    set for the duration)."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if dtype == "tf32" else "ieee"
    try:
        yield torch.float32 if dtype == "tf32" else dtype
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def _case_run(dtype, b, h, hkv, tq, tk, d, *, causal=False, bias=False, packed=False, deterministic=False,
              backward=True, kv_splits=1, bwd_mode="plan", tma=None):
    """Call the launchers the way the ops do (dtype "tf32" = fp32 with TF32 dots). The cases'
    batches are small stand-ins (they only size the grid), so the forward's key split is given:
    ``kv_splits`` 1 (the plain kernel) unless asked, None for the launcher's own choice; and so
    is the backward's mode (``bwd_mode``: "fused", "atomic", "dq_kernel"), "plan" for the one
    the deterministic flag picks where the fused kernel does not fit (these batches). ``tma``: the
    forward's loads (None: the launcher's choice, TMA descriptors on sm_90)."""
    with _case_dtype(dtype) as dtype:
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
        _attention_fwd(q, k, v, key_bias, causal, d ** -0.5, out, lse, kv_splits=kv_splits, tma=tma)
        if backward:
            if bwd_mode == "plan":
                masked = d != sum(_attn_pieces(d, dtype != torch.float32))
                bwd_mode = "dq_kernel" if deterministic or masked else "atomic"
            _attention_bwd(out, q, k, v, out, lse, None, key_bias, causal, d ** -0.5, deterministic, dq, dk, dv,
                           mode=bwd_mode)


def _varlen_case_run(dtype, lens, h, hkv, d, *, causal=False, max_known=False, packed=False, deterministic=False,
                     backward=True, kv_splits=1):
    """A packed (variable-length) launch as ``attention_varlen`` / ``attention_qkvpacked_varlen``
    issue it: (total, H, D) tensors seen as (1, H, total, D), int32 cu_seqlens; ``max_known``
    gives the launchers the longest sequence (the per-sequence grid, VARLEN 1), else the
    token-count grid with the on-device block search (VARLEN 2). ``kv_splits`` as
    :func:`_case_run`'s (1: the plain forward; None: the launcher's choice)."""
    with _case_dtype(dtype) as dtype:
        _varlen_launches(dtype, lens, h, hkv, d, causal, max_known, packed, deterministic, backward, kv_splits)


def _varlen_launches(dtype, lens, h, hkv, d, causal, max_known, packed, deterministic, backward, kv_splits):
    total = sum(lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    longest = max(lens) if max_known else None
    seqs = PackedSeqs(cu, cu, longest, longest)
    if packed:
        qkv = torch.empty((total, 3, h, d), dtype=dtype)
        q, k, v = (_seq_view(t) for t in qkv.unbind(1))
        dq, dk, dv = (_seq_view(t) for t in torch.empty_like(qkv).unbind(1))
    else:
        q = _seq_view(torch.empty((total, h, d), dtype=dtype))
        k, v = (_seq_view(torch.empty((total, hkv, d), dtype=dtype)) for _ in range(2))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    out = _seq_view(torch.empty((total, h, d), dtype=dtype))
    lse = torch.empty((1, h, total), dtype=torch.float32)
    _attention_fwd(q, k, v, None, causal, d ** -0.5, out, lse, seqs=seqs, kv_splits=kv_splits)
    if backward:
        _attention_bwd(out, q, k, v, out, lse, None, None, causal, d ** -0.5, deterministic, dq, dk, dv, seqs=seqs)


def _prologue_case_run(dtype, b, h, hkv, t, d, *, norm=1, affine=True, rope="interleaved", per_head=False,
                       prefix=1, causal=False, packed=False, kv_splits=1):
    """The fused QK-norm / RoPE launches as ``attention_prologue`` issues them: the forward with q's
    prologue (k' made by the prologue's own kernel, a case of its own package), storing q'; the
    backward reading q' / k' with both inverses and the norms' parameter gradients; the tables'
    gradients where they are learned (the mixed RoPE's per-head tables)."""
    with _case_dtype(dtype) as dtype:
        if packed:
            q, k, v = _packed_views(torch.empty((b, t, 3, h, d), dtype=dtype))
        else:
            q = torch.empty((b, h, t, d), dtype=dtype)
            k, v = (torch.empty((b, hkv, t, d), dtype=dtype) for _ in range(2))
        weight = torch.empty(d) if norm and affine else None
        bias = torch.empty(d) if norm == 1 and affine else None
        tables = torch.empty(((h,) if per_head else ()) + (t - prefix, d)) if rope else None
        p = TilePrologue(norm, weight, bias, 1e-6, tables, tables, ROPE_CODES[rope], prefix, (True, True, per_head))
        q_rot, k_rot = torch.empty(q.shape, dtype=dtype), torch.empty(k.shape, dtype=dtype)
        out = torch.empty(q.shape, dtype=dtype)
        lse = torch.empty((b, h, t), dtype=torch.float32)
        _attention_fwd(q, k_rot, v, None, causal, d ** -0.5, out, lse, kv_splits=kv_splits, q_prologue=p, q_rot=q_rot)
        dq, dk, dv = torch.empty(q.shape, dtype=dtype), torch.empty_like(k_rot), torch.empty_like(k_rot)
        _attention_bwd(out, q_rot, k_rot, v, out, lse, None, None, causal, d ** -0.5, False, dq, dk, dv,
                       q_prologue=p, k_prologue=p, q_raw=q, k_raw=k)


@compile_cases
def _attention_compile_cases():
    # the benchmark shapes (ViT-B/16 and ViT-H/14 through the packed path, SigLIP-so400m's head
    # dim 72, a long sequence at head dim 128), default backward; the batch only sizes the grid
    # (B = 256, ViT-L/16 at T = 257 and T = 577 / 1025 compile the same specialisations as these)
    _case_run(torch.bfloat16, 2, 12, 12, 197, 197, 64, packed=True)
    _case_run(torch.bfloat16, 2, 16, 16, 257, 257, 80, packed=True)
    _case_run(torch.bfloat16, 2, 16, 16, 729, 729, 72, packed=True)
    _case_run(torch.bfloat16, 1, 2, 2, 4096, 4096, 128)
    # its deterministic backward (the dQ-kernel mode's 64 x 64 dK/dV tile), with causal + key
    # padding + GQA
    _case_run(torch.bfloat16, 1, 2, 2, 4096, 4096, 128, deterministic=True)
    _case_run(torch.float16, 2, 4, 2, 300, 300, 128, causal=True, bias=True, deterministic=True)
    # the atomic mode's 64 x 64 dK/dV tile at head width 128 without the causal mask (key padding
    # + GQA; the T = 4096 row above is the plain one)
    _case_run(torch.float16, 2, 4, 2, 300, 300, 128, bias=True)
    # the long-sequence forward tile at head dim 64 (the short bucket's tile is the one above)
    _case_run(torch.bfloat16, 1, 2, 2, 2100, 2100, 64, backward=False)
    # sm_90's pointer-load forward (tensors a TMA descriptor cannot address: a view off 16 bytes)
    _case_run(torch.bfloat16, 2, 12, 12, 197, 197, 64, packed=True, backward=False, tma=False)
    _case_run(torch.float16, 2, 8, 2, 100, 197, 72, causal=True, bias=True, backward=False, tma=False)
    # the split-KV forward (fp16 / bf16): ViT-B/16 at batch 1 (the launcher's choice: 4 splits on
    # 132 SMs), and causal + key padding + GQA + a masked head-dim tail
    _case_run(torch.bfloat16, 1, 12, 12, 197, 197, 64, packed=True, kv_splits=None)
    _case_run(torch.float16, 1, 8, 2, 100, 197, 72, causal=True, bias=True, backward=False, kv_splits=3)
    # every other variant once: causal + key padding + GQA, ragged Tq != Tk, a masked head-dim
    # tail, the deterministic dQ kernel; fp32 with IEEE and with TF32 dots
    _case_run(torch.float16, 2, 8, 2, 100, 197, 72, causal=True, bias=True, deterministic=True)
    _case_run(torch.float32, 2, 4, 4, 197, 197, 64, deterministic=True)
    _case_run("tf32", 2, 4, 4, 197, 197, 64)
    # packed variable-length sequences: a mixed-resolution batch through the packed qkv at ViT-B's
    # heads (the on-device block search), equal lengths with max_seqlen (the per-sequence grid),
    # causal + GQA + a masked head-dim tail with the deterministic dQ, head dim 80, and fp32
    _varlen_case_run(torch.bfloat16, (196, 577, 17), 12, 12, 64, packed=True)
    _varlen_case_run(torch.bfloat16, (197, 197, 197), 12, 12, 64, packed=True, max_known=True)
    _varlen_case_run(torch.float16, (197, 50), 8, 2, 72, causal=True, deterministic=True)
    _varlen_case_run(torch.bfloat16, (257, 100), 16, 16, 80, packed=True)
    _varlen_case_run(torch.float32, (197, 197), 4, 4, 64, causal=True, max_known=True)
    # the packed split-KV forward: one image at ViT-B's heads (the launcher's choice: 24 programs,
    # 4 splits on 132 SMs), and the block search with causal + GQA + a masked head-dim tail
    _varlen_case_run(torch.bfloat16, (197,), 12, 12, 64, packed=True, max_known=True, backward=False, kv_splits=None)
    _varlen_case_run(torch.float16, (197, 50), 8, 2, 72, causal=True, backward=False, kv_splits=3)
    # the fused short-sequence backward (16-bit, the widths of _ATTN_FUSED_CONFIGS): ViT-B/16's
    # packed D = 64, 80, and causal + key padding + GQA
    _case_run(torch.bfloat16, 2, 12, 12, 197, 197, 64, packed=True, bwd_mode="fused")
    _case_run(torch.bfloat16, 2, 16, 16, 257, 257, 80, packed=True, bwd_mode="fused")
    _case_run(torch.float16, 2, 8, 2, 100, 197, 64, causal=True, bias=True, bwd_mode="fused")
    # the fused QK-norm / RoPE prologue: EVA-02 (LayerNorm, interleaved pairs, a class token,
    # packed qkv), DINOv3 (halves, 5 prefix tokens, no norm), head dim 72's two pieces with GQA
    # and causal, the mixed RoPE's per-head tables without a norm, RMSNorm alone at 96; fp32
    # IEEE and TF32; the split-KV forward (B = 1)
    _prologue_case_run(torch.bfloat16, 2, 12, 12, 197, 64, packed=True)
    _prologue_case_run(torch.bfloat16, 2, 12, 12, 201, 64, norm=0, rope="half", prefix=5)
    _prologue_case_run(torch.float16, 2, 8, 2, 100, 72, affine=False, causal=True)
    _prologue_case_run(torch.bfloat16, 2, 12, 12, 196, 64, norm=0, per_head=True, prefix=0)
    _prologue_case_run(torch.bfloat16, 2, 8, 8, 197, 96, norm=2, rope=None, prefix=0)
    _prologue_case_run(torch.float32, 2, 4, 4, 197, 64)
    _prologue_case_run("tf32", 2, 4, 4, 197, 64, rope="half")
    _prologue_case_run(torch.bfloat16, 1, 12, 12, 197, 64, packed=True, kv_splits=2)


@compile_cases(slow=True)
def _attention_compile_cases_all():
    # every config of the tables: head dims of every width class, with and without a masked tail,
    # every backward path (the atomic one only runs without a masked tail, the fused one at the
    # widths with a tile of its own), every precision class; the
    # forward at a short (197) and a long (2100) key length, one per key-length bucket
    dims_16 = (24, 32, 40, 56, 64, 72, 80, 88, 96, 104, 128, 136, 160, 176, 192, 200, 256)
    for dtype, dims in ((torch.bfloat16, dims_16),
                        (torch.float32, (64, 72, 128, 200, 256)), ("tf32", (64, 72, 128, 200, 256))):
        for d in dims:
            da, db = _attn_pieces(d, split=dtype == torch.bfloat16)
            modes = ("dq_kernel", "atomic") if d == da + db else ("dq_kernel",)
            if dtype == torch.bfloat16 and d == da + db and any(da + db in t for t in _ATTN_FUSED_CONFIGS.values()):
                modes += ("fused",)
            for mode in modes:
                _case_run(dtype, 2, 4, 4, 197, 197, d, causal=True, bias=True, bwd_mode=mode)
                # GQA: the dK/dV kernel's loop over its group's query heads
                _case_run(dtype, 2, 4, 2, 197, 197, d, causal=True, bias=True, bwd_mode=mode)
            _case_run(dtype, 1, 2, 2, 2100, 2100, d, causal=True, bias=True, backward=False)
            if dtype == torch.bfloat16:
                _case_run(dtype, 1, 2, 2, 197, 197, d, causal=True, bias=True, backward=False, kv_splits=2)
    # the packed launches at every width class of the 16-bit tables (atomic and deterministic dQ
    # where both run) and the fp32 precisions, with the block search and the per-sequence grid
    for d in (32, 64, 72, 128, 256):
        _varlen_case_run(torch.bfloat16, (197, 50), 4, 2, d, causal=True)
        _varlen_case_run(torch.bfloat16, (197, 197), 4, 4, d, causal=True, max_known=True, deterministic=True)
        _varlen_case_run(torch.bfloat16, (197, 50), 4, 2, d, causal=True, backward=False, kv_splits=2)
    for dtype in (torch.float32, "tf32"):
        for d in (72, 128, 200, 256):
            _varlen_case_run(dtype, (197, 50), 4, 2, d, causal=True)
            _varlen_case_run(dtype, (197, 50), 4, 4, d, max_known=True)
    # the fused prologue at every width class it takes (prologue.prologue_fusable), the masked ones
    # (_ATTN_VARIANT_CONFIGS) included
    for d in (16, 32, 40, 56, 72, 80, 96):
        _prologue_case_run(torch.bfloat16, 2, 4, 2, 197, d, causal=True)
