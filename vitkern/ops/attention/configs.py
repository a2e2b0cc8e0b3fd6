"""Attention's kernel configs as data, and the functions that pick one for a call.

Configs are data (_ATTN_CONFIGS, _ATTN_MASKED_CONFIGS), per kernel, arch family, precision class
and padded head width; each entry compiles for its arch without spills (the static check,
vitkern.testing.compile_check, compiles every entry through the slow compile cases).

Head dims: Triton tiles are powers of two, so D is split into two power-of-two pieces, each with
its own dots and accumulator (80 = 64 + 16, 96 = 64 + 32, 72 = 64 + 16 with the last 8 columns
masked) rather than padded to the next power of two (80 -> 128 is 60% more MMA work); a split
that saves nothing over padding (e.g. 112 -> 64 + 64) pads instead, and fp32 always pads
(:func:`_attn_pieces`). The kernels take head dims that are multiples of 8 from 16 to 256
(:data:`ATTENTION_HEAD_DIMS`).
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._config import KernelConfig, TRITON_36


# --------------------------------------------------------------------------------------------
# Configs (data): per kernel, arch family and precision class, (max padded head width, config)
# --------------------------------------------------------------------------------------------
# Each entry compiles without spills for the head dims of its class on its arch (the register,
# spill and shared-memory figures are in the static compile check's rows). Precision classes:
# "16bit" (fp16 / bf16), "tf32" and "ieee" (fp32 following torch's matmul precision; IEEE fp32
# dots run on FMA units and need small tiles). Padded head width = the two pieces' sum.
# Both Triton versions the project runs on (3.8 here, 3.6 on the GPU machines) allocate registers
# differently; the entries marked "3.6" replace tiles that spilled there (figures: registers under
# 3.6 / 3.8 for the causal, key-padding variant, the heaviest).


def _attn_cfg(arch: int, block_m: int, block_n: int, warps: int, stages: int) -> KernelConfig:
    return KernelConfig({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages, archs=(arch,))


_ATTN_CONFIGS: dict[tuple[str, int, str], tuple[tuple[int, KernelConfig], ...]] = {
    # ---- sm_90 (H100 / H200): wgmma for 16-bit and TF32 dots with 64+ rows per warp group
    # 3.6: 48 (40 = 32 + 16) spilled 16 bytes with 128 x 128 tiles, 256 spilled 8 with 128 x 64
    ("fwd", 90, "16bit"): ((48, _attn_cfg(90, 128, 64, 8, 3)), (64, _attn_cfg(90, 128, 128, 8, 3)),
                           (128, _attn_cfg(90, 128, 64, 8, 3)), (256, _attn_cfg(90, 128, 32, 8, 2))),
    # 3.6: 48 spilled 12 bytes with 64 x 128 tiles
    ("dkdv", 90, "16bit"): ((48, _attn_cfg(90, 64, 64, 8, 2)), (64, _attn_cfg(90, 64, 128, 8, 2)),
                            (128, _attn_cfg(90, 32, 128, 8, 2)), (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "16bit"): ((64, _attn_cfg(90, 128, 64, 8, 2)), (128, _attn_cfg(90, 128, 64, 8, 2)),
                          (256, _attn_cfg(90, 128, 32, 8, 2))),
    ("fwd", 90, "tf32"): ((64, _attn_cfg(90, 64, 64, 4, 2)), (128, _attn_cfg(90, 64, 32, 4, 2)),
                          (256, _attn_cfg(90, 16, 32, 4, 1))),
    ("dkdv", 90, "tf32"): ((64, _attn_cfg(90, 32, 32, 4, 1)), (128, _attn_cfg(90, 16, 32, 4, 1)),
                           (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "tf32"): ((64, _attn_cfg(90, 64, 32, 4, 1)), (128, _attn_cfg(90, 32, 32, 4, 1)),
                         (256, _attn_cfg(90, 32, 16, 4, 1))),
    ("fwd", 90, "ieee"): ((64, _attn_cfg(90, 16, 32, 4, 1)), (256, _attn_cfg(90, 16, 16, 4, 1))),
    # 3.6: 16 warps (128 registers a thread) spilled 4 bytes at 128, 8 warps 8 bytes at 256 (a
    # causal, key-padding variant, where 16 warps hold: 84..106); 4 warps spill on both
    ("dkdv", 90, "ieee"): ((128, _attn_cfg(90, 16, 16, 8, 1)), (256, _attn_cfg(90, 16, 16, 16, 1))),
    ("dq", 90, "ieee"): ((64, _attn_cfg(90, 32, 16, 4, 1)), (256, _attn_cfg(90, 16, 16, 4, 1))),
    # ---- sm_80 (A100) and the other non-sm_90 parts: mma.sync, operands in registers
    ("fwd", 80, "16bit"): ((64, _attn_cfg(80, 128, 64, 8, 3)), (128, _attn_cfg(80, 128, 32, 8, 2)),
                           (256, _attn_cfg(80, 32, 16, 8, 2))),
    # 3.6: 256 spilled 12 bytes with 8 warps (128 registers a thread at 16 x 16)
    ("dkdv", 80, "16bit"): ((64, _attn_cfg(80, 32, 128, 8, 2)), (128, _attn_cfg(80, 16, 64, 8, 2)),
                            (256, _attn_cfg(80, 16, 16, 4, 1))),
    ("dq", 80, "16bit"): ((64, _attn_cfg(80, 128, 64, 8, 2)), (128, _attn_cfg(80, 128, 32, 8, 2)),
                          (256, _attn_cfg(80, 32, 32, 8, 2))),
    ("fwd", 80, "tf32"): ((64, _attn_cfg(80, 64, 64, 4, 2)), (128, _attn_cfg(80, 32, 32, 4, 1)),
                          (256, _attn_cfg(80, 16, 32, 4, 1))),
    # 3.6: 64 spilled 16 bytes with 4 warps
    ("dkdv", 80, "tf32"): ((64, _attn_cfg(80, 32, 32, 8, 1)), (128, _attn_cfg(80, 16, 32, 4, 1)),
                           (256, _attn_cfg(80, 16, 16, 8, 1))),
    ("dq", 80, "tf32"): ((64, _attn_cfg(80, 64, 32, 4, 1)), (128, _attn_cfg(80, 32, 16, 4, 1)),
                         (256, _attn_cfg(80, 16, 16, 4, 1))),
    ("fwd", 80, "ieee"): ((64, _attn_cfg(80, 16, 32, 4, 1)), (128, _attn_cfg(80, 16, 16, 4, 1)),
                          (256, _attn_cfg(80, 16, 16, 8, 1))),
    # Up to 128 no 16 x 16 tile holds on both versions: 16 warps spill 12 bytes at 72 under 3.6, 8
    # warps 8-16 bytes at 72 / 128 under 3.8, 4 warps 4 bytes at 64 under 3.8. At 256, 32 x 16
    # tiles with 8 warps hold on both (128..176 / 128..255 registers).
    ("dkdv", 80, "ieee"): ((128, _attn_cfg(80, 16, 16, 8 if TRITON_36 else 16, 1)),
                           (256, _attn_cfg(80, 32, 16, 8, 1))),
    ("dq", 80, "ieee"): ((64, _attn_cfg(80, 32, 16, 4, 1)), (256, _attn_cfg(80, 16, 16, 4, 1))),
}

# Head dims whose last tile has a masked tail (72 = 64 + 16 with 8 masked, 88, 104..120, 136..152,
# 168..184, 200..248) need more registers for the same tiles: where a table is given here it
# replaces the one above for them (every width listed).
_ATTN_MASKED_CONFIGS: dict[tuple[str, int, str], tuple[tuple[int, KernelConfig], ...]] = {
    # 3.6: 256 (200) spilled 140 bytes with 64 x 16 tiles; 48 (40 = 32 + 16, 8 masked) 16 with 128 x 128
    ("fwd", 90, "16bit"): ((48, _attn_cfg(90, 128, 64, 8, 3)), (64, _attn_cfg(90, 128, 128, 8, 3)),
                           (128, _attn_cfg(90, 128, 64, 8, 3)), (256, _attn_cfg(90, 32, 16, 8, 2))),
    # 3.6: 48 (40) spilled 12 bytes with 64 x 128 tiles
    ("dkdv", 90, "16bit"): ((48, _attn_cfg(90, 64, 64, 8, 2)), (64, _attn_cfg(90, 64, 128, 8, 2)),
                            (96, _attn_cfg(90, 16, 64, 8, 2)),
                            (128, _attn_cfg(90, 32, 32, 8, 2)), (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "16bit"): ((64, _attn_cfg(90, 128, 64, 8, 2)), (128, _attn_cfg(90, 64, 32, 8, 2)),
                          (160, _attn_cfg(90, 16, 32, 8, 1)), (256, _attn_cfg(90, 32, 32, 8, 2))),
    ("fwd", 80, "16bit"): ((64, _attn_cfg(80, 128, 32, 8, 2)), (128, _attn_cfg(80, 64, 32, 8, 2)),
                           (256, _attn_cfg(80, 32, 16, 8, 2))),
    # 3.6: 128 (72 = 64 + 16) spilled 24 bytes with 2 stages
    ("dkdv", 80, "16bit"): ((64, _attn_cfg(80, 16, 64, 8, 2)), (128, _attn_cfg(80, 16, 64, 8, 1)),
                            (256, _attn_cfg(80, 16, 16, 8, 1))),
    ("dq", 80, "16bit"): ((64, _attn_cfg(80, 64, 32, 8, 2)), (128, _attn_cfg(80, 64, 32, 8, 2)),
                          (160, _attn_cfg(80, 16, 16, 8, 1)), (256, _attn_cfg(80, 32, 32, 8, 2))),
    # fp32 pads the head dim to one masked tile (no split): 72 -> 128, 200 -> 256. IEEE dK/dV at
    # 200..248: the unmasked table's 32 x 16 tiles spilled 48 bytes under 3.6; 16 x 16 tiles with
    # 4 warps (3.6) / 16 warps (3.8) hold
    ("dkdv", 80, "ieee"): ((128, _attn_cfg(80, 16, 16, 8 if TRITON_36 else 16, 1)),
                           (256, _attn_cfg(80, 16, 16, 4 if TRITON_36 else 16, 1))),
    ("fwd", 80, "tf32"): ((64, _attn_cfg(80, 64, 64, 4, 2)), (128, _attn_cfg(80, 64, 32, 4, 2)),
                          (256, _attn_cfg(80, 16, 16, 4, 1))),
}

# delta = rowsum(dO * O): BLOCK_M rows per program (16 for padded head dims of 128 and more)
_ATTN_PRE_CONFIGS = {64: KernelConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1),
                     256: KernelConfig({"BLOCK_M": 16}, num_warps=4, num_stages=1)}

#: Head dims the kernels take.
ATTENTION_HEAD_DIMS = tuple(range(16, 257, 8))


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _attn_head_dim_reason(d: int) -> Optional[str]:
    if d % 8 or not 16 <= d <= 256:
        return f"head dim {d} (the Triton kernels take multiples of 8 from 16 to 256)"
    return None


def _attn_pieces(d: int, split: bool = True) -> tuple[int, int]:
    """The head dim as two power-of-two tiles ``(BLOCK_DA, BLOCK_DB)``, BLOCK_DB = 0 for one tile:
    80 -> (64, 16), 96 -> (64, 32), 72 -> (64, 16) with 8 columns masked, 64 -> (64, 0); where a
    split would cover as many columns as padding (112 -> 64 + 64) it pads (112 -> (128, 0)).
    ``split=False`` pads (one masked tile): fp32, whose dots are not the fast path and whose split
    variants spill on sm_80."""
    da = 1 << (d.bit_length() - 1)
    if da == d:
        return d, 0
    if not split:
        return _next_pow2(d), 0
    # 16-bit dots need K >= 16; next to a 128-wide tile a 16-wide one costs more registers than it
    # saves (136 and 144 compile to spills), so the small tile is at least 32 there
    db = max(16 if da < 128 else 32, _next_pow2(d - da))
    if da + db >= _next_pow2(d):
        return _next_pow2(d), 0
    return da, db


def _attn_precision(dtype: torch.dtype) -> str:
    """Precision class of a dtype: "16bit", or torch's fp32 matmul precision ("tf32" / "ieee")."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def _attn_config(kernel: str, arch: int, precision: str, width: int, masked: bool = False) -> KernelConfig:
    """The config for a padded head width; ``masked``: the head dim leaves a masked tail in its
    last tile (72, 88, 200, ...), which costs registers: _ATTN_MASKED_CONFIGS overrides there."""
    key = (kernel, arch, precision)
    table = _ATTN_MASKED_CONFIGS[key] if masked and key in _ATTN_MASKED_CONFIGS else _ATTN_CONFIGS[key]
    for max_width, config in table:
        if width <= max_width:
            return config
    raise AssertionError(f"no {kernel} config for head width {width}")
