"""The LayerNorm kernels' configs, as data, and the rules that pick one for a row width (and, in
backward, the arch). Rows up to ``_MAX_FUSED_N`` take the register-path kernels, wider rows the
looped kernels; the pickers say which with their first value.

Under the interpreter (the CPU tests) blocks take more rows: ``_for_interpreter``.
"""

from __future__ import annotations

import dataclasses

from vitkern.ops._config import device_arch, INTERPRETING, KernelConfig


# Rows up to _MAX_FUSED_N wide live in registers, BLOCK_N = next power of two >= max(N, 128);
# wider rows take the looped kernels. The tables give each BLOCK_N about 16 elements per thread
# (two 16-byte vectors of 16-bit data). Next to each entry: registers per thread from ptxas,
# sm_80 / sm_90, the maximum over dtypes and flags (vitkern.testing.compile_check --full); every
# entry compiles without spills on both.

_MAX_FUSED_N = 8192
#: Widest row the Triton backend takes (the looped kernels work beyond it; this bounds the dW /
#: dB partial buffers and what the tests cover).
MAX_WIDTH = 65536

_FWD_CONFIGS: dict[int, KernelConfig] = {
    128: KernelConfig({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4, num_stages=1),   # 48 / 50
    256: KernelConfig({"BLOCK_M": 8, "BLOCK_N": 256}, num_warps=4, num_stages=1),    # 64 / 56
    512: KernelConfig({"BLOCK_M": 4, "BLOCK_N": 512}, num_warps=4, num_stages=1),    # 54 / 56
    1024: KernelConfig({"BLOCK_M": 2, "BLOCK_N": 1024}, num_warps=4, num_stages=1),  # 64 / 56
    2048: KernelConfig({"BLOCK_M": 1, "BLOCK_N": 2048}, num_warps=4, num_stages=1),  # 40 / 44
    4096: KernelConfig({"BLOCK_M": 1, "BLOCK_N": 4096}, num_warps=8, num_stages=1),  # 48 / 46
    8192: KernelConfig({"BLOCK_M": 1, "BLOCK_N": 8192}, num_warps=16, num_stages=1), # 64 / 64
}
_FWD_LOOPED_CONFIG = KernelConfig({"BLOCK_M": 1, "BLOCK_N": 4096}, num_warps=8, num_stages=1)  # 40 / 54

# Backward holds x, dy, w, xhat and two accumulators per element: fewer rows per program. The
# grid is programs_per_sm x SM count, no more than fit on the SMs at once (registers: the
# 4-warp configs use <= 80, so 6 would fit), so that no program starts in a second wave; fewer
# programs mean fewer partials to reduce. NUM_STAGES 2 prefetches the next row block (cp.async;
# at 4096 with 16 warps it spilled 8 bytes on sm_90 for fp32 with HAS_DS, hence 1 there).
_BWD_CONFIGS: dict[int, tuple[KernelConfig, int]] = {
    128: (KernelConfig({"BLOCK_M": 8, "BLOCK_N": 128, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 80 / 80
    256: (KernelConfig({"BLOCK_M": 4, "BLOCK_N": 256, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 80 / 80
    512: (KernelConfig({"BLOCK_M": 2, "BLOCK_N": 512, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 72 / 80
    1024: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 1024, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 4),  # 79 / 80
    2048: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 2048, "NUM_STAGES": 2}, num_warps=8, num_stages=1), 2),  # 72 / 72
    4096: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 4096, "NUM_STAGES": 1}, num_warps=16, num_stages=1), 1),  # 64 / 72
    8192: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 8192, "NUM_STAGES": 1}, num_warps=16, num_stages=1), 1),  # 128 / 128
}
# The sm_90 family at 8192: 16 warps cap a thread at 128 registers, where Triton 3.6 spills 8 bytes
# (3.8 fits in 125); 8 warps compile to 254 / 255 registers (3.8 / 3.6) without spills, still one
# program per SM. On sm_80, 16 warps hold on both versions and 8 warps spill under 3.6.
_BWD_CONFIGS_SM90 = {
    8192: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 8192, "NUM_STAGES": 1}, num_warps=8, num_stages=1), 1),
}
# Wide rows: 4 rows per step, so each program's read-modify-write of its partial row (L2
# resident: 2 x programs x N x 4 bytes) is amortised over 4 rows.
_BWD_LOOPED_CONFIG = (KernelConfig({"BLOCK_M": 4, "BLOCK_N": 1024}, num_warps=8, num_stages=1), 2)  # 102 / 128
# 16 columns (64-byte segments of each partial row) per program: N / 16 programs, 48 at 768.
_DWDB_CONFIG = KernelConfig({"BLOCK_G": 64, "BLOCK_N": 16, "NUM_STAGES": 2}, num_warps=4, num_stages=1)  # 56 / 56
# Cap on the two fp32 partial buffers together (bytes): bounds the persistent grid at wide rows.
_PARTIAL_BYTES_CAP = 64 << 20


def _block_n(n: int) -> int:
    """BLOCK_N of the register path for width ``n`` >= 1: the next power of two >= max(n, 128)."""
    return max(128, 1 << (n - 1).bit_length())


# The interpreter's cost is per block operation, not per element: under it, blocks take more
# rows (same kernels, same BLOCK_N and chunking) so that the CPU tests stay fast. The tests also
# run the GPU configs unchanged, at small row counts.
_WIDE_INTERPRETER_BLOCKS = INTERPRETING
_INTERPRETER_BLOCK_ELEMENTS = 65536


def _for_interpreter(config: KernelConfig, grow: str = "BLOCK_M", other: str = "BLOCK_N") -> KernelConfig:
    """Under the interpreter, ``grow`` (a block dim) enlarged to _INTERPRETER_BLOCK_ELEMENTS / ``other``."""
    if not _WIDE_INTERPRETER_BLOCKS:
        return config
    meta = dict(config.meta)
    meta[grow] = max(meta[grow], _INTERPRETER_BLOCK_ELEMENTS // meta[other])
    return dataclasses.replace(config, meta=meta)


def _fwd_config(n: int) -> tuple[bool, KernelConfig]:
    """(looped, config) of the forward kernel for width ``n``."""
    if n > _MAX_FUSED_N:
        return True, _for_interpreter(_FWD_LOOPED_CONFIG)
    return False, _for_interpreter(_FWD_CONFIGS[_block_n(n)])


def _bwd_config(n: int, device=None) -> tuple[bool, KernelConfig, int]:
    """(looped, config, programs per SM) of the backward kernel for width ``n`` on ``device``'s
    arch (None: the current device's)."""
    if n > _MAX_FUSED_N:
        config, per_sm = _BWD_LOOPED_CONFIG
        return True, _for_interpreter(config), per_sm
    block_n = _block_n(n)
    table = _BWD_CONFIGS_SM90 if block_n in _BWD_CONFIGS_SM90 and device_arch(device) == 90 else _BWD_CONFIGS
    config, per_sm = table[block_n]
    return False, _for_interpreter(config), per_sm
