"""``LayerNorm``: a drop-in ``torch.nn.LayerNorm`` that runs :func:`vitkern.ops.layer_norm.layer_norm`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from vitkern.ops._common import autocast_disabled, autocast_dtype
from vitkern.ops.layer_norm import add_layer_norm, layer_norm

__all__ = ["LayerNorm", "add_final_norm", "add_pre_norm", "apply_norm", "apply_pre_norm", "default_norm_layer"]


class LayerNorm(nn.LayerNorm):
    """Layer normalization over the trailing ``normalized_shape`` dimensions.

    Same constructor, parameters (``weight``, ``bias``; ``bias`` registered as None when
    ``bias=False``), defaults (``eps=1e-5``), initialisation and state_dict keys as
    :class:`torch.nn.LayerNorm`, of which it is a subclass, so code that checks
    ``isinstance(m, nn.LayerNorm)`` (weight-decay grouping, initialisers) keeps working. The forward
    runs the fused ``layer_norm`` op (fp32 statistics; under autocast the output is fp32, as torch's).
    A multi-dimensional ``normalized_shape`` is handled by flattening those dimensions.
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype
        )

    def _flat(self, x: torch.Tensor):
        nd = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - nd :]) != tuple(self.normalized_shape) or x.dim() < nd:
            raise ValueError(
                f"LayerNorm: input must end with normalized_shape {tuple(self.normalized_shape)}, "
                f"got shape {tuple(x.shape)}"
            )
        if nd == 1:
            return x, self.weight, self.bias, None
        n = math.prod(self.normalized_shape)
        lead = x.shape[: x.dim() - nd]
        w = self.weight.reshape(n) if self.weight is not None else None
        b = self.bias.reshape(n) if self.bias is not None else None
        return x.reshape(*lead, n), w, b, x.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf, w, b, shape = self._flat(x)
        y = layer_norm(xf, w, b, self.eps)
        return y if shape is None else y.reshape(shape)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(LayerNorm(x + residual), x + residual)`` in one fused pass (``add_layer_norm``).

        For patching models whose GEMMs cannot carry the residual add in their epilogue.
        """
        xf, w, b, shape = self._flat(x)
        if shape is not None:
            residual = residual.reshape(xf.shape)
        y, s = add_layer_norm(xf, residual, w, b, self.eps)
        if shape is not None:
            y, s = y.reshape(shape), s.reshape(shape)
        return y, s


def apply_norm(norm: nn.Module, x: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Run ``norm`` on ``x``: any last-dimension ``nn.LayerNorm`` (torch's, timm's or ours) goes
    through the fused ``layer_norm`` op with that module's parameters and eps (its output in
    ``out_dtype`` when given); ``nn.Identity`` is skipped; any other norm module runs its own
    forward (``out_dtype`` does not apply to it)."""
    if isinstance(norm, nn.Identity):
        return x
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype=out_dtype)
    return norm(x)


def apply_pre_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`apply_norm` for a norm whose output only feeds GEMMs (a block's pre-norms, the norm
    inside an MLP or before an attention projection): under autocast a LayerNorm writes its output
    in the autocast dtype, the dtype the GEMM casts it to anyway. The values are the same (one
    rounding of the fp32 result either way); the float32 output, the cast pass that read it and
    wrote the 16-bit copy, and in the backward the cast of the GEMM's 16-bit input gradient back
    to float32 are gone (16 bytes an element per norm in a training step, 8 in inference, and two launches).
    The input gradient keeps ``x``'s dtype (the float32 residual stream)."""
    return apply_norm(norm, x, out_dtype=autocast_dtype(x.device))


def add_pre_norm(
    norm: nn.Module, x: torch.Tensor, pending: Optional[torch.Tensor], out_dtype: Optional[torch.dtype] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + pending, norm(x + pending))`` for a residual add deferred into the norm after it
    (``pending``: the branch a block has not added yet; None: nothing pending). A last-dimension
    LayerNorm runs ``add_layer_norm`` in the stream's dtype with autocast off (a 16-bit branch on
    a float32 stream is added without a cast pass; its gradient comes back in 16 bits from the
    same pass that writes the stream's), the normed output in ``out_dtype`` (default: under
    autocast the autocast dtype, as :func:`apply_pre_norm`). Other norms: the add, then the norm."""
    if out_dtype is None:
        out_dtype = autocast_dtype(x.device)
    if pending is None:
        return x, apply_norm(norm, x, out_dtype=out_dtype)
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        with autocast_disabled(x.device):
            h, s = add_layer_norm(pending, x, norm.weight, norm.bias, norm.eps, out_dtype=out_dtype)
        return s, h
    s = x + pending
    return s, apply_norm(norm, s, out_dtype=out_dtype)


def add_final_norm(norm: nn.Module, x: torch.Tensor, pending: Optional[torch.Tensor]) -> torch.Tensor:
    """A model's last norm on the stream ``x`` plus the last block's ``pending`` branch (None:
    none), its output in the dtype :func:`apply_norm` gives (float32 under autocast, like torch's
    LayerNorm; else the stream's)."""
    if pending is None:
        return apply_norm(norm, x)
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    return add_pre_norm(norm, x, pending, out_dtype=out_dtype)[1]


def default_norm_layer(dim: int, **dd) -> LayerNorm:
    """timm's ``LayerNorm`` default (eps=1e-6), the ``norm_layer`` timm's ViT blocks are built
    with: the default of :class:`vitkern.nn.Attention` and :class:`vitkern.nn.Block`."""
    return LayerNorm(dim, eps=1e-6, **dd)
