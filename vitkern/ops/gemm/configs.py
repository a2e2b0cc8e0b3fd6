"""The GEMM core's configs as data: named tiles per arch family and dtype class, the rules that
pick one for an (M, N, K) GEMM and its epilogue kind (:func:`select_config`), and the launch
plan of a GEMM on a given SM count (:func:`plan_gemm`: the split-K choice, persistent or not,
tiles, waves and predicted SM use), all pure functions of their arguments (no Triton, no
device query)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import torch

from vitkern.ops._config import device_arch, KernelConfig, TRITON_36

__all__ = [
    "EPILOGUE_KINDS",
    "GemmConfig",
    "GemmPlan",
    "GEMM_CONFIGS",
    "GEMM_RULES",
    "WIDE_FALLBACK",
    "wide_stand_in",
    "choose_split_k",
    "config_kinds",
    "dot_precision",
    "plan_gemm",
    "select_config",
    "select_swiglu_config",
    "sm_use",
    "SWIGLU_CONFIGS",
]


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One GEMM launch configuration.

    ``persistent``: ``num_sms`` programs stride over the tiles. ``tma``: load operands (and store
    the output) through tensor descriptors where the strides allow (sm_90 family only).
    ``split_k``: the most K splits the launcher may use for split-safe epilogues (the dW GEMMs).
    ``epilogue_split``: the column slices (1, 2 or 4) the epilogue runs in, one after the other:
    each slice's steps and output store hold ``block_n / epilogue_split`` columns of registers and
    of TMA staging, what lets a 128 x 256 tile carry the GELU and residual epilogues.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    persistent: bool = False
    tma: bool = False
    split_k: int = 1
    epilogue_split: int = 1

    def __post_init__(self) -> None:
        if self.epilogue_split not in (1, 2, 4) or self.block_n % (16 * self.epilogue_split):
            raise ValueError(f"GemmConfig: epilogue_split must be 1, 2 or 4 and leave slices of a multiple of 16 "
                             f"columns, got {self.epilogue_split} with block_n {self.block_n}")

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
             "GROUP_M": self.group_m, "FLATTEN": self.persistent, "EPI_SPLIT": self.epilogue_split},
            num_warps=self.num_warps, num_stages=self.num_stages,
        )

    def label(self) -> str:
        s = f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"
        return s + (" persistent" if self.persistent else "") + (" tma" if self.tma else "") + (
            f" splitk{self.split_k}" if self.split_k > 1 else "") + (
            f" epi/{self.epilogue_split}" if self.epilogue_split > 1 else "")


# Named configs. Static compile figures (Triton 3.8, ptxas from its wheel; registers / spill
# bytes / dynamic shared KB, "wg" = wgmma in the PTX) for the fc1 epilogue (bias + GELU + pre
# store), the fc2 epilogue (bias, LayerScale, row scale, fp32 residual) and the dW GEMM (split-K,
# reduction scale, row sums, row dots), from the compile cases (compile_cases.py):
#   h100_16_large  sm_90  164/0/160 wg | 125/0/224 wg | (dW runs it unflattened: as h100_16_mid)
#   h100_16_wide   sm_90  202/0/224 wg | (residual: h100_16_wide_res, 178/0/208 wg) | (not for dW);
#                         bias only (qkv): 160/0/208 wg; 128 x 256, four epilogue slices
#   h100_16_mid    sm_90  161/0/128 wg | 122/0/160 wg | 233/0/116 wg
#   h100_16_small  sm_90  168/0/112 wg | 115/0/128 wg | 237/0/113 wg
#   h100_tf32      sm_90  163/0/160 wg | 150/0/160 wg | 232/0/80 wg
#   h100_fp32      sm_90  128/0/36     | 128/0/36     | 128/0/20      (IEEE fp32: FMA dots)
#   a100_16_large  sm_80  219/0/48     | 238/0/48     | 228/0/76      (mma.sync)
#   a100_16_small  sm_80  221/0/36     | 246/0/36     | 242/0/49
#   a100_tf32      sm_80  250/0/48     | 254/0/48     | 255/0/52
#   a100_fp32      sm_80   80/0/32     |  80/0/32     |  99/0/40
# The same sm_90 sources compiled for sm_80 spill (TMA descriptors lower to plain loads there), and
# so do 128x256 tiles on both arches with the whole-tile residual epilogue; the TMA store of C and
# TMA load of the residual keep the sm_90 fc2 epilogue at ~125 registers (~240 with pointer stores).
# tl.range(..., warp_specialize=True) compiles on sm_90 with Triton 3.8 but to the same code
# (same registers and shared memory: the pass targets Blackwell), so no config uses it and the
# kernel does not pass the option (Triton 3.6 compatible). Tuning these on an H100 / A100 is
# still open: see benchmarks/setups/linear.py and mlp.py.
GEMM_CONFIGS: dict[str, GemmConfig] = {
    # sm_90 family: wgmma, TMA descriptors (plain loads where strides are not 16-byte aligned)
    "h100_16_large": GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=3, persistent=True, tma=True, split_k=16),
    # the bias, GELU (fc1) and residual (fc2 / proj) epilogues at large M: a 128 x 256 tile halves
    # the A re-reads and the per-tile overhead. The epilogue runs in four 64-column slices
    # (epilogue_split): at 128 x 256 with the whole tile at once, fc1 spilled 136 bytes (3.8; 252
    # under 3.6) over the shared-memory limit (240 KB), the fp32-residual epilogue needed 400 KB of
    # staging; in slices (registers 3.8 | 3.6, shared KB, 0 spills): bias (qkv) 160 | 165 at 4
    # stages, 208 KB; GELU + pre store (fc1) 202 | 212 at 4 stages, 224 KB; fp32 residual with
    # LayerScale and drop path (fc2) 178 | 203 at 3 stages, 208 KB (4 stages: 256 KB).
    "h100_16_wide": GemmConfig(128, 256, 64, 8, num_warps=8, num_stages=4, persistent=True, tma=True, split_k=16,
                               epilogue_split=4),
    "h100_16_wide_res": GemmConfig(128, 256, 64, 8, num_warps=8, num_stages=3, persistent=True, tma=True,
                                   split_k=16, epilogue_split=4),
    "h100_16_mid": GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=3, tma=True, split_k=16),
    "h100_16_small": GemmConfig(64, 128, 64, 8, num_warps=4, num_stages=4, tma=True, split_k=16),
    "h100_tf32": GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=3, tma=True, split_k=16),
    "h100_fp32": GemmConfig(64, 64, 16, 8, num_warps=8, num_stages=3, tma=True, split_k=16),
    # Triton 3.6: the GELU-backward epilogue (the MLP's dU) spilled 8 bytes at 3 stages (64
    # registers); 2 stages: 79 (3.8: 128)
    "h100_fp32_act_grad": GemmConfig(64, 64, 16, 8, num_warps=8, num_stages=2, tma=True, split_k=16),
    # sm_80 family: mma.sync, cp.async-pipelined plain loads
    # the epilogue in two 64-column slices: whole-tile, the bias + tanh-GELU epilogue spilled 44
    # bytes under Triton 3.6 (255 registers; 214 before the epilogue became one function per
    # slice); sliced, 180-198 (the halves are a register split of the mma.sync layout, each half's
    # store converts to the coalesced layout on its own)
    "a100_16_large": GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=4, split_k=16, epilogue_split=2),
    # 8 warps: with 4, the bias + tanh-GELU epilogue spilled 68 bytes under Triton 3.6 (M = 1)
    "a100_16_small": GemmConfig(64, 128, 32, 8, num_warps=8, num_stages=4, split_k=16),
    # Triton 3.6: the 128 x 128 tile's dW epilogue (row scale, row sums, row dots) spilled 4 bytes
    # (255 registers), 128 x 64 holds (206); under 3.8 128 x 64 spills 12 bytes in the fc1 epilogue
    # and 128 x 128 holds
    "a100_tf32": GemmConfig(128, 64 if TRITON_36 else 128, 16, 8, num_warps=8, num_stages=4, split_k=16),
    # Triton 3.8: the GELU-backward epilogue (the MLP's dU) spilled 48 bytes at 128 x 128
    "a100_tf32_act_grad": GemmConfig(128, 64, 16, 8, num_warps=8, num_stages=4, split_k=16),
    "a100_fp32": GemmConfig(64, 64, 32, 8, num_warps=8, num_stages=3, split_k=16),
    # Triton 3.6: the GELU-backward epilogue (the MLP's dU) spilled 4 bytes at 3 stages
    "a100_fp32_act_grad": GemmConfig(64, 64, 32, 8, num_warps=8, num_stages=2, split_k=16),
    # the SwiGLU MLP's dH GEMM with the SwiGLU-gradient epilogue (two aux tiles read, two output
    # tiles stored a tile): at 128 x 128 it spilled 12-220 bytes on both arches under Triton 3.8
    # (255 registers), so half the columns a tile. Registers / spill bytes / shared KB at ViT-g's
    # dH (M 4096, N 4096, K 1536), Triton 3.8 | 3.6: bf16; with drop path's row dots; a float32
    # dY written in bf16 (a_copy) with drop path:
    #   h100_16_glu_grad    sm_90  186 | 184 /0/72 wg; 238 | 188; 249 | 255 /0/88
    #   h100_tf32_glu_grad  sm_90  (drop path) 240 | 203 /0/56 wg
    #   h100_fp32_glu_grad  sm_90  (drop path) 165 | 96 /0/12 (64 x 64 at 4 warps: 20 bytes spilled
    #                              under 3.6)
    #   a100_16_glu_grad    sm_80  238 | 190 /0/36; 247 | 255; 237 | 255 /0/60
    #   (a100_tf32_act_grad 255 | 255 /0/36 and a100_fp32_act_grad 128 | 104 /0/16 with drop path)
    "h100_16_glu_grad": GemmConfig(128, 64, 64, 8, num_warps=8, num_stages=3, tma=True),
    "h100_tf32_glu_grad": GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=3, tma=True),
    "h100_fp32_glu_grad": GemmConfig(64, 32, 16, 8, num_warps=4, num_stages=3, tma=True),
    "a100_16_glu_grad": GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=4),
}

#: The epilogue kinds the rules key on (:attr:`vitkern.ops.gemm.epilogue.Epilogue.kind`): "none"
#: (a bare product: dX, dW without scales), "bias" (bias only: qkv), "act" (an activation, with
#: bias / pre store: fc1), "residual" (a residual, with bias / scales: proj, fc2), "act_grad" (the
#: MLP's dU GEMM), "scale" (row / column scales or row dots, none of the above: the dW GEMMs
#: with LayerScale or drop path), "glu_grad" (the SwiGLU MLP's dH GEMM, whose epilogue writes the
#: packed gate / value gradient), "branch" (a bias with LayerScale / drop-path scales and no
#: residual: the proj / fc2 of a block whose residual add is deferred into the next norm).
EPILOGUE_KINDS = ("none", "bias", "act", "residual", "act_grad", "scale", "glu_grad", "branch")

# The config table, keyed on (arch family, dtype class, M bucket, N bucket, K bucket, epilogue
# kind) -> config name; "*" matches anything; the first matching rule wins. dtype class: "16"
# (fp16/bf16), "tf32" (fp32 with TF32 allowed), "fp32" (IEEE fp32). M bucket: "s" (M <= 64), "m"
# (M <= 2048), "l". N bucket: "s" (N <= 64), "l". K bucket: "s" (K <= 64), "l". The last rule of
# each (arch, dtype class) is its default entry.
GEMM_RULES: list[tuple[tuple[int, str, str, str, str, str], str]] = [
    ((90, "16", "*", "*", "*", "glu_grad"), "h100_16_glu_grad"),
    ((90, "tf32", "*", "*", "*", "glu_grad"), "h100_tf32_glu_grad"),
    ((90, "fp32", "*", "*", "*", "glu_grad"), "h100_fp32_glu_grad"),
    ((80, "16", "*", "*", "*", "glu_grad"), "a100_16_glu_grad"),
    ((80, "tf32", "*", "*", "*", "glu_grad"), "a100_tf32_act_grad"),
    ((80, "fp32", "*", "*", "*", "glu_grad"), "a100_fp32_act_grad"),
    ((90, "16", "s", "*", "*", "*"), "h100_16_small"),
    ((90, "16", "*", "s", "*", "*"), "h100_16_small"),
    ((90, "16", "m", "*", "*", "*"), "h100_16_mid"),
    ((90, "16", "l", "l", "l", "bias"), "h100_16_wide"),
    ((90, "16", "l", "l", "l", "act"), "h100_16_wide"),
    ((90, "16", "l", "l", "l", "residual"), "h100_16_wide_res"),
    ((90, "16", "l", "l", "l", "branch"), "h100_16_wide"),
    ((90, "16", "l", "*", "*", "*"), "h100_16_large"),
    ((90, "tf32", "*", "*", "*", "*"), "h100_tf32"),
    ((90, "fp32", "*", "*", "*", "act_grad"), "h100_fp32_act_grad"),
    ((90, "fp32", "*", "*", "*", "*"), "h100_fp32"),
    ((80, "16", "s", "*", "*", "*"), "a100_16_small"),
    ((80, "16", "*", "s", "*", "*"), "a100_16_small"),
    ((80, "16", "*", "*", "*", "*"), "a100_16_large"),
    ((80, "tf32", "*", "*", "*", "act_grad"), "a100_tf32_act_grad"),
    ((80, "tf32", "*", "*", "*", "*"), "a100_tf32"),
    ((80, "fp32", "*", "*", "*", "act_grad"), "a100_fp32_act_grad"),
    ((80, "fp32", "*", "*", "*", "*"), "a100_fp32"),
]


def config_kinds(name: str) -> tuple[str, ...]:
    """The epilogue kinds the rules select config ``name`` for (every kind when a rule naming it
    matches any kind): what the compile cases compile it with."""
    kinds: set[str] = set()
    archs = {rule[0] for rule, _ in GEMM_RULES}
    classes = {rule[1] for rule, _ in GEMM_RULES}
    for key in itertools.product(archs, classes, ("s", "m", "l"), ("s", "l"), ("s", "l"), EPILOGUE_KINDS):
        if _first_rule(key) == name:  # the rules' first match, as select_config takes it
            kinds.add(key[5])
    return tuple(k for k in EPILOGUE_KINDS if k in kinds)


def _first_rule(key: tuple) -> Optional[str]:
    for rule, name in GEMM_RULES:
        if all(r == "*" or r == k for r, k in zip(rule, key)):
            return name
    return None


def dot_precision(dtype: torch.dtype) -> str:
    """The dot precision class of ``dtype``: "16", or for fp32 torch's matmul precision
    (``torch.backends.cuda.matmul.fp32_precision``: "tf32" allows TF32, else IEEE fp32)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "fp32"


