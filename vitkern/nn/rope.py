"""2-D rotary position embeddings for ViTs: the tables of timm's three vision RoPE families.

:class:`Rope2D` computes the sine / cosine tables (:class:`vitkern.ops.qk_prologue.spec.RopeTables`)
that the attention ops apply to q and k as their tiles are loaded. The numbers follow timm's
modules, which the tests compare against:

- ``kind="axial"`` (timm ``RotaryEmbeddingCat``; EVA-02, ``vit_*_rope_*`` "axial"): ``head_dim / 4``
  frequency bands per spatial axis, either inverse frequencies ``temperature ** -(i / bands)``
  (``in_pixels=False``, EVA) or pixel frequencies ``linspace(1, max_res / 2) * pi``
  (``in_pixels=True``); the grid in token indices (+ ``grid_offset``) or in ``[-1, 1]`` pixels,
  optionally rescaled to a reference (pretraining) grid, ``ref_grid_size`` (EVA's fine-tuning rule).
- ``kind="mixed"`` (timm ``RotaryEmbeddingMixed``, "RoPE-Mixed"): learnable frequencies
  ``freqs`` of shape ``(2, depth, num_heads, head_dim / 2)`` (a parameter), angles
  ``x * fx + y * fy``; the tables are per block and per head.
- ``kind="dinov3"`` (timm ``RotaryEmbeddingDinoV3``): 0.5-centred coordinates normalised to
  ``[-1, 1]``, periods ``temperature ** (2 i / (head_dim / 2))`` or geometric between
  ``min_period`` and ``max_period``, angles ``2 pi coord / period``; "half" layout by default.

The training-time coordinate augmentations of timm's modules (shift / jitter / rescale) are not
implemented; :func:`vitkern.models.convert.from_timm` refuses a model that enables them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from vitkern.ops.qk_prologue.spec import ROPE_LAYOUTS, RopeTables

__all__ = ["Rope2D", "ROPE_KINDS"]

ROPE_KINDS = ("axial", "mixed", "dinov3")


def _pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"Rope2D: {what} must be a positive int or an (h, w) pair, got {size!r}")
    return size


def _grid(size: tuple[int, int], grid_type: str, grid_offset: float, indexing: str,
          normalize_coords: str, ref_size: Optional[tuple[int, int]]) -> torch.Tensor:
    """Coordinates ``(h, w, 2)`` float32 of a token grid (timm's ``_build_grid``)."""
    shape = list(size)
    ref = list(ref_size) if ref_size is not None else None
    if indexing == "xy":
        shape = shape[::-1]
        ref = ref[::-1] if ref is not None else None
    if grid_type == "pixel":
        axes = [torch.linspace(-1.0, 1.0, steps=s, dtype=torch.float32) for s in shape]
    elif grid_type == "centered":
        denom = {"max": [float(max(shape))] * 2, "min": [float(min(shape))] * 2,
                 "separate": [float(s) for s in shape]}[normalize_coords]
        axes = [(torch.arange(0.5, s, dtype=torch.float32) + grid_offset) / d for s, d in zip(shape, denom)]
    else:  # "index"
        axes = [torch.arange(s, dtype=torch.int64).to(torch.float32) + grid_offset for s in shape]
    if ref is not None:
        axes = [a / s * r for a, s, r in zip(axes, shape, ref)]
    grid = torch.stack(torch.meshgrid(axes, indexing=indexing), dim=-1)
    if grid_type == "centered":
        grid = 2.0 * grid - 1.0
    return grid


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Per-frequency values ``(..., D / 2)`` to the ``(..., D)`` layout of the rotation."""
    return torch.cat([x, x], dim=-1) if layout == "half" else x.repeat_interleave(2, dim=-1)


class Rope2D(nn.Module):
    """The 2-D rotary embedding of a ViT's attention (see the module docstring for the kinds).

    Args:
        head_dim: the attention head dim (a multiple of 4).
        kind: "axial", "mixed" or "dinov3".
        grid_size: the token grid ``(h, w)`` (or an int) the tables are built for by default.
        layout: "interleaved" or "half"; default "half" for "dinov3", else "interleaved".
        temperature: the frequency base; default 10000 ("axial"), 10 ("mixed"), 100 ("dinov3").
        in_pixels, max_res, linear_bands: "axial" only, timm's pixel-frequency bands.
        ref_grid_size: "axial" only, the pretraining grid the coordinates are rescaled to.
        grid_offset: added to the token coordinates ("axial" index grids, "dinov3").
        grid_indexing: "ij" (row, column) or "xy"; default "xy" for "mixed", else "ij".
        normalize_coords: "dinov3" only: "separate", "min" or "max".
        min_period, max_period: "dinov3" only, a geometric period schedule instead of temperature.
        depth, num_heads: "mixed" only, the shape of the learnable ``freqs`` parameter.
    """

    def __init__(self, head_dim: int, *, kind: str = "axial", grid_size=None, layout: Optional[str] = None,
                 temperature: Optional[float] = None, in_pixels: bool = False, max_res: int = 224,
                 linear_bands: bool = False, ref_grid_size=None, grid_offset: float = 0.0,
                 grid_indexing: Optional[str] = None, normalize_coords: str = "separate",
                 min_period: Optional[float] = None, max_period: Optional[float] = None,
                 depth: Optional[int] = None, num_heads: Optional[int] = None):
        super().__init__()
        if kind not in ROPE_KINDS:
            raise ValueError(f"Rope2D: kind must be one of {ROPE_KINDS}, got {kind!r}")
        if not isinstance(head_dim, int) or head_dim < 4 or head_dim % 4:
            raise ValueError(f"Rope2D: head_dim must be a positive multiple of 4, got {head_dim!r}")
        layout = layout or ("half" if kind == "dinov3" else "interleaved")
        if layout not in ROPE_LAYOUTS:
            raise ValueError(f"Rope2D: layout must be one of {ROPE_LAYOUTS}, got {layout!r}")
        if kind == "mixed" and layout != "interleaved":
            raise ValueError("Rope2D: kind='mixed' rotates interleaved pairs (layout='interleaved')")
        grid_indexing = grid_indexing or ("xy" if kind == "mixed" else "ij")
        if grid_indexing not in ("ij", "xy"):
            raise ValueError(f"Rope2D: grid_indexing must be 'ij' or 'xy', got {grid_indexing!r}")
        if normalize_coords not in ("separate", "min", "max"):
            raise ValueError(f"Rope2D: normalize_coords must be 'separate', 'min' or 'max', got {normalize_coords!r}")
        if ref_grid_size is not None and kind != "axial":
            raise ValueError(f"Rope2D: ref_grid_size applies to kind='axial' only (got kind={kind!r})")
        self.head_dim = head_dim
        self.kind = kind
        self.layout = layout
        self.grid_size = _pair(grid_size, "grid_size") if grid_size is not None else None
        self.temperature = float(temperature if temperature is not None
                                 else {"axial": 10000.0, "mixed": 10.0, "dinov3": 100.0}[kind])
        self.in_pixels = bool(in_pixels)
        self.max_res = int(max_res)
        self.linear_bands = bool(linear_bands)
        self.ref_grid_size = _pair(ref_grid_size, "ref_grid_size") if ref_grid_size is not None else None
        self.grid_offset = float(grid_offset)
        self.grid_indexing = grid_indexing
        self.normalize_coords = normalize_coords
        self.min_period, self.max_period = min_period, max_period
        bands = head_dim // 4
        if kind == "mixed":
            if not (isinstance(depth, int) and depth > 0 and isinstance(num_heads, int) and num_heads > 0):
                raise ValueError("Rope2D: kind='mixed' needs depth and num_heads (positive ints)")
            self.depth, self.num_heads = depth, num_heads
            self.freqs = nn.Parameter(self._init_mixed_freqs(head_dim, depth, num_heads, self.temperature))
        else:
            if depth is not None or num_heads is not None:
                raise ValueError(f"Rope2D: depth / num_heads apply to kind='mixed' only (got kind={kind!r})")
            self.depth = self.num_heads = None
            if kind == "axial":
                if self.in_pixels:
                    if self.linear_bands:
                        f = torch.linspace(1.0, self.max_res / 2, bands, dtype=torch.float32)
                    else:
                        f = 2 ** torch.linspace(0, math.log(self.max_res, 2) - 1, bands, dtype=torch.float32)
                    f = f * torch.pi
                else:
                    f = 1.0 / (self.temperature ** (torch.arange(bands, dtype=torch.int64).to(torch.float32) / bands))
            else:  # dinov3: periods
                if min_period is not None and max_period is not None:
                    exponents = torch.linspace(0, 1, bands, dtype=torch.float32)
                    f = min_period * ((max_period / min_period) ** exponents)
                elif min_period is not None or max_period is not None:
                    raise ValueError("Rope2D: give both min_period and max_period, or neither")
                else:
                    f = self.temperature ** (2.0 * torch.arange(bands, dtype=torch.float32) / (head_dim // 2))
            # bands ("axial") or periods ("dinov3"): a function of the config, not state
            self.register_buffer("bands", f, persistent=False)

    @staticmethod
    def _init_mixed_freqs(head_dim: int, depth: int, num_heads: int, temperature: float) -> torch.Tensor:
        """RoPE-Mixed's initial frequencies: one magnitude per band, a random direction per block
        and head (timm's ``init_random_2d_freqs``)."""
        mag = 1.0 / (temperature ** (torch.arange(0, head_dim, 4, dtype=torch.float32) / head_dim))
        angles = torch.rand(depth, num_heads, 1) * 2 * torch.pi
        fx = torch.cat([mag * torch.cos(angles), mag * torch.cos(angles + torch.pi / 2)], dim=-1)
        fy = torch.cat([mag * torch.sin(angles), mag * torch.sin(angles + torch.pi / 2)], dim=-1)
        return torch.stack([fx, fy], dim=0)

    def _angles(self, size: tuple[int, int], device) -> torch.Tensor:
        """Angles ``(N, D / 2)`` ("axial", "dinov3") or ``(depth, H, N, D / 2)`` ("mixed"), float32."""
        if self.kind == "mixed":
            grid = _grid(size, "index", 0.0, self.grid_indexing, "separate", None).reshape(-1, 2).to(device)
            freqs = self.freqs.float()
            return (grid[:, 0, None] * freqs[0].unsqueeze(-2)) + (grid[:, 1, None] * freqs[1].unsqueeze(-2))
        if self.kind == "dinov3":
            coords = _grid(size, "centered", self.grid_offset, self.grid_indexing, self.normalize_coords, None)
            coords = coords.flatten(0, -2)[:, :, None].to(device=device, dtype=torch.float32)
            return (2 * math.pi * coords / self.bands.to(device)[None, None, :]).flatten(1)
        grid = _grid(size, "pixel" if self.in_pixels else "index", self.grid_offset, self.grid_indexing,
                     "separate", self.ref_grid_size).to(device)
        return (grid.unsqueeze(-1) * self.bands.to(device)).flatten(-2).flatten(0, -2)

    def tables(self, grid_size=None, layer: Optional[int] = None) -> RopeTables:
        """The sine / cosine tables for ``grid_size`` (default: the module's), float32 on the
        module's device; ``layer`` selects the block of a "mixed" RoPE (required there)."""
        size = _pair(grid_size, "grid_size") if grid_size is not None else self.grid_size
        if size is None:
            raise ValueError("Rope2D.tables: no grid_size given and none set on the module")
        device = self.freqs.device if self.kind == "mixed" else self.bands.device
        angles = self._angles(size, device)
        if self.kind == "mixed":
            if layer is None or not 0 <= int(layer) < self.depth:
                raise ValueError(f"Rope2D.tables: kind='mixed' needs layer in [0, {self.depth}), got {layer!r}")
            angles = angles[int(layer)]
        elif layer is not None:
            raise ValueError(f"Rope2D.tables: layer applies to kind='mixed' only (kind={self.kind!r})")
        return RopeTables(sin=_layout(angles.sin(), self.layout), cos=_layout(angles.cos(), self.layout),
                          layout=self.layout)

    def set_grid_size(self, grid_size: Sequence[int]) -> None:
        self.grid_size = _pair(grid_size, "grid_size")

    def no_weight_decay(self):
        return {"freqs"} if self.kind == "mixed" else set()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, kind={self.kind!r}, layout={self.layout!r}, grid_size={self.grid_size}"
