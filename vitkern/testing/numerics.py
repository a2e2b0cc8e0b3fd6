"""How vitkern's tests judge a kernel's numbers, in one place: the comparators, their tolerance
tables, and the output poisoning that makes an element a kernel never writes fail a comparison.

The rule (docs/design.md, "Testing without a GPU"), the flash-attention one: run the op in
float64 (the ``*_ref`` functions) and in the kernel's dtype with PyTorch; the kernel may be at most
twice as far from float64 as PyTorch is, plus a small atol at the result's magnitude::

    max |actual - ref64| <= 2 * max |torch_same_dtype - ref64| + atol * max(1, max |ref64|)

A kernel is thus as accurate as PyTorch in the same dtype, whatever order it sums in. Its forms:

- :func:`assert_2x_torch`: the rule with :data:`ATOL`, for results that float64 keeps finite
  (the op tests: LayerNorm, linear, mlp, patch_embed, the cuda backend).
- :func:`assert_2x_torch_nonfinite`: the same bound where float64 may itself give ±inf (random
  shapes and layouts, the property tests): the non-finite pattern must be float64's.
- :func:`assert_flash_rule`: attention's form, whose atol is the rounding noise of the dtype at the
  reference's magnitude, plus the TF32 allowance when fp32 dots run as TF32.
- :func:`assert_2x_rounding`: the GEMM core's, tested below the ops where no PyTorch op takes its
  epilogue hooks: twice the error of rounding the float64 result to the output dtype.

Two checks besides the rule: :func:`assert_close_same_dtype` (a result against PyTorch's or timm's
own op in the same dtype, with :data:`CLOSE_TOL`) and :func:`relative_error` with
:data:`RELATIVE_TOLERANCE` (a whole op against the reference backend in fp32: the GPU smoke run).

:func:`poisoned` and :func:`poisoned_like` allocate outputs full of NaN, so that the comparators
catch an element a kernel leaves unwritten. Only torch is needed here: no pytest, no Triton.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# atol of the 2x rule by dtype, relative to max(1, max |ref64|), on top of twice PyTorch's error
ATOL: dict[torch.dtype, float] = {F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}

# The checks that hold a dtype to another atol, by the name they pass as ``op``: patch_embed's
# tokens and gradients; the GEMM core under assert_2x_rounding; the property tests (every op at
# random shapes and layouts, on both the triton and the reference backend).
ATOL_OVERRIDES: dict[str, dict[torch.dtype, float]] = {
    "patch_embed": {F32: 1e-5},
    "gemm": {F32: 1e-5, BF16: 1e-2},
    "properties": {F32: 1e-5},
}

# TF32 keeps 10 mantissa bits: unit roundoff 2^-11. fp32 attention with TF32 dots on a GPU is
# compared with PyTorch's fp32 SDPA, whose memory-efficient / math kernels are (nearly) exact
# fp32, so the 2x rule alone would hold the kernel to IEEE accuracy; as PyTorch's own TF32 tests
# do, the rule then adds a TF32 allowance: this many roundoffs at the problem's magnitude (a TF32
# flash forward / backward, emulated in float64, stays under a third of it: see
# tests/ops/test_attention.py, test_tf32_tolerance_admits_tf32_rounding).
TF32_ROUNDOFF = 2.0 ** -11
TF32_ROUNDOFFS = 16

# torch.testing.assert_close tolerances of assert_close_same_dtype, by dtype
CLOSE_TOL: dict[torch.dtype, dict[str, float]] = {
    F32: dict(atol=2e-5, rtol=1e-4),
    F16: dict(atol=2e-3, rtol=2e-3),
    BF16: dict(atol=1.6e-2, rtol=1.6e-2),
    F64: dict(atol=1e-10, rtol=1e-8),
}

# The most relative_error may be against the reference backend run in fp32 with IEEE dots: loose
# enough for bf16 / fp16 rounding and fp32 accumulation-order differences, tight enough that a
# wrong kernel (a missed tile, a wrong stride) fails.
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {BF16: 4e-2, F16: 1e-2, F32: 2e-3}


def atol_for(dtype: torch.dtype, op: Optional[str] = None) -> float:
    """The atol of ``dtype`` for the check named ``op``: its entry in :data:`ATOL_OVERRIDES`, else
    :data:`ATOL`'s (an op without overrides, or None, gets the table)."""
    return ATOL_OVERRIDES.get(op, {}).get(dtype, ATOL[dtype])


def tf32_active(dtype: torch.dtype) -> bool:
    """Whether ``dtype``'s dots run as TF32: fp32 under ``torch.backends.cuda.matmul.fp32_precision
    == "tf32"``."""
    return dtype == F32 and torch.backends.cuda.matmul.fp32_precision == "tf32"


def tf32_atol(magnitude: float) -> float:
    """The TF32 allowance at ``magnitude``: :data:`TF32_ROUNDOFFS` TF32 roundoffs."""
    return TF32_ROUNDOFFS * TF32_ROUNDOFF * magnitude