def _buckets(M: int, N: int, K: int) -> tuple[str, str, str]:
    return ("s" if M <= 64 else "m" if M <= 2048 else "l", "s" if N <= 64 else "l", "s" if K <= 64 else "l")


#: A wide tile's narrower stand-in: the 128 x 256 tiles halve the tile count, so at a mid-size M
#: their last wave may leave more SMs idle than the 128 x 128 tile's (:func:`select_config` with
#: ``num_sms``); and their register budget holds only with both operands loaded through TMA
#: (plain loads of rows that are not 16-byte aligned, K = 588, spilled 432 bytes at 128 x 256:
#: the launcher takes the stand-in there, :func:`wide_stand_in`).
WIDE_FALLBACK: dict[str, str] = {"h100_16_wide": "h100_16_large", "h100_16_wide_res": "h100_16_large"}
#: The wide tile is kept while its predicted SM use is at least this fraction of its stand-in's:
#: its per-tile efficiency gain (half the A re-reads, half the per-tile overhead; ~5%, to be
#: measured) is what a worse last wave may cost.
WIDE_MIN_SM_USE_RATIO = 0.95


def wide_stand_in(config: GemmConfig) -> Optional[GemmConfig]:
    """The narrower config a wide one gives way to (:data:`WIDE_FALLBACK`), None for others."""
    for wide, narrow in WIDE_FALLBACK.items():
        if GEMM_CONFIGS[wide] == config:
            return GEMM_CONFIGS[narrow]
    return None


