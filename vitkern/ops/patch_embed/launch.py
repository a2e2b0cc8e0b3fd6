"""The patch-embedding launchers: argument guards, the gathers' geometry and int32 range checks,
output allocation, and the GEMM-core launches (forward, weight gradient, image gradient) plus the
column sums of the backward.

Strides of every operand are taken as they are (expanded gradients with stride 0 included);
pixels are read in the images' order (see :mod:`vitkern.ops.patch_embed.layout`), the weight as
a (D, K) matrix in that order (a view when its layout matches, else a small copy), its rows
zero-padded when C * PH * PW is not a multiple of 16 (588 for 14 x 14 x 3: without it neither
GEMM operand vectorises).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vitkern.ops.gemm import Epilogue, launch as _gemm
from vitkern.ops._config import INTERPRETING, available_sms
from vitkern.ops._triton import capturing, launch
from vitkern.ops._index import check_int32
from vitkern.ops.patch_embed.configs import (
    _COLSUM_CONFIG,
    _COLSUM_MAX_SPLIT,
    _COLSUM_PROGRAMS_PER_SM,
    _K_ALIGN,
    _select_config,
)
from vitkern.ops.patch_embed.kernels import (
    _dw_gather,
    _dx_cols,
    _dx_gather,
    _dx_rows,
    _fwd_gather,
    _fwd_prefix,
    _fwd_rows,
    _patch_embed_colsum_kernel,
)
from vitkern.ops.patch_embed.layout import _channels_last_k, _dw_layout, _weight_matrix
from vitkern.ops.patch_embed.reference import _out_dtype


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` (keeps a channels-last layout); patched like ``_empty`` by the tests."""
    return torch.empty_like(t)


def _dw_buffer(weight: torch.Tensor, cl_k: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight gradient (the weight's shape, laid out in the pixel order: channels-last strides
    for (i, j, c)) and its (D, K) matrix view."""
    shape, perm = _dw_layout(weight, cl_k)
    buf = _empty(shape, weight.dtype, device or weight.device)
    return buf.permute(perm), buf.view(shape[0], -1)


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
        images, wmat, out.view(b * t, d), Epilogue(bias=bias, residual=pos2),
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
        split = max(1, min(_COLSUM_MAX_SPLIT, b, (available_sms(dy.device) * _COLSUM_PROGRAMS_PER_SM) // blocks))
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
