"""Attention's kernel configs as data, and the functions that pick one for a call.

Configs are data (_ATTN_CONFIGS, _ATTN_MASKED_CONFIGS, _ATTN_SEQ_CONFIGS, _ATTN_VARIANT_CONFIGS),
per kernel, arch family, precision class, padded head width and, for the forward, the key-length
bucket (:data:`ATTN_TK_BUCKETS`); each entry compiles for its arch without spills (the static check,
vitkern.testing.compile_check, compiles every entry through the slow compile cases).

The key is ``(kernel, arch, precision)`` plus the padded head width; the sequence-length tables
``_ATTN_SEQ_CONFIGS[(kernel, arch, precision, max_tk)]`` take precedence for ``Tk <= max_tk`` and
the head widths they list, and everything else (longer sequences, the other widths) reads the
length-independent tables. Resident blocks per SM (:func:`blocks_per_sm`) follow from the
compiled registers, warps and shared memory. :func:`_attn_fwd_plan` adds the split-KV choice
(:func:`_attn_kv_splits`; fp16 / bf16, grids smaller than the SM count).

Head dims: Triton tiles are powers of two, so D is split into two power-of-two pieces, each with
its own dots and accumulator (80 = 64 + 16, 96 = 64 + 32, 72 = 64 + 16 with the last 8 columns
masked) rather than padded to the next power of two (80 -> 128 is 60% more MMA work); a split
that saves nothing over padding (e.g. 112 -> 64 + 64) pads instead, and fp32 always pads
(:func:`_attn_pieces`). The kernels take head dims that are multiples of 8 from 16 to 256
(:data:`ATTENTION_HEAD_DIMS`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

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
    # Up to 80: 4 warps, 32 queries a step against 64 keys, 2 blocks per SM (the 64 x 128 tile
    # with 8 warps held 1; with the single query loop 64 x 64 / 8 warps spilled 16 bytes at 32
    # under 3.6). 96 (64 + 32) spilled 44 bytes at 32 x 128 with the single loop. 128: 32 x 64,
    # 8 warps, 1 stage (221 registers under 3.6; dQ's dot on mma.sync): with the single loop
    # 32 x 128 spilled 24 bytes under 3.6, 64 x 64 with 8 warps (m64 wgmma for every dot) 4
    # bytes under 3.6 (causal, key padding, GQA, atomic dQ) and 36 with 2 stages under 3.8,
    # 64 x 128 148..232 bytes, 16 warps 256+
    ("dkdv", 90, "16bit"): ((80, _attn_cfg(90, 32, 64, 4, 2)), (96, _attn_cfg(90, 16, 64, 8, 2)),
                            (128, _attn_cfg(90, 32, 64, 8, 1)), (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "16bit"): ((64, _attn_cfg(90, 128, 64, 8, 2)), (128, _attn_cfg(90, 128, 64, 8, 2)),
                          (256, _attn_cfg(90, 128, 32, 8, 2))),
    ("fwd", 90, "tf32"): ((64, _attn_cfg(90, 64, 64, 4, 2)), (128, _attn_cfg(90, 64, 32, 4, 2)),
                          (256, _attn_cfg(90, 16, 32, 4, 1))),
    # GQA (the query-head loop): 128 spilled 4 bytes at 16 x 32 with 4 warps under 3.8 (8 warps:
    # 127..158 registers; under 3.6 8 warps spilled 8..24, 4 hold: 162..234)
    ("dkdv", 90, "tf32"): ((64, _attn_cfg(90, 32, 32, 4, 1)), (128, _attn_cfg(90, 16, 32, 4 if TRITON_36 else 8, 1)),
                           (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "tf32"): ((64, _attn_cfg(90, 64, 32, 4, 1)), (128, _attn_cfg(90, 32, 32, 4, 1)),
                         (256, _attn_cfg(90, 32, 16, 4, 1))),
    ("fwd", 90, "ieee"): ((64, _attn_cfg(90, 16, 32, 4, 1)), (256, _attn_cfg(90, 16, 16, 4, 1))),
    # 3.6: 16 warps (128 registers a thread) spilled 4 bytes at 128, 8 warps 8 bytes at 256 (a
    # causal, key-padding variant, where 16 warps hold: 84..106); 4 warps spill on both
    # (3.6, single query loop: 128 spilled 8 bytes with 8 warps, 4 hold: 64..122 registers; the
    # masked 200..248 12 bytes with 16 warps, 8 hold: _ATTN_MASKED_CONFIGS)
    # 3.8: 256 spilled 20 bytes with 16 warps (causal, key padding); 8 warps hold: 80 registers
    # GQA (the query-head loop): 64 / 128 spilled 8 / 32 bytes with 8 warps under 3.8 (4 warps:
    # 64..115 registers on both); 256 28 bytes with 16 warps under 3.6 (16 x 32 with 8 warps:
    # 138..178, 0 spills; 16 x 16 with 8 warps spilled 20)
    ("dkdv", 90, "ieee"): ((128, _attn_cfg(90, 16, 16, 4, 1)),
                           (256, _attn_cfg(90, 16, 32, 8, 1) if TRITON_36 else _attn_cfg(90, 16, 16, 8, 1))),
    ("dq", 90, "ieee"): ((64, _attn_cfg(90, 32, 16, 4, 1)), (256, _attn_cfg(90, 16, 16, 4, 1))),
    # ---- sm_80 (A100) and the other non-sm_90 parts: mma.sync, operands in registers
    ("fwd", 80, "16bit"): ((64, _attn_cfg(80, 128, 64, 8, 3)), (128, _attn_cfg(80, 128, 32, 8, 2)),
                           (256, _attn_cfg(80, 32, 16, 8, 2))),
    # 3.6: 256 spilled 12 bytes with 8 warps (128 registers a thread at 16 x 16), and 12 / 8 with
    # 4 warps (causal, key padding, atomic dQ; GQA under 3.8); 16 x 32 with 8 warps holds on both
    # for every variant (164..247 registers, 1 block per SM; 16 x 32 / 32 x 16 with 4 warps spilled
    # 20..200 bytes), but spilled 48..204 bytes at 160 (128 + 32), which keeps 16 x 16 with 4 warps
    # with the single query loop 64 spilled 48 bytes at 32 x 128 and 96 36 bytes at 16 x 64 with 2
    # stages (causal, key padding, atomic dQ)
    ("dkdv", 80, "16bit"): ((64, _attn_cfg(80, 16, 128, 8, 2)), (96, _attn_cfg(80, 16, 64, 8, 1)),
                            (128, _attn_cfg(80, 16, 64, 8, 2)), (160, _attn_cfg(80, 16, 16, 4, 1)),
                            (256, _attn_cfg(80, 16, 32, 8, 1))),
    ("dq", 80, "16bit"): ((64, _attn_cfg(80, 128, 64, 8, 2)), (128, _attn_cfg(80, 128, 32, 8, 2)),
                          (256, _attn_cfg(80, 32, 32, 8, 2))),
    ("fwd", 80, "tf32"): ((64, _attn_cfg(80, 64, 64, 4, 2)), (128, _attn_cfg(80, 32, 32, 4, 1)),
                          (256, _attn_cfg(80, 16, 32, 4, 1))),
    # 3.6: 64 spilled 16 bytes with 4 warps, and 4 with 8 warps while the fp32 backward formed P
    # with one FMA (16 warps hold either way: 124..128 registers on both)
    ("dkdv", 80, "tf32"): ((64, _attn_cfg(80, 32, 32, 16, 1)), (128, _attn_cfg(80, 16, 32, 4, 1)),
                           (256, _attn_cfg(80, 16, 16, 8, 1))),
    ("dq", 80, "tf32"): ((64, _attn_cfg(80, 64, 32, 4, 1)), (128, _attn_cfg(80, 32, 16, 4, 1)),
                         (256, _attn_cfg(80, 16, 16, 4, 1))),
    ("fwd", 80, "ieee"): ((64, _attn_cfg(80, 16, 32, 4, 1)), (128, _attn_cfg(80, 16, 16, 4, 1)),
                          (256, _attn_cfg(80, 16, 16, 8, 1))),
    # Up to 128 (no masked tail): 16 x 16 with 8 warps on both versions since the single query
    # loop (64..106 registers; 16 warps spilled 4 bytes at 64 under 3.8, 4 warps 16). Before it
    # 16 warps spilled 12 bytes at 72 under 3.6, 8 warps 8-16 bytes at 72 / 128 under 3.8. At 256,
    # 32 x 16 tiles with 8 warps held on both (128..176 / 128..255 registers); under 3.8 they
    # spilled 8 bytes with the single loop, 16 x 16 with 8 warps holds (90..144)
    ("dkdv", 80, "ieee"): ((128, _attn_cfg(80, 16, 16, 8, 1)),
                           (256, _attn_cfg(80, 32, 16, 8, 1) if TRITON_36 else _attn_cfg(80, 16, 16, 8, 1))),
    # single key loop: 256 spilled 4 bytes with 4 warps on both versions (8 warps: 74 registers)
    ("dq", 80, "ieee"): ((64, _attn_cfg(80, 32, 16, 4, 1)), (256, _attn_cfg(80, 16, 16, 8, 1))),
}

# Head dims whose last tile has a masked tail (72 = 64 + 16 with 8 masked, 88, 104..120, 136..152,
# 168..184, 200..248) need more registers for the same tiles: where a table is given here it
# replaces the one above for them (every width listed).
_ATTN_MASKED_CONFIGS: dict[tuple[str, int, str], tuple[tuple[int, KernelConfig], ...]] = {
    # 3.6: 256 (200) spilled 140 bytes with 64 x 16 tiles; 48 (40 = 32 + 16, 8 masked) 16 with
    # 128 x 128, and 64 (56, 8 masked) 120 bytes with 128 x 128 in the single-loop kernel
    # (128 x 64: 175 / 237 registers under 3.8 / 3.6)
    ("fwd", 90, "16bit"): ((48, _attn_cfg(90, 128, 64, 8, 3)), (64, _attn_cfg(90, 128, 64, 8, 3)),
                           (128, _attn_cfg(90, 128, 64, 8, 3)), (256, _attn_cfg(90, 32, 16, 8, 2))),
    # 3.6: 48 (40) spilled 12 bytes with 64 x 128 tiles, 48 with 64 x 64 in the single query loop;
    # 256 (176, GQA) 32 bytes at 16 x 16 with 8 warps (4 warps: 128..254 registers on both)
    ("dkdv", 90, "16bit"): ((64, _attn_cfg(90, 32, 64, 4, 2)), (96, _attn_cfg(90, 16, 64, 8, 2)),
                            (128, _attn_cfg(90, 32, 32, 8, 2)), (256, _attn_cfg(90, 16, 16, 4, 1))),
    # 3.8, single key loop: 160 (136) spilled 4 bytes with 8 warps (4 warps: 166 registers)
    ("dq", 90, "16bit"): ((64, _attn_cfg(90, 128, 64, 8, 2)), (128, _attn_cfg(90, 64, 32, 8, 2)),
                          (160, _attn_cfg(90, 16, 32, 8 if TRITON_36 else 4, 1)), (256, _attn_cfg(90, 32, 32, 8, 2))),
    ("fwd", 80, "16bit"): ((64, _attn_cfg(80, 128, 32, 8, 2)), (128, _attn_cfg(80, 64, 32, 8, 2)),
                           (256, _attn_cfg(80, 32, 16, 8, 2))),
    # 3.6: 128 (72 = 64 + 16) spilled 24 bytes with 2 stages; 3.8: 32 (24, 8 masked) spilled 24
    # bytes with 2 stages (1 stage: 128 / 120 registers under 3.8 / 3.6)
    ("dkdv", 80, "16bit"): ((32, _attn_cfg(80, 16, 64, 8, 1)), (64, _attn_cfg(80, 16, 64, 8, 2)),
                            (128, _attn_cfg(80, 16, 64, 8, 1)),
                            (256, _attn_cfg(80, 16, 16, 8, 1))),
    # single key loop: 160 (136) spilled 16 / 20 bytes with 8 warps under 3.6 / 3.8 (4 warps: 157
    # registers under 3.8)
    ("dq", 80, "16bit"): ((64, _attn_cfg(80, 64, 32, 8, 2)), (128, _attn_cfg(80, 64, 32, 8, 2)),
                          (160, _attn_cfg(80, 16, 16, 4, 1)), (256, _attn_cfg(80, 32, 32, 8, 2))),
    # fp32 pads the head dim to one masked tile (no split): 72 -> 128, 200 -> 256. IEEE dK/dV at
    # 200..248: the unmasked table's 32 x 16 tiles spilled 48 bytes under 3.6; 16 x 16 tiles with
    # 4 warps (3.6) / 16 warps (3.8) hold
    # (single loop: 3.8's 16 warps spilled 12 bytes at 200, 8 hold; 3.6's 8 warps 4 bytes at 72,
    # 4 hold)
    ("dkdv", 80, "ieee"): ((128, _attn_cfg(80, 16, 16, 4 if TRITON_36 else 16, 1)),
                           (256, _attn_cfg(80, 16, 16, 4 if TRITON_36 else 8, 1))),
    # 3.8: 256 (200) spilled 4 bytes with 16 warps; 8 warps: 106 registers
    ("dkdv", 90, "ieee"): ((128, _attn_cfg(90, 16, 16, 4 if TRITON_36 else 8, 1)),
                           (256, _attn_cfg(90, 16, 16, 8, 1))),
    # 3.6: 256 (200, causal + key padding) spilled 8 bytes at the unmasked table's 32 x 16 (255
    # registers); 16 x 16 with 4 warps: 187 / 219..234 registers (3.8 / 3.6), 2 blocks per SM
    ("dq", 90, "tf32"): _ATTN_CONFIGS[("dq", 90, "tf32")][:2] + ((256, _attn_cfg(90, 16, 16, 4, 1)),),
    ("fwd", 80, "tf32"): ((64, _attn_cfg(80, 64, 64, 4, 2)), (128, _attn_cfg(80, 64, 32, 4, 2)),
                          (256, _attn_cfg(80, 16, 16, 4, 1))),
}

# Kernel variants that need more registers than the plain kernel at some tiles, keyed by
# (variant, kernel, arch, precision, masked tail): where a width is listed it replaces the entry
# above (_ATTN_MASKED_CONFIGS' for a masked head dim).
# - "prologue": the backward kernels with the QK-norm / RoPE inverse in their epilogue
#   (prologue.py). The fused prologue takes padded widths up to 96 (prologue.PROLOGUE_MAX_WIDTH),
#   so these stop there. Figures: Triton 3.8, LayerNorm + RoPE.
# - "packed": the kernels of packed sequences (the sequence search, per-sequence bounds): the
#   forward and the backward's.
_ATTN_VARIANT_CONFIGS: dict[tuple[str, str, int, str, bool], tuple[tuple[int, Optional[KernelConfig]], ...]] = {
    # 64 (56 = 64 with 8 masked, causal): 32 x 64 with 4 warps spilled 120 bytes (255 registers)
    ("prologue", "dkdv", 90, "16bit", True): ((64, _attn_cfg(90, 16, 64, 8, 2)),),
    # 64 (56): 128 x 64 spilled 28 bytes (255 registers)
    ("prologue", "dq", 90, "16bit", True): ((64, _attn_cfg(90, 64, 64, 8, 2)),),
    # 80 (72 = 64 + 8 masked) spilled 60 bytes at 16 x 64 with 8 warps (GQA, causal: 252
    # registers without the epilogue)
    ("prologue", "dkdv", 80, "16bit", True): ((128, _attn_cfg(80, 16, 32, 8, 1)),),
    # 32: 16 warps (a 128-register cap) spilled 12 bytes
    ("prologue", "dkdv", 80, "tf32", False): ((64, _attn_cfg(80, 32, 32, 8, 1)),),
    # 32: 8 warps spilled 12 bytes at 64 registers
    ("prologue", "dkdv", 90, "ieee", False): ((64, _attn_cfg(90, 16, 16, 4, 1)),),
    # 3.6: 64 (causal, GQA, atomic dQ, the on-device sequence search) spilled 8 bytes at 255
    # registers with 2 stages; 1 stage: 193 registers, 2 blocks per SM (3.8 holds 2 stages)
    ("packed", "dkdv", 90, "16bit", False): ((64, _attn_cfg(90, 32, 64, 4, 1 if TRITON_36 else 2)),),
    # fp32 packed launches (GQA + causal with the sequence search, and the per-sequence grid):
    # sm_80 TF32 dK/dV at 128 spilled 72 bytes at 16 x 32 with 4 warps under 3.8 (8 warps: 136..160
    # registers on both); sm_80 TF32 forward at 128 8 bytes at 32 x 32 with 4 warps under 3.6 (8
    # warps: 110..112); sm_80 IEEE forward at 256 8 bytes at 16 x 16 with 8 warps (3.6) and 4
    # warps (both) at a 128-register target (16 x 32 with 4 warps: 164 / 165, 3 blocks per SM);
    # sm_90 IEEE dK/dV at 200..248 40 bytes at 16 x 16 with 8 warps under 3.8 (4 warps: 150..168)
    # and 8..144 with 4 warps under 3.6 (8 warps: 128), at 256 16 bytes with 16 warps under 3.6
    # (8 warps: 93..112 on both); sm_80 TF32 forward at 64 4..8 bytes at 64 x 64 with 4 warps (8:
    # 98..124); IEEE dQ at 72 (128 with 56 masked): sm_90 52 bytes at 16 x 16 with 4 warps and
    # 12..20 with 8 under 3.6 (32 x 16 with 8 warps: 94..114 on both), and at 200 12 bytes with 4
    # warps under 3.8 (8: 96..98); sm_80 12 bytes at 16 x 16 with 8 warps under 3.6 (32 x 16: 116 / 128)
    ("packed", "dkdv", 80, "tf32", False): ((64, None), (128, _attn_cfg(80, 16, 32, 8, 1))),
    ("packed", "fwd", 80, "tf32", False): ((64, _attn_cfg(80, 64, 64, 8, 2)), (128, _attn_cfg(80, 32, 32, 8, 1))),
    ("packed", "fwd", 80, "ieee", False): ((128, None), (256, _attn_cfg(80, 16, 32, 4, 1))),
    ("packed", "dkdv", 90, "ieee", False): ((128, None), (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("packed", "dkdv", 90, "ieee", True): ((128, None), (256, _attn_cfg(90, 16, 16, 8 if TRITON_36 else 4, 1))),
    ("packed", "dq", 90, "ieee", True): ((128, _attn_cfg(90, 32, 16, 8, 1)), (256, _attn_cfg(90, 16, 16, 8, 1))),
    ("packed", "dq", 80, "ieee", True): ((128, _attn_cfg(80, 32, 16, 8, 1) if TRITON_36 else None),),
    # The dK/dV kernel of the dQ-kernel mode (no atomic dQ in its loop) at 128: 64 x 64 with 8
    # warps (every dot an m64 wgmma, where the atomic kernel's 32 x 64 runs m64n32): 200..222
    # registers under 3.6 and 3.8 with causal, key padding and GQA (with atomic dQ it spilled
    # 12 / 24 bytes there; 64 x 128: 20-344 bytes; 64 x 64 at 2 stages: 148 bytes under 3.6)
    ("dq_kernel", "dkdv", 90, "16bit", False): ((96, None), (128, _attn_cfg(90, 64, 64, 8, 1))),
    # The atomic mode's dK/dV kernel without the causal mask at 128: the same 64 x 64 (222..255
    # registers under 3.6 and 3.8 with key padding, GQA and the packed qkv, 0 spills; causal
    # reaches 255 and spilled 16 bytes with GQA, so the causal kernel keeps 32 x 64)
    ("atomic_noncausal", "dkdv", 90, "16bit", False): ((96, None), (128, _attn_cfg(90, 64, 64, 8, 1))),
}


# The fused backward (one kernel for dQ, dK, dV; 16-bit inputs): its own tiles per exact padded
# width without a masked tail, where the dK/dV step plus the dQ scratch's tile and its read-back
# compile without spills on both Triton versions (the heaviest variant: causal, key padding,
# GQA); the widths not listed (masked tails, 96 on sm_90, wider than 128) run the other paths.
# sm_90 64: 32 x 64 with 4 warps, 1 stage (196 / 230 registers under 3.6, 2 blocks per SM; 2
# stages spilled 8 bytes on the packed qkv under 3.6); 80 needs 16 x 32 (32 x 64 spilled 4..88
# bytes); sm_80 32 and 64: 16 x 128 (32 x 128 spilled 4 bytes at
# 32 under 3.6, 140 at 64); sm_80 80: 16 x 32 (16 x 64 spilled 8 bytes under 3.8, causal with
# key padding: 232-240 registers).
_ATTN_FUSED_CONFIGS: dict[tuple[int, str], dict[int, KernelConfig]] = {
    (90, "16bit"): {32: _attn_cfg(90, 64, 64, 8, 2), 48: _attn_cfg(90, 32, 64, 4, 2), 64: _attn_cfg(90, 32, 64, 4, 1),
                    80: _attn_cfg(90, 16, 32, 4, 2), 128: _attn_cfg(90, 32, 32, 4, 2)},
    (80, "16bit"): {32: _attn_cfg(80, 16, 128, 8, 2), 48: _attn_cfg(80, 16, 128, 8, 2),
                    64: _attn_cfg(80, 16, 128, 8, 2), 80: _attn_cfg(80, 16, 32, 8, 1), 96: _attn_cfg(80, 16, 64, 8, 1),
                    128: _attn_cfg(80, 16, 64, 8, 2)},
}

# Key-length buckets of the forward (Tk <= bucket; longer sequences read _ATTN_CONFIGS).
#: The bounds of the forward's key-length buckets, ascending; a Tk above the last is "long".
ATTN_TK_BUCKETS = (2048,)

# Up to 2048 keys (ViT / DeiT / DINOv2 at 224..518 px: T = 197..1370) the sm_90 16-bit forward
# runs 128 x 64 tiles at head widths <= 64 (D = 64 and the padded 24 / 40 / 56): ~116 registers
# x 256 threads and 64 KB of shared memory, 2 blocks per SM (the 128 x 128 tile of the long
# table compiles to 164..208 registers: 1 block per SM). Registers under 3.8 / 3.6 at D = 64:
# 116 / 114, causal with key padding 127 / 196. 64 x 64 tiles with 4 warps (106..168
# registers, 4 blocks per SM) were left out: each block reloads K / V for half the rows, twice
# the L2 -> SM traffic per FLOP of the 128-row tile. Head width 80 needs no entry: the
# length-independent 128 x 64 tile compiles to 126 / 127 registers (2 blocks per SM).
_ATTN_SEQ_CONFIGS: dict[tuple[str, int, str, int], tuple[tuple[int, KernelConfig], ...]] = {
    ("fwd", 90, "16bit", 2048): ((64, _attn_cfg(90, 128, 64, 8, 3)),),
}

# delta = rowsum(dO * O): BLOCK_M rows per program (16 for padded head dims of 128 and more)
_ATTN_PRE_CONFIGS = {64: KernelConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1),
                     256: KernelConfig({"BLOCK_M": 16}, num_warps=4, num_stages=1)}

# The split-KV forward (fp16 / bf16) runs the forward's config, except at these (arch, precision,
# padded width) of head dims with a masked tail, where the split kernel's extra state spilled under
# 3.6 with the forward's tile: 104 (128, 8 masked) with 128 x 64 (128 x 32: 194 / 206 registers
# under 3.8 / 3.6), 200..248 (256) with 32 x 16 and 8 warps (4 warps: 204 / 153)
_ATTN_SPLIT_MASKED_CONFIGS = {(90, "16bit", 128): _attn_cfg(90, 128, 32, 8, 3),
                              (90, "16bit", 256): _attn_cfg(90, 32, 16, 4, 2)}

# The split-KV forward's merge: BLOCK_M rows per program over padded head widths up to the key
_ATTN_MERGE_CONFIGS = {128: KernelConfig({"BLOCK_M": 32}, num_warps=4, num_stages=1),
                       256: KernelConfig({"BLOCK_M": 16}, num_warps=4, num_stages=1)}

#: Arch families whose forward loads q / k / v and stores out through TMA tensor descriptors
#: (where the tensors are addressable: vitkern.ops.attention.launch._attn_tma_ok). sm_80 has no
#: copy engine for them (descriptors lower to plain loads there).
ATTN_TMA_ARCHS = (90,)

#: The most key splits of the split-KV forward.
ATTN_MAX_KV_SPLITS = 16

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


def _attn_kv_splits(programs: int, key_blocks: int, sms: int) -> int:
    """Key splits of the forward (flash-decoding style): 1, the plain kernel, when its grid of
    ``programs`` fills the ``sms``; else as many as fill them, at most one per key block and
    :data:`ATTN_MAX_KV_SPLITS` (B = 1, T = 197, 12 heads: 24 programs, 4 key blocks -> 4 splits,
    96 programs on 132 SMs). Rounded so that no split is empty."""
    if programs >= sms or key_blocks < 2:
        return 1
    splits = max(1, min(sms // programs, key_blocks, ATTN_MAX_KV_SPLITS))
    per_split = -(-key_blocks // splits)
    return -(-key_blocks // per_split)


def _attn_split_config(arch: int, precision: str, width: int, masked: bool, tk: Optional[int]) -> KernelConfig:
    """The split-KV forward's config: the forward's (:func:`_attn_config`) unless
    _ATTN_SPLIT_MASKED_CONFIGS replaces it for a masked head dim."""
    if masked and (arch, precision, width) in _ATTN_SPLIT_MASKED_CONFIGS:
        return _ATTN_SPLIT_MASKED_CONFIGS[(arch, precision, width)]
    return _attn_config("fwd", arch, precision, width, masked, tk=tk)


def _attn_fwd_plan(arch: int, precision: str, width: int, masked: bool, heads: int, tq: int, tk: int,
                   sms: Optional[int], kv_splits: Optional[int] = None, *,
                   grid: Optional[Callable[[int], int]] = None, max_keys: Optional[int] = None,
                   variant: Optional[str] = None) -> tuple[KernelConfig, int, int]:
    """The forward's ``(config, splits, key blocks per split)`` for ``heads`` (batch x heads)
    query-key slices: splits = 1 is the plain kernel. ``kv_splits`` None picks by
    :func:`_attn_kv_splits` on ``sms``; fp32 never splits (16-bit only). ``tk`` is the key length
    the config is chosen for. A packed launch gives ``grid`` (its programs for a BLOCK_M; dense:
    ``cdiv(tq, BLOCK_M) * heads``) and ``max_keys``, a bound on one sequence's keys (the longest
    when the caller knows it, else the total: every key block of every sequence must fall in a
    split; dense: ``tk``) and ``variant`` "packed" (:data:`_ATTN_VARIANT_CONFIGS`)."""
    config = _attn_config("fwd", arch, precision, width, masked, tk=tk, variant=variant)
    grid = grid or (lambda block_m: -(-tq // block_m) * heads)
    max_keys = tk if max_keys is None else max_keys
    if precision != "16bit":
        kv_splits = 1
    elif kv_splits is None:
        kv_splits = _attn_kv_splits(grid(config.meta["BLOCK_M"]), -(-max_keys // config.meta["BLOCK_N"]), sms)
    if kv_splits <= 1:
        return config, 1, -(-max_keys // config.meta["BLOCK_N"])
    config = _attn_split_config(arch, precision, width, masked, tk)
    key_blocks = max(1, -(-max_keys // config.meta["BLOCK_N"]))
    per_split = -(-key_blocks // min(kv_splits, key_blocks))
    return config, -(-key_blocks // per_split), per_split


#: The fused backward's L2 budget per arch family: the resident programs' fp32 dQ scratch plus the
#: q and dO they re-read once per key block must stay in L2 (H100 / H200: 50 MB, A100: 40 MB;
#: the rest holds the K / V streams and the dK / dV / dQ writes). See docs/perf-notes.md.
ATTN_FUSED_L2_BYTES = {90: 40 << 20, 80: 32 << 20}

#: Programs of the fused backward's persistent grid per SM (its tiles hold two blocks a SM on
#: sm_90 in the compile report; a program without a free slot waits, which stays correct).
ATTN_FUSED_PROGRAMS_PER_SM = 2

#: The backward's ways of forming dQ.
ATTN_BWD_MODES = ("fused", "atomic", "dq_kernel")


class AttnBwdPlan(NamedTuple):
    """The backward's launch plan: ``mode`` "fused" (one kernel for dQ, dK, dV: a persistent grid
    of ``programs`` over the (batch, kv head) pairs, each with its own fp32 dQ scratch), "atomic"
    (the dK/dV kernel adds dQ into an fp32 buffer with atomics) or "dq_kernel" (the dK/dV kernel,
    then the dQ kernel); ``config``: the dK/dV or fused kernel's, ``dq_config``: the dQ kernel's
    (None unless "dq_kernel"); ``programs``: the first kernel's grid."""

    mode: str
    config: KernelConfig
    dq_config: Optional[KernelConfig]
    programs: int