def select_config(M: int, N: int, K: int, dtype: torch.dtype, arch: Optional[int] = None,
                  epilogue: str = "none", num_sms: Optional[int] = None) -> GemmConfig:
    """The config for an (M, N, K) GEMM with ``dtype`` operands and an ``epilogue`` kind (one of
    :data:`EPILOGUE_KINDS`) on ``arch`` (default: the current device's family; see
    :func:`vitkern.ops._config.device_arch`). With ``num_sms`` (the free SMs the grid runs on) a
    128 x 256 tile whose waves fill the chip worse than its narrower stand-in's (below
    :data:`WIDE_MIN_SM_USE_RATIO` of its SM use: ViT-B's fc2 at batch 64, 297 tiles on 132 SMs)
    gives way to it (:data:`WIDE_FALLBACK`)."""
    if epilogue not in EPILOGUE_KINDS:
        raise ValueError(f"unknown epilogue kind {epilogue!r} (expected one of {EPILOGUE_KINDS})")
    arch = device_arch() if arch is None else arch
    key = (arch, dot_precision(dtype), *_buckets(M, N, K), epilogue)
    name = _first_rule(key)
    if name is None:
        raise RuntimeError(f"no GEMM config for {key}")
    if num_sms is not None and name in WIDE_FALLBACK:
        wide, narrow = GEMM_CONFIGS[name], GEMM_CONFIGS[WIDE_FALLBACK[name]]

        def use(cfg: GemmConfig) -> float:
            return sm_use(math.ceil(M / cfg.block_m) * math.ceil(N / cfg.block_n), 1, num_sms)

        if use(wide) < WIDE_MIN_SM_USE_RATIO * use(narrow):
            name = WIDE_FALLBACK[name]
    return GEMM_CONFIGS[name]