# ------------------------------------------------------------------------------------- the rule


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _label(name: str, actual_dtype: torch.dtype, dtype: torch.dtype) -> str:
    """``name (dtype)`` for failure messages; the tensor's own dtype too where the rule's is
    another (a float32 residual's gradient under bfloat16's atol)."""
    if actual_dtype == dtype:
        return f"{name} ({_dtype_name(dtype)})"
    return f"{name} ({_dtype_name(actual_dtype)}, {_dtype_name(dtype)} atol)"


def _max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; 0 for empty tensors."""
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def _magnitude(ref: torch.Tensor) -> float:
    """max(1, max |ref|): the scale atol is relative to."""
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def assert_2x_torch(name: str, actual: Optional[torch.Tensor], ref64: torch.Tensor, torch_same: torch.Tensor,
                    dtype: torch.dtype, *, op: Optional[str] = None, finite: bool = True) -> None:
    """``max |actual - ref64| <= 2 max |torch_same - ref64| + atol * max(1, max |ref64|)``.

    ``ref64``: the op in float64; ``torch_same``: PyTorch's result (or the reference's) in the
    run's ``dtype`` from the same inputs, whose shape and dtype ``actual`` must have; atol is
    :func:`atol_for` ``(dtype, op)``. A NaN in ``actual`` fails (an element never written into a
    poisoned output); with ``finite`` (the linear, mlp and cuda-backend tests) so does ±inf, while
    ``finite=False`` (the LayerNorm and patch_embed tests) leaves an inf to the bound, which it
    passes only where PyTorch's own error is infinite too. Empty tensors pass.
    """
    assert actual is not None, f"{name}: no result (a gradient never computed?)"
    label = _label(name, actual.dtype, dtype)
    assert actual.shape == ref64.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == torch_same.dtype, f"{label}: dtype {actual.dtype} != torch's {torch_same.dtype}"
    assert not torch.isnan(actual).any(), f"{label}: NaN (an element the kernel never wrote?)"
    if finite:
        assert torch.isfinite(actual).all(), f"{label}: non-finite values"
    err, torch_err = _max_abs_err(actual, ref64), _max_abs_err(torch_same, ref64)
    atol = atol_for(dtype, op) * _magnitude(ref64)
    bound = 2 * torch_err + atol
    assert err <= bound, f"{label}: error {err:.3g} > bound {bound:.3g} = 2 x torch's {torch_err:.3g} + atol {atol:.3g}"


def _max_abs_err_equal_infs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, an inf of one sign in both counting as no error; 0 for empty tensors."""
    if a.numel() == 0:
        return 0.0
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    return (a - b).masked_fill(both_inf, 0.0).abs().max().item()


def assert_2x_torch_nonfinite(name: str, actual: torch.Tensor, ref64: torch.Tensor, torch_same: torch.Tensor,
                              dtype: torch.dtype, *, op: Optional[str] = None, slack: float = 0.0) -> None:
    """The bound of :func:`assert_2x_torch` where ``ref64`` may hold ±inf: ``actual`` must be
    non-finite exactly where ``ref64`` is, and an inf equal to float64's is no error; a non-finite
    ``torch_same`` where float64 is finite (PyTorch overflowing) counts as no error of PyTorch's,
    so it cannot widen the bound. atol: :func:`atol_for` ``(dtype, op)`` at the finite reference's
    magnitude, plus ``slack`` (an absolute allowance the caller derives for a known effect).
    """
    label = _label(name, actual.dtype, dtype)
    assert actual.shape == ref64.shape, f"{label}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == torch_same.dtype, f"{label}: dtype {actual.dtype} != torch's {torch_same.dtype}"
    fin = torch.isfinite(ref64)
    torch_same = torch.where(torch.isfinite(torch_same) | ~fin, torch_same.double(), ref64).to(torch_same.dtype)
    assert torch.equal(torch.isfinite(actual), fin), f"{label}: non-finite values where fp64 has none (or vice versa)"
    err, torch_err = _max_abs_err_equal_infs(actual, ref64), _max_abs_err_equal_infs(torch_same, ref64)
    scale = max(ref64[fin].abs().max().item() if fin.any() else 0.0, 1.0)
    atol = atol_for(dtype, op) * scale + slack
    bound = 2 * torch_err + atol
    assert err <= bound, f"{label}: error {err:.3g} > bound {bound:.3g} = 2 x torch's {torch_err:.3g} + atol {atol:.3g}"


