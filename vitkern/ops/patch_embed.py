"""Patch embedding: patchify + GEMM + bias + position embedding, prefix tokens written in place.

Public functions (re-exported from ``vitkern``):

- ``patch_embed(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None)``: the ViT stem
  ``(B, C, H, W) -> (B, K + N, D)``: timm's ``PatchEmbed`` (a stride-P conv) followed by
  ``VisionTransformer._pos_embed`` (class / register tokens and the absolute position embedding).
- ``resample_pos_embed(pos_embed, new_size, ...)``: interpolate an absolute position embedding to a
  new patch grid (``timm.layers.resample_abs_pos_embed`` semantics, plain torch).

Backends are registered at the bottom of the module. Implementations of op ``"patch_embed"`` are
called as ``impl(images, weight, bias, pos_embed=..., prefix_tokens=...)`` after the public
function's checks and autocast casts.

The Triton backend, in the five layers every op follows, is built on the GEMM core of
:mod:`vitkern.ops.gemm` (its tiles, configs, pipelining and fp32 epilogue) through its hooks:

1. Device functions plugged into the core, and one kernel of its own. Forward: ``_fwd_gather``
   loads the A tile straight from the image pixels (implicit im2col inside the GEMM's reduction
   loop over the C * PH * PW pixels of a patch, any image strides: NCHW and channels-last read
   without a copy), ``_fwd_rows`` maps patch m to its token row after its image's prefix rows and to its
   pos_embed row (pos_embed rides in the core's residual epilogue, the bias in its bias epilogue),
   ``_fwd_prefix`` is the core's prologue: the GEMM's own programs write the prefix rows
   (prefix + pos_embed[:K]) before their tiles. One launch writes the whole (B, K + N, D) buffer.
   Backward: ``_dw_gather`` is the transposed im2col for dW^T = patches^T @ dY (reduced over the
   token rows, prefix rows reading as zero), ``_dx_gather`` / ``_dx_rows`` / ``_dx_cols`` give
   dX = dY_patches @ W with every output element scattered to its pixel (patches do not overlap:
   col2im is a permutation), and ``_patch_embed_colsum_kernel`` sums dY over the batch (fp32) for
   the pos_embed, prefix-token and bias gradients.
2. Launchers ``_patch_embed_fwd`` / ``_patch_embed_bwd``: strides of every operand (expanded
   gradients with stride 0 included); pixels in the images' order ((i, j, c) for channels-last,
   (c, i, j) otherwise: contiguous runs for the gathers), the weight read as (D, K) in that order
   (a view when its layout matches, else a small copy), its rows zero-padded when C * PH * PW is
   not a multiple of 16 (588 for 14 x 14 x 3: without it neither GEMM operand vectorises).
3. Registered ops ``vitkern::patch_embed_fwd`` and ``vitkern::patch_embed_bwd`` (custom ops with
   fakes); 4. autograd: the forward saves only the images and the weight (the additive terms'
   gradients are column sums of dY); 5. the public function below, backend "triton".

Cost (forward, elements of e bytes; N patches, T = K + N tokens, D width, P x P patches):
2 * B * N * D * C * P * P FLOPs; HBM bytes (images B * C * H * W + weight D * C * P * P + T * D
pos_embed + B * T * D tokens) * e, each read or written once (the pixels are re-read from L2 by
the D / BLOCK_N column tiles of a row block). At ViT-B/16, 224 px, batch 128, bf16: 29.6 GFLOP and
77 MB, compute-bound on an H100 (37 us at 800 TFLOP/s vs 26 us at 3 TB/s). timm runs the conv,
then flatten + transpose, cat and add as separate passes over the token buffer.
Backward: dW is the same GEMM size (reads images and dY), dX another (reads dY and W, writes
pixels), plus one pass over dY for the column sums.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitkern._backend import register_impl, select_impl
from vitkern.ops import gemm as _gemm
from vitkern.ops._common import (
    autocast_dtype,
    cast_floating,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
    contiguous_vectors,
    kernel_op,
)
from vitkern.ops._config import (
    INTERPRETING,
    KernelConfig,
    capturing,
    compile_cases,
    device_arch,
    launch,
    num_sms,
    register_helper,
    register_kernel,
    round_to,
)
from vitkern.ops._index import check_int32

__all__ = ["patch_embed", "patch_embed_ref", "resample_pos_embed"]


def _out_dtype(compute: torch.dtype, *extra: Optional[torch.Tensor]) -> torch.dtype:
    dtype = compute
    for t in extra:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# Reference implementation
# --------------------------------------------------------------------------------------------


def patch_embed_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference patch embedding (no argument checks; float64 accepted).

    timm-style ``conv2d(stride = patch) -> flatten(2).transpose(1, 2)``, then the prefix tokens and
    the position embedding added in fp32 (fp64 for fp64) with one cast to the output dtype (the
    promoted dtype of the conv output, ``pos_embed`` and ``prefix_tokens``).
    """
    d, c, ph, pw = weight.shape
    n_patch = (images.shape[2] // ph) * (images.shape[3] // pw)
    if n_patch == 0 or d == 0 or c * ph * pw == 0:
        # no patches, no output features or an empty reduction (conv2d refuses the first and gets
        # the shape of the last wrong): the same GEMM on the im2col patches, (B, N, K) @ (K, D)
        kc = c * ph * pw
        if images.numel() == 0:
            patches = images.reshape(images.shape[0], n_patch, kc)
        else:
            patches = F.unfold(images, (ph, pw), stride=(ph, pw)).transpose(1, 2)
        x = F.linear(patches, weight.reshape(d, kc), bias)
    else:
        x = F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)  # (B, N, D)
    out_dtype = _out_dtype(x.dtype, pos_embed, prefix_tokens)
    if pos_embed is None and prefix_tokens is None:
        return x
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    batch, n = x.shape[0], x.shape[1]
    k = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    x = x.to(acc)
    prefix = None if prefix_tokens is None else prefix_tokens.to(acc)
    if pos_embed is not None:
        pos = pos_embed.to(acc)
        if pos.shape[1] == n:
            x = x + pos
        else:
            x = x + pos[:, k:]
            if prefix is not None:
                prefix = prefix + pos[:, :k]
    if prefix is not None:
        x = torch.cat([prefix.expand(batch, -1, -1), x], dim=1)
    return x.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Layer 1: device functions plugged into the GEMM core, and the column-sum kernel
