"""Self-test kernels for the kernel registry and the static compile check (not part of vitkern.ops).

They prove the harness end to end: a row-wise kernel autotuned over configs (with an
sm_90-only config), a bf16 GEMM tile through ``dot_operand`` that must compile to wgmma on sm_90
and mma.sync on sm_80, and a kernel whose config spills, which the check must flag.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from vitkern.ops._config import device_arch, KernelConfig
from vitkern.ops._triton import dot_operand, launch, register_kernel, round_to, wgmma_expected
from vitkern.testing.compile_check import compile_cases

# --------------------------------------------------------------------------------------------
# (a) Row-wise: y = (x - mean(x)) * w over the last dim, autotuned over rows per program
# --------------------------------------------------------------------------------------------

ROWWISE_CONFIGS = [
    KernelConfig({"BLOCK_M": 1}, num_warps=4, num_stages=1),
    KernelConfig({"BLOCK_M": 4}, num_warps=4, num_stages=1, bench=True),
    KernelConfig({"BLOCK_M": 2}, num_warps=2, num_stages=1, archs=(90,)),
]


@register_kernel(configs=ROWWISE_CONFIGS, key=["N"])
@triton.jit
def _rowwise_center_kernel(
    X, W, Y, M, N, stride_xm, stride_ym,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    y = tl.where(mask, x - mean[:, None], 0.0)
    if HAS_W:
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)


def rowwise_center(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x - x.mean(-1, keepdim=True)) * weight`` for 2-D ``x`` with a unit last-dim stride."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with unit last-dim stride, got shape {tuple(x.shape)} strides {x.stride()}")
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != x.shape or y.stride(1) != 1:
        raise ValueError(f"out must have shape {tuple(x.shape)} and unit last-dim stride")
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    launch(_rowwise_center_kernel, grid, x, weight, y, M, N, x.stride(0), y.stride(0),
           HAS_W=weight is not None, BLOCK_N=triton.next_power_of_2(N))
    return y


def rowwise_center_ref(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = x - x.mean(-1, keepdim=True)
    return y if weight is None else y * weight


# --------------------------------------------------------------------------------------------
# (b) bf16 GEMM tile: BLOCK_M=128, 4 warps -> wgmma on sm_90, mma.sync on sm_80
# --------------------------------------------------------------------------------------------


@register_kernel(expects_wgmma=wgmma_expected(operand="A", block_m="BLOCK_M"))
@triton.jit
def _gemm_tile_kernel(
    A, B, C, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(B + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(dot_operand(a), dot_operand(b), acc)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, round_to(acc, C.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemm(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` for 2-D fp16/bf16 ``a`` (M, K) and ``b`` (K, N), any strides; fp32 accumulation."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm needs (M, K) @ (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=a.dtype, device=a.device) if out is None else out
    if c.shape != (M, N):
        raise ValueError(f"out must have shape {(M, N)}, got {tuple(c.shape)}")
    BLOCK_M, BLOCK_N, BLOCK_K = 128, 64, 64
    num_stages = 4 if device_arch(a.device) == 90 else 3
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    launch(_gemm_tile_kernel, grid, a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(),
           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4, num_stages=num_stages)
    return c


# --------------------------------------------------------------------------------------------
# (c) A config that spills: a 32 x 256 fp32 tile kept live across three reductions, one warp
#     (8192 values for 32 threads: 256 per thread, past the 255-register limit)
# --------------------------------------------------------------------------------------------


@register_kernel
@triton.jit
def _spill_rows_kernel(X, Y, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    x = tl.load(X + rm[:, None] * stride + rn[None, :])
    y = x - (tl.sum(x, axis=1) / BLOCK_N)[:, None]
    z = y * tl.rsqrt(tl.sum(y * y, axis=1) / BLOCK_N + 1e-5)[:, None]
    w = tl.sum(tl.exp(z), axis=1)
    tl.store(Y + rm[:, None] * stride + rn[None, :], z / w[:, None] + x)


def spill_rows(x: torch.Tensor) -> torch.Tensor:
    """A row transform over (M, 256) fp32 with M a multiple of 32, compiled so that it spills."""
    if x.dim() != 2 or x.shape[1] != 256 or x.shape[0] % 32 or x.stride(1) != 1 or x.dtype != torch.float32:
        raise ValueError(f"spill_rows needs contiguous (32 k, 256) fp32, got {tuple(x.shape)} {x.dtype}")
    y = torch.empty_like(x)
    launch(_spill_rows_kernel, (x.shape[0] // 32,), x, y, x.stride(0), BLOCK_M=32, BLOCK_N=256,
           num_warps=1, num_stages=1)
    return y


# --------------------------------------------------------------------------------------------
# Compile cases (CPU tensors: nothing runs under capture, big shapes cost nothing)
# --------------------------------------------------------------------------------------------


def fixture_calls(make) -> None:
    """The launches the compile cases make; ``make(shape, dtype)`` creates each input.

    The compile cases pass ``torch.empty`` on the CPU; the GPU test passes CUDA tensors and
    compares what the JIT compiled with what the static check compiles for the same calls.
    """
    x = make((8 * 197, 768), torch.bfloat16)
    rowwise_center(x)
    rowwise_center(x, make((768,), torch.bfloat16))
    # A view one element into a padded fp32 buffer: the pointer is not 16-byte aligned and the
    # row stride (770) is not divisible by 16, so neither is specialised.
    rowwise_center(make((197, 770), torch.float32)[:, 1:769])
    # bf16 GEMM at a ViT fc1 shape: (B*T, D) @ (D, 4D) through a transposed weight view.
    gemm(make((8 * 197, 768), torch.bfloat16), make((3072, 768), torch.bfloat16).t())


def _cpu_empty(shape, dtype):
    return torch.empty(shape, dtype=dtype)


@compile_cases
def _fixture_cases():
    fixture_calls(_cpu_empty)
    spill_rows(torch.empty(1024, 256, dtype=torch.float32))


@compile_cases(slow=True)
def _fixture_slow_cases():
    for n in (50, 257):
        rowwise_center(torch.empty(64, n, dtype=torch.float16), torch.empty(n, dtype=torch.float16))