# The SwiGLU forward GEMM (vitkern.ops.gemm.kernels._swiglu_gemm_kernel): two fp32 accumulators a
# tile (the gate and the value rows of the same output columns), so BLOCK_N is half the fc1
# columns a tile covers: a 128 x 64 SwiGLU tile does the MMA work and holds the accumulator
# registers of a 128 x 128 tile of the plain GEMM. Keyed on (arch family, dtype class, M bucket
# "s" / "*"). Static compile figures (registers, Triton 3.8 | 3.6 / spill bytes / dynamic shared
# KB) at ViT-g's fc1 (M 4096, H 4096, K 1536, biases, the pre-activation stored; the small configs
# at M 32), then at a ragged K = 72 (not a multiple of 16: unvectorised loads), H = 200:
#   h100_16_swiglu        sm_90  128 | 128 /0/96 wg;  255 | 255 /0/32 (no bias, no pre store)
#   h100_16_swiglu_small  sm_90  104 | 102 /0/48 wg;  243 | 254 /0/12 (64 x 64 x 64 at 4 warps
#                                spilled 228-232 bytes at K = 72 on both)
#   h100_tf32_swiglu      sm_90  142 | 140 /0/96 wg;  178 | 180
#   h100_fp32_swiglu      sm_90   80 |  80 /0/8;       98 |  94 (4 warps, or 3 stages at 8:
#                                12-28 bytes spilled)
#   a100_16_swiglu        sm_80  146 | 146 /0/32;     194 | 188
#   a100_16_swiglu_small  sm_80  143 | 143 /0/24;     249 | 252
#   a100_tf32_swiglu      sm_80  142 | 142 /0/32;     192 | 192
#   a100_fp32_swiglu      sm_80   80 | 172 /0/32;     124 | 206
SWIGLU_CONFIGS: dict[str, GemmConfig] = {
    "h100_16_swiglu": GemmConfig(128, 64, 64, 8, num_warps=8, num_stages=3),
    "h100_16_swiglu_small": GemmConfig(64, 64, 32, 8, num_warps=4, num_stages=4),
    "h100_tf32_swiglu": GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=3),
    "h100_fp32_swiglu": GemmConfig(64, 32, 16, 8, num_warps=8, num_stages=2),
    "a100_16_swiglu": GemmConfig(128, 64, 32, 8, num_warps=8, num_stages=3),
    "a100_16_swiglu_small": GemmConfig(64, 64, 32, 8, num_warps=4, num_stages=3),
    "a100_tf32_swiglu": GemmConfig(128, 64, 16, 8, num_warps=8, num_stages=3),
    "a100_fp32_swiglu": GemmConfig(64, 32, 32, 8, num_warps=8, num_stages=3),
}