def _attn_fused_bytes(programs: int, group: int, tq: int, width: int, block_m: int, itemsize: int) -> int:
    """L2 bytes the fused backward's resident programs keep: per program its fp32 scratch
    (group x Tq rounded up to whole query blocks x the padded width) and its q and dO (re-read
    once per key block)."""
    return programs * group * (-(-tq // block_m) * block_m * width * 4 + 2 * tq * width * itemsize)


def _attn_bwd_plan(arch: int, precision: str, width: int, masked: bool, batch: int, heads: int, kv_heads: int,
                   tq: int, tk: int, sms: Optional[int], deterministic: bool, itemsize: int = 2,
                   mode: Optional[str] = None, variant: Optional[str] = None, causal: bool = True) -> AttnBwdPlan:
    """How the backward runs (``mode`` None picks; a given one is checked):

    - "fused" wherever it fits: a tile of its own (_ATTN_FUSED_CONFIGS: 16-bit, head dims
      without a masked tail up to 128), keys to walk (Tk > 0), at least one (batch, kv head) pair per SM
      (its grid is the pairs: fewer leave SMs idle where the dK/dV kernel has a program per key
      block), and the resident programs' scratch, q and dO within :data:`ATTN_FUSED_L2_BYTES`
      (:func:`_attn_fused_bytes`): on an H100 at head dim 64, T <= 257 (ViT-B/16, ViT-L/16 at
      224 px), not 577; at head dim 80 not 257 (see docs/perf-notes.md). Deterministic too.
    - else "dq_kernel" when ``deterministic`` or the head dim has a masked tail (the atomic
      epilogue's variants spill there), else "atomic".

    ``variant``: "prologue" (the kernels run the QK-norm / RoPE inverse in their epilogues, always
    in the dQ kernel's mode) or "packed" (packed sequences), whose registers some tiles need
    (:data:`_ATTN_VARIANT_CONFIGS`). Without one, the dQ-kernel mode's dK/dV kernel reads the
    "dq_kernel" variant's tiles (no atomic dQ in its loop: 64 x 64 at head width 128 on sm_90),
    and the atomic mode's, without ``causal``, the "atomic_noncausal" variant's (its mask's
    registers are the ones 64 x 64 lacks at 128 with atomic dQ)."""
    if mode is not None and mode not in ATTN_BWD_MODES:
        raise ValueError(f"backward mode {mode!r}: expected one of {ATTN_BWD_MODES}")
    config = _attn_config("dkdv", arch, precision, width, masked, variant=variant)
    group = heads // kv_heads
    pairs = batch * kv_heads
    if mode is None:
        fused = None if masked else _ATTN_FUSED_CONFIGS.get((arch, precision), {}).get(width)
        programs = min(pairs, (sms or 1) * ATTN_FUSED_PROGRAMS_PER_SM)
        fits = (fused is not None and sms is not None and tk > 0 and pairs >= sms and _attn_fused_bytes(
            programs, group, tq, width, fused.meta["BLOCK_M"], itemsize) <= ATTN_FUSED_L2_BYTES[arch])
        mode = "fused" if fits else "dq_kernel" if deterministic or masked else "atomic"
    if mode == "fused":
        programs = min(pairs, (sms or 1) * ATTN_FUSED_PROGRAMS_PER_SM)
        return AttnBwdPlan("fused", _attn_config("fused", arch, precision, width, masked), None, programs)
    if mode == "atomic" and masked:
        raise ValueError(f"backward mode 'atomic' takes head dims without a masked tail (padded width {width})")
    if mode == "dq_kernel":  # without the atomic dQ epilogue some widths take wider dK/dV tiles
        config = _attn_config("dkdv", arch, precision, width, masked, variant=variant or "dq_kernel")
    elif mode == "atomic" and not causal and variant is None:  # ... and without the causal mask
        config = _attn_config("dkdv", arch, precision, width, masked, variant="atomic_noncausal")
    programs = -(-tk // config.meta["BLOCK_N"]) * pairs
    dq_config = _attn_config("dq", arch, precision, width, masked, variant=variant) if mode == "dq_kernel" else None
    return AttnBwdPlan(mode, config, dq_config, programs)


def _attn_tk_bucket(tk: Optional[int]) -> Optional[int]:
    """The key-length bucket of ``tk``: the smallest bound of :data:`ATTN_TK_BUCKETS` that holds it,
    None for longer sequences (or when ``tk`` is None)."""
    if tk is None:
        return None
    for bound in ATTN_TK_BUCKETS:
        if tk <= bound:
            return bound
    return None


def _attn_config(kernel: str, arch: int, precision: str, width: int, masked: bool = False,
                 tk: Optional[int] = None, variant: Optional[str] = None) -> KernelConfig:
    """The config for a padded head width; ``masked``: the head dim leaves a masked tail in its
    last tile (72, 88, 200, ...), which costs registers: _ATTN_MASKED_CONFIGS overrides there.
    ``tk``: the key length, whose bucket may select a config of _ATTN_SEQ_CONFIGS (the forward's
    short-sequence tiles); None or a long sequence reads the length-independent tables.
    ``variant``: a kernel variant whose tiles :data:`_ATTN_VARIANT_CONFIGS` may replace."""
    bucket = _attn_tk_bucket(tk)
    if bucket is not None:
        for max_width, config in _ATTN_SEQ_CONFIGS.get((kernel, arch, precision, bucket), ()):
            if width <= max_width:
                return config
    if kernel == "fused":
        config = None if masked else _ATTN_FUSED_CONFIGS.get((arch, precision), {}).get(width)
        # where the fused kernel has no tile of its own (it is forced: tests, fp32) it runs the
        # dK/dV kernel's
        return config or _attn_config("dkdv", arch, precision, width, masked)
    key = (kernel, arch, precision)
    if variant is not None:
        for max_width, config in _ATTN_VARIANT_CONFIGS.get((variant,) + key + (masked,), ()):
            if width <= max_width:
                if config is not None:  # None: the widths up to max_width read the plain tables
                    return config
                break
    table = _ATTN_MASKED_CONFIGS[key] if masked and key in _ATTN_MASKED_CONFIGS else _ATTN_CONFIGS[key]
    for max_width, config in table:
        if width <= max_width:
            return config
    raise AssertionError(f"no {kernel} config for head width {width}")


# Resident blocks per SM from a compiled kernel's registers, warps and dynamic shared memory.
#: (registers per SM, shared memory per SM, shared memory reserved per block, max threads per SM,
#: max blocks per SM) per arch family: H100 (sm_90) and A100 (sm_80).
SM_LIMITS = {90: (65536, 228 * 1024, 1024, 2048, 32), 80: (65536, 164 * 1024, 1024, 2048, 32)}


def blocks_per_sm(arch: int, regs: int, num_warps: int, shared: int) -> int:
    """Blocks of a kernel resident on one SM: registers are allocated per warp in units of 256
    (``ceil(regs * 32 / 256) * 256`` a warp), shared memory per block plus the 1 KB the driver
    reserves; the least of the register, shared-memory, thread and block limits."""
    regs_sm, smem_sm, reserved, threads_sm, blocks_max = SM_LIMITS[arch]
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = regs_sm // (per_warp * num_warps)
    by_smem = smem_sm // (shared + reserved)
    return max(0, min(by_regs, by_smem, threads_sm // (32 * num_warps), blocks_max))