# --------------------------------------------------------------------------------------------
# Index spaces. Images (B, C, H, W) with element strides (s_b, s_c, s_h, s_w) (any layout);
# patch grid gh x gw, N = gh * gw patches per image, patch m = b * N + ph * gw + pw (row-major,
# as conv + flatten(2) orders them). Pixel k of a patch, 0 <= k < C * PH * PW, in the images' own
# order: (i, j, c) for channels-last images (CL_K: a patch row's PW * C pixels are one contiguous
# run), (c, i, j) otherwise (runs of PW pixels when s_w = 1), so that the gathers load contiguous
# runs; the weight is read as a (D, K) matrix in that order (a view when its own layout matches,
# else a D x K copy). Tokens: T = NP + N per image (NP prefix tokens first), token row
# r = b * T + t of the (B * T, D) output.


# The gathers' argument tuples are flat: the image geometry ``img`` (see :func:`_image_args`) takes
# their first ten fields, the gather's own fields follow from index 10. Triton 3.6 drops the
# constexprs of a tuple nested in a tuple argument when it is used inside a loop (the GEMM's K
# loop) and a field before it was specialised as a constexpr (any int equal to 1, such as one
# prefix token): the compile then fails on None values. Flat tuples hold on 3.6 and 3.8.


@register_helper
@triton.jit
def _pixel_offsets(offs_k, img):
    """Element offset (int32) of pixel ``k`` of a patch from the patch's top-left pixel.

    ``img`` starts with (grid_w, s_b / G, s_c / G, s_h / G, s_w, C, PH, PW, CL_K, G), the last five constexpr
    (see :func:`_image_args`). With CL_K (channels-last, s_c = 1 and s_w = C) a patch row is one run
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


# --------------------------------------------------------------------------------------------
# Configs (data)
# --------------------------------------------------------------------------------------------
# The GEMMs take the GEMM core's configs (vitkern.ops.gemm.select_config on (M, N, K); the
# overrides below where those spilled):
#   forward  M = B * N patches, N = D, K = C * PH * PW
#   dW^T     M = C * PH * PW,   N = D, K = B * T token rows (split-K when the tiles are few)
#   dX       M = B * N patches, N = C * PH * PW, K = D
# The column sum streams dY once: BLOCK elements of the (T, D) plane per program, the batch split
# so that there are about _COLSUM_PROGRAMS_PER_SM programs per SM.

# The forward GEMM's K bound is padded to a multiple of this (see _patch_embed_fwd).
_K_ALIGN = 16

# Where the core's choice spilled with the gathers (static compile, Triton 3.8), these replace it
# (registers per thread over the compile cases, all without spills):
# - the weight gradient on the sm_80 family: its A operand is the transposed gather, whose address
#   arithmetic per thread grows with the number of pixel runs a tile touches. With runs narrower
#   than 8 pixels (PW = 14: 2-pixel, 4-byte vectors) the core's 128 x 128 x 32 tile spilled
#   (255 registers, 132 bytes); 16-deep K steps hold half the addresses: 202..236. IEEE fp32 (FMA
#   dots): the core's 64 x 64 x 32 spilled 276 bytes at P = 14; 16-deep steps: 157..175.
# - the weight gradient on the sm_90 family with narrow runs: the core's 128 x 128 x 64 reached 255
#   registers (no spill, no margin) at P = 14; 32-deep K steps: 172..215.
# - IEEE fp32 on the sm_90 family (all three GEMMs): the core's 64 x 64 x 16 compiled to 128
#   registers and spilled 4 bytes in the channels-last forward; 64 x 64 x 32 with 3 stages:
#   193..249 under 3.8 but up to 12 bytes of spills in the dW / dX gathers under 3.6; 2 stages:
#   184..255 without spills on both.
_DW_NARROW_16_SM80 = _gemm.GemmConfig(128, 128, 16, 8, num_warps=8, num_stages=4, split_k=8)
_DW_FP32_SM80 = _gemm.GemmConfig(64, 64, 16, 8, num_warps=8, num_stages=3, split_k=8)
_DW_NARROW_16_SM90 = _gemm.GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=3, tma=True, split_k=8)
_FP32_SM90 = _gemm.GemmConfig(64, 64, 32, 8, num_warps=8, num_stages=2, tma=True, split_k=8)
_COLSUM_CONFIG = KernelConfig({"BLOCK": 1024, "NUM_STAGES": 3}, num_warps=4, num_stages=1)
_COLSUM_PROGRAMS_PER_SM = 4
_COLSUM_MAX_SPLIT = 16


# --------------------------------------------------------------------------------------------
# Layer 2: launchers
# --------------------------------------------------------------------------------------------


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` (keeps a channels-last layout); patched like ``_empty`` by the tests."""
    return torch.empty_like(t)


