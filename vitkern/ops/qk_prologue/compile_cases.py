"""The prologue launches of the static compile check (``vitkern.testing.compile_check``): the
launchers run on empty CPU tensors under its capture, so the kernels are specialised and compiled
for sm_80 / sm_90 but nothing runs."""

from __future__ import annotations

import torch

from vitkern.testing.compile_check import compile_cases
from vitkern.ops.qk_prologue.launch import _qk_prologue_bwd, _qk_prologue_fwd


def _case(B, H, T, D, dtype, *, norm="layer", affine=True, rope=True, half=False, per_head=False, prefix=1,
          packed=False, dtables=False):
    if packed:  # q of a (B, T, 3, H, D) qkv
        x = torch.empty(B, T, 3, H, D, dtype=dtype)[:, :, 0].transpose(1, 2)
    else:
        x = torch.empty(B, H, T, D, dtype=dtype)
    w = torch.empty(D, dtype=dtype) if norm and affine else None
    b = torch.empty(D, dtype=dtype) if norm == "layer" and affine else None
    shape = (H, T - prefix, D) if per_head else (T - prefix, D)
    sin = torch.empty(shape, dtype=torch.float32) if rope else None
    cos = torch.empty(shape, dtype=torch.float32) if rope else None
    _qk_prologue_fwd(x, w, b, sin, cos, norm, 1e-6, half, prefix)
    _qk_prologue_bwd(torch.empty(B, H, T, D, dtype=dtype), x, w, b, sin, cos, norm, 1e-6, half, prefix,
                     True, w is not None, b is not None, dtables)


@compile_cases
def _qk_prologue_cases():
    # the benchmark shapes: EVA-02-L (T = 257, D = 64, packed qkv), DINOv3-B (4 registers + class)
    _case(256, 16, 257, 64, torch.bfloat16, packed=True)
    _case(256, 12, 201, 64, torch.bfloat16, norm=None, half=True, prefix=5)
    # every variant once: RMSNorm, no affine, no rope, no norm, per-head learnable tables, the
    # half layout at a split head dim (Qwen-VL's 80), fp32 / fp16, head dims 16 / 72 / 128 / 256
    _case(2, 4, 50, 80, torch.float16, norm="rms", half=True, prefix=0)
    _case(2, 4, 50, 72, torch.float32, affine=False)
    _case(2, 4, 50, 64, torch.bfloat16, rope=False)
    _case(2, 6, 37, 16, torch.bfloat16, norm=None, per_head=True, dtables=True, prefix=0)
    _case(2, 3, 33, 128, torch.bfloat16, norm="rms", dtables=True)
    _case(1, 2, 17, 256, torch.bfloat16)
