"""Index range of the kernels' int32 offsets: what a launcher checks before it launches.

Triton types an integer argument as int32 when it fits (as int64 otherwise) and ``tl.arange`` as
int32, so ``offs * stride`` inside a tile is computed in int32 and wraps past 2^31 - 1: a silent
read or write of the wrong element. The kernels keep their per-program bases in int64 (batch,
head and row offsets: ``tl.program_id(0).to(tl.int64)``) and their in-tile offsets in int32
(fewer registers); the launchers make sure that every in-tile offset fits, copying a view whose
layout is the problem (a transposed input) and raising a ``ValueError`` that names the tensor
where no layout would do.

An in-tile offset is ``sum_i idx_i * stride_i`` over index ranges ``0 <= idx_i < count_i``:
:func:`int32_overflow` gives its largest value when int32 arithmetic would wrap, else None (the
whole sum is int64 as soon as one stride is an int64 argument, but every int32 product on its own
must still fit). ``tests/test_index_range.py`` replays the launchers on meta tensors past 2^31
elements under :func:`vitkern.testing.compile_check.capture` and checks each captured launch's in-tile
offsets with the same rule.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["INT32_MAX", "int32_overflow", "fits_int32", "check_int32", "rows_int32_safe"]

INT32_MAX = 2**31 - 1


def _is_i32(v: int) -> bool:
    """How Triton types an integer argument (its specialisation aside)."""
    return -(2**31) <= v <= INT32_MAX


def int32_overflow(*terms: tuple[int, int]) -> Optional[int]:
    """The largest value of ``sum_i idx_i * stride_i`` (``0 <= idx_i < count_i``, ``terms`` =
    ``(count_i, stride_i)``) when int32 arithmetic would wrap computing it, else None.

    A product of an int32 index and an int64 stride is int64; a sum is int64 when one of its terms
    is. Empty ranges (count 0) contribute nothing.
    """
    i32 = True
    total = 0
    for count, stride in terms:
        if count <= 0:
            continue
        value = (count - 1) * abs(int(stride))
        if _is_i32(int(stride)):
            if value > INT32_MAX:
                return value
        else:
            i32 = False
        total += value
    if i32 and total > INT32_MAX:
        return total
    return None


def fits_int32(*terms: tuple[int, int]) -> bool:
    return int32_overflow(*terms) is None


def check_int32(op: str, name: str, *terms: tuple[int, int]) -> None:
    """Raise a ValueError naming ``name`` when its in-tile offset would wrap in int32."""
    value = int32_overflow(*terms)
    if value is not None:
        raise ValueError(
            f"{op}: {name} needs in-tile offsets up to {value}, past the kernels' int32 range "
            f"(2^31 - 1 = {INT32_MAX}); use a smaller shape or a more compact layout"
        )


def rows_int32_safe(t: torch.Tensor) -> torch.Tensor:
    """A 2-D ``(rows, n)`` view for kernels that offset rows in int64 and columns in int32:
    ``t`` itself when ``(n - 1) * stride(1)`` fits in int32, else a contiguous copy (unit column
    stride; a transposed input)."""
    if fits_int32((t.shape[1], t.stride(1))):
        return t
    return t.contiguous()
