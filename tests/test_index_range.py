"""Index range: no in-tile offset of any kernel wraps in int32, for shapes past 2^31 elements.

Nothing is allocated: the launchers run on meta tensors under ``vitkern.ops.compile_check.capture``,
which records each launch instead of running it. For every captured launch the test evaluates the
kernel's int32 offset expressions (the ``offs * stride`` products inside a tile; per-program bases
are int64) on the captured arguments with Triton's typing rule (an integer argument is int32 when
it fits, int64 otherwise), using :func:`vitkern.ops._index.int32_overflow`. A launcher either
produces launches whose offsets fit (copying a view whose layout is the problem) or raises a
ValueError naming the tensor before it launches.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from vitkern.ops.activation import Activation
from vitkern.ops.attention import backward as A_backward, forward as A_forward, launch as A, op as A_op
from vitkern.ops.gemm import Epilogue, kernels as GK, launch as _gemm
from vitkern.ops.layer_norm import kernels as LN_kernels, launch as LN
from vitkern.ops.linear import launch as L
from vitkern.ops.patch_embed import kernels as PE_kernels, launch as PE
from vitkern.ops._triton import is_registered_helper, param_names
from vitkern.testing.compile_check import capture
from vitkern.ops._index import INT32_MAX, int32_overflow

META = torch.device("meta")
BF16 = torch.bfloat16


def _empty(*shape, dtype=BF16):
    return torch.empty(shape, dtype=dtype, device=META)


def _bind(launch):
    names = param_names(launch.entry.kernel)
    values = dict(zip(names, launch.args))
    values.update(launch.kwargs)
    if launch.config is not None:
        values.update(launch.config.meta)
    elif launch.entry.autotuned:
        values.update(launch.entry.configs[0].meta)
    return values


def _gemm_terms(v):
    M, N, K = v["M"], v["N"], v["K"]
    bm, bn, bk = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_K"]
    groups = []
    if v["A_GATHER"] is None:
        groups += [[(min(bm, M), v["stride_am"]), (min(bk, K), v["stride_ak"])], [(2, bk * v["stride_ak"])]
                   if abs(v["stride_ak"]) <= INT32_MAX else []]
    groups += [[(min(bn, N), v["stride_bn"]), (min(bk, K), v["stride_bk"])],
               [(2, bk * v["stride_bk"])] if abs(v["stride_bk"]) <= INT32_MAX else []]
    cols = 2 * N if v["GLU_GRAD"] else N  # the SwiGLU gradient: (dg, dv) and (g, v) side by side
    if v["COL_MAP"] is None:
        groups.append([(cols, v["stride_cn"])])
    for flag, stride in (("HAS_RESIDUAL", "stride_rn"), ("STORE_PRE", "stride_pn"), ("ROW_DOT", "stride_wn")):
        if v[flag]:
            groups.append([(N, v[stride])])
    if v["ACT_GRAD"] or v["GLU_GRAD"]:
        groups.append([(cols, v["stride_xn"])])
    groups.append([(max(M, N, K) + max(bm, bn, bk), 1)])  # tile coordinates (off_m + tm, ...)
    return groups


def _swiglu_gemm_terms(v):
    M, N, K = v["M"], v["N"], v["K"]
    bm, bn, bk = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_K"]
    groups = []
    for rows, block, s_r, s_k in ((M, bm, "stride_am", "stride_ak"), (N, bn, "stride_gn", "stride_gk"),
                                  (N, bn, "stride_vn", "stride_vk")):
        groups.append([(min(block, rows), v[s_r]), (min(bk, K), v[s_k])])
        groups.append([(2, bk * v[s_k])] if abs(v[s_k]) <= INT32_MAX else [])  # the per-step increment
    groups.append([(N, v["stride_cn"])])
    if v["STORE_PRE"]:
        groups.append([(2 * N, v["stride_pn"])])
    groups.append([(max(M, N, K) + max(bm, bn, bk), 1)])
    return groups


def _attn_terms(v, tensors):
    groups = []
    for t, length in tensors:
        groups.append([(v[length], v[f"stride_{t}t"])])
    return groups


# The int32 offset expressions of each kernel, from its source (the comments name the lines).
_TERMS = {
    # cols * stride_xn / stride_rn (rows are int64)
    "_layer_norm_fwd_kernel": lambda v: [[(v["N"], v["stride_xn"])], [(v["N"], v["stride_rn"])]],
    "_layer_norm_fwd_looped_kernel": lambda v: [[(v["N"], v["stride_xn"])], [(v["N"], v["stride_rn"])]],
    "_layer_norm_bwd_kernel": lambda v: [[(v["N"], v[s])] for s in ("stride_dyn", "stride_xn", "stride_dsn")],
    "_layer_norm_bwd_looped_kernel": lambda v: [[(v["N"], v[s])] for s in ("stride_dyn", "stride_xn", "stride_dsn")],
    "_layer_norm_bwd_dwdb_kernel": lambda v: [[(v["N"] + v["BLOCK_N"], 1)]],  # g.to(int64) * N + cols
    "_gemm_kernel": _gemm_terms,
    # the SwiGLU GEMM: A / gate / value tiles as the GEMM's plain loads, out columns, the packed
    # pre-activation's 2N columns, tile coordinates
    "_swiglu_gemm_kernel": lambda v: _swiglu_gemm_terms(v),
    # offs_n * stride_gn, (N + offs_n) * stride_pn / stride_on (rows are int64)
    "_swiglu_bwd_kernel": lambda v: [[(v["N"], v["stride_gn"])], [(2 * v["N"], v["stride_pn"])],
                                     [(2 * v["N"], v["stride_on"])]],
    # offs_n * stride_*n (rows are int64)
    "_act_bwd_kernel": lambda v: [[(v["N"], v[s])] for s in ("stride_gn", "stride_pn", "stride_on")],
    # offs_m * stride_*t within one (batch, head) slice (batch and head offsets are int64)
    "_attention_fwd_kernel": lambda v: _attn_terms(v, [("q", "Tq"), ("k", "Tk"), ("v", "Tk"), ("b", "Tk"),
                                                       ("o", "Tq")]),
    # the split-KV forward: q / k / v / bias as above, offs_m * HEAD_DIM in its contiguous partials
    "_attention_fwd_split_kernel": lambda v: _attn_terms(v, [("q", "Tq"), ("k", "Tk"), ("v", "Tk"), ("b", "Tk")])
    + [[(v["Tq"], v["HEAD_DIM"])]],
    # offs_m * HEAD_DIM (partials), s * stride_ls (split lses), offs_m * stride_ot (out)
    "_attention_fwd_merge_kernel": lambda v: [[(v["Tq"], v["HEAD_DIM"])], [(v["SPLITS"], v["stride_ls"])],
                                              [(v["Tq"], v["stride_ot"])]],
    "_attention_bwd_preprocess_kernel": lambda v: _attn_terms(v, [("o", "Tq"), ("do", "Tq")]),
    "_attention_bwd_dkdv_kernel": lambda v: _attn_terms(v, [("q", "Tq"), ("k", "Tk"), ("v", "Tk"), ("b", "Tk"),
                                                            ("do", "Tq"), ("dk", "Tk"), ("dv", "Tk"), ("dq", "Tq")]),
    "_attention_bwd_dq_kernel": lambda v: _attn_terms(v, [("q", "Tq"), ("k", "Tk"), ("v", "Tk"), ("b", "Tk"),
                                                          ("do", "Tq"), ("dq", "Tq")]),
    # the fused backward: as dK/dV, plus g * tq_ceil * width + offs_m * width in its program's
    # scratch (the program's base is int64)
    "_attention_bwd_fused_kernel": lambda v: _attn_terms(v, [("q", "Tq"), ("k", "Tk"), ("v", "Tk"), ("b", "Tk"),
                                                             ("do", "Tq"), ("dk", "Tk"), ("dv", "Tk"), ("dq", "Tq")])
    + [[(v["GROUP"] * (v["Tq"] + v["BLOCK_M"]), v["BLOCK_DA"] + v["BLOCK_DB"])]],
    # offs = pid * BLOCK + arange < n_tok * D, n * stride_yn
    "_patch_embed_colsum_kernel": lambda v: [[(v["n_tok"] * v["D"] + v["BLOCK"], 1)], [(v["D"], v["stride_yn"])]],
}


def _img_terms(img):
    """The patch-embedding gathers' int32 pixel and patch offsets (_pixel_offsets, _patch_origin)
    from their ``img`` tuple: (grid_w, s_b / G, s_c / G, s_h / G, s_w, C, PH, PW, CL_K, G)."""
    gw, _, sc, sh, sw = img[:5]
    c, ph, pw, cl_k, g = (x.value for x in img[5:])
    if cl_k:
        pixel = [[(ph, sh * g), (pw * c, 1)], [(ph, sh)]]
    else:
        pixel = [[(c, sc * g), (ph, sh * g), (pw, sw)], [(c, sc), (ph, sh)]]
    return pixel


def _largest_wrapping_offset(launch):
    """The largest int32 in-tile offset of a captured launch that would wrap, or None."""
    name = launch.entry.name.rsplit(":", 1)[-1]
    assert name in _TERMS, f"no index terms for kernel {name}: add them to _TERMS"
    v = _bind(launch)
    groups = [g for g in _TERMS[name](v) if g]
    if name == "_gemm_kernel":
        for args in (v["a_args"], v["c_args"]):
            for item in args:
                if isinstance(item, tuple) and len(item) == 10:  # an img tuple
                    groups += _img_terms(item)
    worst = [w for w in (int32_overflow(*g) for g in groups) if w is not None]
    return max(worst) if worst else None


def _captured(fn):
    with capture(90) as launches:
        fn()
    assert launches, "nothing was launched"
    return launches


def _assert_fits(launches):
    for launch in launches:
        worst = _largest_wrapping_offset(launch)
        assert worst is None, f"{launch.entry.name}: an int32 in-tile offset reaches {worst}"


# --------------------------------------------------------------------------------------------
# LayerNorm: cols * stride_xn for a transposed input with N x stride >= 2^31
# --------------------------------------------------------------------------------------------


def test_layer_norm_transposed_input_past_int32():
    x = _empty(4096, 2**20).t()  # (2^20, 4096) with column stride 2^20: 2^32 elements
    assert (x.shape[1] - 1) * x.stride(1) > INT32_MAX
    w = _empty(4096)

    def run():
        y, _, mean, rstd = LN._layer_norm_fwd(x, x, w, w, 1e-6)
        LN._layer_norm_bwd(x, x, w, mean, rstd, x, True, BF16)

    _assert_fits(_captured(run))


def test_layer_norm_many_rows_past_int32():
    x = _empty(2**22, 1024)  # 2^32 elements, row offsets int64
    _assert_fits(_captured(lambda: LN._layer_norm_fwd(x, None, None, None, 1e-6)))


# --------------------------------------------------------------------------------------------
# GEMM core (linear / mlp): transposed operands, residuals and gradients past 2^31 elements
# --------------------------------------------------------------------------------------------


def test_linear_transposed_operands_past_int32():
    m, k, n = 2**26, 64, 64
    x = _empty(k, m).t()  # (M, K) with K stride 2^26: 2^32 elements
    w = _empty(n, k)
    residual = _empty(n, m).t()
    grad = _empty(n, m).t()

    def run():
        out = _empty(m, n)
        _gemm.gemm(x, w, out, Epilogue(bias=_empty(n), residual=residual))
        L.linear_backward(grad, x, w, _empty(n), _empty(n), _empty(m, dtype=torch.float32), None, Activation.NONE,
                          need_drs=True)
        _gemm.act_bwd(grad, _empty(m, n), Activation.GELU, BF16)

    _assert_fits(_captured(run))


def test_swiglu_past_int32():
    """The SwiGLU forward on a transposed x past 2^31 elements (copied to a layout that fits) and
    the backward's dH GEMM / elementwise gate backward on 2^31-element packed gradients."""
    from vitkern.ops.swiglu import launch as SW

    m, k, hidden, n = 2**26, 64, 48, 64
    x = _empty(k, m).t()
    w1, w2 = _empty(2 * hidden, k), _empty(n, hidden)
    grad = _empty(n, m).t()

    def run():
        pre = _empty(m, 2 * hidden)
        SW.swiglu_forward(x, w1, _empty(2 * hidden), None, None, w2, _empty(n), None, None, None, pre)
        SW.swiglu_backward(grad, x, w1, None, w2, _empty(n), None, None, pre, _empty(m, hidden))
        _gemm.swiglu_bwd(_empty(hidden, m).t(), pre, BF16)

    _assert_fits(_captured(run))


