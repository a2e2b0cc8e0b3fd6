"""The LayerNorm kernels' configs, as data, and the rules that pick one for a row width (and, in
backward, the arch). Rows up to ``_MAX_FUSED_N`` take the register-path kernels, wider rows the
looped kernels; the pickers say which with their first value.

Under the interpreter (the CPU tests) blocks take more rows: ``_for_interpreter``.
"""

from __future__ import annotations

import dataclasses

from typing import Optional

import torch

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
# grid is programs_per_sm x SM count, no more than fit on the SMs at once (the blocks per SM of
# the static check, the minimum over dtypes and flags, >= programs_per_sm: tested), so that no
# program starts in a second wave. NUM_STAGES 3 keeps the next two row blocks in flight
# (cp.async into shared memory: 8 KB per program for bf16 rows of 1024), 5 programs per SM at
# widths 513..1024: for ViT-B (768, bf16) 5 x 2 x 3 KB = 30 KB per SM in flight, against ~20 KB
# that 4.3 TB/s over 132 SMs needs at ~600 ns latency (4 programs x 1 row x 3 KB = 12 KB before);
# ViT-H (1280): 3 x 2 x 5 KB = 30 KB (was 2 x 5 KB = 10 KB).
# At 4096 with 16 warps NUM_STAGES 2 spilled 8 bytes on sm_90 for fp32 with HAS_DS, hence 1 there.
# Next to each entry: registers sm_80 / sm_90 (max over dtypes and flags, --full), then the
# fewest blocks per SM over the entry's variants.
_BWD_CONFIGS: dict[int, tuple[KernelConfig, int]] = {
    128: (KernelConfig({"BLOCK_M": 8, "BLOCK_N": 128, "NUM_STAGES": 2}, num_warps=4, num_stages=1), 6),  # 80 / 80, 6
    256: (KernelConfig({"BLOCK_M": 4, "BLOCK_N": 256, "NUM_STAGES": 3}, num_warps=4, num_stages=1), 5),  # 80 / 85, 5
    # 5: the fp32 sum with its 16-bit gradient copy (DX_LOW) takes 28 KB of shared memory on sm_80
    # (24 KB without the copy: 6 blocks)
    512: (KernelConfig({"BLOCK_M": 2, "BLOCK_N": 512, "NUM_STAGES": 3}, num_warps=4, num_stages=1), 5),  # 80 / 80, 5
    1024: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 1024, "NUM_STAGES": 3}, num_warps=4, num_stages=1), 5),  # 80 / 89, 5
    2048: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 2048, "NUM_STAGES": 3}, num_warps=8, num_stages=1), 3),  # 74 / 75, 3
    4096: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 4096, "NUM_STAGES": 1}, num_warps=16, num_stages=1), 1),  # 64 / 72, 1
    8192: (KernelConfig({"BLOCK_M": 1, "BLOCK_N": 8192, "NUM_STAGES": 1}, num_warps=16, num_stages=1), 1),  # 128 / -, 1
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
# The dW / dB reduction: each program sums a (G, BLOCK_N) column strip of the partials (L2
# resident) in BLOCK_G-row steps, a 1024-element tile per step. 16 columns (64-byte segments)
# per program where that gives at least one program per SM, else 8 (32-byte sectors: no wasted
# bytes) over twice the rows per step: at 768, 96 programs and half the steps of 48 x 16.
_DWDB_CONFIGS = {
    16: KernelConfig({"BLOCK_G": 64, "BLOCK_N": 16, "NUM_STAGES": 2}, num_warps=4, num_stages=1),  # 40 / 39
    8: KernelConfig({"BLOCK_G": 128, "BLOCK_N": 8, "NUM_STAGES": 2}, num_warps=4, num_stages=1),  # 56 / 56
}
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


#: The smallest second piece of a two-piece row (narrower tails round up to it).
_MIN_PIECE = 32
#: Piece pairs kept as one piece: 1536 = 1024 + 512 spilled 8 bytes on sm_80 under Triton 3.6
#: (fp16, 4 warps; 8 warps spill 16-bit rows elsewhere), so it stays one 2048-wide piece.
_ROW_PIECES_EXCLUDED = {(1024, 512)}


