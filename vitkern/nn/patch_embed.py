"""``PatchEmbed``: timm's image-to-patch embedding through the single fused ``patch_embed`` op
(patchify + GEMM + bias, optionally + position embedding and prefix tokens)."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn
import torch.nn.functional as F

from vitkern.ops.patch_embed import patch_embed, resample_patch_embed

__all__ = ["PatchEmbed"]


def _to_2tuple(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


class PatchEmbed(nn.Module):
    """2D image to patch embedding with timm's constructor and state_dict keys (``proj.weight``
    ``(D, C, P, P)``, ``proj.bias``; ``proj`` is an ``nn.Conv2d`` so initialisers treat it as timm's).

    ``forward(x, pos_embed=None, prefix_tokens=None)`` returns ``(B, K + N, D)`` tokens (always
    flattened, NLC): the conv as a GEMM with its bias, plus ``pos_embed`` (``(1, N, D)``, or
    ``(1, K + N, D)`` covering the prefix tokens too) and the ``prefix_tokens`` ``(1, K, D)``
    (class / register tokens) written in front, all in one ``patch_embed`` call.

    ``strict_img_size`` requires inputs of exactly ``img_size``; otherwise H and W must be multiples
    of the patch size, unless ``dynamic_img_pad`` pads the bottom/right edge with zeros first.
    """

    def __init__(
        self,
        img_size: Optional[Union[int, Tuple[int, int]]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.patch_size = _to_2tuple(patch_size)
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size,
            bias=bias, device=device, dtype=dtype,
        )

    def _init_img_size(self, img_size):
        if img_size is None:
            return None, None, None
        img_size = _to_2tuple(img_size)
        grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Change the nominal input size and / or the patch size (None keeps the current one), as
        timm's ``PatchEmbed.set_input_size``: a new patch size replaces ``proj`` by a conv whose
        kernel is the old one resampled by :func:`vitkern.resample_patch_embed` (FlexiViT's
        pseudo-inverse resize, bicubic antialiased), the bias, ``requires_grad`` and train mode
        kept. The position embedding is the owner's business."""
        new_patch_size = None if patch_size is None else _to_2tuple(patch_size)
        if new_patch_size is not None and new_patch_size != self.patch_size:
            old = self.proj
            with torch.no_grad():
                proj = nn.Conv2d(
                    old.in_channels, old.out_channels, kernel_size=new_patch_size, stride=new_patch_size,
                    bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype,
                )
                proj.weight.copy_(resample_patch_embed(old.weight, new_patch_size))
                proj.weight.requires_grad_(old.weight.requires_grad)
                if old.bias is not None:
                    proj.bias.copy_(old.bias)
                    proj.bias.requires_grad_(old.bias.requires_grad)
            proj.train(old.training)
            self.proj = proj
            self.patch_size = new_patch_size
        img_size = img_size or self.img_size
        if img_size != self.img_size or new_patch_size is not None:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Grid size for an input of ``img_size`` (H, W), counting padding when ``dynamic_img_pad``."""
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def _check_and_pad(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PatchEmbed: images must have shape (B, C, H, W), got {tuple(x.shape)}")
        _, C, H, W = x.shape
        Ph, Pw = self.patch_size
        if C != self.proj.in_channels:
            raise ValueError(
                f"PatchEmbed: expected {self.proj.in_channels} input channels, got {C} (shape {tuple(x.shape)})"
            )
        if self.img_size is not None and self.strict_img_size:
            if (H, W) != self.img_size:
                raise ValueError(
                    f"PatchEmbed: input size ({H}, {W}) doesn't match the model's img_size {self.img_size} "
                    "(build with dynamic_img_size=True / strict_img_size=False to accept other sizes)"
                )
        elif not self.dynamic_img_pad and (H % Ph or W % Pw):
            raise ValueError(f"PatchEmbed: input size ({H}, {W}) must be divisible by the patch size {self.patch_size}")
        if self.dynamic_img_pad:
            pad_h = (Ph - H % Ph) % Ph
            pad_w = (Pw - W % Pw) % Pw
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def forward(
        self,
        x: torch.Tensor,
        pos_embed: Optional[torch.Tensor] = None,
        prefix_tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = self._check_and_pad(x)
        return patch_embed(x, self.proj.weight, self.proj.bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, in_chans={self.in_chans}, "
            f"embed_dim={self.embed_dim}"
        )