def test_gemm_many_rows_past_int32():
    m, k, n = 2**22, 768, 768  # 3.2e9-element input, contiguous
    _assert_fits(_captured(lambda: _gemm.gemm(_empty(m, k), _empty(n, k), _empty(m, n), Epilogue(bias=_empty(n)))))


# --------------------------------------------------------------------------------------------
# Attention: offs_m * stride_t within one (batch, head) slice
# --------------------------------------------------------------------------------------------


def _attn_fwd_bwd(q, k, v, out, bias=None):
    tq = q.shape[2]
    lse = _empty(q.shape[0], q.shape[1], tq, dtype=torch.float32)
    A._attention_fwd(q, k, v, bias, False, 0.125, out, lse)
    A._attention_bwd(out, q, k, v, out, lse, None, bias, False, 0.125, True,
                     torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))


def test_attention_strided_slice_past_int32_is_copied():
    b, t, h, d = 1, 2**22, 12, 64  # (B, T, H, D) layout: stride_t = H * D, (T - 1) * 768 > 2^31
    q = _empty(b, t, h, d).transpose(1, 2)
    assert (t - 1) * q.stride(2) > INT32_MAX

    def run():
        qc, kc, vc = (A_op._unit_last(x) for x in (q, q, q))  # what the ops do before launching
        _attn_fwd_bwd(qc, kc, vc, _empty(b, h, t, d), bias=_empty(b, 1, t, dtype=torch.float32))

    _assert_fits(_captured(run))


