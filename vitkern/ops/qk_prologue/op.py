"""The registered prologue ops (``vitkern::qk_prologue_fwd`` with autograd, ``vitkern::qk_prologue_bwd``)
and the Triton backend's implementation with its ``supports`` predicate. The launchers are
imported where the ops run, so importing this module needs no Triton."""

from __future__ import annotations

from typing import Optional

import torch

from vitkern.ops._autograd import fill_outputs, kernel_op
from vitkern.ops._common import FLOAT_DTYPES
from vitkern.ops.qk_prologue.configs import MAX_HEAD_DIM

_KINDS = (None, "layer", "rms")
TRITON_DTYPES = FLOAT_DTYPES


def _fwd_fake(x, weight, bias, sin, cos, norm_code, eps, half, prefix):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _bwd_fakes(x, weight, bias, sin, cos):
    def like(t):
        return torch.empty(t.shape if t is not None else (0,), dtype=(t if t is not None else x).dtype,
                           device=x.device)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), like(weight), like(bias),
            like(sin), like(cos))


def _bwd_fake(dy, x, weight, bias, sin, cos, norm_code, eps, half, prefix, need_dx, need_dw, need_db, need_dtables):
    return _bwd_fakes(x, weight, bias, sin, cos)


@kernel_op("vitkern::qk_prologue_bwd", fake=_bwd_fake)
def _qk_prologue_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    sin: Optional[torch.Tensor], cos: Optional[torch.Tensor], norm_code: int, eps: float, half: bool,
    prefix: int, need_dx: bool, need_dw: bool, need_db: bool, need_dtables: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from vitkern.ops.qk_prologue import launch as _launch

    out = _launch._qk_prologue_bwd(dy, x, weight, bias, sin, cos, _KINDS[norm_code], eps, half, prefix,
                                   need_dx, need_dw, need_db, need_dtables)
    return fill_outputs(out, _bwd_fakes(x, weight, bias, sin, cos))


def _save(inputs, output):
    x, weight, bias, sin, cos, norm_code, eps, half, prefix = inputs
    return (x, weight, bias, sin, cos), (norm_code, eps, half, prefix)


def _backward(state, saved, grads, need):
    x, weight, bias, sin, cos = saved
    norm_code, eps, half, prefix = state
    dx, dw, db, dsin, dcos = torch.ops.vitkern.qk_prologue_bwd(
        grads[0], x, weight, bias, sin, cos, norm_code, eps, half, prefix,
        need[0], need[1], need[2], need[3] or need[4])
    return dx, dw, db, dsin, dcos, None, None, None, None


@kernel_op("vitkern::qk_prologue_fwd", fake=_fwd_fake, save=_save, backward=_backward)
def _qk_prologue_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], sin: Optional[torch.Tensor],
    cos: Optional[torch.Tensor], norm_code: int, eps: float, half: bool, prefix: int,
) -> torch.Tensor:
    from vitkern.ops.qk_prologue import launch as _launch

    return _launch._qk_prologue_fwd(x, weight, bias, sin, cos, _KINDS[norm_code], eps, half, prefix)


# --------------------------------------------------------------------------------------------
# The Triton backend (what register_impl gets: the public arguments after checks and autocast)
# --------------------------------------------------------------------------------------------


def _qk_prologue_triton_supports(x, weight, bias, sin, cos, norm_kind, eps, layout, num_prefix_tokens):
    if not 2 <= x.shape[-1] <= MAX_HEAD_DIM:
        return f"the Triton prologue takes head dims 2..{MAX_HEAD_DIM} (x.shape[-1] = {x.shape[-1]})"
    return None


def _qk_prologue_triton(x, weight, bias, sin, cos, norm_kind, eps, layout, num_prefix_tokens):
    return torch.ops.vitkern.qk_prologue_fwd(x, weight, bias, sin, cos, _KINDS.index(norm_kind), float(eps),
                                             layout == "half", int(num_prefix_tokens))
