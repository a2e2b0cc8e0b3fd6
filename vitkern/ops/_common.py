"""Helpers every op shares: argument checks and the autocast policy.

Argument checks raise ``ValueError`` / ``TypeError`` naming the argument and what was expected, so
bad input never reaches a kernel (where it would be a silent wrong answer or an illegal memory
access).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "check_tensor",
    "check_optional_tensor",
    "check_same_device",
    "check_same_dtype",
    "check_last_dim",
    "contiguous_vectors",
    "autocast_dtype",
    "cast_floating",
    "autocast_disabled",
]

# Every op takes these; fp32 follows torch's matmul precision, fp16/bf16 accumulate in fp32.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def check_tensor(
    name: str,
    value,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    min_ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = FLOAT_DTYPES,
    shape: Optional[Sequence[Optional[int]]] = None,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of the expected rank, dtype and shape.

    ``shape`` entries that are None are not checked.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if shape is not None:
        if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    return value


def check_optional_tensor(name: str, value, **kwargs) -> Optional[torch.Tensor]:
    """``check_tensor`` for an argument that may be None."""
    if value is None:
        return None
    return check_tensor(name, value, **kwargs)


def check_last_dim(name: str, value: torch.Tensor, size: int, what: str = "") -> None:
    if value.shape[-1] != size:
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have last dimension {size}{extra}, got shape {tuple(value.shape)}")


def contiguous_vectors(*tensors: Optional[torch.Tensor]):
    """Each 1-D tensor with a stride other than 1 (an expanded ``(N,)`` with stride 0, a ``[::2]``
    slice) copied to a contiguous one; None and everything else unchanged.

    Kernels read bias / scale vectors as contiguous: the copy (N elements, differentiable) is
    cheap next to the op, and it spares every kernel a stride argument per vector.
    """
    return tuple(
        t.contiguous() if t is not None and t.dim() == 1 and t.shape[0] > 1 and t.stride(0) != 1 else t
        for t in tensors
    )


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All non-None tensors on one device; returns it."""
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}; all inputs must be on one device")
    return device


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    """All non-None tensors share one dtype (outside autocast, mixed dtypes are an error)."""
    dtype = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dtype is None:
            dtype, first = t.dtype, name
        elif t.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {first} has "
                f"{str(dtype).replace('torch.', '')}; cast them to one dtype or run under torch.autocast"
            )
    return dtype


# --------------------------------------------------------------------------------------------
# Autocast policy
# --------------------------------------------------------------------------------------------
# Custom ops are not autocast-aware, and torch.library.register_autocast casts every input to one
# dtype fixed at registration, so the public functions apply torch's policy themselves before
# dispatching to any backend: GEMM-like ops cast their floating operands to the autocast dtype;
# layer_norm computes in fp32 (as torch's autocast does). A residual keeps its own dtype.


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The active autocast dtype for ``device``'s type, or None when autocast is off."""
    device_type = device.type
    if device_type not in ("cuda", "cpu", "xpu"):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_floating(dtype: Optional[torch.dtype], *tensors: Optional[torch.Tensor]):
    """Cast each floating tensor to ``dtype`` (no-op when ``dtype`` is None); None stays None."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t for t in tensors)


def autocast_disabled(device: torch.device):
    """A context manager that turns autocast off for ``device``'s type (a no-op when it is off).

    References use it so that they compute in the dtypes they chose (e.g. fp32 attention scores for
    bf16 inputs) even when a caller runs them under autocast.
    """
    if device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