def _rounding_atol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the error of just rounding ``ref`` to ``dtype`` (as the flash-attention tests do)."""
    finite = ref[torch.isfinite(ref)]
    if finite.numel() == 0:
        return 0.0
    r = finite.to(dtype)
    return 2.0 * ((r + 0.3 - 0.3).double() - finite).abs().max().item() + 1e-7


#: fp32's floor in :func:`assert_flash_rule`, in ulps at the problem's magnitude: a kernel and
#: torch summing the same fp32 terms in different orders each err by a few ulps of the terms'
#: magnitude, and torch's own error (the rule's yardstick) can fall far below that for a given
#: input and CPU (its reductions' blocking differs between CPUs: on one, dK of a D = 72 varlen case
#: erred 1.2e-6 in torch and 3.8e-6 in the kernel at magnitude 4.8, 7 ulps).
FP32_ORDER_ULPS = 8


def assert_flash_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, torch_lp: torch.Tensor, dtype: torch.dtype,
                      scale: float = 0.0, tf32: bool = False) -> None:
    """Attention's form of the rule: ``|got - ref64| <= 2 |torch_lp - ref64| + atol`` over the
    finite elements of ``ref64``, and ``got`` non-finite exactly where ``ref64`` is, with its
    values. atol: the rounding noise of ``dtype`` at the reference's magnitude, at least one ulp
    (fp32: :data:`FP32_ORDER_ULPS`) at ``scale`` (the magnitude of the problem: a gradient that is
    exactly 0, as dK for a single key, still carries the rounding of the terms that cancel in it);
    with ``tf32`` (fp32 under TF32 dots), at least :func:`tf32_atol` at that magnitude.
    """
    label = _label(name, got.dtype, dtype)
    fin = torch.isfinite(ref64)
    got_fin = torch.isfinite(got)
    assert torch.equal(got_fin, fin), f"{label}: {(got_fin != fin).sum().item()} elements differ in finiteness"
    if not fin.any():
        return
    assert torch.equal(got[~fin], ref64[~fin].to(got.dtype)), f"{label}: non-finite values differ"
    err = (got.double() - ref64)[fin].abs().max().item()
    err_torch = (torch_lp.double() - ref64)[fin].abs().max().item()
    ulps = FP32_ORDER_ULPS if dtype == torch.float32 and not tf32 else 1
    atol = max(_rounding_atol(ref64, dtype), ulps * torch.finfo(dtype).eps * scale)
    if tf32:
        magnitude = max(scale, ref64[fin].abs().max().item(), 1.0)
        atol = max(atol, tf32_atol(magnitude))
    assert err <= 2 * err_torch + atol, (
        f"{label}: kernel error {err:.3e} > 2 x torch error {err_torch:.3e} + atol {atol:.1e}")


def assert_2x_rounding(name: str, actual: torch.Tensor, ref64: torch.Tensor, *, op: Optional[str] = None) -> None:
    """``max |actual - ref64| <= 2 max |round(ref64) - ref64| + atol * max(1, max |ref64|)``, with
    ``round`` to ``actual``'s dtype and atol :func:`atol_for` ``(actual.dtype, op)``: for code below
    the ops (the GEMM core's epilogue hooks) that no PyTorch op computes in the same dtype.
    Every element must be finite."""
    dtype = actual.dtype
    label = f"{name} ({_dtype_name(dtype)})"
    assert torch.isfinite(actual).all(), f"{label}: non-finite output (unwritten?)"
    err = _max_abs_err(actual, ref64)
    rnd = _max_abs_err(ref64.to(dtype), ref64)
    atol = atol_for(dtype, op) * _magnitude(ref64)
    assert err <= 2 * rnd + atol, f"{label}: error {err:.3g} > 2 x rounding {rnd:.3g} + atol {atol:.3g}"


# ----------------------------------------------------------------------- checks besides the rule


def assert_close_same_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype: Optional[torch.dtype] = None,
                            **tol: float) -> None:
    """``torch.testing.assert_close`` with :data:`CLOSE_TOL`'s atol / rtol of ``dtype`` (default:
    ``expected``'s), ``tol`` overriding them, after checking that both tensors have one dtype: a
    result against PyTorch's (or timm's) own op run in the same dtype rather than against float64."""
    tol = {**CLOSE_TOL[dtype or expected.dtype], **tol}
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, **tol)


def relative_error(got: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> float:
    """``max |got - ref| / max(1, max |ref|)``, to hold against :data:`RELATIVE_TOLERANCE`: 0 when
    both are None or empty; inf when only one is None, the shapes differ or ``got`` is not finite."""
    if got is None or ref is None:
        return math.inf if (got is None) != (ref is None) else 0.0
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return math.inf
    if got.numel() == 0:
        return 0.0
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


# ------------------------------------------------------------------------------------ poisoning


def poison_value(dtype: torch.dtype) -> Union[float, int]:
    """What :func:`poisoned` fills ``dtype`` with: NaN for floating (and complex) dtypes, the
    largest value for integers (no count or index of an op reaches it). bool has no value to
    spare: TypeError."""
    if dtype.is_floating_point or dtype.is_complex:
        return math.nan
    if dtype == torch.bool:
        raise TypeError("a bool tensor cannot be poisoned: every value is a valid result")
    return torch.iinfo(dtype).max


def poisoned(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """A new ``shape`` tensor full of :func:`poison_value`: an output buffer whose unwritten
    elements fail the comparators (the signature of the ops' ``_empty`` allocators, which tests
    replace with it)."""
    return torch.full(shape, poison_value(dtype), dtype=dtype, device=device)


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`poisoned` with ``t``'s shape, dtype, device and layout (a channels-last ``t`` gives a
    channels-last buffer)."""
    return torch.full_like(t, poison_value(t.dtype))
