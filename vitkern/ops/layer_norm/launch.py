"""The LayerNorm launchers: argument guards, the (rows, N) views of any leading shape and strides,
output allocation, the persistent backward grid and the kernel launches.

``_layer_norm_fwd`` / ``_layer_norm_bwd`` take any leading shape and strides (rows are flattened
without a copy whenever the leading dims collapse to one stride; expanded gradients are read with
stride 0) and return contiguous outputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from vitkern.ops._common import FLOAT_DTYPES
from vitkern.ops._config import available_sms
from vitkern.ops._triton import launch
from vitkern.ops._index import rows_int32_safe
from vitkern.ops.layer_norm.configs import (
    _dwdb_config,
    _dwdb_splits,
    _PARTIAL_BYTES_CAP,
    MAX_WIDTH,
    _bwd_config,
    _for_interpreter,
    _fwd_config,
)
from vitkern.ops.layer_norm.kernels import (
    _layer_norm_bwd_dwdb_kernel,
    _layer_norm_bwd_kernel,
    _layer_norm_bwd_looped_kernel,
    _layer_norm_fwd_kernel,
    _layer_norm_fwd_looped_kernel,
)


def _check_launch(x: torch.Tensor, **others: Optional[torch.Tensor]) -> int:
    """Launcher-side validation (the public functions check first; this guards direct calls)."""
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if not 1 <= n <= MAX_WIDTH:
        raise ValueError(f"layer_norm (triton): the normalised width must be in [1, {MAX_WIDTH}], got {n}")
    for name, t in (("x", x), *others.items()):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"layer_norm (triton): {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"layer_norm (triton): {name} is on {t.device} but x is on {x.device}")
    return n


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as a (rows, n) view when its leading dims collapse to one row stride, else a copy.

    Row offsets are int64 in the kernels, column offsets (``cols * stride_n``) int32: a view whose
    ``(n - 1) * stride_n`` passes 2^31 - 1 (a transposed input) is copied to unit column stride."""
    try:
        v = t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n).contiguous()
    return rows_int32_safe(v)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests fill them with NaN to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _as_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def _layer_norm_fwd(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward launcher: ``(y, s, mean, rstd)``; ``s = x + residual`` (None without a residual).

    ``y`` has ``out_dtype``, default ``s``'s dtype (``x``'s without a residual): the kernel rounds
    the fp32 result to it once, so a float32 row normalised into bf16 equals
    ``layer_norm(x).to(bf16)`` bit for bit. mean / rstd are fp32 of shape ``x.shape[:-1]``.
    Outputs are contiguous; inputs may have any strides.
    """
    n = _check_launch(x, residual=residual, weight=weight, bias=bias)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    weight, bias = _as_vector(weight), _as_vector(bias)
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    if residual is not None:
        r2 = _as_rows(residual, n)
        s = _empty(x.shape, torch.promote_types(x.dtype, residual.dtype), x.device)
        s2 = s.view(m, n)
        row_dtype = s.dtype
    else:
        r2, s, s2, row_dtype = None, None, None, x.dtype
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm (triton): out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    y = _empty(x.shape, out_dtype or row_dtype, x.device)
    y2 = y.view(m, n)
    mean = _empty(x.shape[:-1], torch.float32, x.device)
    rstd = _empty(x.shape[:-1], torch.float32, x.device)
    if m == 0:
        return y, s, mean, rstd
    looped, config = _fwd_config(n, row_dtype, out_dtype)
    kernel = _layer_norm_fwd_looped_kernel if looped else _layer_norm_fwd_kernel
    launch(
        kernel, (triton.cdiv(m, config.meta["BLOCK_M"]),),
        x2, r2, weight, bias, y2, s2, mean, rstd,
        m, n,
        x2.stride(0), x2.stride(1),
        r2.stride(0) if r2 is not None else 0, r2.stride(1) if r2 is not None else 1,
        y2.stride(0), s2.stride(0) if s2 is not None else 0,
        eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        config=config,
    )
    return y, s, mean, rstd


def _layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ds: Optional[torch.Tensor],
    compute_dw: bool,
    db_dtype: Optional[torch.dtype],
    dx_low_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward launcher: ``(dx, dw, db, dx_low)``.

    ``x`` is the tensor that was normalised (the sum ``s`` for the add variant) and ``dx`` has its
    dtype; ``ds`` (add variant) is the gradient of the returned sum, added to ``dx``. ``dw`` (in
    ``weight``'s dtype) is computed when ``compute_dw``; ``db`` when ``db_dtype`` is given;
    ``dx_low``, the same ``dx`` in ``dx_low_dtype``, when that is given (one pass writes both).
    ``dy`` / ``ds`` may have any strides, including the stride 0 of an expanded gradient.
    """
    n = _check_launch(x, dy=dy, weight=weight, ds=ds)
    for name, t in (("dy", dy), ("ds", ds)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    compute_dw = bool(compute_dw) and weight is not None
    compute_db = db_dtype is not None
    weight = _as_vector(weight)
    x2 = _as_rows(x, n)
    dy2 = _as_rows(dy, n)
    ds2 = _as_rows(ds, n) if ds is not None else None
    m = x2.shape[0]
    mean, rstd = mean.reshape(m), rstd.reshape(m)
    dx = _empty(x.shape, x.dtype, x.device)
    dx2 = dx.view(m, n)
    if dx_low_dtype is not None and dx_low_dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer_norm (triton): dx_low_dtype must be float32, float16 or bfloat16, got {dx_low_dtype}")
    dx_low = _empty(x.shape, dx_low_dtype, x.device) if dx_low_dtype is not None else None
    dw = _empty((n,), weight.dtype, x.device) if compute_dw else None
    db = _empty((n,), db_dtype, x.device) if compute_db else None
    if m == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db, dx_low
    looped, config, per_sm = _bwd_config(n, x.device if x.device.type == "cuda" else None,
                                         narrow_dy=dy.element_size() < x.element_size())
    kernel = _layer_norm_bwd_looped_kernel if looped else _layer_norm_bwd_kernel
    sms = available_sms(x.device)
    programs = sms * per_sm
    programs = min(programs, triton.cdiv(m, config.meta["BLOCK_M"]), max(1, _PARTIAL_BYTES_CAP // (8 * n)))
    dw_partial = _empty((programs, n), torch.float32, x.device) if compute_dw else None
    db_partial = _empty((programs, n), torch.float32, x.device) if compute_db else None
    launch(
        kernel, (programs,),
        dy2, x2, weight, mean, rstd, ds2, dx2, dx_low.view(m, n) if dx_low is not None else None,
        dw_partial, db_partial,
        m, n,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
        ds2.stride(0) if ds2 is not None else 0, ds2.stride(1) if ds2 is not None else 1,
        dx2.stride(0),
        HAS_WEIGHT=weight is not None, HAS_DS=ds is not None, HAS_DX_LOW=dx_low is not None,
        COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
        config=config,
    )
    if compute_dw or compute_db:
        _reduce_dwdb(dw_partial, db_partial, dw, db, programs, n, sms)
    return dx, dw, db, dx_low


def _reduce_dwdb(dw_partial, db_partial, dw, db, rows: int, n: int, sms: int) -> None:
    """dw / db = the sums of the (rows, n) fp32 partials over their rows, in a fixed order: one
    launch over column strips x row splits (:func:`_dwdb_splits`), and where it split, a second
    over the (splits, n) partials it wrote."""
    config = _for_interpreter(_dwdb_config(n, sms), grow="BLOCK_N", other="BLOCK_G")
    splits = _dwdb_splits(rows, n, config, sms)
    if splits > 1:
        dw_out = _empty((splits, n), torch.float32, dw_partial.device) if dw is not None else None
        db_out = _empty((splits, n), torch.float32, db_partial.device) if db is not None else None
    else:
        dw_out, db_out = dw, db
    launch(
        _layer_norm_bwd_dwdb_kernel, (triton.cdiv(n, config.meta["BLOCK_N"]), splits),
        dw_partial, db_partial, dw_out, db_out, rows, n, triton.cdiv(rows, splits),
        COMPUTE_DW=dw is not None, COMPUTE_DB=db is not None,
        config=config,
    )
    if splits > 1:
        _reduce_dwdb(dw_out, db_out, dw, db, splits, n, 1)
