"""The patch-embedding launches of the static compile check (``vitkern.testing.compile_check``): the
launchers run on empty CPU tensors under its capture, so the kernels are specialised and
compiled for sm_80 / sm_90 but nothing runs."""

from __future__ import annotations

import torch

from vitkern.testing.compile_check import compile_cases
from vitkern.ops.patch_embed.launch import _patch_embed_bwd, _patch_embed_fwd


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
