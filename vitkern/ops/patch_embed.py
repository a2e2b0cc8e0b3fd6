"""Patch embedding: patchify + GEMM + bias + position embedding, prefix tokens written in place.

Public functions (re-exported from ``vitkern``):

- ``patch_embed(images, weight, bias=None, *, pos_embed=None, prefix_tokens=None)``: the ViT stem
  ``(B, C, H, W) -> (B, K + N, D)``: timm's ``PatchEmbed`` (a stride-P conv) followed by
  ``VisionTransformer._pos_embed`` (class / register tokens and the absolute position embedding).
- ``resample_pos_embed(pos_embed, new_size, ...)``: interpolate an absolute position embedding to a
  new patch grid (``timm.layers.resample_abs_pos_embed`` semantics, plain torch).

Backends are registered at the bottom of the module. Implementations of op ``"patch_embed"`` are
called as ``impl(images, weight, bias, pos_embed=..., prefix_tokens=...)`` after the public
function's checks and autocast casts.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from vitkern._backend import register_impl, select_impl
from vitkern.ops._common import (
    autocast_dtype,
    cast_floating,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

__all__ = ["patch_embed", "patch_embed_ref", "resample_pos_embed"]


def _out_dtype(compute: torch.dtype, *extra: Optional[torch.Tensor]) -> torch.dtype:
    dtype = compute
    for t in extra:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# Reference implementation
# --------------------------------------------------------------------------------------------


def patch_embed_ref(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference patch embedding (no argument checks; float64 accepted).

    timm-style ``conv2d(stride = patch) -> flatten(2).transpose(1, 2)``, then the prefix tokens and
    the position embedding added in fp32 (fp64 for fp64) with one cast to the output dtype (the
    promoted dtype of the conv output, ``pos_embed`` and ``prefix_tokens``).
    """
    ph, pw = weight.shape[-2:]
    x = F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)  # (B, N, D)
    out_dtype = _out_dtype(x.dtype, pos_embed, prefix_tokens)
    if pos_embed is None and prefix_tokens is None:
        return x
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    batch, n = x.shape[0], x.shape[1]
    k = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    x = x.to(acc)
    prefix = None if prefix_tokens is None else prefix_tokens.to(acc)
    if pos_embed is not None:
        pos = pos_embed.to(acc)
        if pos.shape[1] == n:
            x = x + pos
        else:
            x = x + pos[:, k:]
            if prefix is not None:
                prefix = prefix + pos[:, :k]
    if prefix is not None:
        x = torch.cat([prefix.expand(batch, -1, -1), x], dim=1)
    return x.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    pos_embed: Optional[torch.Tensor] = None,
    prefix_tokens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ViT patch embedding with the prefix tokens and the position embedding fused in.

    ``tokens[:, K:] = patches(images) @ weight.flatten(1).T + bias (+ pos_embed)`` in row-major
    patch order, and ``tokens[:, :K] = prefix_tokens (+ pos_embed[:, :K])``. Equals timm's
    ``PatchEmbed`` followed by ``VisionTransformer._pos_embed``.

    Args:
        images: ``(B, C, H, W)`` float32 / float16 / bfloat16, contiguous or channels_last; H and
            W multiples of the patch size.
        weight: ``(D, C, Ph, Pw)`` (``nn.Conv2d`` layout); the patch size is read from it.
        bias: optional ``(D,)``.
        pos_embed: optional ``(1, N, D)`` for the ``N = (H / Ph) * (W / Pw)`` patch tokens only
            (timm ``no_embed_class=True``: prefix tokens get none), or ``(1, K + N, D)`` for all
            tokens (timm's default).
        prefix_tokens: optional ``(1, K, D)``: class and register tokens, written first and
            expanded over the batch.

    Returns:
        ``(B, K + N, D)`` tokens. Their dtype is the compute dtype, promoted by ``pos_embed``'s
        and ``prefix_tokens``' dtypes: those additive terms may be float32 with fp16/bf16 images
        (timm keeps them as float32 parameters, so under autocast its tokens are float32 too).

    Autocast: images, weight and bias are cast to the autocast dtype; ``pos_embed`` and
    ``prefix_tokens`` keep theirs (the compute dtype or float32). Outside autocast images, weight
    and bias must share one dtype.

    Raises:
        TypeError: a non-tensor argument, an unsupported or mismatched dtype.
        ValueError: image size not divisible by the patch size, channel mismatch, a ``pos_embed``
            of a length other than ``N`` or ``K + N``, wrong shapes of ``bias`` / ``prefix_tokens``,
            tensors on different devices (each message names the argument).
        vitkern.BackendUnavailableError: the explicitly selected backend cannot run this call.
    """
    check_tensor("images", images, ndim=4)
    check_tensor("weight", weight, ndim=4)
    batch, channels, height, width = images.shape
    dim, w_channels, ph, pw = weight.shape
    if w_channels != channels:
        raise ValueError(
            f"images has {channels} channels but weight expects {w_channels} (weight is (D, C, Ph, Pw) = "
            f"{tuple(weight.shape)})"
        )
    if ph == 0 or pw == 0 or height % ph != 0 or width % pw != 0:
        raise ValueError(
            f"images height {height} and width {width} must be multiples of the patch size ({ph}, {pw}) "
            f"(weight's last two dims)"
        )
    n = (height // ph) * (width // pw)
    check_optional_tensor("bias", bias, shape=(dim,))
    k = 0
    if prefix_tokens is not None:
        check_tensor("prefix_tokens", prefix_tokens, ndim=3)
        if prefix_tokens.shape[0] != 1 or prefix_tokens.shape[2] != dim:
            raise ValueError(
                f"prefix_tokens must have shape (1, K, {dim}) (class / register tokens, D = weight.shape[0]), "
                f"got {tuple(prefix_tokens.shape)}"
            )
        k = prefix_tokens.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        if pos_embed.shape[0] != 1 or pos_embed.shape[2] != dim:
            raise ValueError(
                f"pos_embed must have shape (1, L, {dim}) (D = weight.shape[0]), got {tuple(pos_embed.shape)}"
            )
        length = pos_embed.shape[1]
        if length not in (n, k + n):
            accepted = f"{n} (patch tokens only)"
            if k:
                accepted += f" or {k + n} ({k} prefix + {n} patch tokens)"
            raise ValueError(
                f"pos_embed has length {length} but must have length {accepted} for {height}x{width} images "
                f"and patch size ({ph}, {pw}); resample it with vitkern.resample_pos_embed"
            )
    device = check_same_device(
        images=images, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens
    )
    ac = autocast_dtype(device)
    if ac is not None:
        images, weight, bias = cast_floating(ac, images, weight, bias)
    else:
        check_same_dtype(images=images, weight=weight, bias=bias)
    compute = images.dtype
    for name, t in (("pos_embed", pos_embed), ("prefix_tokens", prefix_tokens)):
        if t is not None and t.dtype not in (compute, torch.float32):
            raise TypeError(
                f"{name} must have the compute dtype ({str(compute).replace('torch.', '')}) or float32, "
                f"got {str(t.dtype).replace('torch.', '')}"
            )
    kwargs = dict(pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    impl = select_impl("patch_embed", device, images, weight, bias, **kwargs)
    return impl(images, weight, bias, **kwargs)


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
        TypeError / ValueError naming the argument: a non-tensor or non-3-D ``pos_embed``, bad
        sizes, a grid that does not match the token count, an unknown interpolation mode.
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

    num_grid = length - num_prefix_tokens
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

    batch, dim = pos_embed.shape[0], pos_embed.shape[2]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(batch, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, align_corners=align_corners, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(batch, -1, dim).to(orig_dtype)
    if num_prefix_tokens:
        grid = torch.cat([prefix, grid], dim=1)
    return grid


register_impl("patch_embed", "reference", patch_embed_ref)
