"""The pure-PyTorch reference of the packed position-embedding resampling (backend "reference";
also the "torch" backend, being PyTorch's own ops): timm NaFlex's rule per distinct grid size,
``F.interpolate`` in float32 then one cast, concatenated in the images' order. Differentiable by
autograd in both tables."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkern.ops.pos_resample.plan import interp_size

__all__ = ["grid_pos_embed_ref", "resample_pos_embed_packed_ref"]


def grid_pos_embed_ref(table: Tensor, table_x: Optional[Tensor], grid: Tuple[int, int], mode: str, antialias: bool,
                       align_corners: bool, aspect_preserving: bool, dtype: torch.dtype) -> Tensor:
    """One image grid's position embedding, ``(rows * cols, D)`` row-major in ``dtype``: the
    learned ``(1, Gh, Gw, D)`` table resampled (cropped to the grid when aspect-preserving), or,
    with ``table_x``, the sum of the y ``(1, Gh, D)`` and x ``(1, Gw, D)`` tables resampled with
    the 1-D linear rule."""
    gh, gw = grid
    ly, lx = interp_size(grid, aspect_preserving)
    if table_x is not None:
        pe_y = _resample_1d(table, ly, dtype)[:gh]
        pe_x = _resample_1d(table_x, lx, dtype)[:gw]
        return (pe_y[:, None] + pe_x[None]).reshape(gh * gw, -1)
    oh, ow = table.shape[1:3]
    if (gh, gw) == (oh, ow):
        return table.reshape(oh * ow, -1).to(dtype)
    kwargs = {} if mode in ("nearest", "nearest-exact", "area") else {"align_corners": align_corners,
                                                                       "antialias": antialias}
    out = F.interpolate(table.permute(0, 3, 1, 2).float(), size=(ly, lx), mode=mode, **kwargs)
    return out[0, :, :gh, :gw].flatten(1).t().to(dtype)


def _resample_1d(table: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    # timm's factorized table resampling: linear, no antialias, (L, D) out
    if table.shape[1] == length:
        return table[0].to(dtype)
    out = F.interpolate(table.permute(0, 2, 1).float(), size=length, mode="linear", align_corners=False)
    return out[0].t().to(dtype)


def resample_pos_embed_packed_ref(table: Tensor, table_x: Optional[Tensor], grid_sizes: Sequence[Tuple[int, int]],
                                  mode: str, antialias: bool, align_corners: bool, aspect_preserving: bool,
                                  dtype: torch.dtype) -> Tensor:
    """The packed rows: each image's :func:`grid_pos_embed_ref`, one resampling per distinct grid."""
    if not grid_sizes:
        return table.new_zeros((0, table.shape[-1]), dtype=dtype)
    tables = {g: grid_pos_embed_ref(table, table_x, g, mode, antialias, align_corners, aspect_preserving, dtype)
              for g in dict.fromkeys(grid_sizes)}
    return torch.cat([tables[g] for g in grid_sizes])
