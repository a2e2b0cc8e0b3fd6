"""The pixel order of the patch GEMMs, shared by the launchers and the backward ops' fakes (torch
only): pixel k of a patch is taken in the images' own order, (i, j, c) for channels-last images
and (c, i, j) otherwise, and the weight and its gradient are laid out to match (the Triton
backend); the "cuda" backend's padded K and its weight gradient's layout (``_cuda_dw``)."""

from __future__ import annotations

import torch


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


def _dw_layout(weight: torch.Tensor, cl_k: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The weight gradient's storage in the pixel order: the shape to allocate ((D, PH, PW, C) for
    (i, j, c), the weight's (D, C, PH, PW) otherwise) and the permutation that views it with the
    weight's dims (channels-last strides for (i, j, c))."""
    d, c, ph, pw = weight.shape
    if cl_k:
        return (d, ph, pw, c), (0, 3, 1, 2)
    return (d, c, ph, pw), (0, 1, 2, 3)


# The "cuda" backend (csrc/patch_embed.cpp) runs its patch GEMMs with K' = C * PH * PW rounded up
# to a whole number of 16 bytes of elements, zero columns in both the patch matrix and the weight:
# rows of 588 bf16 values (P = 14, C = 3: 1176 bytes) are only 8-byte aligned, which limits
# cuBLASLt to its slower kernels. The weight gradient is the first K columns of its (D, K') GEMM
# output, returned as a view (row stride K'), so the padding never reaches the caller.


def _cuda_patch_k(k: int, itemsize: int) -> int:
    """K' of the "cuda" backend's patch GEMMs for K pixels of ``itemsize`` bytes (the same rule as
    csrc/patchify.h's padded_patch_k; a test compares the two)."""
    per_16_bytes = 16 // itemsize
    return -(-k // per_16_bytes) * per_16_bytes


def _cuda_dw(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised weight gradient laid out as the "cuda" backend returns it: the weight's
    shape (D, C, PH, PW), viewing the first K columns of a (D, K') buffer."""
    d, c, ph, pw = weight.shape
    k = c * ph * pw
    buffer = weight.new_empty((d, _cuda_patch_k(k, weight.element_size())))
    return buffer[:, :k].view(d, c, ph, pw)
