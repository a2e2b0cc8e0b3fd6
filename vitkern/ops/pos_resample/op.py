"""The registered resampling ops (``vitkern::pos_resample_fwd`` with autograd,
``vitkern::pos_resample_bwd``) and the Triton backend's implementation. The launchers are imported
where the ops run, so importing this module needs no Triton."""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._autograd import kernel_op
from vitkern.ops._common import FLOAT_DTYPES
from vitkern.ops.pos_resample.plan import device_plan, pick_pass_order
from vitkern.ops.pos_resample.reference import resample_pos_embed_packed_ref

TRITON_DTYPES = FLOAT_DTYPES


def _fwd_fake(table, table_x, y_row, x_row, y_index, y_weight, y_count, y_dense, x_index, x_weight, x_count, x_dense,
              x_perm, x_seg, out_dtype, pass_order):
    return torch.empty((y_row.shape[0], table.shape[-1]), dtype=out_dtype, device=table.device)


def _bwd_fake(grad, table, table_x, y_row, x_row, y_dense, x_dense, x_perm, x_seg):
    dx = torch.empty(table_x.shape if table_x is not None else (0,), dtype=table.dtype, device=table.device)
    return torch.empty_like(table), dx


@kernel_op("vitkern::pos_resample_bwd", fake=_bwd_fake)
def _pos_resample_bwd_op(
    grad: torch.Tensor, table: torch.Tensor, table_x: Optional[torch.Tensor], y_row: torch.Tensor,
    x_row: torch.Tensor, y_dense: torch.Tensor, x_dense: torch.Tensor, x_perm: torch.Tensor, x_seg: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    from vitkern.ops.pos_resample import launch as _launch

    d_table, d_table_x = _launch._pos_resample_bwd(grad, table, table_x, y_row, x_row, y_dense, x_dense, x_perm, x_seg)
    if d_table_x is None:
        d_table_x = torch.empty((0,), dtype=table.dtype, device=table.device)
    return d_table, d_table_x


def _save(inputs, output):
    table, table_x, y_row, x_row, _, _, _, y_dense, _, _, _, x_dense, x_perm, x_seg, _, _ = inputs
    return (table, table_x, y_row, x_row, y_dense, x_dense, x_perm, x_seg), ()


def _backward(state, saved, grads, need):
    table, table_x, y_row, x_row, y_dense, x_dense, x_perm, x_seg = saved
    if not (need[0] or need[1]):
        return (None,) * 16
    d_table, d_table_x = torch.ops.vitkern.pos_resample_bwd(grads[0], table, table_x, y_row, x_row, y_dense,
                                                            x_dense, x_perm, x_seg)
    return (d_table if need[0] else None, d_table_x if need[1] and table_x is not None else None) + (None,) * 14


@kernel_op("vitkern::pos_resample_fwd", fake=_fwd_fake, save=_save, backward=_backward)
def _pos_resample_fwd_op(
    table: torch.Tensor, table_x: Optional[torch.Tensor], y_row: torch.Tensor, x_row: torch.Tensor,
    y_index: torch.Tensor, y_weight: torch.Tensor, y_count: torch.Tensor, y_dense: torch.Tensor,
    x_index: torch.Tensor, x_weight: torch.Tensor, x_count: torch.Tensor, x_dense: torch.Tensor,
    x_perm: torch.Tensor, x_seg: torch.Tensor, out_dtype: torch.dtype, pass_order: str,
) -> torch.Tensor:
    from vitkern.ops.pos_resample import launch as _launch

    return _launch._pos_resample_fwd(table, table_x, y_row, x_row, y_index, y_weight, y_count, x_index, x_weight,
                                     x_count, out_dtype, pass_order)


# --------------------------------------------------------------------------------------------
# The Triton backend (what register_impl gets: the public arguments after checks)
# --------------------------------------------------------------------------------------------


def _pos_resample_triton(table, table_x, grid_sizes, mode, antialias, align_corners, aspect_preserving, dtype,
                         pass_order=None):
    """``pass_order`` None: the plan's (``plan.pick_pass_order``); a benchmark forces one."""
    factorized = table_x is not None
    source = (table.shape[1], table_x.shape[1]) if factorized else tuple(table.shape[1:3])
    # the factorized tables resample with the 1-D linear rule: bilinear along one axis
    plan = device_plan(grid_sizes, source, "bilinear" if factorized else mode, False if factorized else antialias,
                       False if factorized else align_corners, aspect_preserving, table.device,
                       learned=not factorized)
    if plan is None:  # a CUDA graph capture of a layout not seen before: the reference's device ops
        return resample_pos_embed_packed_ref(table, table_x, grid_sizes, mode, antialias, align_corners,
                                             aspect_preserving, dtype)
    order = pass_order or pick_pass_order(plan.loads, source, table.shape[-1], plan.x_index.shape[0],
                                          plan.y_index.shape[0])
    return torch.ops.vitkern.pos_resample_fwd(
        table[0], table_x[0] if factorized else None, plan.y_row, plan.x_row, plan.y_index, plan.y_weight,
        plan.y_count, plan.y_dense, plan.x_index, plan.x_weight, plan.x_count, plan.x_dense, plan.x_perm, plan.x_seg,
        dtype, order)
