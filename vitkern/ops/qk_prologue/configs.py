"""The prologue kernels' configs: a BLOCK_T x BLOCK_D tile of about 2048 (forward) / 1024
(backward: dy, x, their partner loads, the tables and the statistics live at once) elements,
4 warps: 16 values per thread and tensor in the forward, every load 16 bytes wide at D >= 64.
Memory bound (~10 FLOP per element): the tiles are sized for resident blocks, not for reuse; at
4096 elements the fp32 forward at D = 72 needed 250 / 255 registers (sm_80 / sm_90)."""

from __future__ import annotations

from vitkern.ops._config import KernelConfig

#: Head dims the Triton prologue takes (one tile spans the head dim).
MAX_HEAD_DIM = 256


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _prologue_config(head_dim: int, backward: bool) -> KernelConfig:
    block_d = _block_d(head_dim)
    block_t = max(1, (1024 if backward else 2048) // block_d)
    return KernelConfig({"BLOCK_T": block_t, "BLOCK_D": block_d}, num_warps=4, num_stages=1)