SWIGLU_RULES: list[tuple[tuple[int, str, str], str]] = [
    ((90, "16", "s"), "h100_16_swiglu_small"),
    ((90, "16", "*"), "h100_16_swiglu"),
    ((90, "tf32", "*"), "h100_tf32_swiglu"),
    ((90, "fp32", "*"), "h100_fp32_swiglu"),
    ((80, "16", "s"), "a100_16_swiglu_small"),
    ((80, "16", "*"), "a100_16_swiglu"),
    ((80, "tf32", "*"), "a100_tf32_swiglu"),
    ((80, "fp32", "*"), "a100_fp32_swiglu"),
]


def select_swiglu_config(M: int, N: int, K: int, dtype: torch.dtype, arch: Optional[int] = None) -> GemmConfig:
    """The SwiGLU forward GEMM's config for ``(M, N, K)`` (N: the hidden width, half of fc1's
    outputs) with ``dtype`` operands on ``arch`` (default: the current device's family)."""
    arch = device_arch() if arch is None else arch
    key = (90 if arch >= 90 else 80, dot_precision(dtype), "s" if M <= 64 else "l")
    for (r_arch, r_prec, r_m), name in SWIGLU_RULES:
        if r_arch == key[0] and r_prec == key[1] and r_m in ("*", key[2]):
            return SWIGLU_CONFIGS[name]
    raise RuntimeError(f"no SwiGLU GEMM config for {key}")


