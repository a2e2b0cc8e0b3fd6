"""The row view every backend of ``linear`` and ``mlp`` computes on: ``x (..., K)`` as ``(M, K)``
and the residual ``(..., N)`` as ``(M, N)``, ``M`` the product of the leading dims."""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["as_rows"]


def as_rows(x: torch.Tensor, residual: Optional[torch.Tensor], n: int):
    """``(x2, residual2, out_shape)``: the 2-D views and the ``(..., N)`` shape of the result."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    m = math.prod(lead)  # not reshape(-1, k): that is ambiguous for k = 0
    x2 = x.reshape(m, k)
    return x2, residual.reshape(m, n) if residual is not None else None, (*lead, n)
