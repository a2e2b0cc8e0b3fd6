"""The patch-embedding device functions plugged into the GEMM core (:mod:`vitkern.ops.gemm`,
through its gather / row-map / prologue hooks), and the column-sum kernel of the backward.

Forward: ``_fwd_gather`` loads the A tile straight from the image pixels (implicit im2col inside
the GEMM's reduction loop over the C * PH * PW pixels of a patch, any image strides: NCHW and
channels-last read without a copy), ``_fwd_rows`` maps patch m to its token row after its image's
prefix rows and to its pos_embed row (pos_embed rides in the core's residual epilogue, the bias in
its bias epilogue), ``_fwd_prefix`` is the core's prologue: the GEMM's own programs write the
prefix rows (prefix + pos_embed[:K]) before their tiles. Backward: ``_dw_gather`` is the
transposed im2col for dW^T = patches^T @ dY (reduced over the token rows, prefix rows reading as
zero), ``_dx_gather`` / ``_dx_rows`` / ``_dx_cols`` give dX = dY_patches @ W with every output
element scattered to its pixel (patches do not overlap: col2im is a permutation), and
``_patch_embed_colsum_kernel`` sums dY over the batch (fp32) for the pos_embed, prefix-token and
bias gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vitkern.ops._triton import register_helper, register_kernel, round_to


# Index spaces. Images (B, C, H, W) with element strides (s_b, s_c, s_h, s_w) (any layout);
# patch grid gh x gw, N = gh * gw patches per image, patch m = b * N + ph * gw + pw (row-major,
# as conv + flatten(2) orders them). Pixel k of a patch, 0 <= k < C * PH * PW, in the images' own
# order: (i, j, c) for channels-last images (CL_K: a patch row's PW * C pixels are one contiguous
# run), (c, i, j) otherwise (runs of PW pixels when s_w = 1), so that the gathers load contiguous
# runs; the weight is read as a (D, K) matrix in that order (a view when its own layout matches,
# else a D x K copy). Tokens: T = NP + N per image (NP prefix tokens first), token row
# r = b * T + t of the (B * T, D) output.


# The gathers' argument tuples are flat: the image geometry ``img`` (see ``launch._image_args``) takes
# their first ten fields, the gather's own fields follow from index 10. Triton 3.6 drops the
# constexprs of a tuple nested in a tuple argument when it is used inside a loop (the GEMM's K
# loop) and a field before it was specialised as a constexpr (any int equal to 1, such as one
# prefix token): the compile then fails on None values. Flat tuples hold on 3.6 and 3.8.


@register_helper
@triton.jit
def _pixel_offsets(offs_k, img):
    """Element offset (int32) of pixel ``k`` of a patch from the patch's top-left pixel.

    ``img`` starts with (grid_w, s_b / G, s_c / G, s_h / G, s_w, C, PH, PW, CL_K, G), the last five constexpr
    (see ``launch._image_args``). With CL_K (channels-last, s_c = 1 and s_w = C) a patch row is one run
    of PW * C elements, written as such so that Triton sees it (vectorised loads)."""
    C: tl.constexpr = img[5]
    PH: tl.constexpr = img[6]
    PW: tl.constexpr = img[7]
    G: tl.constexpr = img[9]
    # Each index straight from k (no remainder of a remainder): Triton's alignment analysis then
    # keeps the contiguity of the innermost run (2 pixels for PW = 14, PW for powers of two); the
    # coarse strides are multiplied by their common factor G last, so that it knows their alignment.
    if img[8]:
        off = ((offs_k // (PW * C)) * img[3]) * G + offs_k % (PW * C)
    else:
        off = ((offs_k // (PH * PW)) * img[2] + ((offs_k // PW) % PH) * img[3]) * G + (offs_k % PW) * img[4]
    return off


@register_helper
@triton.jit
def _patch_origin(b, p, img):
    """Element offset (int64) of the top-left pixel of patch ``p`` of image ``b``."""
    PH: tl.constexpr = img[6]
    PW: tl.constexpr = img[7]
    G: tl.constexpr = img[9]
    return (b.to(tl.int64) * img[1] + ((p // img[0]) * PH) * img[3]) * G + ((p % img[0]) * PW) * img[4]


@register_helper
@triton.jit
def _fwd_gather(a_ptr, offs_m, offs_k, M, K, a_args):
    """Implicit im2col: A[m, k] = pixel k of patch m. Rows are clamped into range (their outputs
    are masked on store); pixels past K are zero, masked against the constexpr C * PH * PW so
    that the mask stays uniform over the contiguous runs (vectorised, cp.async-pipelined loads).

    a_args = (*img, n_patch) (img: see :func:`_pixel_offsets`).
    """
    KC: tl.constexpr = a_args[5] * a_args[6] * a_args[7]
    m = tl.minimum(offs_m, M - 1)
    rows = _patch_origin(m // a_args[10], m % a_args[10], a_args)
    cols = _pixel_offsets(offs_k, a_args)
    return tl.load(a_ptr + rows[:, None] + cols[None, :], mask=(offs_k < KC)[None, :], other=0.0)


@register_helper
@triton.jit
def _fwd_rows(offs_m, c_args):
    """Output token row of patch m (after its image's NP prefix rows); pos_embed row of patch m.

    c_args = (n_patch, n_prefix, pos_off, ...): pos_off is NP for a (1, NP + N, D) pos_embed, 0
    for (1, N, D).
    """
    n_patch = c_args[0]
    n_prefix = c_args[1]
    img = offs_m // n_patch
    return offs_m + (img + 1) * n_prefix, offs_m % n_patch + c_args[2]


@register_helper
@triton.jit
def _fwd_prefix(pid, num_progs, c_ptr, stride_cm, stride_cn, c_args, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Prefix rows out[b * T + t] = prefix[t] (+ pos_embed[t]) for t < NP, written by the GEMM's own
    programs before their tiles: [16, BLOCK_N] blocks, program-strided.

    c_args = (n_patch, n_prefix, pos_off, n_img, D, prefix, s_pt, s_pn, pos, s_qt, s_qn, PREFIX_POS).
    """
    R: tl.constexpr = 16
    n_patch = c_args[0]
    n_prefix = c_args[1]
    n_img = c_args[3]
    D = c_args[4]
    prefix = c_args[5]
    pos = c_args[8]
    rows_total = n_img * n_prefix
    n_cb = tl.cdiv(D, BLOCK_N)
    n_blocks = tl.cdiv(rows_total, R) * n_cb
    for blk in range(pid, n_blocks, num_progs):
        r = (blk // n_cb) * R + tl.arange(0, R)
        n = (blk % n_cb) * BLOCK_N + tl.arange(0, BLOCK_N)
        t = r % n_prefix
        mask = (r < rows_total)[:, None] & (n < D)[None, :]
        v = tl.load(prefix + t[:, None] * c_args[6] + n[None, :] * c_args[7], mask=mask, other=0.0).to(tl.float32)
        if c_args[11]:
            q = tl.load(pos + t[:, None] * c_args[9] + n[None, :] * c_args[10], mask=mask, other=0.0)
            v += q.to(tl.float32)
        out_rows = (r // n_prefix).to(tl.int64) * (n_patch + n_prefix) + t
        tl.store(c_ptr + out_rows[:, None] * stride_cm + n[None, :] * stride_cn, round_to(v, c_ptr.dtype.element_ty),
                 mask=mask)


@register_helper
@triton.jit
def _dw_gather(a_ptr, offs_m, offs_k, M, K, a_args):
    """A[k, r] = pixel k of the patch at token row r (zero for prefix rows, r >= K and k >= M):
    the transposed im2col, reduced over token rows in the weight-gradient GEMM dW^T = A @ dY.

    a_args = (*img, n_tok, n_prefix, n_patch).
    """
    n_tok = a_args[10]
    KC: tl.constexpr = a_args[5] * a_args[6] * a_args[7]
    b = offs_k // n_tok
    p = offs_k % n_tok - a_args[11]
    valid = (p >= 0) & (offs_k < K)
    cols = _patch_origin(b, tl.maximum(p, 0), a_args)
    rows = _pixel_offsets(offs_m, a_args)
    return tl.load(a_ptr + rows[:, None] + cols[None, :], mask=(offs_m < KC)[:, None] & valid[None, :], other=0.0)


@register_helper
@triton.jit
def _dx_gather(a_ptr, offs_m, offs_k, M, K, a_args):
    """A[m, n] = dY[b, NP + p, n] for patch m = b * N + p (the patch rows of the token gradient).

    a_args = (n_patch, n_prefix, s_yb, s_yt, s_yn).
    """
    n_patch = a_args[0]
    m = tl.minimum(offs_m, M - 1)
    b = m // n_patch
    rows = b.to(tl.int64) * a_args[2] + (m % n_patch + a_args[1]).to(tl.int64) * a_args[3]
    return tl.load(a_ptr + rows[:, None] + offs_k[None, :] * a_args[4], mask=(offs_k < K)[None, :], other=0.0)


@register_helper
@triton.jit
def _dx_rows(offs_m, c_args):
    """Top-left pixel offset of patch m in the image gradient (its 'row'); no residual.

    c_args = (*img, n_patch).
    """
    return _patch_origin(offs_m // c_args[10], offs_m % c_args[10], c_args), offs_m


@register_helper
@triton.jit
def _dx_cols(offs_n, c_args):
    """Offset of pixel k within its patch in the image gradient (its 'column')."""
    return _pixel_offsets(offs_n, c_args)


@register_kernel
@triton.jit
def _patch_embed_colsum_kernel(
    DY, S, n_img, n_tok, D, img_per_split,
    stride_yb, stride_yt, stride_yn,
    BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """S[s, t, n] = sum over this split's images b of dY[b, t, n], fp32 (summed over s by the
    launcher): the gradients of pos_embed and the prefix tokens, and the bias's through them."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    split = tl.program_id(1)
    mask = offs < n_tok * D
    t = offs // D
    n = offs % D
    b_lo = split * img_per_split
    b_hi = tl.minimum(b_lo + img_per_split, n_img)
    ptrs = DY + b_lo.to(tl.int64) * stride_yb + t.to(tl.int64) * stride_yt + n * stride_yn
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in tl.range(b_lo, b_hi, num_stages=NUM_STAGES):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += stride_yb
    tl.store(S + split.to(tl.int64) * n_tok * D + offs, acc, mask=mask)