# --------------------------------------------------------------------------------------------
# The launch plan: split-K, persistent grids, predicted SM use
# --------------------------------------------------------------------------------------------

#: Each K split keeps at least this many BLOCK_K iterations (the pipeline's fill and the fp32
#: partial a split writes are amortised over them).
SPLIT_MIN_K_ITERS = 8
#: The most K splits any GEMM takes (a config's ``split_k`` may cap it lower).
SPLIT_MAX = 16
#: Machine balance for the cost of a split (bf16 dense FLOP per HBM byte; H100 SXM about
#: 800 TFLOP/s over 3.0-3.35 TB/s): each extra split writes and the reduction reads one more fp32
#: M x N partial.
FLOP_PER_BYTE = 256


def sm_use(tiles: int, split: int, sms: int) -> float:
    """Predicted SM use of ``tiles * split`` equal work units on ``sms`` SMs, one resident unit
    per SM (the 128-row tiles hold one CTA per SM): units / (waves * sms)."""
    units = tiles * split
    if units <= 0 or sms <= 0:
        return 0.0
    return units / (math.ceil(units / sms) * sms)


def _split_cost(tiles: int, split: int, sms: int, reduce_cost: float) -> float:
    """Time of a ``split``-way split-K GEMM in units of one full-K tile on one SM: the waves of
    1/split-K units, plus ``reduce_cost`` (one fp32 partial's write and read, same units) per
    split beyond the first."""
    return math.ceil(tiles * split / sms) / split + reduce_cost * (split - 1)


