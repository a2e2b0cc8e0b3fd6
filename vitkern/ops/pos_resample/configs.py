"""The resampling kernel's config: BLOCK_R rows by BLOCK_D columns, 4 warps. Each tap is a
gathered BLOCK_R x BLOCK_D load of the learned grid (an L2 hit: the grid of a ViT-B NaFlex model
is 16 x 16 x 768 elements) and one FMA per element, so the tile is sized for resident programs
and 16-byte loads along D, not for reuse."""

from __future__ import annotations

from vitkern.ops._config import KernelConfig


def _resample_config(dim: int) -> KernelConfig:
    """2048 elements a program: 16 x 128 with 4 warps; narrower tables take more rows and 8 warps
    (32 x 64 with 4 warps compiled to 255 registers on sm_80 / sm_90 in fp32, with 8 to 40)."""
    block_d = min(128, max(16, 1 << (dim - 1).bit_length()))
    return KernelConfig({"BLOCK_R": 2048 // block_d, "BLOCK_D": block_d}, num_warps=4 if block_d == 128 else 8,
                        num_stages=1)
