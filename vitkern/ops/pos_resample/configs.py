"""The resampling kernel's config: BLOCK_R rows by BLOCK_D columns, 4 warps. Each tap is a
gathered BLOCK_R x BLOCK_D load of the learned grid (an L2 hit: the grid of a ViT-B NaFlex model
is 16 x 16 x 768 elements) and one FMA per element, so the tile is sized for resident programs
and 16-byte loads along D, not for reuse."""

from __future__ import annotations

from vitkern.ops._config import KernelConfig


def _resample_config(dim: int) -> KernelConfig:
    block_d = min(128, max(16, 1 << (dim - 1).bit_length()))
    return KernelConfig({"BLOCK_R": 4096 // block_d // 2, "BLOCK_D": block_d}, num_warps=4, num_stages=1)
