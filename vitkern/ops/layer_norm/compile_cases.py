"""The LayerNorm launches of the static compile check (``vitkern.testing.compile_check``): the
launchers run on empty CPU tensors under its capture, so the kernels are specialised and
compiled for sm_80 / sm_90 but nothing runs."""

from __future__ import annotations

import torch

from vitkern.ops._common import FLOAT_DTYPES
from vitkern.testing.compile_check import compile_cases
from vitkern.ops.layer_norm.configs import _FWD_CONFIGS, _MAX_FUSED_N
from vitkern.ops.layer_norm.launch import _layer_norm_bwd, _layer_norm_fwd


def _compile_case(shape, dtype, *, affine=True, residual=False, res_dtype=None, backward=True, view=None):
    n = shape[-1]
    x = torch.empty(shape, dtype=dtype)
    if view is not None:
        x = view(x)
        n = x.shape[-1]
    w = torch.empty(n, dtype=dtype) if affine else None
    b = torch.empty(n, dtype=dtype) if affine else None
    r = torch.empty(x.shape, dtype=res_dtype or dtype) if residual else None
    y, s, mean, rstd = _layer_norm_fwd(x, r, w, b, 1e-6)
    if backward:
        src = s if residual else x
        # an fp32 sum of a 16-bit x: its gradient is written in x's dtype too (the 16-bit stream)
        low = dtype if residual and src.dtype != dtype else None
        _layer_norm_bwd(torch.empty(src.shape, dtype=src.dtype), src, w, mean, rstd,
                        torch.empty_like(src) if residual else None, affine, b.dtype if affine else None, low)


@compile_cases
def _layer_norm_cases():
    # the benchmark shapes (bf16, ViT-B / L / H), with and without the residual
    for rows, n in ((128 * 197, 768), (128 * 197, 1024), (64 * 257, 1280)):
        _compile_case((rows, n), torch.bfloat16)
        _compile_case((rows, n), torch.bfloat16, residual=True)
    # every kernel variant once: dtypes, no affine, an fp32 residual stream, a misaligned row
    # stride, an expanded gradient, narrow and looped widths
    _compile_case((2, 197, 192), torch.float32, affine=False)
    _compile_case((197, 1152), torch.float32)  # two pieces, fp32
    _compile_case((197, 6144), torch.bfloat16, residual=True)  # two pieces at 8 warps
    _compile_case((2, 197, 384), torch.float16, residual=True, res_dtype=torch.float32)
    _compile_case((197, 1001), torch.bfloat16, view=lambda t: t[:, 1:])
    x = torch.empty(197, 8192, dtype=torch.bfloat16)
    w = torch.empty(8192, dtype=torch.bfloat16)
    _, _, mean, rstd = _layer_norm_fwd(x, None, w, w, 1e-6)
    _layer_norm_bwd(torch.empty((), dtype=torch.bfloat16).expand(x.shape), x, w, mean, rstd, None, True, w.dtype)
    _compile_case((197, 16384), torch.bfloat16)
    _compile_case((197, 16384), torch.float32, affine=False, residual=True)
    _compile_case((197, 16384), torch.bfloat16, residual=True, res_dtype=torch.float32)
    _compile_case((128 * 197, 768), torch.bfloat16, residual=True, res_dtype=torch.float32)
    # a pre-norm under autocast: float32 rows normalised into bf16 (out_dtype), and the backward
    # of its bf16 output gradient into the float32 stream, at ViT-B / ViT-H widths
    for n in (384, 768, 1024, 1152, 1280, 1536, 3072):
        x = torch.empty(128 * 197, n, dtype=torch.float32)
        w = torch.empty(n, dtype=torch.float32)
        _, _, mean, rstd = _layer_norm_fwd(x, None, w, w, 1e-6, torch.bfloat16)
        _layer_norm_bwd(torch.empty(x.shape, dtype=torch.bfloat16), x, w, mean, rstd, None, True, w.dtype)


@compile_cases(slow=True)
def _layer_norm_all_configs():
    # every config of every kernel, each dtype, each flag combination
    # one-piece widths (each table entry), two-piece widths (every head entry with a tail), looped
    widths = sorted(_FWD_CONFIGS) + [192, 384, 768, 1152, 1280, 3072, 6144] + [2 * _MAX_FUSED_N]
    for dtype in FLOAT_DTYPES:
        for n in widths:
            for affine in (False, True):
                for residual in (False, True):
                    _compile_case((4, n), dtype, affine=affine, residual=residual)
