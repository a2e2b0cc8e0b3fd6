"""The kernel registry (vitkern.ops._config): every @triton.jit function under vitkern.ops is
registered (as a kernel, or as a device helper inlined into its callers) and launched by a
compile case; launch / capture / autotune / dot_operand behave under the interpreter and on a GPU.

The self-test kernels in ``_compile_fixture_kernels`` run here through ``launch`` on the test
device (the CPU through the interpreter when there is no GPU), checked against references.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch
import triton
import triton.language as tl

import _compile_fixture_kernels as fx
import vitkern.ops
from vitkern.ops import _config, _triton
from vitkern.ops._config import CHECK_ARCHS, device_arch, KernelConfig, num_sms
from vitkern.ops._triton import (
    autotune,
    base_kernel,
    is_kernel_object,
    is_registered_helper,
    kernel_entry,
    launch,
    register_kernel,
    registered_kernels,
    round_to,
    wgmma_expected,
)
from vitkern.testing.compile_check import capture, registered_cases, run_cases
from vitkern.testing.numerics import poisoned, poisoned_like


def _ops_modules():
    names = sorted(m.name for m in pkgutil.walk_packages(vitkern.ops.__path__, "vitkern.ops."))
    return [importlib.import_module(n) for n in names]


def _jit_functions(module):
    """(name, kernel) for every @triton.jit function defined in ``module`` (wrappers unwrapped)."""
    for name, obj in sorted(vars(module).items()):
        base = base_kernel(obj)
        if is_kernel_object(base) and base.fn.__module__ == module.__name__:
            yield name, base


def _unregistered(modules):
    return [f"{m.__name__}.{name}" for m in modules for name, k in _jit_functions(m)
            if kernel_entry(k) is None and not is_registered_helper(k)]


def _unlaunched(prefix):
    entries = registered_kernels(prefix)
    launched = set()
    for arch in CHECK_ARCHS:
        with capture(arch) as launches:
            for cases in registered_cases(prefix):
                run_cases(cases)
        launched |= {id(launch_.entry) for launch_ in launches}
    return [e.name for e in entries if id(e) not in launched]


def test_every_ops_jit_function_is_registered():
    modules = _ops_modules()
    missing = _unregistered(modules)
    assert not missing, (
        "@triton.jit functions in vitkern.ops missing from the kernel config registry (decorate "
        "kernels with vitkern.ops._triton.register_kernel, device helpers with register_helper): "
        + ", ".join(missing))
    if not _config.INTERPRETING:  # JITFunctions also record themselves, nested ones included
        from triton.runtime.jit import _triton_jit_function_registry

        nested = [name for name, fn in _triton_jit_function_registry.items()
                  if fn.module.startswith("vitkern.ops.") and kernel_entry(fn) is None
                  and not is_registered_helper(fn)]
        assert not nested, "unregistered @triton.jit functions in vitkern.ops: " + ", ".join(nested)
    # dot_operand is a registered helper, found by the same walk
    assert ("dot_operand", _triton.dot_operand) in list(_jit_functions(_triton))
    assert is_registered_helper(_triton.dot_operand)


def test_every_ops_kernel_is_launched_by_a_compile_case():
    _ops_modules()
    missing = _unlaunched("vitkern.ops")
    assert not missing, "registered kernels that no @compile_cases launches: " + ", ".join(missing)


def test_fixture_kernels_are_registered_and_launched():
    assert _unregistered([fx]) == []
    assert {name for name, _ in _jit_functions(fx)} == {
        "_rowwise_center_kernel", "_gemm_tile_kernel", "_spill_rows_kernel"}
    assert _unlaunched(fx.__name__) == []


# --------------------------------------------------------------------------------------------
# Registration rules
# --------------------------------------------------------------------------------------------


@triton.jit
def _unregistered_kernel(X, BLOCK: tl.constexpr):
    tl.store(X + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32))


def test_launch_refuses_an_unregistered_kernel():
    x = torch.zeros(16)
    with pytest.raises(RuntimeError, match="not registered"):
        launch(_unregistered_kernel, (1,), x, BLOCK=16)
    with capture(90), pytest.raises(RuntimeError, match="not registered"):
        launch(_unregistered_kernel, (1,), x, BLOCK=16)


def test_register_kernel_validates_configs():
    @triton.jit
    def k(X, N, BLOCK: tl.constexpr):
        pass

    with pytest.raises(ValueError, match="not constexpr parameters"):
        register_kernel(k, configs=[KernelConfig({"N": 4})])
    with pytest.raises(ValueError, match="names no kernel parameter"):
        register_kernel(k, configs=[KernelConfig({"BLOCK": 4})], key=["M"])
    with pytest.raises(ValueError, match="compiler options"):
        KernelConfig({"num_warps": 4})
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig({}, num_warps=3)
    with pytest.raises(TypeError, match="@triton.jit"):
        register_kernel(lambda x: x)
    assert kernel_entry(k) is None


def test_kernel_config_data():
    c = KernelConfig.coerce({"BLOCK_M": 64, "num_warps": 8, "num_stages": 2, "archs": 90, "bench": True})
    assert c == KernelConfig({"BLOCK_M": 64}, num_warps=8, num_stages=2, archs=(90,), bench=True)
    assert c.all_kwargs() == {"BLOCK_M": 64, "num_warps": 8, "num_stages": 2, "num_ctas": 1}
    assert c.applies_to(90) and not c.applies_to(80)
    assert c.label() == "BLOCK_M=64 w8 s2"
    t = c.to_triton()
    assert (t.kwargs, t.num_warps, t.num_stages) == ({"BLOCK_M": 64}, 8, 2)
    assert KernelConfig.coerce(t) == KernelConfig({"BLOCK_M": 64}, num_warps=8, num_stages=2)

    entry = kernel_entry(fx._rowwise_center_kernel)
    assert entry.autotuned and entry.key == ("N",)
    label = lambda cs: [x.label() for x in cs]  # noqa: E731
    assert label(entry.check_configs(80, full=False)) == ["BLOCK_M=1 w4 s1", "BLOCK_M=4 w4 s1"]
    assert label(entry.check_configs(90, full=True)) == ["BLOCK_M=1 w4 s1", "BLOCK_M=4 w4 s1", "BLOCK_M=2 w2 s1"]
    assert label(entry.check_configs(80, full=True)) == ["BLOCK_M=1 w4 s1", "BLOCK_M=4 w4 s1"]


def test_wgmma_expected_rule():
    rule = wgmma_expected(operand="A", block_m="BLOCK_M", tf32="ALLOW_TF32")
    spec = {"A": "*bf16", "BLOCK_M": 128, "ALLOW_TF32": False, "num_warps": 4}
    assert rule(spec)
    assert not rule({**spec, "num_warps": 2})
    assert not rule({**spec, "BLOCK_M": 32})
    assert not rule({**spec, "A": "*fp32"})
    assert rule({**spec, "A": "*fp32", "ALLOW_TF32": True})


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def test_capture_records_launches_and_runs_nothing():
    x = torch.randn(64, 197)
    out = poisoned_like(x)
    for arch, sms in ((80, 108), (90, 132)):
        with capture(arch) as launches:
            assert device_arch(x.device) == arch and num_sms(x.device) == sms
            fx.rowwise_center(x, out=out)
            fx.gemm(torch.randn(32, 16, dtype=torch.bfloat16), torch.randn(16, 8, dtype=torch.bfloat16))
        assert out.isnan().all()  # nothing ran
        rw, gm = launches
        assert rw.entry is kernel_entry(fx._rowwise_center_kernel) and rw.arch == arch and rw.config is None
        assert rw.kwargs == {"HAS_W": False, "BLOCK_N": 256} and rw.args[0] is x and rw.args[1] is None
        assert gm.kwargs["num_stages"] == (4 if arch == 90 else 3)  # the launcher's per-arch choice
    assert not _triton.capturing()


def test_capture_checks_launch_arguments():
    a = torch.randn(32, 16, dtype=torch.bfloat16)
    with capture(80):
        with pytest.raises(TypeError, match="unknown keyword arguments"):
            launch(fx._gemm_tile_kernel, (1,), a, a, a, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                   BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_Z=1)
        with pytest.raises(TypeError, match="missing a required argument"):
            launch(fx._gemm_tile_kernel, (1,), a, a, a, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
        with pytest.raises(TypeError, match="come from the autotuned configs"):
            launch(fx._rowwise_center_kernel, (1,), a, None, a, 1, 1, 1, 1, HAS_W=False, BLOCK_N=16, BLOCK_M=4)
    with pytest.raises(ValueError, match="80 or 90"):
        with capture(75):
            pass


# --------------------------------------------------------------------------------------------
# Interpreter helpers
# --------------------------------------------------------------------------------------------

interpreter_only = pytest.mark.skipif(not _config.INTERPRETING, reason="interpreter behaviour (TRITON_INTERPRET=1)")


@interpreter_only
def test_interpreter_device_queries_are_fixed():
    assert num_sms() == _config.INTERPRET_NUM_SMS == 4
    assert num_sms(torch.device("cpu")) == 4
    assert device_arch(torch.device("cpu")) == 90


@interpreter_only
def test_autotune_hands_the_interpreter_one_config():
    tuner = autotune([KernelConfig({"BLOCK": 16}), {"BLOCK": 32, "num_warps": 8}], key=["N"])(
        fx._rowwise_center_kernel)
    assert [c.kwargs for c in tuner.configs] == [{"BLOCK": 16}]
    entry = kernel_entry(fx._rowwise_center_kernel)
    assert [c.kwargs for c in entry.tuner(90).configs] == [{"BLOCK_M": 1}]


@register_kernel
@triton.jit
def _cast_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Y + offs, round_to(tl.load(X + offs, mask=mask), Y.dtype.element_ty), mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_rounds_to_nearest_even(device, dtype):
    """The store cast matches torch's (round to nearest even), interpreter included, where a
    plain fp32 -> bf16 ``.to`` truncates."""
    x = torch.randn(2048) * torch.logspace(-30, 30, 2048)
    ties = [1.0 + 3 * 2**-8, 1.0 + 2**-8, 1.0 + 2**-8 + 2**-12, -(1.0 + 3 * 2**-8), 33.7, 3.3e38, 1e-40, -0.0]
    x = torch.cat([x, torch.tensor(ties + [float("inf"), -float("inf")])])
    if dtype == torch.float16:  # finite values past fp16's range: numpy warns on the cast
        x = x[(x.abs() < 6e4) | x.isinf()]
    x = x.to(device)
    y = torch.empty(x.shape, dtype=dtype, device=device)
    launch(_cast_kernel, (1,), x, y, x.numel(), BLOCK=4096)
    assert torch.equal(y, x.to(dtype))


# --------------------------------------------------------------------------------------------
# The fixture kernels run (interpreter on the CPU, compiled on a GPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 197), (3, 768), (1, 50)])
@pytest.mark.parametrize("has_weight", [False, True])
def test_rowwise_center_through_launch(device, dtype, shape, has_weight):
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[1], dtype=dtype, device=device) if has_weight else None
    out = poisoned_like(x)
    y = fx.rowwise_center(x, w, out=out)
    ref = fx.rowwise_center_ref(x.double(), None if w is None else w.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_launch_with_a_forced_config(device):
    """config= bypasses autotuning (benchmarks sweep configs this way); capture records it."""
    x = torch.randn(9, 100, device=device)
    out = poisoned_like(x)
    forced = fx.ROWWISE_CONFIGS[1]
    args = (x, None, out, 9, 100, x.stride(0), out.stride(0))
    with capture(90) as launches:
        launch(fx._rowwise_center_kernel, (3,), *args, config=forced, HAS_W=False, BLOCK_N=128)
    assert launches[0].config == forced and out.isnan().all()
    launch(fx._rowwise_center_kernel, (3,), *args, config=forced, HAS_W=False, BLOCK_N=128)  # 3 x 4 rows
    torch.testing.assert_close(out.double(), fx.rowwise_center_ref(x.double()), rtol=1e-5, atol=1e-5)


def test_rowwise_center_misaligned_view(device):
    buf = torch.randn(33, 770, device=device)
    x = buf[:, 1:769]
    y = fx.rowwise_center(x, out=poisoned((33, 768), torch.float32, device))
    torch.testing.assert_close(y.double(), fx.rowwise_center_ref(x.double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mnk", [(50, 70, 100), (197, 64, 32), (1, 130, 16)])
def test_gemm_through_dot_operand(device, dtype, mnk):
    """bf16 dots through dot_operand are right under the interpreter (raw tl.dot on bf16 would
    multiply bit patterns there) and on the GPU; error within 2x torch's own plus a small atol."""
    M, N, K = mnk
    a = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, K, dtype=dtype, device=device).t()  # a transposed (K, N) view
    out = poisoned((M, N), dtype, device)
    c = fx.gemm(a, b, out=out)
    ref = a.double() @ b.double()
    err = (c.double() - ref).abs().max().item()
    torch_err = ((a @ b).double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-2, (err, torch_err)