def test_attention_packed_slice_past_int32_raises():
    b, t, h, d = 1, 2**20, 12, 64  # packed qkv: stride_t = 3 * H * D
    qkv = _empty(b, t, 3, h, d)
    q, k, v = A_op._packed_views(qkv)
    out = _empty(b, t, h, d).transpose(1, 2)
    with capture(90) as launches, pytest.raises(ValueError, match="int32"):
        _attn_fwd_bwd(q, k, v, out)
    assert not launches


def test_attention_large_batch_past_int32():
    b, h, t, d = 2**14, 12, 197, 64  # 2.5e9 elements, each (batch, head) slice small
    qkv = _empty(b, t, 3, h, d)
    q, k, v = A_op._packed_views(qkv)
    launches = _captured(lambda: _attn_fwd_bwd(q, k, v, _empty(b, t, h, d).transpose(1, 2)))
    # the backward at this batch is the fused kernel (its persistent grid: 2 programs a SM)
    assert "_attention_bwd_fused_kernel" in [launch.entry.name.rsplit(":", 1)[-1] for launch in launches]
    _assert_fits(launches)


def test_attention_split_forward_offsets():
    # batch 1: the split-KV forward (4 key splits of ViT-B/16 on 132 SMs) and its merge
    b, h, t, d = 1, 12, 197, 64
    qkv = _empty(b, t, 3, h, d)
    q, k, v = A_op._packed_views(qkv)
    launches = _captured(lambda: _attn_fwd_bwd(q, k, v, _empty(b, t, h, d).transpose(1, 2)))
    names = [launch.entry.name.rsplit(":", 1)[-1] for launch in launches]
    assert "_attention_fwd_split_kernel" in names and "_attention_fwd_merge_kernel" in names
    _assert_fits(launches)