def _channels_last_k(images: torch.Tensor) -> bool:
    """Whether pixels are taken in (i, j, c) order: channels-last images (s_c = 1, s_w = C)."""
    c = images.shape[1]
    return c > 1 and images.stride(1) == 1 and images.stride(3) == c


def _weight_matrix(weight: torch.Tensor, cl_k: bool) -> torch.Tensor:
    """The weight as a (D, K) matrix in the pixel order: a view when its layout matches (contiguous
    for (c, i, j), channels-last for (i, j, c)), else a copy (D x K elements)."""
    d = weight.shape[0]
    if cl_k:
        return weight.permute(0, 2, 3, 1).reshape(d, -1)
    return weight.reshape(d, -1)


def _dw_buffer(weight: torch.Tensor, cl_k: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight gradient (the weight's shape, laid out in the pixel order: channels-last strides
    for (i, j, c)) and its (D, K) matrix view."""
    d, c, ph, pw = weight.shape
    if cl_k:
        buf = _empty((d, ph, pw, c), weight.dtype, device or weight.device)
        return buf.permute(0, 3, 1, 2), buf.view(d, -1)
    buf = _empty((d, c, ph, pw), weight.dtype, device or weight.device)
    return buf, buf.view(d, -1)


def _image_args(images: torch.Tensor, ph: int, pw: int) -> tuple:
    """The ``img`` tuple of the gathers and pixel maps: (grid_w, s_b / G, s_c / G, s_h / G, s_w) and
    the constexprs (C, PH, PW, CL_K, G). CL_K (pixels in (i, j, c) order) for channels-last images.
    G = gcd(16, the strides between pixel runs): Triton specialises an int on divisibility by 16
    only, so a row stride of 378 or 518 pixels (27 or 37 patches of 14) would hide that the runs
    stay 4-byte aligned, and the loads would not vectorise (nor pipeline)."""
    _, c, _, w = images.shape
    sb, sc, sh, sw = images.stride()
    cl_k = _channels_last_k(images)
    g = math.gcd(16, sb, sh) if cl_k else math.gcd(16, sb, sc, sh)
    if not cl_k:
        sc //= g
    return (w // pw, sb // g, sc, sh // g, sw,
            tl.constexpr(c), tl.constexpr(ph), tl.constexpr(pw), tl.constexpr(cl_k), tl.constexpr(g))


def _wide_runs(img: tuple) -> bool:
    """Whether the gathered pixel runs are at least 8 pixels (16-byte bf16 vectors) long."""
    c, ph, pw, cl_k, _ = (v.value for v in img[5:])
    if cl_k:
        return (pw * c) % 8 == 0
    return img[4] == 1 and pw % 8 == 0


def _select_config(kind: str, config, m: int, n: int, k: int, dtype: torch.dtype, img: tuple):
    """The config of GEMM ``kind`` ("fwd", "dw", "dx"; an (m, n, k) GEMM with ``dtype`` operands):
    ``config`` when one is forced (tests), else the core's choice with the overrides above."""
    if config is not None:
        return config
    arch = device_arch()
    prec = _gemm.dot_precision(dtype)
    if arch >= 90 and prec == "fp32":
        return _FP32_SM90
    if kind == "dw":
        if arch < 90 and prec == "fp32":
            return _DW_FP32_SM80
        if prec == "16" and not _wide_runs(img):
            return _DW_NARROW_16_SM90 if arch >= 90 else _DW_NARROW_16_SM80
    return _gemm.select_config(m, n, k, dtype, arch)


def _check_launch(images, weight, bias, pos_embed, prefix_tokens) -> tuple[int, int]:
    """Launcher-side validation (the public function checks first; this guards direct op calls).
    Returns (N patches, NP prefix tokens)."""
    if images.dim() != 4 or weight.dim() != 4 or images.shape[1] != weight.shape[1]:
        raise ValueError(f"patch_embed (triton): images (B, C, H, W) {tuple(images.shape)} and weight (D, C, Ph, Pw) "
                         f"{tuple(weight.shape)} do not match")
    d, _, ph, pw = weight.shape
    if ph * pw == 0 or images.shape[2] % ph or images.shape[3] % pw:
        raise ValueError(f"patch_embed (triton): image size {tuple(images.shape[2:])} is not a multiple of the "
                         f"patch size ({ph}, {pw})")
    n = (images.shape[2] // ph) * (images.shape[3] // pw)
    n_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != images.dtype:
            raise TypeError(f"patch_embed (triton): {name} has dtype {t.dtype}, images {images.dtype}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"patch_embed (triton): bias must have shape ({d},), got {tuple(bias.shape)}")
    if prefix_tokens is not None and (prefix_tokens.dim() != 3 or prefix_tokens.shape[0] != 1
                                      or prefix_tokens.shape[2] != d):
        raise ValueError(f"patch_embed (triton): prefix_tokens must be (1, K, {d}), got {tuple(prefix_tokens.shape)}")
    if pos_embed is not None and (pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != d
                                  or pos_embed.shape[1] not in (n, n + n_prefix)):
        raise ValueError(f"patch_embed (triton): pos_embed must be (1, {n} or {n + n_prefix}, {d}), "
                         f"got {tuple(pos_embed.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("pos_embed", pos_embed), ("prefix_tokens", prefix_tokens)):
        if t is not None and t.device != images.device:
            raise ValueError(f"patch_embed (triton): {name} is on {t.device} but images are on {images.device}")
    return n, n_prefix


def _check_index_range(images, ph: int, pw: int, t: int, d: int, **others: Optional[torch.Tensor]) -> None:
    """The gathers' int32 arithmetic (vitkern.ops._index): pixel offsets within a patch, patch
    origins within an image (the image offset is int64), the GEMM's token rows; ``others`` are
    2-D (rows, D) views read with int32 offsets (prefix tokens, pos_embed, dY's feature stride)."""
    op = "patch_embed (triton)"
    b, c, h, w = images.shape
    sb, sc, sh, sw = images.stride()
    check_int32(op, "images (pixel offsets within a patch)", (c, sc), (ph, sh), (pw, sw))
    check_int32(op, "images (patch offsets within an image)", (h - ph + 1, sh))
    check_int32(op, "images (patch offsets within an image row)", (w - pw + 1, sw))
    check_int32(op, "the token rows (B * T)", (b * t + 1, 1))
    for name, v in others.items():
        if v is not None:
            check_int32(op, name, (v.shape[0], v.stride(0)), (v.shape[1], v.stride(1)))


def _patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens, config=None) -> torch.Tensor:
    """Forward launcher: the (B, NP + N, D) tokens in one GEMM launch (prefix rows written by its
    programs' prologue). ``config`` forces a GEMM config (tests, compile cases)."""
    n, n_prefix = _check_launch(images, weight, bias, pos_embed, prefix_tokens)
    b, c, h, w = images.shape
    d, _, ph, pw = weight.shape
    t = n_prefix + n
    out = _empty((b, t, d), _out_dtype(images.dtype, pos_embed, prefix_tokens), images.device)
    if b == 0 or d == 0:
        return out
    wmat = _weight_matrix(weight, _channels_last_k(images))
    kdim = wmat.shape[1]
    if kdim % _K_ALIGN:
        # K = C * PH * PW not a multiple of 16 (588 for 14 x 14 x 3): zero-pad the weight's rows
        # (D x K, small) so that the GEMM's K bound is divisible by 16: the B loads vectorise
        # (TMA on sm_90) and both operands pipeline; the gather masks pixels at the true K.
        wmat = F.pad(wmat, (0, _K_ALIGN - kdim % _K_ALIGN))
    pos2 = pos_embed[0] if pos_embed is not None else None
    pos_off = n_prefix if pos_embed is not None and pos_embed.shape[1] != n else 0
    if n == 0:  # no patches: only the prefix rows
        if n_prefix:
            v = prefix_tokens.float() + (pos_embed[:, :n_prefix].float() if pos_off else 0.0)
            out.copy_(v.expand(b, -1, -1))
        return out
    pre2 = prefix_tokens[0] if prefix_tokens is not None else None
    _check_index_range(images, ph, pw, t, d, prefix_tokens=pre2, pos_embed=pos2)
    dummy = pre2 if pre2 is not None else wmat
    q = pos2 if pos2 is not None else dummy
    c_args = (n, n_prefix, pos_off, b, d,
              dummy, dummy.stride(0), dummy.stride(1), q, q.stride(0), q.stride(1),
              tl.constexpr(bool(pos_off) and n_prefix > 0))
    img = _image_args(images, ph, pw)
    cfg = _select_config("fwd", config, b * n, d, wmat.shape[1], wmat.dtype, img)
    _gemm.gemm(
        images, wmat, out.view(b * t, d), _gemm.Epilogue(bias=bias, residual=pos2),
        a_gather=_fwd_gather, a_args=(*img, n), a_shape=(b * n, wmat.shape[1]),
        row_map=_fwd_rows, c_args=c_args, prologue=_fwd_prefix if n_prefix else None, config=cfg,
    )
    return out


def _colsum(dy: torch.Tensor) -> torch.Tensor:
    """S[t, n] = sum_b dy[b, t, n] in fp32 (one pass over dy)."""
    b, t, d = dy.shape
    s_ = _empty((t, d), torch.float32, dy.device)
    if t * d == 0:
        return s_
    if b == 0:
        return s_.zero_()
    cfg = _COLSUM_CONFIG
    blocks = triton.cdiv(t * d, cfg.meta["BLOCK"])
    split = 1
    if not INTERPRETING:
        split = max(1, min(_COLSUM_MAX_SPLIT, b, (num_sms(dy.device) * _COLSUM_PROGRAMS_PER_SM) // blocks))
    per = triton.cdiv(b, split)
    split = triton.cdiv(b, per)
    part = s_ if split == 1 else _empty((split, t, d), torch.float32, dy.device)
    launch(_patch_embed_colsum_kernel, (blocks, split), dy, part, b, t, d, per, *dy.stride(), config=cfg)
    if split > 1 and not capturing():
        torch.sum(part, dim=0, out=s_)
    return s_


def _patch_embed_bwd(grad, images, weight, need_dx, need_dw, bias_dtype, n_prefix, pos_len, pos_dtype,
                     prefix_dtype, config=None):
    """Backward launcher: (dimages, dweight, dbias, dpos_embed, dprefix), None where not asked.

    ``grad`` is dY (B, NP + N, D), any strides. ``bias_dtype`` / ``pos_dtype`` / ``prefix_dtype``:
    the dtype of a gradient to compute, None for none; ``pos_len`` is pos_embed's length (N or
    NP + N). dimages has the images' layout, dweight the weight's.
    """
    n, _ = _check_launch(images, weight, None, None, None)
    b, c, h, w = images.shape
    d, _, ph, pw = weight.shape
    t = n_prefix + n
    if tuple(grad.shape) != (b, t, d):
        raise ValueError(f"patch_embed (triton): grad must have shape {(b, t, d)}, got {tuple(grad.shape)}")
    if pos_dtype is not None and pos_len not in (n, t):
        raise ValueError(f"patch_embed (triton): pos_len must be {n} or {t}, got {pos_len}")
    dev = images.device
    dx = dw = db = dpos = dprefix = None
    if b * n and d:
        # dY is read with int32 offsets along D (dX gather, column sums) and T * D (column sums)
        _check_index_range(images, ph, pw, t, d, grad=grad[0])
        check_int32("patch_embed (triton)", "grad (the (T, D) plane of one image)", (t * d + 1, 1))
    cl_k = _channels_last_k(images)
    kdim = weight.shape[1] * ph * pw
    if bias_dtype is not None or pos_dtype is not None or prefix_dtype is not None:
        s_ = _colsum(grad)
        if bias_dtype is not None:
            db = s_[n_prefix:].sum(0).to(bias_dtype)
        if pos_dtype is not None:
            # copies (outputs may not alias one another): (NP + N) x D, small
            dpos = (s_ if pos_len == t else s_[n_prefix:]).to(pos_dtype, copy=True).unsqueeze(0)
        if prefix_dtype is not None:
            dprefix = s_[:n_prefix].to(prefix_dtype, copy=True).unsqueeze(0)
    if need_dw:
        dw, dw2 = _dw_buffer(weight, cl_k, dev)
        if b * n == 0 or d == 0 or kdim == 0:
            dw.zero_()
        else:
            gy = grad if grad.dtype == weight.dtype else grad.to(weight.dtype)
            gy2 = gy.reshape(b * t, d)
            img = _image_args(images, ph, pw)
            cfg = _select_config("dw", config, kdim, d, b * t, weight.dtype, img)
            _gemm.gemm(images, gy2.t(), dw2.t(), a_gather=_dw_gather, a_args=(*img, t, n_prefix, n),
                       a_shape=(kdim, b * t), config=cfg)
    if need_dx:
        dx = _empty_like(images)
        if b * n == 0 or d == 0:
            dx.zero_()
        else:
            a_args = (n, n_prefix, *grad.stride())
            img = _image_args(dx, ph, pw)
            wmat = _weight_matrix(weight, img[8].value)
            cfg = _select_config("dx", config, b * n, kdim, d, weight.dtype, img)
            _gemm.gemm(grad, wmat.t(), dx.as_strided((1, 1), (1, 1)), a_gather=_dx_gather, a_args=a_args,
                       a_shape=(b * n, d), row_map=_dx_rows, col_map=_dx_cols, c_args=(*img, n), config=cfg)
    return dx, dw, db, dpos, dprefix


# --------------------------------------------------------------------------------------------
# Layers 3 and 4: registered ops and autograd
# --------------------------------------------------------------------------------------------


def _fwd_fake(images, weight, bias, pos_embed, prefix_tokens):
    b, _, h, w = images.shape
    d, _, ph, pw = weight.shape
    n_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    t = n_prefix + (h // ph) * (w // pw)
    return images.new_empty((b, t, d), dtype=_out_dtype(images.dtype, pos_embed, prefix_tokens))


def _bwd_fake(grad, images, weight, need_dx, need_dw, bias_dtype, n_prefix, pos_len, pos_dtype, prefix_dtype):
    """The backward op's outputs: (0,) placeholders for the gradients not asked for."""
    d = weight.shape[0]
    dx = torch.empty_like(images) if need_dx else images.new_empty((0,))
    dw = _dw_buffer(weight, _channels_last_k(images))[0] if need_dw else weight.new_empty((0,))
    db = images.new_empty((d,) if bias_dtype is not None else (0,), dtype=bias_dtype or images.dtype)
    dpos = images.new_empty((1, pos_len, d) if pos_dtype is not None else (0,), dtype=pos_dtype or images.dtype)
    dpre = images.new_empty((1, n_prefix, d) if prefix_dtype is not None else (0,), dtype=prefix_dtype or images.dtype)
    return dx, dw, db, dpos, dpre


@kernel_op("vitkern::patch_embed_bwd", fake=_bwd_fake)
def _patch_embed_bwd_op(
    grad: torch.Tensor,
    images: torch.Tensor,
    weight: torch.Tensor,
    need_dx: bool,
    need_dw: bool,
    bias_dtype: Optional[torch.dtype],
    n_prefix: int,
    pos_len: int,
    pos_dtype: Optional[torch.dtype],
    prefix_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = _patch_embed_bwd(grad, images, weight, need_dx, need_dw, bias_dtype, n_prefix, pos_len, pos_dtype,
                            prefix_dtype)
    # empty (0,) placeholders for the gradients not asked for (as the fake returns them)
    dtypes = (images.dtype, weight.dtype, bias_dtype, pos_dtype, prefix_dtype)
    return tuple(o if o is not None else images.new_empty((0,), dtype=dt or images.dtype)
                 for o, dt in zip(outs, dtypes))


def _fwd_setup(ctx, inputs, output):
    images, weight, bias, pos_embed, prefix_tokens = inputs
    ctx.save_for_backward(images, weight)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.pos = (pos_embed.shape[1], pos_embed.dtype) if pos_embed is not None else None
    ctx.prefix = (prefix_tokens.shape[1], prefix_tokens.dtype) if prefix_tokens is not None else None


def _fwd_backward(ctx, grad):
    images, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    n_prefix = ctx.prefix[0] if ctx.prefix is not None else 0
    bias_dtype = ctx.bias_dtype if need[2] else None
    pos_len, pos_dtype = (ctx.pos if ctx.pos is not None and need[3] else (0, None))
    prefix_dtype = ctx.prefix[1] if ctx.prefix is not None and need[4] else None
    dx, dw, db, dpos, dpre = torch.ops.vitkern.patch_embed_bwd(
        grad, images, weight, bool(need[0]), bool(need[1]), bias_dtype, n_prefix, pos_len, pos_dtype, prefix_dtype)
    return (dx if need[0] else None, dw if need[1] else None, db if bias_dtype is not None else None,
            dpos if pos_dtype is not None else None, dpre if prefix_dtype is not None else None)


@kernel_op("vitkern::patch_embed_fwd", fake=_fwd_fake, setup_context=_fwd_setup, backward=_fwd_backward)
def _patch_embed_fwd_op(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    prefix_tokens: Optional[torch.Tensor],
) -> torch.Tensor:
    return _patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens)


def _patch_embed_triton(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None):
    return torch.ops.vitkern.patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens)


def _patch_embed_triton_supports(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None):
    if weight.shape[1] * weight.shape[2] * weight.shape[3] == 0:
        return f"the Triton kernels need C * Ph * Pw >= 1 (weight shape {tuple(weight.shape)})"
    return None


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ViT patch embedding with the prefix tokens and the position embedding fused in.

    ``tokens[:, K:] = patches(images) @ weight.flatten(1).T + bias (+ pos_embed)`` in row-major
    patch order, and ``tokens[:, :K] = prefix_tokens (+ pos_embed[:, :K])``. Equals timm's
    ``PatchEmbed`` followed by ``VisionTransformer._pos_embed``.

    Args:
        images: ``(B, C, H, W)`` float32 / float16 / bfloat16, contiguous or channels_last; H and
            W multiples of the patch size.
        weight: ``(D, C, Ph, Pw)`` (``nn.Conv2d`` layout); the patch size is read from it.
        bias: optional ``(D,)``.
        pos_embed: optional ``(1, N, D)`` for the ``N = (H / Ph) * (W / Pw)`` patch tokens only
            (timm ``no_embed_class=True``: prefix tokens get none), or ``(1, K + N, D)`` for all
            tokens (timm's default).
        prefix_tokens: optional ``(1, K, D)``: class and register tokens, written first and
            expanded over the batch.

    Returns:
        ``(B, K + N, D)`` tokens. Their dtype is the compute dtype, promoted by ``pos_embed``'s
        and ``prefix_tokens``' dtypes: those additive terms may be float32 with fp16/bf16 images
        (timm keeps them as float32 parameters, so under autocast its tokens are float32 too).

    Autocast: images, weight and bias are cast to the autocast dtype; ``pos_embed`` and
    ``prefix_tokens`` keep theirs (the compute dtype or float32). Outside autocast images, weight
    and bias must share one dtype.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mismatched dtype.
        ValueError: image size not divisible by the patch size, channel mismatch, a ``pos_embed``
            of a length other than ``N`` or ``K + N``, wrong shapes of ``bias`` / ``prefix_tokens``,
            tensors on different devices (each message names the argument).
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    batch, channels, height, width = images.shape
    dim, w_channels, ph, pw = weight.shape
    if w_channels != channels:
        raise ValueError(
            f"images has {channels} channels but weight expects {w_channels} (weight is (D, C, Ph, Pw) = "
            f"{tuple(weight.shape)})"
        )
    if ph == 0 or pw == 0 or height % ph != 0 or width % pw != 0:
        raise ValueError(
            f"images height {height} and width {width} must be multiples of the patch size ({ph}, {pw}) "
            f"(weight's last two dims)"
        )
    n = (height // ph) * (width // pw)
    check_optional_tensor("bias", bias, shape=(dim,))
    k = 0
    if prefix_tokens is not None:
        check_tensor("prefix_tokens", prefix_tokens, ndim=3)
        if prefix_tokens.shape[0] != 1 or prefix_tokens.shape[2] != dim:
            raise ValueError(
                f"prefix_tokens must have shape (1, K, {dim}) (class / register tokens, D = weight.shape[0]), "
                f"got {tuple(prefix_tokens.shape)}"
            )
        k = prefix_tokens.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        if pos_embed.shape[0] != 1 or pos_embed.shape[2] != dim:
            raise ValueError(
                f"pos_embed must have shape (1, L, {dim}) (D = weight.shape[0]), got {tuple(pos_embed.shape)}"
            )
        length = pos_embed.shape[1]
        if length not in (n, k + n):
            accepted = f"{n} (patch tokens only)"
            if k:
                accepted += f" or {k + n} ({k} prefix + {n} patch tokens)"
            raise ValueError(
                f"pos_embed has length {length} but must have length {accepted} for {height}x{width} images "
                f"and patch size ({ph}, {pw}); resample it with vitkern.resample_pos_embed"
            )
    device = check_same_device(
        images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens
    )
    ac = autocast_dtype(device)
    if ac is not None:
        images, weight, bias = cast_floating(ac, images, weight, bias)
    else:
        check_same_dtype(images=images, weight=weight, bias=bias)
    compute = images.dtype
    for name, t in (("pos_embed", pos_embed), ("prefix_tokens", prefix_tokens)):
        if t is not None and t.dtype not in (compute, torch.float32):
            raise TypeError(
                f"{name} must have the compute dtype ({str(compute).replace('torch.', '')}) or float32, "
                f"got {str(t.dtype).replace('torch.', '')}"
            )
    (bias,) = contiguous_vectors(bias)  # every backend reads it as contiguous
    kwargs = dict(pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    impl = select_impl("patch_embed", device, images, weight, bias, **kwargs)
    return impl(images, weight, bias, **kwargs)


_INTERPOLATION_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def _check_size(name: str, value) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: Union[int, Sequence[int]],
    old_size: Optional[Union[int, Sequence[int]]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = False,
    align_corners: Optional[bool] = None,
) -> torch.Tensor:
    """Resample an absolute position embedding to a new patch grid.

    Semantics of ``timm.layers.resample_abs_pos_embed`` (implemented here in plain torch): the
    first ``num_prefix_tokens`` entries (class / register tokens) are kept as they are, the rest
    are viewed as an ``old_size`` grid (row-major), interpolated in float32 with
    ``F.interpolate(mode=interpolation, antialias=antialias, align_corners=align_corners)`` to
    ``new_size`` and cast back. As in timm, the input is returned unchanged when the token count
    already matches and the grid is square (or ``old_size == new_size``).

    Args:
        pos_embed: ``(B, L, D)`` (B is 1 for a model's parameter), floating point.
        new_size: target grid ``(height, width)`` in patches, or an int for a square grid.
        old_size: current grid; None means square, ``sqrt(L - num_prefix_tokens)`` per side.
        num_prefix_tokens: leading entries that are not on the grid (0 for timm's
            ``no_embed_class`` models).
        interpolation: an ``F.interpolate`` mode: "nearest", "nearest-exact", "bilinear",
            "bicubic" (default) or "area".
        antialias: anti-aliasing when downsampling (bilinear / bicubic); default False here (timm's
            default is True; upsampling, the usual case, is unaffected).
        align_corners: passed to ``F.interpolate`` (None is its default).

    Returns:
        ``(B, num_prefix_tokens + new_h * new_w, D)`` in ``pos_embed``'s dtype.

    Raises:
        TypeError / ValueError naming the argument: a non-tensor or non-3-D ``pos_embed``, an empty
        one (B = 0, D = 0 or no grid tokens), bad sizes, a grid that does not match the token
        count, an unknown interpolation mode.
    """
    check_tensor("pos_embed", pos_embed, ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    new_size = _check_size("new_size", new_size)
    if old_size is not None:
        old_size = _check_size("old_size", old_size)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    num_prefix_tokens = int(num_prefix_tokens)
    length = pos_embed.shape[1]
    if not 0 <= num_prefix_tokens <= length:
        raise ValueError(
            f"num_prefix_tokens must be in [0, {length}] (pos_embed has {length} tokens), got {num_prefix_tokens}"
        )
    if interpolation not in _INTERPOLATION_MODES:
        raise ValueError(f"interpolation must be one of {_INTERPOLATION_MODES}, got {interpolation!r}")
    if not isinstance(antialias, bool):
        raise TypeError(f"antialias must be a bool, got {type(antialias).__name__}")

    batch, dim = pos_embed.shape[0], pos_embed.shape[2]
    if batch == 0 or dim == 0:
        raise ValueError(
            f"pos_embed must be non-empty (B >= 1 and D >= 1 in (B, L, D)), got shape {tuple(pos_embed.shape)}"
        )
    num_grid = length - num_prefix_tokens
    if num_grid == 0:
        raise ValueError(
            f"pos_embed has no grid tokens to resample: L = {length} with num_prefix_tokens={num_prefix_tokens} "
            f"(shape {tuple(pos_embed.shape)})"
        )
    if num_prefix_tokens + new_size[0] * new_size[1] == length:
        if old_size is not None and old_size == new_size:
            return pos_embed
        if old_size is None and new_size[0] == new_size[1]:
            return pos_embed
    if old_size is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"pos_embed has {num_grid} grid tokens ({length} minus num_prefix_tokens={num_prefix_tokens}), "
                "which is not a square grid: pass old_size"
            )
        old_size = (side, side)
    elif old_size[0] * old_size[1] != num_grid:
        raise ValueError(
            f"old_size {old_size} has {old_size[0] * old_size[1]} positions but pos_embed has {num_grid} grid "
            f"tokens ({length} minus num_prefix_tokens={num_prefix_tokens})"
        )

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(batch, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, align_corners=align_corners, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(batch, new_size[0] * new_size[1], dim).to(orig_dtype)
    if num_prefix_tokens:
        grid = torch.cat([prefix, grid], dim=1)
    return grid


# --------------------------------------------------------------------------------------------
# Backend registration
# --------------------------------------------------------------------------------------------

register_impl("patch_embed", "reference", patch_embed_ref)
register_impl("patch_embed", "triton", _patch_embed_triton, supports=_patch_embed_triton_supports)


# --------------------------------------------------------------------------------------------
# Static compile cases (vitkern.ops._compile_check): CPU tensors, nothing runs
# --------------------------------------------------------------------------------------------


def _compile_case(b, c, h, w, p, d, dtype, *, channels_last=False, weight_cl=False, n_prefix=1, pos="full",
                  bias=True, add_dtype=None, dw=True, dx=False, sums=True, config=None):
    """One forward and backward (as autograd would call them) on empty CPU tensors."""
    if channels_last:
        images = torch.empty(b, h, w, c, dtype=dtype).permute(0, 3, 1, 2)
    else:
        images = torch.empty(b, c, h, w, dtype=dtype)
    if weight_cl:
        weight = torch.empty(d, p, p, c, dtype=dtype).permute(0, 3, 1, 2)
    else:
        weight = torch.empty(d, c, p, p, dtype=dtype)
    n = (h // p) * (w // p)
    add_dtype = add_dtype or dtype
    bias_t = torch.empty(d, dtype=dtype) if bias else None
    prefix = torch.empty(1, n_prefix, d, dtype=add_dtype) if n_prefix else None
    pos_len = {"full": n_prefix + n, "patch": n, None: 0}[pos]
    pos_t = torch.empty(1, pos_len, d, dtype=add_dtype) if pos else None
    out = _patch_embed_fwd(images, weight, bias_t, pos_t, prefix, config=config)
    if dw or dx or sums:
        grad = torch.empty(out.shape, dtype=out.dtype)
        _patch_embed_bwd(grad, images, weight, dx, dw, dtype if bias and sums else None, n_prefix, pos_len,
                         add_dtype if pos and sums else None, add_dtype if n_prefix and sums else None,
                         config=config)


@compile_cases
def _patch_embed_cases():
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    # the benchmark shapes: ViT-B/16 and ViT-L/14 at 224 and 384 (378 = 27 x 14 for P = 14), batch 1
    # and large (forward, and the backward the benchmark runs: weight, bias, pos_embed and class
    # token gradients); channels-last images once
    for b, img in ((1, 224), (128, 224), (32, 384)):
        _compile_case(b, 3, img, img, 16, 768, bf16)
    for b, img in ((1, 224), (64, 224), (16, 378)):
        _compile_case(b, 3, img, img, 14, 1024, bf16)
    _compile_case(64, 3, 224, 224, 16, 768, bf16, channels_last=True)
    # the image gradient; fp16 channels-last images and weight, patch-only float32 pos_embed, five
    # prefix tokens without position embedding, no bias
    _compile_case(8, 3, 224, 224, 16, 768, bf16, dw=False, dx=True, sums=False)
    _compile_case(2, 4, 64, 96, 8, 192, f16, channels_last=True, weight_cl=True, n_prefix=5, pos="patch",
                  bias=False, add_dtype=f32, dx=True)
    # float32 (IEEE dots) with ragged K = 196, and TF32; no prefix tokens, no pos_embed
    _compile_case(2, 1, 56, 28, 14, 64, f32, n_prefix=0, pos=None, dx=True)
    prev = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        _compile_case(4, 3, 64, 64, 16, 192, f32, dx=True)
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev


@compile_cases(slow=True)
def _patch_embed_all_configs():
    """Every config the three GEMMs can select (each M / N bucket of the core's rules, and the
    overrides), for each dot precision, P = 16 and 14, NCHW and channels-last images."""
    prev = torch.backends.cuda.matmul.fp32_precision
    shapes = (
        # (B, image, P, D, channels_last): forward M = 16 (small), 256 (mid), 12544 / 16384 (large);
        # D = 64 (small N)
        (1, 64, 16, 768, False), (1, 224, 14, 1024, True), (64, 224, 16, 768, True), (64, 224, 14, 1024, False),
        (4, 224, 16, 64, False),
    )
    try:
        for dtype, precision in ((torch.bfloat16, "ieee"), (torch.float32, "tf32"), (torch.float32, "ieee")):
            torch.backends.cuda.matmul.fp32_precision = precision
            for b, img, p, d, cl in shapes:
                _compile_case(b, 3, img, img, p, d, dtype, channels_last=cl, dx=True)
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev

