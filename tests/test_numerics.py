"""vitkern.testing.numerics, the comparators of every kernel test: each admits what its rule admits
and fails, naming the tensor and its dtype, just past the bound; the tolerance tables and their
per-op overrides; poisoned outputs; and that the module needs torch only (no pytest, no Triton).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from vitkern.testing import numerics
from vitkern.testing.numerics import (
    assert_2x_rounding,
    assert_2x_torch,
    assert_2x_torch_nonfinite,
    assert_close_same_dtype,
    assert_flash_rule,
    atol_for,
    poison_value,
    poisoned,
    poisoned_like,
    relative_error,
    tf32_active,
    tf32_atol,
)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DTYPES = [F32, F16, BF16]

# The fp64 reference of the cases below: max |ref| = 2, so atol counts twice. Element 0 (a zero)
# takes the kernel's error, element 1 PyTorch's: 2^-6 away, representable in every dtype.
REF64 = torch.tensor([0.0, -1.5, 2.0, 0.25], dtype=F64)
TORCH_ERR = 2.0 ** -6


def _torch_same(dtype):
    t = REF64.clone()
    t[1] += TORCH_ERR
    return t.to(dtype)


def _actual(dtype, err):
    """REF64 in ``dtype`` with element 0 off by ``err`` (rounded to ``dtype``); and that error."""
    t = REF64.clone()
    t[0] = err
    t = t.to(dtype)
    return t, (t.double() - REF64).abs().max().item()


def _just_inside_and_outside(dtype, bound):
    """Results 1% inside and 1% outside ``bound`` (the dtype's rounding moves them by < 0.4%)."""
    inside, err_in = _actual(dtype, 0.99 * bound)
    outside, err_out = _actual(dtype, 1.01 * bound)
    assert err_in < bound < err_out
    return inside, outside


# ------------------------------------------------------------------------------------ the tables


def test_atol_table_and_overrides():
    assert numerics.ATOL == {F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}
    assert [atol_for(dt) for dt in DTYPES] == [2e-6, 2e-3, 1.6e-2]
    assert atol_for(F32, "linear") == 2e-6  # an op without overrides gets the table
    assert atol_for(F32, "patch_embed") == 1e-5
    assert atol_for(BF16, "patch_embed") == 1.6e-2  # an override covers only its dtypes
    assert (atol_for(F32, "gemm"), atol_for(F16, "gemm"), atol_for(BF16, "gemm")) == (1e-5, 2e-3, 1e-2)
    assert atol_for(F32, "properties") == 1e-5
    with pytest.raises(KeyError):
        atol_for(F64)  # float64 is the reference, never under test
    assert numerics.CLOSE_TOL[F32] == dict(atol=2e-5, rtol=1e-4)
    assert numerics.RELATIVE_TOLERANCE == {BF16: 4e-2, F16: 1e-2, F32: 2e-3}


def test_tf32_switch_and_allowance():
    previous = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert not tf32_active(F32)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert tf32_active(F32) and not tf32_active(BF16)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    assert tf32_atol(3.0) == 16 * 2.0 ** -11 * 3.0


# --------------------------------------------------------------------------- the 2x-of-torch rule


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("finite", [True, False])
def test_2x_torch_bound(dtype, finite):
    bound = 2 * TORCH_ERR + atol_for(dtype) * 2.0
    inside, outside = _just_inside_and_outside(dtype, bound)
    assert_2x_torch("dq", inside, REF64, _torch_same(dtype), dtype, finite=finite)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(AssertionError, match=rf"dq \({name}\): error \S+ > bound {bound:.3g}"):
        assert_2x_torch("dq", outside, REF64, _torch_same(dtype), dtype, finite=finite)


def test_2x_torch_atol_is_relative_to_the_magnitude():
    # an error of 1.5 atols and none of torch's: inside at max |ref| = 2, outside at max |ref| <= 1
    actual, _ = _actual(BF16, 1.5 * 1.6e-2)
    assert_2x_torch("y", actual, REF64, REF64.to(BF16), BF16)
    keep = [0, 3]  # max |ref| = 0.25: the atol at magnitude 1
    with pytest.raises(AssertionError, match=r"y \(bfloat16\): error"):
        assert_2x_torch("y", actual[keep], REF64[keep], REF64[keep].to(BF16), BF16)


def test_2x_torch_per_op_atol():
    # fp32, no torch error: 1e-5 at magnitude 2 is past the table's atol there (4e-6), inside patch_embed's (2e-5)
    actual, _ = _actual(F32, 1e-5)
    same = REF64.to(F32)
    assert_2x_torch("tokens", actual, REF64, same, F32, op="patch_embed")
    with pytest.raises(AssertionError, match=r"tokens \(float32\)"):
        assert_2x_torch("tokens", actual, REF64, same, F32)


def test_2x_torch_names_a_tensor_of_another_dtype():
    # a float32 residual's gradient held to the bfloat16 atol of the run
    actual, _ = _actual(F32, 1.0)
    with pytest.raises(AssertionError, match=r"dresidual \(float32, bfloat16 atol\)"):
        assert_2x_torch("dresidual", actual, REF64, REF64.to(F32), BF16)


@pytest.mark.parametrize("finite", [True, False])
def test_2x_torch_nan_fails(finite):
    actual = REF64.to(BF16)
    actual[2] = math.nan  # an element the kernel never wrote into its poisoned output
    with pytest.raises(AssertionError, match=r"dx \(bfloat16\): NaN"):
        assert_2x_torch("dx", actual, REF64, _torch_same(BF16), BF16, finite=finite)


def test_2x_torch_inf():
    actual = REF64.to(F16)
    actual[3] = math.inf
    with pytest.raises(AssertionError, match=r"y \(float16\): non-finite"):
        assert_2x_torch("y", actual, REF64, _torch_same(F16), F16)
    # finite=False leaves the inf to the bound: it fails unless torch's own error is infinite
    with pytest.raises(AssertionError, match=r"y \(float16\): error inf > bound"):
        assert_2x_torch("y", actual, REF64, _torch_same(F16), F16, finite=False)
    overflowed = _torch_same(F16)
    overflowed[3] = math.inf
    assert_2x_torch("y", actual, REF64, overflowed, F16, finite=False)


def test_2x_torch_shape_dtype_missing_and_empty():
    same = _torch_same(BF16)
    with pytest.raises(AssertionError, match="db: no result"):
        assert_2x_torch("db", None, REF64, same, BF16)
    with pytest.raises(AssertionError, match=r"y \(bfloat16\): shape \(3,\) != \(4,\)"):
        assert_2x_torch("y", same[:3], REF64, same, BF16)
    with pytest.raises(AssertionError, match=r"y \(float16, bfloat16 atol\): dtype"):
        assert_2x_torch("y", REF64.to(F16), REF64, same, BF16)
    empty = torch.empty(0, 8, dtype=BF16)
    assert_2x_torch("y", empty, empty.double(), empty, BF16)


def test_2x_torch_nonfinite_bound_and_slack():
    bound = 2 * TORCH_ERR + atol_for(F32, "properties") * 2.0
    inside, outside = _just_inside_and_outside(F32, bound)
    same = _torch_same(F32)
    assert_2x_torch_nonfinite("linear[triton] output 0", inside, REF64, same, F32, op="properties")
    with pytest.raises(AssertionError, match=r"linear\[triton\] output 0 \(float32\): error"):
        assert_2x_torch_nonfinite("linear[triton] output 0", outside, REF64, same, F32, op="properties")
    assert_2x_torch_nonfinite("y", outside, REF64, same, F32, op="properties", slack=0.02 * bound)
    # an empty result passes
    empty = torch.empty(0, 3)
    assert_2x_torch_nonfinite("y", empty, empty.double(), empty, F32)


def test_2x_torch_nonfinite_pattern():
    ref64 = torch.tensor([1.0, -math.inf, math.inf, 0.5], dtype=F64)
    same = ref64.to(BF16)
    assert_2x_torch_nonfinite("lse", ref64.to(BF16), ref64, same, BF16)  # equal infs are no error
    flipped = ref64.to(BF16)
    flipped[1] = math.inf
    with pytest.raises(AssertionError, match=r"lse \(bfloat16\): error inf"):
        assert_2x_torch_nonfinite("lse", flipped, ref64, same, BF16)
    for bad in (math.nan, math.inf):
        got = ref64.to(BF16)
        got[0] = bad
        with pytest.raises(AssertionError, match=r"lse \(bfloat16\): non-finite values where fp64 has none"):
            assert_2x_torch_nonfinite("lse", got, ref64, same, BF16)


def test_2x_torch_nonfinite_overflowing_torch_widens_nothing():
    # torch inf where fp64 is finite counts as no torch error: the bound stays the atol alone
    ref64 = REF64.clone()
    same = ref64.to(F16)
    same[1] = math.inf
    actual, _ = _actual(F16, 0.5)
    with pytest.raises(AssertionError, match=r"y \(float16\): error 0.5 > bound"):
        assert_2x_torch_nonfinite("y", actual, ref64, same, F16)


# ------------------------------------------------------------------------------ attention's form


def test_flash_rule_rounding_atol():
    ref64 = torch.linspace(-3, 3, 101, dtype=F64)
    same = ref64.to(BF16)
    # rounding ref64 to bf16 is within the rule whatever torch does
    assert_flash_rule("out", ref64.to(BF16), ref64, same, BF16)
    off = ref64.to(BF16)
    off[50] += 0.25  # ref64[50] = 0: a quarter is many bf16 roundings at magnitude 3
    with pytest.raises(AssertionError, match=r"out \(bfloat16\): kernel error 2.500e-01 > 2 x torch error"):
        assert_flash_rule("out", off, ref64, same, BF16)


def test_flash_rule_scale_and_tf32_allowance():
    ref64 = torch.zeros(8, dtype=F64)  # a gradient that is exactly 0: its atol comes from scale
    same = ref64.to(F32)
    got = same.clone()
    got[3] = 1e-5  # under one TF32 allowance at magnitude 1 (7.8e-3), above fp32 ulps at scale 1
    with pytest.raises(AssertionError, match=r"dk \(float32\)"):
        assert_flash_rule("dk", got, ref64, same, F32, scale=1.0)
    assert_flash_rule("dk", got, ref64, same, F32, scale=1.0, tf32=True)
    got[3] = tf32_atol(1.0) * 1.01
    with pytest.raises(AssertionError, match=r"dk \(float32\)"):
        assert_flash_rule("dk", got, ref64, same, F32, scale=1.0, tf32=True)
    got[3] = torch.finfo(F32).eps * 10  # inside one ulp at scale 16 (16 eps)
    assert_flash_rule("dk", got, ref64, same, F32, scale=16.0)


def test_flash_rule_nonfinite_pattern_and_values():
    ref64 = torch.tensor([0.5, -math.inf, 0.25], dtype=F64)  # lse of a fully masked row: -inf
    same = ref64.to(F16)
    assert_flash_rule("lse", ref64.to(F16), ref64, same, F16)
    written = ref64.to(F16)
    written[0] = math.nan  # never written
    with pytest.raises(AssertionError, match=r"lse \(float16\): 1 elements differ in finiteness"):
        assert_flash_rule("lse", written, ref64, same, F16)
    written = ref64.to(F16)
    written[1] = math.nan  # where fp64 gives -inf
    with pytest.raises(AssertionError, match=r"lse \(float16\): non-finite values differ"):
        assert_flash_rule("lse", written, ref64, same, F16)


# ------------------------------------------------------------------------- the GEMM core's form


def test_2x_rounding():
    ref64 = torch.linspace(-2, 2, 33, dtype=F64) / 3  # not representable: rounding errs
    rnd = (ref64.to(BF16).double() - ref64).abs().max().item()
    bound = 2 * rnd + 1e-2 * 1.0
    assert_2x_rounding("out", ref64.to(BF16), ref64, op="gemm")
    got = ref64.to(BF16)
    got[16] = 1.01 * bound  # ref64[16] = 0
    with pytest.raises(AssertionError, match=r"out \(bfloat16\): error"):
        assert_2x_rounding("out", got, ref64, op="gemm")
    got[16] = 0.99 * bound
    assert_2x_rounding("out", got, ref64, op="gemm")
    # fp32: inside the GEMM core's 1e-5 atol, outside the table's 2e-6
    got32 = ref64.to(F32)
    got32[16] = 5e-6
    assert_2x_rounding("out", got32, ref64, op="gemm")
    with pytest.raises(AssertionError, match=r"out \(float32\)"):
        assert_2x_rounding("out", got32, ref64)
    got[16] = math.nan
    with pytest.raises(AssertionError, match=r"pre \(bfloat16\): non-finite output"):
        assert_2x_rounding("pre", got, ref64, op="gemm")


# ------------------------------------------------------------------------ checks besides the rule


def test_close_same_dtype():
    x = torch.linspace(-1, 1, 9)
    assert_close_same_dtype(x + 1e-5, x)  # float32: atol 2e-5
    with pytest.raises(AssertionError):
        assert_close_same_dtype(x + 1e-4, x)
    assert_close_same_dtype(x + 1e-4, x, atol=1e-3)  # keyword overrides
    assert_close_same_dtype((x + 1e-2).to(BF16), x.to(BF16))  # bfloat16: 1.6e-2
    with pytest.raises(AssertionError, match="dtype torch.bfloat16 != torch.float32"):
        assert_close_same_dtype(x.to(BF16), x)


def test_relative_error():
    ref = torch.tensor([4.0, -2.0, 0.5])
    assert relative_error(ref + torch.tensor([0.0, 0.2, 0.0]), ref) == pytest.approx(0.2 / 4.0)
    small = torch.tensor([0.5, 0.25])
    assert relative_error(small + 0.1, small) == pytest.approx(0.1)  # max(1, max |ref|) = 1
    assert relative_error(None, None) == 0.0 and relative_error(torch.empty(0), torch.empty(0)) == 0.0
    assert relative_error(None, ref) == math.inf and relative_error(ref, None) == math.inf
    assert relative_error(ref[:2], ref) == math.inf
    assert relative_error(torch.tensor([math.nan, 0.0, 0.0]), ref) == math.inf


# ------------------------------------------------------------------------------------- poisoning


def test_poisoned_floats_are_nan():
    for dtype in (F32, F16, BF16, F64, torch.complex64):
        t = poisoned((3, 5), dtype)
        assert t.shape == (3, 5) and t.dtype == dtype and torch.isnan(t).all()
    assert torch.isnan(poisoned(torch.Size([2, 2]), F32, torch.device("cpu"))).all()


def test_poisoned_integers_and_bool():
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.int8):
        assert poison_value(dtype) == torch.iinfo(dtype).max
        assert (poisoned((4,), dtype) == torch.iinfo(dtype).max).all()
    with pytest.raises(TypeError, match="bool"):
        poisoned((4,), torch.bool)


def test_poisoned_like_keeps_the_layout():
    images = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    t = poisoned_like(images.to(BF16))
    assert t.dtype == BF16 and t.stride() == images.stride() and torch.isnan(t).all()
    assert (poisoned_like(torch.zeros(3, dtype=torch.int32)) == torch.iinfo(torch.int32).max).all()


def test_poisoned_outputs_fail_the_rule():
    # a kernel that writes all but the last row of a poisoned output
    ref64 = torch.randn(4, 16, dtype=F64)
    out = poisoned(ref64.shape, BF16)
    out[:-1] = ref64[:-1].to(BF16)
    with pytest.raises(AssertionError, match="NaN"):
        assert_2x_torch("y", out, ref64, ref64.to(BF16), BF16, finite=False)


# ------------------------------------------------------------------------------------ torch only


def test_module_needs_torch_only():
    """The module file, run with pytest and triton unimportable and without the vitkern package
    (whose ops import Triton): torch and the standard library suffice."""
    code = (
        "import sys, importlib.util\n"
        "sys.modules['pytest'] = sys.modules['triton'] = None\n"
        f"spec = importlib.util.spec_from_file_location('numerics', {numerics.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import torch\n"
        "m.assert_2x_torch('y', torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(2), torch.float32)\n"
        "loaded = [k for k, v in sys.modules.items() if v is not None]\n"
        "assert not [k for k in loaded if k == 'vitkern' or k.startswith(('vitkern.', 'triton'))], loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
