"""The patch-embedding configs, as data, and the rule that picks the config of each of its three
GEMMs (forward, weight gradient, image gradient) for the arch, the dot precision and the pixel
runs of the gathers."""

from __future__ import annotations

import torch

from vitkern.ops import gemm as _gemm
from vitkern.ops._config import device_arch, KernelConfig


# The GEMMs take the GEMM core's configs (vitkern.ops.gemm.select_config on (M, N, K); the
# overrides below where those spilled):
#   forward  M = B * N patches, N = D, K = C * PH * PW
#   dW^T     M = C * PH * PW,   N = D, K = B * T token rows (split-K when the tiles are few)
#   dX       M = B * N patches, N = C * PH * PW, K = D
# The column sum streams dY once: BLOCK elements of the (T, D) plane per program, the batch split
# so that there are about _COLSUM_PROGRAMS_PER_SM programs per SM.

# The forward GEMM's K bound is padded to a multiple of this (see launch._patch_embed_fwd).
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


def _wide_runs(img: tuple) -> bool:
    """Whether the gathered pixel runs are at least 8 pixels (16-byte bf16 vectors) long (``img``:
    the gathers' image geometry, see ``launch._image_args``)."""
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
