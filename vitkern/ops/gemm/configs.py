"""The GEMM core's configs as data: named tiles per arch family and dtype class, and the rules
that pick one for an (M, N, K) GEMM (:func:`select_config`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from vitkern.ops._config import device_arch, KernelConfig, TRITON_36

__all__ = ["GemmConfig", "GEMM_CONFIGS", "GEMM_RULES", "dot_precision", "select_config"]


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One GEMM launch configuration.

    ``persistent``: ``num_sms`` programs stride over the tiles. ``tma``: load operands (and store
    the output) through tensor descriptors where the strides allow (sm_90 family only).
    ``split_k``: the most K splits the launcher may use for split-safe epilogues (the dW GEMMs).
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

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
             "GROUP_M": self.group_m, "FLATTEN": self.persistent},
            num_warps=self.num_warps, num_stages=self.num_stages,
        )

    def label(self) -> str:
        s = f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"
        return s + (" persistent" if self.persistent else "") + (" tma" if self.tma else "") + (
            f" splitk{self.split_k}" if self.split_k > 1 else "")


# Named configs. Static compile figures (Triton 3.8, ptxas from its wheel; registers / spill
# bytes / dynamic shared KB, "wg" = wgmma in the PTX) for the fc1 epilogue (bias + GELU + pre
# store), the fc2 epilogue (bias, LayerScale, row scale, fp32 residual) and the dW GEMM (split-K,
# reduction scale, row sums, row dots), from the compile cases (compile_cases.py):
#   h100_16_large  sm_90  164/0/160 wg | 125/0/224 wg | (dW runs it unflattened: as h100_16_mid)
#   h100_16_mid    sm_90  161/0/128 wg | 122/0/160 wg | 233/0/116 wg
#   h100_16_small  sm_90  168/0/112 wg | 115/0/128 wg | 237/0/113 wg
#   h100_tf32      sm_90  163/0/160 wg | 150/0/160 wg | 232/0/80 wg
#   h100_fp32      sm_90  128/0/36     | 128/0/36     | 128/0/20      (IEEE fp32: FMA dots)
#   a100_16_large  sm_80  219/0/48     | 238/0/48     | 228/0/76      (mma.sync)
#   a100_16_small  sm_80  221/0/36     | 246/0/36     | 242/0/49
#   a100_tf32      sm_80  250/0/48     | 254/0/48     | 255/0/52
#   a100_fp32      sm_80   80/0/32     |  80/0/32     |  99/0/40
# The same sm_90 sources compiled for sm_80 spill (TMA descriptors lower to plain loads there), and
# so do 128x256 tiles on both arches with the residual epilogue; the TMA store of C and TMA load of
# the residual keep the sm_90 fc2 epilogue at ~125 registers (~240 with pointer stores).
# tl.range(..., warp_specialize=True) compiles on sm_90 with Triton 3.8 but to the same code
# (same registers and shared memory: the pass targets Blackwell), so no config uses it and the
# kernel does not pass the option (Triton 3.6 compatible). Tuning these on an H100 / A100 is
# still open: see benchmarks/setups/linear.py and mlp.py.
GEMM_CONFIGS: dict[str, GemmConfig] = {
    # sm_90 family: wgmma, TMA descriptors (plain loads where strides are not 16-byte aligned)
    "h100_16_large": GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=3, persistent=True, tma=True, split_k=8),
    "h100_16_mid": GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=3, tma=True, split_k=8),
    "h100_16_small": GemmConfig(64, 128, 64, 8, num_warps=4, num_stages=4, tma=True, split_k=8),
    "h100_tf32": GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=3, tma=True, split_k=8),
    "h100_fp32": GemmConfig(64, 64, 16, 8, num_warps=8, num_stages=3, tma=True, split_k=8),
    # sm_80 family: mma.sync, cp.async-pipelined plain loads
    "a100_16_large": GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=4, split_k=8),
    # 8 warps: with 4, the bias + tanh-GELU epilogue spilled 68 bytes under Triton 3.6 (M = 1)
    "a100_16_small": GemmConfig(64, 128, 32, 8, num_warps=8, num_stages=4, split_k=8),
    # Triton 3.6: the 128 x 128 tile's dW epilogue (row scale, row sums, row dots) spilled 4 bytes
    # (255 registers), 128 x 64 holds (206); under 3.8 128 x 64 spills 12 bytes in the fc1 epilogue
    # and 128 x 128 holds
    "a100_tf32": GemmConfig(128, 64 if TRITON_36 else 128, 16, 8, num_warps=8, num_stages=4, split_k=8),
    "a100_fp32": GemmConfig(64, 64, 32, 8, num_warps=8, num_stages=3, split_k=8),
}

# (arch family, dtype class, M bucket, N bucket, K bucket) -> config name; "*" matches anything.
# dtype class: "16" (fp16/bf16), "tf32" (fp32 with TF32 allowed), "fp32" (IEEE fp32).
# M bucket: "s" (M <= 64), "m" (M <= 2048), "l". N bucket: "s" (N <= 64), "l". K bucket: "s" (K <=
# 64), "l". The first matching rule wins.
GEMM_RULES: list[tuple[tuple[int, str, str, str, str], str]] = [
    ((90, "16", "s", "*", "*"), "h100_16_small"),
    ((90, "16", "*", "s", "*"), "h100_16_small"),
    ((90, "16", "m", "*", "*"), "h100_16_mid"),
    ((90, "16", "l", "*", "*"), "h100_16_large"),
    ((90, "tf32", "*", "*", "*"), "h100_tf32"),
    ((90, "fp32", "*", "*", "*"), "h100_fp32"),
    ((80, "16", "s", "*", "*"), "a100_16_small"),
    ((80, "16", "*", "s", "*"), "a100_16_small"),
    ((80, "16", "*", "*", "*"), "a100_16_large"),
    ((80, "tf32", "*", "*", "*"), "a100_tf32"),
    ((80, "fp32", "*", "*", "*"), "a100_fp32"),
]


def dot_precision(dtype: torch.dtype) -> str:
    """The dot precision class of ``dtype``: "16", or for fp32 torch's matmul precision
    (``torch.backends.cuda.matmul.fp32_precision``: "tf32" allows TF32, else IEEE fp32)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "fp32"


def _buckets(M: int, N: int, K: int) -> tuple[str, str, str]:
    return ("s" if M <= 64 else "m" if M <= 2048 else "l", "s" if N <= 64 else "l", "s" if K <= 64 else "l")


def select_config(M: int, N: int, K: int, dtype: torch.dtype, arch: Optional[int] = None) -> GemmConfig:
    """The config for an (M, N, K) GEMM with ``dtype`` operands on ``arch`` (default: the
    current device's family; see :func:`vitkern.ops._config.device_arch`)."""
    arch = device_arch() if arch is None else arch
    key = (arch, dot_precision(dtype), *_buckets(M, N, K))
    for rule, name in GEMM_RULES:
        if all(r == "*" or r == k for r, k in zip(rule, key)):
            return GEMM_CONFIGS[name]
    raise RuntimeError(f"no GEMM config for {key}")