def choose_split_k(M: int, N: int, K: int, num_sms: int, tile: tuple[int, int, int],
                   max_split: int = SPLIT_MAX, min_k_iters: int = SPLIT_MIN_K_ITERS) -> int:
    """The K split of an (M, N, K) GEMM (a split-safe epilogue) with ``tile = (BLOCK_M, BLOCK_N,
    BLOCK_K)`` on ``num_sms`` free SMs: the split ``s`` that minimises ``ceil(tiles * s / num_sms)
    / s`` (the waves of 1/s-K work units: 1 / SM use, scaled) plus the cost of the extra fp32
    partials (a split's M x N partial write and read, against one tile's full-K MMA time at
    :data:`FLOP_PER_BYTE`), with at least ``min_k_iters`` BLOCK_K steps per split and ``s <=
    max_split``; the smallest such ``s`` on ties. 1 when nothing beats one pass.

    ViT-B/16 at batch 256 on 132 SMs (K = 50432 tokens, 128 x 128 tiles): fc1 / fc2 dW, 144
    tiles: s = 7 (95% SM use, was 55%); qkv dW, 108 tiles: s = 6 (98%, was 82%); proj dW, 36
    tiles: s = 7 (95%).
    """
    bm, bn, bk = tile
    tiles = math.ceil(M / bm) * math.ceil(N / bn)
    k_tiles = math.ceil(K / bk)
    if tiles <= 0 or k_tiles <= 0 or num_sms <= 0:
        return 1
    limit = max(1, min(max_split, k_tiles // max(1, min_k_iters)))
    # one partial's write + read (8 bytes per element) against one tile's full-K MMA time on one
    # SM (2 * bm * bn * K FLOP at 1/num_sms of the chip's rate)
    reduce_cost = 8.0 * M * N * FLOP_PER_BYTE / (2.0 * bm * bn * K * num_sms)
    best, best_cost = 1, _split_cost(tiles, 1, num_sms, reduce_cost)
    for s in range(2, limit + 1):
        # the splits the kernel really runs: ceil(k_tiles / ceil(k_tiles / s))
        per = math.ceil(k_tiles / s)
        if math.ceil(k_tiles / per) != s:
            continue
        cost = _split_cost(tiles, s, num_sms, reduce_cost)
        if cost < best_cost - 1e-12:
            best, best_cost = s, cost
    return best


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """How one GEMM launches (:func:`plan_gemm`): the config, K splits, the grid (``programs`` x
    ``split_k``), persistent or one program per tile, and the predicted SM use on ``sms`` SMs."""

    config: GemmConfig
    M: int
    N: int
    K: int
    sms: int
    tiles: int
    k_tiles: int
    split_k: int
    k_tiles_per_split: int
    programs: int
    persistent: bool

    @property
    def units(self) -> int:
        """Work units: tiles times K splits."""
        return self.tiles * self.split_k

    @property
    def waves(self) -> int:
        """Rounds of work units per SM (persistent: the most tiles one program runs)."""
        if self.persistent:
            return math.ceil(self.tiles / self.programs)
        return math.ceil(self.units / self.sms)

    @property
    def sm_use(self) -> float:
        """Predicted SM use: units / (waves x SMs)."""
        return self.units / (self.waves * self.sms) if self.units else 0.0

    def describe(self) -> dict:
        cfg = self.config
        return {
            "tile": f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}", "warps": cfg.num_warps,
            "stages": cfg.num_stages, "persistent": self.persistent, "split_k": self.split_k,
            "k_iters_per_split": self.k_tiles_per_split, "tiles": self.tiles, "units": self.units,
            "grid": [self.programs, self.split_k], "sms": self.sms, "waves": self.waves,
            "sm_use": round(self.sm_use, 4),
        }


def plan_gemm(M: int, N: int, K: int, config: GemmConfig, num_sms: int, *, split_safe: bool = False,
              row_sum: bool = False, split_k: Optional[int] = None) -> GemmPlan:
    """The launch of an (M, N, K) GEMM (M, N, K >= 1) with ``config`` on ``num_sms`` free SMs.

    ``split_k`` None: :func:`choose_split_k` when the epilogue is ``split_safe`` (linear in the
    accumulator: the dW GEMMs; the bias gradient, ``row_sum``, is a per-split partial sum too),
    capped by the config's ``split_k``; an explicit value is clamped to the K steps. A split GEMM
    launches one program per (tile, split): equal work units in waves; otherwise a persistent
    config launches ``min(tiles, num_sms)`` programs striding over the tiles (flattened, unless
    ``row_sum``: Triton 3.8's loop fusion fails on the in-loop row sums, so those launch one
    program per tile, the same waves for equal tiles).
    """
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    tiles = math.ceil(M / bm) * math.ceil(N / bn)
    k_tiles = math.ceil(K / bk)
    if split_k is None:
        split_k = (choose_split_k(M, N, K, num_sms, (bm, bn, bk), max_split=config.split_k)
                   if split_safe and config.split_k > 1 else 1)
    split_k = max(1, min(int(split_k), k_tiles))
    per_split = math.ceil(k_tiles / split_k)
    split_k = math.ceil(k_tiles / per_split)
    persistent = config.persistent and not row_sum and split_k == 1
    programs = max(1, min(tiles, num_sms)) if persistent else tiles
    return GemmPlan(config, M, N, K, num_sms, tiles, k_tiles, split_k, per_split, programs, persistent)
