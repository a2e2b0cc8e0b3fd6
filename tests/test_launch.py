"""The launch path's GPU-only duties, tested for their logic on the CPU.

- Triton's scratch allocator (device-side tensor descriptors) lives in a ``ContextVar``: every
  thread must get it, including autograd's backward thread (on CUDA, backward runs on a device
  thread of its own) and a user's worker threads.
- The device guard: Triton launches on the current CUDA device, so a launch whose tensors live on
  another device must make theirs current first (and only then: it costs microseconds).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton.runtime import _allocation

import vitkern
from vitkern.ops import _triton
from vitkern.ops.gemm import configs as _gemm_configs, kernels as _gemm_kernels, launch as _gemm
from vitkern.ops._config import device_arch
from vitkern.testing.threads import run_in_thread


def _has_allocator() -> bool:
    return not isinstance(_allocation._allocator.get(), _allocation.NullAllocator)


def _tma_gemm(device):
    a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    b = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    out = torch.empty(64, 64, device=device, dtype=torch.bfloat16)
    cfg = next(c for c in _gemm_configs.GEMM_CONFIGS.values() if c.tma)
    assert _gemm._operand_mode(a, True) == _gemm.LOAD_TMA
    _gemm.gemm(a, b, out, config=cfg)
    return out, a, b


@pytest.mark.skipif(device_arch() < 90, reason="TMA descriptors are an sm_90 launch path")
def test_scratch_allocator_in_every_thread(device):
    # The main thread installs the allocator first: a module-global "installed" flag would then
    # wrongly tell every other thread that it has one.
    _tma_gemm(device)
    assert _has_allocator()
    assert not run_in_thread(_has_allocator), "a fresh thread starts without Triton's allocator"

    def worker():
        out, a, b = _tma_gemm(device)
        torch.testing.assert_close(out.float(), (a.float() @ b.float().T), atol=0.25, rtol=2e-2)
        return _has_allocator()

    assert run_in_thread(worker), "a GEMM launched from a worker thread left it without an allocator"


def test_scratch_allocator_keeps_a_users_own():
    def users_allocator(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    def worker():
        import triton

        triton.set_allocator(users_allocator)
        _triton.ensure_scratch_allocator()
        return _allocation._allocator.get()

    assert run_in_thread(worker) is users_allocator


def test_backward_from_a_worker_thread(device):
    """Forward and backward of the GEMM-based ops driven from a non-main thread (on CUDA the
    backward itself runs on autograd's device thread)."""
    x = torch.randn(2, 33, 64, device=device, requires_grad=True)
    w = (torch.randn(128, 64, device=device) * 0.1).requires_grad_()
    b = torch.randn(128, device=device, requires_grad=True)

    def worker():
        with vitkern.use_backend("triton"):
            y = vitkern.linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), activation="gelu")
            y.float().square().sum().backward()
        return y

    y = run_in_thread(worker)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert torch.isfinite(w.grad).all()


# ------------------------------------------------------------------------------- device guard


def _fake_cuda(index):
    """A fake (storage-less) tensor on cuda:<index>: no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return torch.empty(16, device=f"cuda:{index}")


def test_launch_device_only_when_the_index_differs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    t0, t1 = _fake_cuda(0), _fake_cuda(1)
    assert _triton.launch_device((t0, 3), {}) is None
    assert _triton.launch_device((t1, t0), {}) == 1
    assert _triton.launch_device((4, t1), {}) == 1          # the first tensor argument decides
    assert _triton.launch_device((), {"X": t1}) == 1
    assert _triton.launch_device((torch.empty(2), 1), {}) is None   # CPU tensors: nothing to do
    assert _triton.launch_device((None, 1), {}) is None


def test_launch_runs_on_the_tensors_device(monkeypatch):
    """launch() enters the tensors' device before running the kernel, and leaves it after."""
    current = {"index": 0}
    entered = []

    @contextlib.contextmanager
    def fake_device(index):
        previous = current["index"]
        current["index"] = index
        entered.append(index)
        try:
            yield
        finally:
            current["index"] = previous

    ran_on = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(_triton, "_run", lambda *a, **k: ran_on.append(current["index"]))
    a = _fake_cuda(1)
    kernel = _gemm_kernels._act_bwd_kernel
    args = (a, a, a, None, None, None, None, 8, 2, 2, 1, 2, 1, 2, 1)
    meta = dict(BLOCK_M=64, BLOCK_N=64, ACTIVATION=1, HAS_COL_SCALE=False, HAS_ROW_SCALE=False,
                WRITE_DSCALE=False, WRITE_DROW=False, num_warps=4, num_stages=1)
    _triton.launch(kernel, (1, 1), *args, **meta)
    assert entered == [1] and ran_on == [1] and current["index"] == 0
    current["index"] = 1
    _triton.launch(kernel, (1, 1), *args, **meta)
    assert entered == [1] and ran_on == [1, 1], "no device switch when the tensors' device is current"
