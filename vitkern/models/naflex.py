"""``NaFlexViT``: timm's ``NaFlexVit`` (ViTs for images of any size and aspect ratio: SigLIP2-NaFlex,
the NaFlex ViT-B / SO150M / SO400M configurations) on vitkern's ops, with timm's module names so
a timm NaFlexVit state_dict loads as it is; and the packing helpers for mixed-resolution batches.

Two ways to run a batch of images of different sizes:

- **Padded** (timm's layout, what its NaFlex collator gives): ``forward({"patches": (B, N, P*P*C),
  "patch_coord": (B, N, 2), "patch_valid": (B, N)})``. Each image's valid patches come first in
  its row, padding after. The valid flags reach the attention kernel as a key-padding mask, so no
  (B, 1, T, T) mask is built; the GEMMs still run over the padding.
- **Packed**: :func:`pack_images` lays the patches of every image end to end (``PackedBatch``:
  ``(total, P*P*C)`` and the images' ``cu_seqlens``) and :meth:`NaFlexViT.forward_packed` runs the
  GEMMs over the real tokens only and attention per image with one varlen call
  (:func:`vitkern.attention_varlen`): no padding anywhere, memory linear in the total tokens.

Both give timm's outputs for every valid token and image. The position embedding follows timm's
rule (``F.interpolate`` of the learned grid, bicubic or bilinear, antialiased, optionally
aspect-preserving, or the factorized y / x tables): packed, every image's in one launch of the
``pos_resample`` op (:func:`vitkern.resample_pos_embed_packed`); padded, one resampling per
distinct grid size. It is added in the patch projection's GEMM epilogue; the class / register
tokens are written into the token buffer.

Refused by name (``NaFlexViT.from_timm`` raises a ValueError): RoPE and the EVA-style blocks
(``attn_type`` "eva" / "rope", SwiGLU, gated attention), the conv patch projection, an input or
embedding norm, grid-sample position embeddings, the patch-size interpolator, patch dropout.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from vitkern.models.vit import GLOBAL_POOLS, global_pool_nlc
from vitkern.nn.attention_pool import AttentionPoolLatent
from vitkern.nn.block import Block, run_blocks
from vitkern.nn.layer_norm import LayerNorm, apply_norm
from vitkern.nn.linear import Linear, resolve_activation

from vitkern.ops.linear import linear
from vitkern.ops.pos_resample import grid_pos_embed_ref, resample_pos_embed_packed

__all__ = ["NaFlexViT", "NaFlexEmbeds", "PackedBatch", "pack_images", "cu_seqlens_from_mask", "hf_batch"]

GridSize = Tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """Images packed end to end, one token row per patch (what :func:`pack_images` returns).

    ``patches`` ``(total, P*P*C)``: each image's patches in row-major (y, x) order, pixels of a
    patch in ``(ph, pw, C)`` order (``channels_last``, timm NaFlex's) or ``(C, ph, pw)``;
    ``patch_coord`` ``(total, 2)`` int64 ``(y, x)``; ``cu_seqlens`` ``(num_images + 1,)`` int32,
    on the patches' device: image ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i + 1]``;
    ``grid_sizes``: each image's ``(rows, cols)`` of patches, host integers known at packing time
    (so no device-to-host copy is needed to resample position embeddings or size a launch).
    """

    patches: torch.Tensor
    patch_coord: torch.Tensor
    cu_seqlens: torch.Tensor
    grid_sizes: Tuple[GridSize, ...]

    @property
    def num_images(self) -> int:
        return len(self.grid_sizes)

    @property
    def seqlens(self) -> List[int]:
        return [h * w for h, w in self.grid_sizes]

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens, default=0)

    def padded(self, seq_len: Optional[int] = None, pad_value: float = 0.0) -> Dict[str, torch.Tensor]:
        """timm's NaFlex collator layout of these images: ``{"patches": (B, N, P*P*C),
        "patch_coord": (B, N, 2), "patch_valid": (B, N)}``, each image's patches first and
        ``pad_value`` after, ``N = seq_len`` (default: the longest image). What timm's NaFlexVit
        and :meth:`NaFlexViT.forward` take."""
        N = self.max_seqlen if seq_len is None else seq_len
        if N < self.max_seqlen:
            raise ValueError(f"PackedBatch.padded: seq_len {N} is shorter than the longest image ({self.max_seqlen})")
        B, dev = self.num_images, self.patches.device
        patches = torch.full((B, N, self.patches.shape[1]), pad_value, device=dev, dtype=self.patches.dtype)
        coord = torch.zeros(B, N, 2, device=dev, dtype=self.patch_coord.dtype)
        valid = torch.zeros(B, N, device=dev, dtype=torch.bool)
        start = 0
        for i, n in enumerate(self.seqlens):  # host lengths: no device read
            patches[i, :n] = self.patches[start:start + n]
            coord[i, :n] = self.patch_coord[start:start + n]
            valid[i, :n] = True
            start += n
        return {"patches": patches, "patch_coord": coord, "patch_valid": valid}

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "PackedBatch":
        """Moved to ``device``; ``dtype`` converts the pixel values only."""
        return PackedBatch(
            self.patches.to(device=device, dtype=dtype, non_blocking=non_blocking),
            self.patch_coord.to(device=device, non_blocking=non_blocking),
            self.cu_seqlens.to(device=device, non_blocking=non_blocking),
            self.grid_sizes,
        )


def _pair(v, name: str) -> GridSize:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(s, int) and s > 0 for s in t):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return t  # type: ignore[return-value]


def _fit_grid(grid: GridSize, max_tokens: int) -> GridSize:
    # the largest grid of the same aspect ratio with at most max_tokens patches
    h, w = grid
    ratio = math.sqrt(max_tokens / (h * w))
    gh, gw = max(1, int(h * ratio)), max(1, int(w * ratio))
    while gh * gw > max_tokens:
        if gh >= gw:
            gh -= 1
        else:
            gw -= 1
    return gh, gw


def patchify(image: torch.Tensor, patch_size: GridSize, channels_last: bool = True) -> torch.Tensor:
    """``(C, H, W)`` with H, W multiples of the patch -> ``(H/ph * W/pw, ph*pw*C)`` row-major patches
    (timm's ``batch_patchify`` for one image)."""
    C, H, W = image.shape
    ph, pw = patch_size
    x = image.reshape(C, H // ph, ph, W // pw, pw)
    x = x.permute(1, 3, 2, 4, 0) if channels_last else x.permute(1, 3, 0, 2, 4)
    return x.reshape((H // ph) * (W // pw), ph * pw * C)


def pack_images(
    images: Union[torch.Tensor, Sequence[torch.Tensor]],
    patch_size: Union[int, Tuple[int, int]],
    *,
    max_tokens: Optional[int] = None,
    channels_last: bool = True,
) -> PackedBatch:
    """Pack images of any sizes into one :class:`PackedBatch`.

    ``images``: a sequence of ``(C, H, W)`` tensors (any H, W; same C and device), or a
    ``(B, C, H, W)`` batch. Sizes that are not multiples of the patch are zero-padded at the bottom
    / right (timm's ``batch_patchify(pad=True)``). With ``max_tokens``, an image with more patches
    is first resized (bilinear, antialiased) to the largest grid of its aspect ratio that fits;
    smaller images are never upsampled. Runs on the images' device; the only host values are the
    grid sizes, computed from the shapes.
    """
    ph, pw = _pair(patch_size, "pack_images: patch_size")
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"pack_images: a tensor of images must be (B, C, H, W), got {tuple(images.shape)}")
        images = list(images.unbind(0))
    images = list(images)
    if not images:
        raise ValueError("pack_images: no images")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"pack_images: max_tokens must be a positive int, got {max_tokens!r}")
    channels, device = images[0].shape[0] if images[0].dim() == 3 else None, images[0].device
    rows, coords, grids = [], [], []
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != channels:
            raise ValueError(f"pack_images: image {i} must be ({channels}, H, W) like image 0, got {tuple(img.shape)}")
        if img.device != device:
            raise ValueError(f"pack_images: image {i} is on {img.device}, image 0 on {device}")
        H, W = img.shape[1:]
        if H == 0 or W == 0:
            raise ValueError(f"pack_images: image {i} is empty ({tuple(img.shape)})")
        grid = (-(-H // ph), -(-W // pw))
        if max_tokens is not None and grid[0] * grid[1] > max_tokens:
            grid = _fit_grid(grid, max_tokens)
            img = F.interpolate(img[None].float(), size=(grid[0] * ph, grid[1] * pw), mode="bilinear",
                                align_corners=False, antialias=True)[0].to(img.dtype)
        else:
            img = F.pad(img, (0, grid[1] * pw - W, 0, grid[0] * ph - H))
        rows.append(patchify(img, (ph, pw), channels_last))
        ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                                indexing="ij")
        coords.append(torch.stack((ys.flatten(), xs.flatten()), dim=1))
        grids.append(grid)
    offsets = [0]
    for h, w in grids:
        offsets.append(offsets[-1] + h * w)
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    return PackedBatch(torch.cat(rows), torch.cat(coords), cu, tuple(grids))


def cu_seqlens_from_mask(patch_valid: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """The ``(B + 1,)`` int32 sequence offsets of a padded batch's valid tokens (timm NaFlex's
    ``patch_valid`` (B, N), True = a real patch), each sequence counted with ``num_prefix_tokens``
    class / register tokens in front: what the varlen ops take once the valid rows are packed.
    Valid patches must precede the padding in each row (timm's collator layout). Computed on the
    mask's device, no host sync."""
    if patch_valid.dim() != 2:
        raise ValueError(f"cu_seqlens_from_mask: patch_valid must be (B, N), got {tuple(patch_valid.shape)}")
    if num_prefix_tokens < 0:
        raise ValueError(f"cu_seqlens_from_mask: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    lengths = patch_valid.bool().sum(dim=1, dtype=torch.int32) + num_prefix_tokens
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


@torch.compiler.disable
def grid_sizes_from_coord(patch_coord: torch.Tensor) -> List[GridSize]:
    """Each image's grid ``(max y + 1, max x + 1)`` from timm's ``patch_coord`` (B, N, 2): host
    integers (one device-to-host copy), as timm's ``calculate_naflex_grid_sizes``."""
    sizes = (patch_coord.amax(dim=1) + 1).tolist()
    return [(int(h), int(w)) for h, w in sizes]


# ----------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------


class NaFlexEmbeds(nn.Module):
    """timm's ``NaFlexEmbeds`` in linear mode (keys ``proj``, ``cls_token``, ``reg_token``,
    ``pos_embed`` (1, H, W, D) or ``pos_embed_y`` / ``pos_embed_x``): the patch projection GEMM with
    the resampled position embedding added in its epilogue, the prefix tokens in front."""

    def __init__(self, patch_size: GridSize, in_chans: int, embed_dim: int, *, proj_bias: bool = True,
                 class_token: bool = False, reg_tokens: int = 0, pos_embed: str = "learned",
                 pos_embed_grid_size: GridSize = (16, 16), pos_embed_interp_mode: str = "bicubic",
                 pos_embed_ar_preserving: bool = False, pos_embed_antialias: bool = True,
                 pos_embed_align_corners: bool = False, pos_drop_rate: float = 0.0, channels_last: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if pos_embed not in ("", "none", "learned", "factorized"):
            raise ValueError(f"NaFlexEmbeds: pos_embed must be 'learned', 'factorized' or 'none', got {pos_embed!r}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.channels_last = channels_last
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.pos_embed_interp_mode = pos_embed_interp_mode
        self.pos_embed_ar_preserving = pos_embed_ar_preserving
        self.pos_embed_antialias = pos_embed_antialias
        self.pos_embed_align_corners = pos_embed_align_corners
        self.pos_embed_grid_size = tuple(pos_embed_grid_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        self.proj = Linear(patch_size[0] * patch_size[1] * in_chans, embed_dim, bias=proj_bias, **dd)
        self.pos_embed = self.pos_embed_y = self.pos_embed_x = None
        self.pos_embed_type = "none" if pos_embed in ("", "none") else pos_embed
        h, w = self.pos_embed_grid_size
        if self.pos_embed_type == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, h, w, embed_dim, **dd))
        elif self.pos_embed_type == "factorized":
            self.pos_embed_y = nn.Parameter(torch.empty(1, h, embed_dim, **dd))
            self.pos_embed_x = nn.Parameter(torch.empty(1, w, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p, std in ((self.cls_token, 1e-6), (self.reg_token, 1e-6), (self.pos_embed, 0.02),
                       (self.pos_embed_y, 0.02), (self.pos_embed_x, 0.02)):
            if p is not None:
                nn.init.normal_(p, std=std)

    def prefix_tokens(self) -> Optional[torch.Tensor]:
        """The class then register tokens, ``(1, K, D)``, or None."""
        tokens = [t for t in (self.cls_token, self.reg_token) if t is not None]
        return torch.cat(tokens, dim=1) if len(tokens) > 1 else (tokens[0] if tokens else None)

    def _resample_args(self):
        """The tables and timm's resampling options, as the pos_resample op takes them."""
        if self.pos_embed_type == "factorized":
            return (self.pos_embed_y, self.pos_embed_x), {"aspect_preserving": self.pos_embed_ar_preserving}
        return (self.pos_embed, None), {
            "mode": self.pos_embed_interp_mode, "antialias": self.pos_embed_antialias,
            "align_corners": self.pos_embed_align_corners, "aspect_preserving": self.pos_embed_ar_preserving}

    def pos_table(self, grid: GridSize, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The position embedding of a ``grid`` of patches, ``(rows * cols, D)`` row-major in
        ``dtype``: timm's resampling of the learned table (in fp32, cropped to the grid when
        aspect-preserving), or the sum of the resampled y / x tables."""
        if self.pos_embed_type == "none":
            return None
        (table, table_x), opts = self._resample_args()
        return grid_pos_embed_ref(table, table_x, tuple(grid), opts.get("mode", "bilinear"),
                                  opts.get("antialias", False), opts.get("align_corners", False),
                                  opts["aspect_preserving"], dtype)

    def _pos_tables(self, grids: Sequence[GridSize], dtype: torch.dtype) -> Dict[GridSize, torch.Tensor]:
        # one resampling per distinct grid size
        return {g: self.pos_table(g, dtype) for g in dict.fromkeys(grids)}

    def _project(self, patches: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        if patches.shape[-1] != self.proj.in_features:
            raise ValueError(f"NaFlexEmbeds: patches must have {self.proj.in_features} values each "
                             f"(patch {self.patch_size}, {self.in_chans} channels), got {patches.shape[-1]}")
        return linear(patches, self.proj.weight, self.proj.bias, residual=pos)

    def forward(self, patches: torch.Tensor, grid_sizes: Sequence[GridSize]) -> torch.Tensor:
        """Padded: ``patches`` (B, N, P*P*C) with image b's grid ``grid_sizes[b]`` -> tokens
        (B, K + N, D). As timm, image b's first ``min(N, rows * cols)`` tokens get the position
        embedding in row-major order; later (padding) tokens none."""
        B, N, _ = patches.shape
        dtype = _compute_dtype(self.proj.weight, patches)
        pos = None
        if self.pos_embed_type != "none":
            tables = self._pos_tables(grid_sizes, dtype)
            pos = torch.zeros(B, N, self.embed_dim, device=patches.device, dtype=dtype)
            for b, g in enumerate(grid_sizes):
                n = min(N, g[0] * g[1])
                pos[b, :n] = tables[g][:n]
        x = self._project(patches, pos)
        prefix = self.prefix_tokens()
        if prefix is not None:
            x = torch.cat((prefix.to(x.dtype).expand(B, -1, -1), x), dim=1)
        return self.pos_drop(x) if self.training and self.pos_drop.p > 0 else x

    def forward_packed(self, packed: PackedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Packed: ``(tokens (total, D), cu_seqlens)``: each image's K prefix tokens then its
        patches, end to end; ``cu_seqlens`` the offsets of these sequences (no host sync)."""
        patches, cu = packed.patches, packed.cu_seqlens
        n, K = packed.num_images, self.num_prefix_tokens
        dtype = _compute_dtype(self.proj.weight, patches)
        pos = None
        if self.pos_embed_type != "none":
            (table, table_x), opts = self._resample_args()
            pos = resample_pos_embed_packed(table, packed.grid_sizes, pos_embed_x=table_x, dtype=dtype, **opts)
        x = self._project(patches, pos)
        if K == 0:
            out, cu_tokens = x, cu
        else:
            steps = torch.arange(n + 1, device=cu.device, dtype=torch.int32) * K
            cu_tokens = cu + steps
            image = _segment_ids(cu, patches.shape[0])
            patch_rows = torch.arange(patches.shape[0], device=cu.device) + K * (image + 1)
            prefix_rows = (cu_tokens[:-1, None].long() + torch.arange(K, device=cu.device)).flatten()
            prefix = self.prefix_tokens().to(x.dtype).expand(n, K, -1).reshape(n * K, -1)
            out = x.new_zeros(patches.shape[0] + n * K, x.shape[-1])
            out = out.index_copy(0, patch_rows, x).index_copy(0, prefix_rows, prefix)
        if self.training and self.pos_drop.p > 0:
            out = self.pos_drop(out)
        return out, cu_tokens


def _compute_dtype(weight: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The sequence index of each of ``total`` packed rows, on the device (no host sync)."""
    n = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(n, device=cu_seqlens.device), lengths, output_size=total)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class NaFlexViT(nn.Module):
    """timm's ``NaFlexVit`` (linear patch embedding, learned or factorized position embedding, the
    standard pre-norm block) on vitkern's ops; constructor keywords are timm's ``NaFlexVitCfg``
    fields of the same names (``act`` and ``norm_eps`` name the MLP activation, "gelu" or
    "gelu_tanh", and the LayerNorm eps).

    ``forward`` takes what timm's takes: images (B, C, H, W) (patchified as timm's linear mode),
    or NaFlex patches with ``patch_coord`` and ``patch_valid`` (or timm's collator dict), and
    gives timm's outputs. :meth:`forward_packed` takes a :class:`PackedBatch` instead.
    """

    def __init__(
        self,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = False,
        reg_tokens: int = 0,
        pos_embed: str = "learned",
        pos_embed_grid_size: Tuple[int, int] = (16, 16),
        pos_embed_interp_mode: str = "bicubic",
        pos_embed_ar_preserving: bool = False,
        pos_embed_antialias: bool = True,
        pos_embed_align_corners: bool = False,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        global_pool: str = "map",
        pool_include_prefix: bool = False,
        attn_pool_num_heads: Optional[int] = None,
        attn_pool_mlp_ratio: Optional[float] = None,
        scale_mlp_norm: bool = False,
        scale_attn_inner_norm: bool = False,
        patchify_channels_last: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fix_init: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"NaFlexViT: global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("NaFlexViT: global_pool='token' needs class_token=True")
        act_name = resolve_activation(act)
        if act_name is None:
            raise ValueError(f"NaFlexViT: act must be 'gelu', 'gelu_tanh' or 'quick_gelu', got {act!r}")

        def norm_layer(dim: int, **kw) -> LayerNorm:
            return LayerNorm(dim, eps=norm_eps, **kw)

        patch_size = _pair(patch_size, "NaFlexViT: patch_size")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.pool_include_prefix = pool_include_prefix
        self.act = act_name
        self.norm_eps = norm_eps
        self.embeds = NaFlexEmbeds(
            patch_size, in_chans, embed_dim, proj_bias=not pre_norm, class_token=class_token,
            reg_tokens=reg_tokens, pos_embed=pos_embed, pos_embed_grid_size=_pair(pos_embed_grid_size,
                                                                                 "pos_embed_grid_size"),
            pos_embed_interp_mode=pos_embed_interp_mode, pos_embed_ar_preserving=pos_embed_ar_preserving,
            pos_embed_antialias=pos_embed_antialias, pos_embed_align_corners=pos_embed_align_corners,
            pos_drop_rate=pos_drop_rate, channels_last=patchify_channels_last, **dd)
        self.norm_pre = norm_layer(embed_dim, **dd) if pre_norm else nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")] if depth > 0 else []
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                  scale_attn_norm=scale_attn_inner_norm, scale_mlp_norm=scale_mlp_norm, proj_bias=proj_bias,
                  proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, init_values=init_values, drop_path=dpr[i],
                  act_layer=act_name, norm_layer=norm_layer, **dd)
            for i in range(depth)
        ])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = norm_layer(embed_dim, **dd) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = (
            AttentionPoolLatent(embed_dim, num_heads=attn_pool_num_heads or num_heads,
                                mlp_ratio=attn_pool_mlp_ratio or mlp_ratio, norm_layer=norm_layer,
                                act_layer=act_name, **dd)
            if global_pool == "map" else None
        )
        self.fc_norm = norm_layer(embed_dim, **dd) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.fix_init = fix_init
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: trunc-normal(0.02) Linear weights, zero biases, then (``fix_init``)
        each block's proj / fc2 weights divided by ``sqrt(2 * (layer + 1))``."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.embeds.proj:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.attn_pool is not None:
            self.attn_pool.init_weights()
        if self.fix_init:
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self):
        return {"embeds.pos_embed", "embeds.pos_embed_y", "embeds.pos_embed_x", "embeds.cls_token",
                "embeds.reg_token"}

    # ------------------------------------------------------------------------------------------
    # Padded batches (timm's interface)
    # ------------------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor, patch_coord: Optional[torch.Tensor]) -> torch.Tensor:
        if patch_coord is None:  # images: timm's linear-mode patchify, one grid for the batch
            if x.dim() != 4:
                raise ValueError(f"NaFlexViT: images must be (B, C, H, W), got {tuple(x.shape)}")
            ph, pw = self.embeds.patch_size
            if x.shape[-2] % ph or x.shape[-1] % pw:
                raise ValueError(f"NaFlexViT: image size {tuple(x.shape[-2:])} is not a multiple of the patch "
                                 f"({ph}, {pw})")
            grid = (x.shape[-2] // ph, x.shape[-1] // pw)
            patches = torch.stack([patchify(img, (ph, pw), self.embeds.channels_last) for img in x.unbind(0)]) \
                if x.shape[0] else x.new_empty(0, grid[0] * grid[1], ph * pw * x.shape[1])
            grids = [grid] * x.shape[0]
        else:
            if x.dim() != 3:
                raise ValueError(f"NaFlexViT: NaFlex patches must be (B, N, P*P*C), got {tuple(x.shape)}")
            if patch_coord.shape != (*x.shape[:2], 2):
                raise ValueError(f"NaFlexViT: patch_coord must be {(*x.shape[:2], 2)}, got {tuple(patch_coord.shape)}")
            patches, grids = x, grid_sizes_from_coord(patch_coord)
        return apply_norm(self.norm_pre, self.embeds(patches, grids))

    def forward_features(
        self,
        patches: torch.Tensor,
        patch_coord: Optional[torch.Tensor] = None,
        patch_valid: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """timm's ``forward_features``: tokens (B, K + N, D) after the final norm; in NaFlex mode
        (``patch_coord`` given) timm's dict ``{"patches": tokens, "patch_valid": patch_valid}``."""
        x = self._embed(patches, patch_coord)
        key_padding_mask = None
        if patch_valid is not None and attn_mask is None:
            if patch_valid.shape != x.shape[:1] + (x.shape[1] - self.num_prefix_tokens,):
                raise ValueError(f"NaFlexViT: patch_valid must be {(x.shape[0], x.shape[1] - self.num_prefix_tokens)},"
                                 f" got {tuple(patch_valid.shape)}")
            key_padding_mask = F.pad(patch_valid.bool(), (self.num_prefix_tokens, 0), value=True)
        x = run_blocks(self.blocks, x, self.norm, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        if patch_coord is not None:
            return {"patches": x, "patch_valid": patch_valid}
        return x

    def _pool(self, x: torch.Tensor, patch_valid: Optional[torch.Tensor]) -> torch.Tensor:
        K = self.num_prefix_tokens
        if self.attn_pool is not None:
            valid = patch_valid
            if self.pool_include_prefix:
                valid = None if valid is None else F.pad(valid.bool(), (K, 0), value=True)
            else:
                x = x[:, K:]
            return self.attn_pool(x, key_padding_mask=None if valid is None else valid.bool())
        pool = self.global_pool
        if patch_valid is None or pool not in ("avg", "avgmax", "max"):
            return global_pool_nlc(x, pool, K, self.pool_include_prefix)
        # timm's global_pool_naflex: padding excluded from the mean and the max
        valid = patch_valid.bool()
        if self.pool_include_prefix:
            valid = F.pad(valid, (K, 0), value=True)
        else:
            x = x[:, K:]
        w = valid.to(x.dtype).unsqueeze(-1)
        avg = (x * w).sum(1) / w.sum(1).clamp(min=1)
        if pool == "avg":
            return avg
        mx = x.masked_fill(~valid.unsqueeze(-1), torch.finfo(x.dtype).min).amax(1)
        return mx if pool == "max" else 0.5 * (avg + mx)

    def forward_head(self, patches: torch.Tensor, pre_logits: bool = False,
                     patch_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = apply_norm(self.fc_norm, self._pool(patches, patch_valid))
        if self.training and self.head_drop.p > 0:
            x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x, patch_coord: Optional[torch.Tensor] = None, patch_valid: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(x, PackedBatch):
            return self.forward_packed(x)
        if isinstance(x, dict):  # timm's NaFlex collator output; its entries take priority
            patch_valid = x.get("patch_valid", patch_valid)
            patch_coord = x.get("patch_coord", patch_coord)
            attn_mask = x.get("attn_mask", attn_mask)
            x = x["patches"]
        if patch_coord is not None:
            if patch_valid is None:
                raise ValueError("NaFlexViT: patch_valid is required with patch_coord (NaFlex mode)")
            feats = self.forward_features(x, patch_coord, patch_valid, attn_mask)
            return self.forward_head(**feats)
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask))

    # ------------------------------------------------------------------------------------------
    # Packed batches
    # ------------------------------------------------------------------------------------------

    def forward_features_packed(self, packed: PackedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (total, D) after the final norm, cu_seqlens)`` of a :class:`PackedBatch`:
        each image's prefix tokens then patches; attention per image (one varlen call a block)."""
        if not isinstance(packed, PackedBatch):
            raise TypeError(f"NaFlexViT.forward_packed: expected a PackedBatch, got {type(packed).__name__}")
        x, cu = self.embeds.forward_packed(packed)
        x = apply_norm(self.norm_pre, x)[None]
        max_seqlen = packed.max_seqlen + self.num_prefix_tokens
        return run_blocks(self.blocks, x, self.norm, cu_seqlens=cu, max_seqlen=max_seqlen)[0], cu

    def forward_packed(self, packed: PackedBatch, pre_logits: bool = False) -> torch.Tensor:
        """Logits ``(num_images, num_classes)`` (pooled features with ``pre_logits``) of a
        :class:`PackedBatch`: what :meth:`forward` gives for the same images padded."""
        x, cu = self.forward_features_packed(packed)
        x = apply_norm(self.fc_norm, self._pool_packed(x, cu, packed))
        if self.training and self.head_drop.p > 0:
            x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def _pool_packed(self, x: torch.Tensor, cu: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
        K, n = self.num_prefix_tokens, packed.num_images
        pool = self.global_pool
        if self.attn_pool is None and pool == "token":
            return x[cu[:-1].long()]
        if self.attn_pool is None and not pool:
            raise ValueError("NaFlexViT.forward_packed: global_pool='' has no per-image output; use "
                             "forward_features_packed")
        if self.pool_include_prefix or K == 0:
            rows, cu_rows, max_len = x, cu, packed.max_seqlen + K
        else:  # the patch tokens only, still end to end
            image = _segment_ids(packed.cu_seqlens, packed.patches.shape[0])
            keep = torch.arange(packed.patches.shape[0], device=x.device) + K * (image + 1)
            rows, cu_rows, max_len = x.index_select(0, keep), packed.cu_seqlens, packed.max_seqlen
        if self.attn_pool is not None:
            return self.attn_pool.forward_packed(rows, cu_rows, max_len)
        image = _segment_ids(cu_rows, rows.shape[0])
        counts = (cu_rows[1:] - cu_rows[:-1]).clamp(min=1).to(rows.dtype)[:, None]
        avg = rows.new_zeros(n, rows.shape[1]).index_add(0, image, rows) / counts
        if pool == "avg":
            return avg
        index = image[:, None].expand_as(rows)
        mx = rows.new_full((n, rows.shape[1]), torch.finfo(rows.dtype).min).scatter_reduce(
            0, index, rows, reduce="amax", include_self=True)
        return mx if pool == "max" else 0.5 * (avg + mx)

    # ------------------------------------------------------------------------------------------
    # Conversion
    # ------------------------------------------------------------------------------------------

    def load_checkpoint(self, path, strict: bool = True) -> "NaFlexViT":
        """Load a timm NaFlexVit checkpoint (``.safetensors`` or a torch file) into this model; a
        classifier of another class count is dropped with a warning, any other key that does not
        fit raises a ValueError naming it before anything is copied."""
        from vitkern.models.convert import load_timm_checkpoint

        return load_timm_checkpoint(self, path, strict)

    @classmethod
    def from_hf(cls, model: nn.Module) -> "NaFlexViT":
        """A vitkern ``NaFlexViT`` (no classifier) with the configuration and weights of a Hugging
        Face ``Siglip2VisionModel`` (the SigLIP2 NaFlex image tower): ``forward(hf_batch(pixel_values,
        pixel_attention_mask, spatial_shapes))`` gives its ``pooler_output`` and
        ``forward_features(...)["patches"]`` its ``last_hidden_state`` at the valid patches; packed
        images (:func:`pack_images`) give the same through :meth:`forward_packed`. Parameters that do
        not map raise a ValueError naming them."""
        if type(model).__name__ != "Siglip2VisionModel":
            raise ValueError(f"NaFlexViT.from_hf: expected a transformers Siglip2VisionModel, got "
                             f"{type(model).__name__}")
        cfg, state = _hf_siglip2(model)
        p = next(model.parameters())
        out = cls(**cfg, device=p.device, dtype=p.dtype)
        try:
            out.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"NaFlexViT.from_hf: the state_dict of {type(model).__name__} does not map: {e}") \
                from None
        return out.train(model.training)

    @classmethod
    def from_timm(cls, model: nn.Module) -> "NaFlexViT":
        """A vitkern ``NaFlexViT`` with the configuration and weights of ``model`` (a
        ``timm.models.naflexvit.NaFlexVit``); what it does not cover raises a ValueError naming it
        (nothing is loaded partly)."""
        config = _config_from_timm(model)
        p = next(model.parameters())
        out = cls(**config, device=p.device, dtype=p.dtype)
        try:
            out.load_state_dict(model.state_dict(), strict=True)
        except RuntimeError as e:
            raise ValueError(f"NaFlexViT.from_timm: the state_dict of {type(model).__name__} does not map: {e}") \
                from None
        pretrained_cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(pretrained_cfg, dict):  # timm's preprocessing for the source weights
            out.pretrained_cfg = copy.deepcopy(pretrained_cfg)
            out.default_cfg = out.pretrained_cfg
        return out.train(model.training)


def hf_batch(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
             spatial_shapes: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Hugging Face SigLIP2-NaFlex inputs (its processor's ``pixel_values`` (B, N, P*P*C),
    ``pixel_attention_mask`` (B, N), ``spatial_shapes`` (B, 2) patch rows / cols) as timm's NaFlex
    batch (``patches``, ``patch_coord``, ``patch_valid``), which :meth:`NaFlexViT.forward` takes.
    The coordinates are computed on the device (row-major within each image, as the processor lays
    the patches), no host sync."""
    if pixel_values.dim() != 3 or pixel_attention_mask.shape != pixel_values.shape[:2] \
            or spatial_shapes.shape != (pixel_values.shape[0], 2):
        raise ValueError("hf_batch: expected pixel_values (B, N, P*P*C), pixel_attention_mask (B, N) and "
                         f"spatial_shapes (B, 2); got {tuple(pixel_values.shape)}, "
                         f"{tuple(pixel_attention_mask.shape)}, {tuple(spatial_shapes.shape)}")
    n = torch.arange(pixel_values.shape[1], device=pixel_values.device)[None]
    cols = spatial_shapes[:, 1:].to(n.device).long().clamp(min=1)
    valid = pixel_attention_mask.bool()
    coord = torch.stack((n // cols, n % cols), dim=-1) * valid[..., None]
    return {"patches": pixel_values, "patch_coord": coord, "patch_valid": valid}


def _hf_siglip2(model: nn.Module):
    """(NaFlexViT keywords, state_dict) of a Hugging Face ``Siglip2VisionModel``."""
    from vitkern.models.convert import _hf_activation, convert_hf_state_dict

    c = model.config
    grid = int(round(c.num_patches ** 0.5))
    if grid * grid != c.num_patches:
        raise ValueError(f"NaFlexViT.from_hf: num_patches {c.num_patches} is not a square grid")
    state = convert_hf_state_dict(
        {k: v for k, v in model.state_dict().items()}, "siglip_vision_model")
    out = {}
    for k, v in state.items():
        if k.startswith("patch_embed.proj."):
            out["embeds.proj." + k[len("patch_embed.proj."):]] = v
        elif k == "pos_embed":
            out["embeds.pos_embed"] = v.reshape(1, grid, grid, -1)
        else:
            out[k] = v
    use_head = bool(getattr(c, "vision_use_head", True))
    cfg = dict(
        patch_size=_pair(c.patch_size, "patch_size"), in_chans=c.num_channels, num_classes=0,
        embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
        mlp_ratio=c.intermediate_size / c.hidden_size, pos_embed_grid_size=(grid, grid),
        pos_embed_interp_mode="bilinear", pos_embed_antialias=True, global_pool="map" if use_head else "avg",
        fc_norm=False, act=_hf_activation(c.hidden_act), norm_eps=c.layer_norm_eps,
        attn_drop_rate=float(c.attention_dropout or 0.0),
    )
    return cfg, out


def _timm_activation(act: nn.Module) -> str:
    name = type(act).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    if name == "GELUTanh":
        return "gelu_tanh"
    if name == "QuickGELU":
        return "quick_gelu"
    raise ValueError(f"NaFlexViT.from_timm: MLP activation {name} is not supported (gelu, gelu_tanh, quick_gelu)")


def _config_from_timm(model: nn.Module) -> Dict[str, object]:
    if type(model).__name__ != "NaFlexVit":
        raise ValueError(f"NaFlexViT.from_timm: expected a timm NaFlexVit, got {type(model).__name__}")
    e = model.embeds
    refusals = {
        "RoPE": model.rope is not None,
        "patch dropout": model.patch_drop is not None,
        "the conv patch projection (embed_proj_type='conv')": not e.is_linear,
        "an input norm (input_norm_layer)": e.norm_input is not None,
        "an embedding norm (embed_norm_layer)": not isinstance(e.norm, nn.Identity),
        "grid-sample position embeddings (pos_embed_use_grid_sample)": e.pos_embed_use_grid_sample,
        "the patch-size interpolator (enable_patch_interpolator)": e.patch_interpolator is not None,
    }
    blk = model.blocks[0] if len(model.blocks) else None
    for b in model.blocks:
        kinds = (type(b).__name__, type(b.attn).__name__, type(b.mlp).__name__)
        if kinds != ("Block", "Attention", "Mlp"):
            refusals[f"blocks of {kinds} (only timm's Block / Attention / Mlp)"] = True
            break
    bad = [name for name, yes in refusals.items() if yes]
    if bad:
        raise ValueError(f"NaFlexViT.from_timm: not supported: {', '.join(bad)}")
    if blk is None:
        raise ValueError("NaFlexViT.from_timm: a model without blocks")
    pool = model.attn_pool
    pe = e.pos_embed if e.pos_embed is not None else None
    grid = tuple(pe.shape[1:3]) if pe is not None else (
        (e.pos_embed_y.shape[1], e.pos_embed_x.shape[1]) if e.pos_embed_y is not None else (16, 16))
    dim = model.embed_dim
    hidden = blk.mlp.fc1.out_features
    return dict(
        patch_size=tuple(e.patch_size), in_chans=model.in_chans,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=dim, depth=len(model.blocks), num_heads=blk.attn.num_heads, mlp_ratio=hidden / dim,
        qkv_bias=blk.attn.qkv.bias is not None, qk_norm=not isinstance(blk.attn.q_norm, nn.Identity),
        proj_bias=blk.attn.proj.bias is not None,
        init_values=1e-5 if not isinstance(blk.ls1, nn.Identity) else None,
        class_token=e.cls_token is not None, reg_tokens=e.reg_token.shape[1] if e.reg_token is not None else 0,
        pos_embed=e.pos_embed_type, pos_embed_grid_size=grid, pos_embed_interp_mode=e.pos_embed_interp_mode,
        pos_embed_ar_preserving=e.pos_embed_ar_preserving, pos_embed_antialias=e.pos_embed_antialias,
        pos_embed_align_corners=e.pos_embed_align_corners, pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity), global_pool=model.global_pool,
        pool_include_prefix=model.pool_include_prefix,
        attn_pool_num_heads=pool.num_heads if pool is not None else None,
        attn_pool_mlp_ratio=pool.mlp.fc1.out_features / dim if pool is not None else None,
        scale_mlp_norm=not isinstance(blk.mlp.norm, nn.Identity),
        scale_attn_inner_norm=not isinstance(blk.attn.norm, nn.Identity),
        patchify_channels_last=e.channels_last, act=_timm_activation(blk.mlp.act), norm_eps=blk.norm1.eps,
        drop_path_rate=getattr(model.blocks[-1].drop_path1, "drop_prob", 0.0),
    )


# ----------------------------------------------------------------------------------------------
# The named configurations (timm's NaFlex names and values; create_model builds a NaFlexViT)
# ----------------------------------------------------------------------------------------------


def _naflex_pcfg(tag: str, num_classes: int) -> Dict[str, object]:
    return dict(tag=tag, input_size=(3, 384, 384), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
                crop_mode="center", interpolation="bicubic", num_classes=num_classes, license="apache-2.0",
                fixed_input_size=False, first_conv="embeds.proj", classifier="head", pool_size=None)


_B16 = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_SO150M2 = dict(patch_size=16, embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, init_values=1e-5,
                qkv_bias=False, reg_tokens=1)
_NAFLEX_CONFIGS = {
    "naflexvit_base_patch16_gap": (dict(_B16, init_values=1e-5, global_pool="avg", reg_tokens=4, fc_norm=True),
                                   "e300_s576_in1k", 1000, "ViT-B/16 NaFlex, 4 registers, average pooling."),
    "naflexvit_base_patch16_par_gap": (
        dict(_B16, init_values=1e-5, pos_embed_ar_preserving=True, global_pool="avg", reg_tokens=4, fc_norm=True),
        "e300_s576_in1k", 1000, "ViT-B/16 NaFlex, aspect-preserving position embedding, average pooling."),
    "naflexvit_base_patch16_parfac_gap": (
        dict(_B16, init_values=1e-5, pos_embed_ar_preserving=True, pos_embed="factorized", global_pool="avg",
             reg_tokens=4, fc_norm=True),
        "e300_s576_in1k", 1000, "ViT-B/16 NaFlex, aspect-preserving factorized position embedding, average pooling."),
    "naflexvit_base_patch16_map": (dict(_B16, init_values=1e-5, global_pool="map", reg_tokens=1), "untrained", 1000,
                                   "ViT-B/16 NaFlex with the MAP attention-pooling head."),
    "naflexvit_so150m2_patch16_reg1_gap": (dict(_SO150M2, global_pool="avg", fc_norm=True), "untrained", 1000,
                                           "ViT-SO150M2/16 NaFlex, average pooling."),
    "naflexvit_so150m2_patch16_reg1_map": (dict(_SO150M2, global_pool="map"), "untrained", 1000,
                                           "ViT-SO150M2/16 NaFlex, MAP head."),
    "naflexvit_base_patch16_siglip": (
        dict(_B16, act="gelu_tanh", global_pool="map", pos_embed_interp_mode="bilinear", num_classes=0),
        "v2_webli", 0, "SigLIP2 NaFlex ViT-B/16 image tower."),
    "naflexvit_so400m_patch16_siglip": (
        dict(patch_size=16, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, act="gelu_tanh",
             global_pool="map", pos_embed_interp_mode="bilinear", num_classes=0),
        "v2_webli", 0, "SigLIP2 NaFlex SO400M/16 image tower."),
}


def _register_naflex(name, config, tag, num_classes, doc):
    from vitkern.models.registry import register_model

    def config_fn():
        return dict(config)

    config_fn.__name__ = config_fn.__qualname__ = name
    config_fn.__doc__ = doc + " Any image size: pack mixed sizes with vitkern.pack_images."
    return register_model(config_fn, pretrained_cfg=_naflex_pcfg(tag, num_classes), model_cls=NaFlexViT)


for _name, (_config, _tag, _classes, _doc) in _NAFLEX_CONFIGS.items():
    globals()[_name] = _register_naflex(_name, _config, _tag, _classes, _doc)