# --------------------------------------------------------------------------------------------
# Patch embedding: the gathers' pixel offsets, the token rows, the column sums
# --------------------------------------------------------------------------------------------


def test_patch_embed_large_batch_past_int32():
    images = _empty(2**16, 3, 224, 224)  # 9.9e9 pixels, each image 150528
    weight = _empty(768, 3, 16, 16)
    prefix, pos = _empty(1, 1, 768), _empty(1, 197, 768)

    def run():
        out = PE._patch_embed_fwd(images, weight, _empty(768), pos, prefix)
        PE._patch_embed_bwd(out, images, weight, True, True, BF16, 1, 197, BF16, BF16)

    _assert_fits(_captured(run))


def test_patch_embed_huge_image_raises():
    images = _empty(1, 3, 2**15, 2**15)  # one image past 2^31 pixels: (C - 1) * H * W > 2^31
    with capture(90) as launches, pytest.raises(ValueError, match="images .*int32"):
        PE._patch_embed_fwd(images, _empty(64, 3, 16, 16), None, None, None)
    assert not launches


# --------------------------------------------------------------------------------------------
# The rule itself, and the kernels' int64 bases
# --------------------------------------------------------------------------------------------


def test_int32_overflow_rule():
    assert int32_overflow((2**16, 2**15)) is None  # (2^16 - 1) * 2^15 < 2^31
    assert int32_overflow((2**16 + 1, 2**15)) == 2**31
    assert int32_overflow((2, 2**31)) is None  # an int64 stride: an int64 product
    assert int32_overflow((2**16, 2**15), (2**16, 2**15)) == 2 * (2**16 - 1) * 2**15  # the sum wraps
    assert int32_overflow((2**16, 2**15), (2**16, 2**15), (2, 2**40)) is None  # the sum is int64
    assert int32_overflow((0, 2**40), (1, 2**40)) is None


@pytest.mark.parametrize("kernel", [LN_kernels._layer_norm_fwd_kernel, LN_kernels._layer_norm_bwd_kernel,
                                    GK._gemm_kernel, GK._act_bwd_kernel, GK._swiglu_gemm_kernel,
                                    GK._swiglu_bwd_kernel, A_forward._attention_fwd_kernel,
                                    A_forward._attention_fwd_split_kernel, A_forward._attention_fwd_merge_kernel,
                                    A_backward._attention_bwd_dkdv_kernel, A_backward._attention_bwd_dq_kernel,
                                    A_backward._attention_bwd_fused_kernel,
                                    PE_kernels._patch_embed_colsum_kernel])
def test_kernels_take_int64_program_bases(kernel):
    """The per-program bases (rows, batch x head) are int64 in each kernel the table above
    treats as int64 (in its own source or in a registered helper it calls, directly or through
    another helper: all of them are inlined into it)."""
    seen, pending, src = set(), [kernel.fn], ""
    while pending:
        fn = pending.pop()
        body = inspect.getsource(fn)
        src += body
        for name, obj in fn.__globals__.items():
            if f"{name}(" in body and is_registered_helper(obj) and name not in seen:
                seen.add(name)
                pending.append(obj.fn)
    assert "tl.int64" in src
