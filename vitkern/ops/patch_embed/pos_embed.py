"""``resample_pos_embed``: interpolate an absolute position embedding to a new patch grid
(``timm.layers.resample_abs_pos_embed`` semantics, plain torch). A reference-only helper: no
kernel, no backend; models call it to load checkpoints at another image size."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from vitkern.ops._common import check_tensor


_INTERPOLATION_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")


def _check_size(name: str, value) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list, torch.Size))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size: Union[int, Sequence[int]],
    old_size: Optional[Union[int, Sequence[int]]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = False,
    align_corners: Optional[bool] = None,
) -> torch.Tensor:
    """Resample an absolute position embedding to a new patch grid.

    Semantics of ``timm.layers.resample_abs_pos_embed`` (implemented here in plain torch): the
    first ``num_prefix_tokens`` entries (class / register tokens) are kept as they are, the rest
    are viewed as an ``old_size`` grid (row-major), interpolated in float32 with
    ``F.interpolate(mode=interpolation, antialias=antialias, align_corners=align_corners)`` to
    ``new_size`` and cast back. As in timm, the input is returned unchanged when the token count
    already matches and the grid is square (or ``old_size == new_size``).

    Args:
        pos_embed: ``(B, L, D)`` (B is 1 for a model's parameter), floating point.
        new_size: target grid ``(height, width)`` in patches, or an int for a square grid.
        old_size: current grid; None means square, ``sqrt(L - num_prefix_tokens)`` per side.
        num_prefix_tokens: leading entries that are not on the grid (0 for timm's
            ``no_embed_class`` models).
        interpolation: an ``F.interpolate`` mode: "nearest", "nearest-exact", "bilinear",
            "bicubic" (default) or "area".
        antialias: anti-aliasing when downsampling (bilinear / bicubic); default False here (timm's
            default is True; upsampling, the usual case, is unaffected).
        align_corners: passed to ``F.interpolate`` (None is its default).

    Returns:
        ``(B, num_prefix_tokens + new_h * new_w, D)`` in ``pos_embed``'s dtype.

    Raises:
        TypeError / ValueError naming the argument: a non-tensor or non-3-D ``pos_embed``, an empty
        one (B = 0, D = 0 or no grid tokens), bad sizes, a grid that does not match the token
        count, an unknown interpolation mode.
    """
    check_tensor("pos_embed", pos_embed, ndim=3, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    new_size = _check_size("new_size", new_size)
    if old_size is not None:
        old_size = _check_size("old_size", old_size)
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    num_prefix_tokens = int(num_prefix_tokens)
    length = pos_embed.shape[1]
    if not 0 <= num_prefix_tokens <= length:
        raise ValueError(
            f"num_prefix_tokens must be in [0, {length}] (pos_embed has {length} tokens), got {num_prefix_tokens}"
        )
    if interpolation not in _INTERPOLATION_MODES:
        raise ValueError(f"interpolation must be one of {_INTERPOLATION_MODES}, got {interpolation!r}")
    if not isinstance(antialias, bool):
        raise TypeError(f"antialias must be a bool, got {type(antialias).__name__}")

    batch, dim = pos_embed.shape[0], pos_embed.shape[2]
    if batch == 0 or dim == 0:
        raise ValueError(
            f"pos_embed must be non-empty (B >= 1 and D >= 1 in (B, L, D)), got shape {tuple(pos_embed.shape)}"
        )
    num_grid = length - num_prefix_tokens
    if num_grid == 0:
        raise ValueError(
            f"pos_embed has no grid tokens to resample: L = {length} with num_prefix_tokens={num_prefix_tokens} "
            f"(shape {tuple(pos_embed.shape)})"
        )
    if num_prefix_tokens + new_size[0] * new_size[1] == length:
        if old_size is not None and old_size == new_size:
            return pos_embed
        if old_size is None and new_size[0] == new_size[1]:
            return pos_embed
    if old_size is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise ValueError(
                f"pos_embed has {num_grid} grid tokens ({length} minus num_prefix_tokens={num_prefix_tokens}), "
                "which is not a square grid: pass old_size"
            )
        old_size = (side, side)
    elif old_size[0] * old_size[1] != num_grid:
        raise ValueError(
            f"old_size {old_size} has {old_size[0] * old_size[1]} positions but pos_embed has {num_grid} grid "
            f"tokens ({length} minus num_prefix_tokens={num_prefix_tokens})"
        )

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(batch, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, align_corners=align_corners, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(batch, new_size[0] * new_size[1], dim).to(orig_dtype)
    if num_prefix_tokens:
        grid = torch.cat([prefix, grid], dim=1)
    return grid


def resample_patch_embed(
    weight: torch.Tensor,
    new_size: Union[int, Sequence[int]],
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a patch-embedding kernel ``(D, C, Ph, Pw)`` to another patch size (FlexiViT, Beyer
    et al., 2023; ``timm.layers.resample_patch_embed`` semantics, plain torch).

    The resize of a ``Ph x Pw`` patch to ``new_size`` is a linear map ``A`` (``F.interpolate`` of
    each basis patch, ``mode=interpolation``, ``antialias``); the new kernel is the old one through
    ``pinv(A)``, so that ``<resize(patch), new_kernel> ~= <patch, old_kernel>``: a model given the
    resampled kernel on inputs resized by the same factor sees about the same embeddings. Computed
    in float32 and cast back; the input is returned unchanged when the size already matches.

    Raises:
        TypeError / ValueError naming the argument: a non-tensor or non-4-D ``weight``, an empty
        one, a bad size or an unknown interpolation mode.
    """
    check_tensor("weight", weight, ndim=4, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    new_size = _check_size("new_size", new_size)
    if interpolation not in _INTERPOLATION_MODES:
        raise ValueError(f"interpolation must be one of {_INTERPOLATION_MODES}, got {interpolation!r}")
    if not isinstance(antialias, bool):
        raise TypeError(f"antialias must be a bool, got {type(antialias).__name__}")
    if weight.numel() == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    old_size = (int(weight.shape[-2]), int(weight.shape[-1]))
    if old_size == new_size:
        return weight
    old_total, new_total = old_size[0] * old_size[1], new_size[0] * new_size[1]
    basis = torch.eye(old_total, device=weight.device, dtype=torch.float32).reshape(old_total, 1, *old_size)
    kw = {} if interpolation in ("nearest", "nearest-exact", "area") else dict(antialias=antialias, align_corners=False)
    resized = F.interpolate(basis, size=new_size, mode=interpolation, **kw)
    resize_mat = resized.squeeze(1).permute(1, 2, 0).reshape(new_total, old_total)
    pinv = torch.linalg.pinv(resize_mat)  # (old_total, new_total)
    d, c = weight.shape[0], weight.shape[1]
    out = weight.reshape(d, c, old_total).to(torch.float32) @ pinv
    return out.reshape(d, c, *new_size).to(weight.dtype)
