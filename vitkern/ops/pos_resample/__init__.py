"""Position embeddings of a packed mixed-resolution batch: a learned grid resampled to every
image's patch grid in one kernel launch.

Public function: ``resample_pos_embed_packed(pos_embed, grid_sizes, *, pos_embed_x=None,
mode="bicubic", antialias=True, align_corners=False, aspect_preserving=False, dtype=None)`` ->
``(sum of rows * cols, D)``: image ``i``'s rows * cols position embeddings, row-major, after
image ``i - 1``'s (the packed order of :func:`vitkern.pack_images`). timm NaFlex's rule: the
learned ``(1, Gh, Gw, D)`` grid interpolated in float32 (a square of the longer side, cropped,
when aspect-preserving), or the factorized y ``(1, Gh, D)`` / x ``(1, Gw, D)`` tables resampled
with the 1-D linear rule and summed; one cast to ``dtype`` (default: the table's).

Backends: "reference" and "torch" (``F.interpolate`` per distinct grid size, then a
concatenation: ``reference.py``), "triton" (``kernels.py``: one launch for the whole batch, or
two in the separable order, its taps from the separable weights of ``plan.py``; the backward
separable too: a segmented sum over the rows of each x weight row, then one float32 matmul,
deterministic). Per output element: the image's taps
(4 x 4 bicubic, 2 x 2 bilinear; more when antialiasing widens the filter on downsampling)
gathered from the grid, an L2-resident table, or, for a batch of many images, one axis's taps
gathered from the grid resampled along the other (``plan.pick_pass_order``), and one 16- or
32-bit store; the reference's cost is per distinct grid size (several launches each), which a
batch of mixed sizes pays once per image.

Under ``torch.compile`` the reference's ops trace into the graph (the tap tables are host-built
per batch, from its grid sizes). Eagerly the tables of the last 32 layouts stay on the device
(``plan.device_plan``): a repeated layout copies nothing from the host, and a CUDA graph can
capture it once it has run before the capture (a layout first seen during a capture takes the
reference's ops).

Files: ``plan`` (the separable weights and the per-batch tap tables), ``reference``, ``configs``,
``kernels``, ``launch``, ``op`` (registered ops, autograd, the Triton backend), ``compile_cases``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import FLOAT_DTYPES, check_tensor
from vitkern.ops.pos_resample.op import TRITON_DTYPES, _pos_resample_triton
from vitkern.ops.pos_resample.plan import RESAMPLE_MODES, axis_weights, build_plan, clear_plan_cache
from vitkern.ops.pos_resample.reference import grid_pos_embed_ref, resample_pos_embed_packed_ref

__all__ = ["resample_pos_embed_packed", "resample_pos_embed_packed_ref", "grid_pos_embed_ref", "axis_weights",
           "build_plan", "clear_plan_cache", "RESAMPLE_MODES"]


def _check_grids(grid_sizes) -> Tuple[Tuple[int, int], ...]:
    if isinstance(grid_sizes, torch.Tensor) or not isinstance(grid_sizes, Sequence):
        raise TypeError("resample_pos_embed_packed: grid_sizes must be a sequence of (rows, cols) host integers, "
                        f"got {type(grid_sizes).__name__}")
    out = []
    for i, g in enumerate(grid_sizes):
        if (not isinstance(g, Sequence) or len(g) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in g)):
            raise ValueError(f"resample_pos_embed_packed: grid_sizes[{i}] must be a (rows, cols) pair of positive "
                             f"ints, got {g!r}")
        out.append((int(g[0]), int(g[1])))
    return tuple(out)


def resample_pos_embed_packed(
    pos_embed: torch.Tensor,
    grid_sizes: Sequence[Tuple[int, int]],
    *,
    pos_embed_x: Optional[torch.Tensor] = None,
    mode: str = "bicubic",
    antialias: bool = True,
    align_corners: bool = False,
    aspect_preserving: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Each image's position embedding, packed (see the module docstring).

    Args:
        pos_embed: the learned grid ``(1, Gh, Gw, D)`` (timm NaFlex's layout), or with
            ``pos_embed_x`` the factorized y table ``(1, Gh, D)``.
        grid_sizes: each image's ``(rows, cols)`` of patches, host integers
            (``PackedBatch.grid_sizes``).
        pos_embed_x: the factorized x table ``(1, Gw, D)``; ``mode`` / ``antialias`` /
            ``align_corners`` then do not apply (timm's 1-D linear rule).
        mode: an ``F.interpolate`` mode: "bicubic" (timm NaFlex's default), "bilinear",
            "nearest", "nearest-exact" or "area".
        antialias, align_corners: as ``F.interpolate`` (bilinear / bicubic only).
        aspect_preserving: resample to a square of the grid's longer side and crop (timm's
            ``pos_embed_ar_preserving``).
        dtype: the output dtype (default ``pos_embed``'s); the interpolation runs in float32.
    """
    grids = _check_grids(grid_sizes)
    if pos_embed_x is None:
        check_tensor("pos_embed", pos_embed, ndim=4, shape=(1, None, None, None))
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"resample_pos_embed_packed: mode must be one of {RESAMPLE_MODES}, got {mode!r}")
    else:
        check_tensor("pos_embed", pos_embed, ndim=3, shape=(1, None, None))
        check_tensor("pos_embed_x", pos_embed_x, ndim=3, shape=(1, None, pos_embed.shape[-1]))
        if pos_embed_x.device != pos_embed.device or pos_embed_x.dtype != pos_embed.dtype:
            raise ValueError("resample_pos_embed_packed: pos_embed_x must have pos_embed's device and dtype, got "
                             f"{pos_embed_x.device} / {pos_embed_x.dtype} and {pos_embed.device} / {pos_embed.dtype}")
    if min(pos_embed.shape[1:]) == 0:
        raise ValueError(f"resample_pos_embed_packed: pos_embed has an empty dimension, shape {tuple(pos_embed.shape)}")
    dtype = pos_embed.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"resample_pos_embed_packed: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    args = (pos_embed, pos_embed_x, grids, mode, bool(antialias), bool(align_corners), bool(aspect_preserving), dtype)
    if torch.compiler.is_compiling():
        # the tap tables are built on the host per batch; the reference's ops trace instead
        return resample_pos_embed_packed_ref(*args)
    impl = select_impl("pos_resample", pos_embed.device, *args)
    return impl(*args)


register_impl("pos_resample", "reference", resample_pos_embed_packed_ref)
register_impl("pos_resample", "torch", resample_pos_embed_packed_ref)
register_impl("pos_resample", "triton", _pos_resample_triton, dtypes=TRITON_DTYPES)
