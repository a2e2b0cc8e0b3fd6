"""The q / k prologue of attention: QK-norm and 2-D RoPE in one pass (see ``spec``).

Public function: ``qk_prologue(x, norm=None, rope=None, num_prefix_tokens=0)`` on a ``(B, H, T, D)``
q or k (any strides, the packed qkv view included), returning a new contiguous ``(B, H, T, D)``
tensor in ``x``'s dtype; the attention ops call it for their ``q_norm`` / ``k_norm`` / ``rope``
arguments. Implementations are called as ``impl(x, weight, bias, sin, cos, norm_kind, eps, layout,
num_prefix_tokens)`` (the data classes flattened, so the backend machinery sees tensors).

Backends: "reference" and "torch" (PyTorch ops: ``reference.py``), "triton" (one kernel pass
forward, one backward: ``kernels.py``). Per token of head dim D and element size e bytes: read
D * e (+ the partner columns, an L1 / L2 hit) and the tables' row, write D * e; ~10 FLOP per
element forward, ~20 backward.

Files: ``spec`` (QKNorm, RopeTables, the argument checks), ``reference``, ``configs``, ``kernels``,
``launch``, ``op`` (registered ops, autograd, the Triton backend), ``compile_cases``.
"""

from __future__ import annotations

from typing import Optional

import torch

from vitkern._backend import register_impl, select_impl
from vitkern.ops.qk_prologue.op import TRITON_DTYPES, _qk_prologue_triton, _qk_prologue_triton_supports
from vitkern.ops.qk_prologue.reference import apply_qk_prologue_ref, qk_prologue_ref
from vitkern.ops.qk_prologue.spec import QKNorm, RopeTables, check_prologue, prologue_requested

__all__ = ["qk_prologue", "QKNorm", "RopeTables", "apply_qk_prologue_ref", "check_prologue",
           "prologue_requested"]


def qk_prologue(x: torch.Tensor, norm: Optional[QKNorm] = None, rope: Optional[RopeTables] = None,
                num_prefix_tokens: int = 0) -> torch.Tensor:
    """``norm`` then ``rope`` (on tokens ``num_prefix_tokens:``) applied to ``x`` ``(B, H, T, D)``;
    arguments already validated by :func:`check_prologue`. Differentiable in ``x``, the norm's
    weight / bias and the tables."""
    args = (x,
            norm.weight if norm is not None else None, norm.bias if norm is not None else None,
            rope.sin if rope is not None else None, rope.cos if rope is not None else None,
            norm.kind if norm is not None else None, float(norm.eps) if norm is not None else 0.0,
            rope.layout if rope is not None else "interleaved", int(num_prefix_tokens))
    impl = select_impl("qk_prologue", x.device, *args)
    return impl(*args)


register_impl("qk_prologue", "reference", qk_prologue_ref)
register_impl("qk_prologue", "torch", qk_prologue_ref)
register_impl("qk_prologue", "triton", _qk_prologue_triton, _qk_prologue_triton_supports, dtypes=TRITON_DTYPES)