def _row_pieces(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_N2) of the register paths (forward and backward) for width ``n`` (1..8192): the row as
    one power-of-two piece, or as two (the largest power of two <= n, then the next power of two
    >= the rest, at least _MIN_PIECE) where those hold fewer padded lanes: 768 = 512 + 256, 1280 =
    1024 + 256, 1152 = 1024 + 128, 384 = 256 + 128, 192 = 128 + 64 (no padding); 1000 and 197 keep
    one piece (1024, 256: two pieces would pad as much), and so do the pairs in
    _ROW_PIECES_EXCLUDED."""
    single = _block_n(n)
    head = 1 << (n.bit_length() - 1)
    rest = n - head
    if head < 128 or rest == 0:
        return single, 0
    tail = max(_MIN_PIECE, 1 << (rest - 1).bit_length())
    if head + tail >= single or (head, tail) in _ROW_PIECES_EXCLUDED:
        return single, 0
    return head, tail


def _fwd_config(n: int, dtype: torch.dtype = torch.bfloat16,
                out_dtype: Optional[torch.dtype] = None) -> tuple[bool, KernelConfig]:
    """(looped, config) of the forward kernel for width ``n``, ``dtype`` rows and an ``out_dtype``
    output (None: the rows' dtype). A two-piece row takes its first piece's entry. For fp32 rows
    with an fp32 output under 8 warps the warps double, so a thread holds no more elements than in
    a one-piece tile: with the entry's 4 warps the fp32 rows of 1536 and 384 spilled 4 bytes on
    sm_90 under Triton 3.8. 16-bit rows keep the entry's warps: doubled, 768 spilled 8 bytes on
    sm_90 under Triton 3.6 (ptxas kept 32 registers); so do fp32 rows written in 16 bits (a
    pre-norm under autocast): doubled, 1280 spilled 8 bytes on sm_90 under 3.8 (40 registers); at
    the entry's warps every width from 384 to 4096 holds at 48-72 registers on both versions."""
    if n > _MAX_FUSED_N:
        return True, _for_interpreter(_FWD_LOOPED_CONFIG)
    head, tail = _row_pieces(n)
    config = _FWD_CONFIGS[head]
    if tail and dtype == torch.float32 and out_dtype in (None, torch.float32) and config.num_warps < 8:
        config = dataclasses.replace(config, num_warps=2 * config.num_warps)
    config = dataclasses.replace(config, meta={**config.meta, "BLOCK_N2": tail})
    return False, _for_interpreter(config)


def _bwd_config(n: int, device=None, narrow_dy: bool = False) -> tuple[bool, KernelConfig, int]:
    """(looped, config, programs per SM) of the backward kernel for width ``n`` on ``device``'s
    arch (None: the current device's). ``narrow_dy``: the output gradient is narrower than the
    rows (a pre-norm's 16-bit output on a float32 stream, ``out_dtype``); its entries prefetch two
    row blocks instead of three (``NUM_STAGES`` 3 -> 2): at three, Triton 3.6 spilled 4 bytes at
    768 (sm_90, 72 registers) and fell to 2 blocks per SM at 1152 (94 registers, the entry runs
    3); at two, 72-80 registers and the entry's programs per SM at 384..1536 on both versions.
    The bytes in flight per program fall by a third (6 bytes an element where fp32 rows with an
    fp32 gradient move 8)."""
    if n > _MAX_FUSED_N:
        config, per_sm = _BWD_LOOPED_CONFIG
        return True, _for_interpreter(config), per_sm
    block_n = _block_n(n)
    table = _BWD_CONFIGS_SM90 if block_n in _BWD_CONFIGS_SM90 and device_arch(device) == 90 else _BWD_CONFIGS
    config, per_sm = table[block_n]
    # a two-piece row keeps its one-piece entry (rows per block, warps, stages, programs per SM)
    # and holds fewer elements: no more registers or shared memory per program than the entry's
    head, tail = _row_pieces(n)
    meta = {**config.meta, "BLOCK_N": head, "BLOCK_N2": tail}
    if narrow_dy and meta["NUM_STAGES"] == 3:
        meta["NUM_STAGES"] = 2
    config = dataclasses.replace(config, meta=meta)
    return False, _for_interpreter(config), per_sm


def _dwdb_splits(partial_rows: int, n: int, config: KernelConfig, sms: int) -> int:
    """Row splits of the dW / dB reduction (a pure function): enough that column strips x splits
    >= ``sms`` programs, each split keeping at least one BLOCK_G step of the ``partial_rows``; 1
    when the strips alone fill the SMs (a second, one-split launch sums the splits' partials).
    ViT-B (768, 660 partial rows, 8-column strips) on 132 SMs: 96 strips -> 2 splits, 192
    programs; ViT-H (1280): 160 strips, 1 split."""
    strips = -(-n // config.meta["BLOCK_N"])
    wanted = -(-sms // strips)
    return max(1, min(wanted, partial_rows // config.meta["BLOCK_G"]))


def _dwdb_config(n: int, sms: int) -> KernelConfig:
    """The dW / dB reduction's config for width ``n`` on ``sms`` free SMs (a pure function)."""
    wide = _DWDB_CONFIGS[16]
    if -(-n // wide.meta["BLOCK_N"]) >= sms:
        return wide
    return _DWDB_CONFIGS[8]
