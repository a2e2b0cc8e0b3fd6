"""The resampling launches of the static compile check (``vitkern.testing.compile_check``): the
launcher runs on empty CPU tensors under its capture, so the kernel is specialised and compiled
for sm_80 / sm_90 but nothing runs."""

from __future__ import annotations

import torch

from vitkern.ops.pos_resample.launch import _pos_resample_bwd, _pos_resample_fwd
from vitkern.testing.compile_check import compile_cases


def _case(total, grid, dim, dtype, out_dtype, *, factorized=False, taps=(4, 4), order="joint"):
    gh, gw = grid
    table = torch.empty((gh, dim) if factorized else (gh, gw, dim), dtype=dtype)
    table_x = torch.empty((gw, dim), dtype=dtype) if factorized else None
    rows = torch.empty(total, dtype=torch.int32)
    idx_y, idx_x = torch.empty((64, taps[0]), dtype=torch.int32), torch.empty((64, taps[1]), dtype=torch.int32)
    w_y, w_x = torch.empty((64, taps[0])), torch.empty((64, taps[1]))
    count = torch.empty(64, dtype=torch.int32)
    _pos_resample_fwd(table, table_x, rows, rows, idx_y, w_y, count, idx_x, w_x, count, out_dtype, order)


@compile_cases
def _pos_resample_cases():
    # NaFlex ViT-B (16 x 16 grid, D = 768) into bf16 tokens from an fp32 and a bf16 table; SO400M's
    # D = 1152; the factorized tables; the narrow tiles (D = 16, 40, 64); the separable orders'
    # two passes (grid rows of one axis's taps into the fp32 intermediate, then the other axis)
    _case(35561, (16, 16), 768, torch.float32, torch.bfloat16)
    _case(35561, (16, 16), 768, torch.bfloat16, torch.bfloat16)
    _case(7153, (16, 16), 1152, torch.float32, torch.float16, factorized=True, taps=(2, 2))
    _case(100, (4, 5), 40, torch.float32, torch.float32, taps=(7, 9))
    _case(100, (4, 5), 64, torch.float32, torch.float32, taps=(7, 9))
    _case(100, (4, 5), 16, torch.bfloat16, torch.bfloat16, factorized=True)
    _case(35561, (16, 16), 768, torch.float32, torch.bfloat16, taps=(16, 16))
    _case(35561, (16, 16), 768, torch.float32, torch.bfloat16, order="x_first")
    _case(35561, (16, 16), 768, torch.bfloat16, torch.bfloat16, order="y_first", taps=(16, 16))
    _case(7153, (16, 16), 1152, torch.float32, torch.float16, order="x_first")
    _case(100, (4, 5), 40, torch.float32, torch.float32, taps=(7, 9), order="y_first")


def _bwd_case(total, grid, dim, dtype, grad_dtype, n_x=506, n_y=490):
    gh, gw = grid
    table = torch.empty((gh, gw, dim), dtype=dtype)
    rows = torch.empty(total, dtype=torch.int32)
    _pos_resample_bwd(torch.empty((total, dim), dtype=grad_dtype), table, None, rows, rows,
                      torch.empty((n_y, gh)), torch.empty((n_x, gw)), rows, torch.empty(n_x + 1, dtype=torch.int32))


@compile_cases
def _pos_resample_bwd_cases():
    # the learned grid's backward: NaFlex ViT-B's bf16 and fp32 gradients, SO400M's D = 1152, a
    # small grid and narrow rows (D = 40: BLOCK_D 64), a tall grid (Gh = 70: five BLOCK_I = 16 blocks)
    _bwd_case(35561, (16, 16), 768, torch.float32, torch.bfloat16)
    _bwd_case(35561, (16, 16), 768, torch.float32, torch.float32)
    _bwd_case(7153, (16, 16), 1152, torch.bfloat16, torch.float16)
    _bwd_case(100, (4, 5), 40, torch.float32, torch.float32, n_x=12, n_y=9)
    _bwd_case(300, (70, 3), 136, torch.float32, torch.float32, n_x=12, n_y=9)
