"""The prologue launchers: argument guards, output / partial-sum allocation, the launches and the
deterministic reductions of the per-program partial sums."""

from __future__ import annotations

from typing import Optional

import torch
import triton

from vitkern.ops._triton import launch
from vitkern.ops.qk_prologue.configs import MAX_HEAD_DIM, _prologue_config
from vitkern.ops.qk_prologue.kernels import _qk_prologue_bwd_kernel, _qk_prologue_fwd_kernel

NORM_CODES = {None: 0, "layer": 1, "rms": 2}


def _unit_last(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _tables(sin: Optional[torch.Tensor], cos: Optional[torch.Tensor]):
    """Tables as ``(rows, D)``-strided views with a head stride (0 when shared by the heads)."""
    if sin is None:
        return None, None, 0, 0
    sin, cos = sin.contiguous(), cos.contiguous()
    if sin.dim() == 3:
        return sin, cos, sin.stride(0), sin.stride(1)
    return sin, cos, 0, sin.stride(0)


def _check(x: torch.Tensor) -> int:
    if x.dim() != 4:
        raise ValueError(f"qk_prologue (triton): x must be (B, H, T, D), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if not 2 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"qk_prologue (triton): the head dim must be in [2, {MAX_HEAD_DIM}], got {d}")
    return d


def _qk_prologue_fwd(x, weight, bias, sin, cos, norm_kind, eps, half, prefix) -> torch.Tensor:
    d = _check(x)
    x = _unit_last(x)
    B, H, T, _ = x.shape
    y = torch.empty((B, H, T, d), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    sin, cos, stride_rh, stride_rt = _tables(sin, cos)
    config = _prologue_config(d, backward=False)
    launch(
        _qk_prologue_fwd_kernel, (triton.cdiv(T, config.meta["BLOCK_T"]), B * H),
        x, y, weight, bias, sin, cos,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), stride_rh, stride_rt,
        H, T, prefix, eps,
        HEAD_DIM=d, NORM=NORM_CODES[norm_kind], HAS_W=weight is not None, HAS_B=bias is not None,
        ROPE=sin is not None, HALF=half, config=config,
    )
    return y


def _qk_prologue_bwd(dy, x, weight, bias, sin, cos, norm_kind, eps, half, prefix,
                     need_dx: bool, need_dw: bool, need_db: bool, need_dtables: bool):
    """``(dx, dw, db, dsin, dcos)``, None for what was not asked for. ``dw`` / ``db`` in the
    parameters' dtypes, the table gradients in the tables' (summed over the batch, and over the
    heads for shared tables)."""
    d = _check(x)
    x, dy = _unit_last(x), _unit_last(dy)
    B, H, T, _ = x.shape
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    need_dtables = need_dtables and sin is not None
    sin_in, cos_in = sin, cos
    sin, cos, stride_rh, stride_rt = _tables(sin, cos)
    config = _prologue_config(d, backward=True)
    block_t, block_d = config.meta["BLOCK_T"], config.meta["BLOCK_D"]
    n_t = triton.cdiv(T, block_t)
    dx = torch.empty((B, H, T, d), dtype=x.dtype, device=x.device) if need_dx else None
    f32 = dict(dtype=torch.float32, device=x.device)
    dw_part = torch.empty((B * H * n_t, block_d), **f32) if need_dw else None
    db_part = torch.empty((B * H * n_t, block_d), **f32) if need_db else None
    n_rot = sin.shape[-2] if sin is not None else 0
    dsin_part = torch.empty((B * H, n_rot, d), **f32) if need_dtables else None
    dcos_part = torch.empty((B * H, n_rot, d), **f32) if need_dtables else None
    if x.numel() and (need_dx or need_dw or need_db or need_dtables):
        launch(
            _qk_prologue_bwd_kernel, (n_t, B * H),
            dy, x, weight, bias, sin, cos, dx, dw_part, db_part, dsin_part, dcos_part,
            dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
            dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
            dx.stride(2) if dx is not None else 0, stride_rh, stride_rt, n_rot * d,
            H, T, prefix, eps,
            HEAD_DIM=d, NORM=NORM_CODES[norm_kind], HAS_W=weight is not None, HAS_B=bias is not None,
            ROPE=sin is not None, HALF=half, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
            NEED_DTABLES=need_dtables, config=config,
        )
    elif x.numel() == 0:
        for t in (dw_part, db_part, dsin_part, dcos_part):
            if t is not None:
                t.zero_()
    dw = dw_part.sum(0)[:d].to(weight.dtype) if need_dw else None
    db = db_part.sum(0)[:d].to(bias.dtype) if need_db else None
    dsin = dcos = None
    if need_dtables:
        if sin_in.dim() == 3:  # per head: sum over the batch
            dsin = dsin_part.view(B, H, n_rot, d).sum(0).to(sin_in.dtype)
            dcos = dcos_part.view(B, H, n_rot, d).sum(0).to(cos_in.dtype)
        else:
            dsin = dsin_part.sum(0).to(sin_in.dtype)
            dcos = dcos_part.sum(0).to(cos_in.dtype)
    return dx, dw, db, dsin, dcos
