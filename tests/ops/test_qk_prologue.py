"""The Triton q / k prologue (``vitkern.ops.qk_prologue``): QK-norm and 2-D RoPE in one pass,
forward and every gradient (x, the norm's weight / bias, the tables) against the float64
reference, under the interpreter. The rule is the LayerNorm tests': within twice the reference's
own error in the run's dtype plus a small atol. Outputs are allocated NaN-filled (an element a
kernel never writes fails)."""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern.ops.qk_prologue import QKNorm, RopeTables, apply_qk_prologue_ref, qk_prologue
from vitkern.ops.qk_prologue import launch as pl_launch
from vitkern.testing.numerics import assert_2x_torch, poisoned

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@pytest.fixture(autouse=True)
def _triton_poisoned(monkeypatch):
    vitkern.use_backend("triton")  # conftest restores the previous choice
    real_empty = torch.empty

    def empty(*shape, dtype=None, device=None, **kw):
        return poisoned(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape, dtype, device)

    monkeypatch.setattr(pl_launch, "torch", _TorchWithPoisonedEmpty(real_empty, empty))


class _TorchWithPoisonedEmpty:
    """``torch`` for the launcher module with ``empty`` filling NaN (everything else torch's)."""

    def __init__(self, real_empty, empty):
        self._empty = empty

    def __getattr__(self, name):
        return self._empty if name == "empty" else getattr(torch, name)


def _inputs(B, H, T, D, dtype, *, norm, affine, rope, per_head, prefix, packed, table_grad, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift)

    if packed:
        x = rnd(B, T, 3, H, D, scale=2.0, shift=0.5).to(dtype)[:, :, 1].transpose(1, 2)
    else:
        x = rnd(B, H, T, D, scale=2.0, shift=0.5).to(dtype)
    w = rnd(D, scale=0.5, shift=1.0).to(dtype) if norm and affine else None
    b = rnd(D, scale=0.5).to(dtype) if norm == "layer" and affine else None
    tables = None
    if rope:
        shape = (H, T - prefix, D // 2) if per_head else (T - prefix, D // 2)
        angles = rnd(*shape, scale=3.0)
        lay = (lambda a: torch.cat([a, a], -1)) if rope == "half" else (lambda a: a.repeat_interleave(2, -1))
        tables = (lay(angles.sin()), lay(angles.cos()))
    return x, w, b, tables


CASES = [
    # (B, H, T, D, norm, affine, rope, per_head, prefix, packed)
    (2, 3, 197, 64, "layer", True, "interleaved", False, 1, True),     # EVA-02 block, packed qkv
    (2, 3, 201, 64, None, False, "half", False, 5, False),             # DINOv3: 4 registers + cls
    (1, 2, 50, 80, "rms", True, "half", False, 0, False),              # Qwen-VL's 80, split halves
    (1, 2, 33, 72, "layer", False, "interleaved", False, 1, False),    # SigLIP's 72, no affine
    (1, 4, 17, 16, None, False, "interleaved", True, 0, False),        # mixed RoPE: per-head tables
    (1, 2, 9, 128, "rms", True, None, False, 0, True),                 # QK-norm only
    (1, 1, 3, 256, "layer", True, "interleaved", False, 1, False),
    (1, 2, 1, 32, "layer", True, "half", False, 1, False),             # only a prefix token
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[2]}-D{c[3]}-{c[4]}-{c[6]}{'-heads' if c[7] else ''}")
def test_prologue_matches_reference(case, dtype):
    B, H, T, D, norm_kind, affine, rope, per_head, prefix, packed = case
    x, w, b, tables = _inputs(B, H, T, D, dtype, norm=norm_kind, affine=affine, rope=rope, per_head=per_head,
                              prefix=prefix, packed=packed, table_grad=True)
    leaves = [t.detach().requires_grad_() if t is not None else None
              for t in (x, w, b, *(tables or (None, None)))]
    lx, lw, lb, lsin, lcos = leaves

    def run(x, w, b, sin, cos, fn):
        norm = QKNorm(norm_kind, w, b, 1e-6) if norm_kind else None
        tab = RopeTables(sin, cos, rope) if rope else None
        return fn(x, norm, tab, prefix)

    y = run(lx, lw, lb, lsin, lcos, qk_prologue)
    assert y.dtype == dtype and y.shape == (B, H, T, D)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, dy)
    ref_leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    y64 = run(*ref_leaves64, apply_qk_prologue_ref)
    grads64 = torch.autograd.grad(y64, [t for t in ref_leaves64 if t is not None], dy.double())
    same = [t.detach().requires_grad_() if t is not None else None for t in leaves]
    y_same = run(*same, apply_qk_prologue_ref)
    grads_same = torch.autograd.grad(y_same, [t for t in same if t is not None], dy)
    assert_2x_torch("y", y, y64, y_same, dtype)
    names = [n for n, t in zip(("dx", "dw", "db", "dsin", "dcos"), leaves) if t is not None]
    for name, g_, g64, gs in zip(names, grads, grads64, grads_same):
        assert_2x_torch(name, g_, g64, gs, dtype)


def test_partial_gradients_and_no_grad():
    """Only the gradients asked for are computed (the others skip their partial sums)."""
    x, w, b, (sin, cos) = _inputs(1, 2, 20, 32, F32, norm="layer", affine=True, rope="interleaved",
                                  per_head=False, prefix=2, packed=False, table_grad=False)
    w.requires_grad_()
    y = qk_prologue(x, QKNorm("layer", w, b), RopeTables(sin, cos), 2)
    (gw,) = torch.autograd.grad(y.sum(), [w])
    ref_w = w.detach().double().requires_grad_()
    y64 = apply_qk_prologue_ref(x.double(), QKNorm("layer", ref_w, b.double()),
                                RopeTables(sin.double(), cos.double()), 2)
    (gw64,) = torch.autograd.grad(y64.sum(), [ref_w])
    torch.testing.assert_close(gw.double(), gw64, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(qk_prologue(x, QKNorm("layer", w, b), RopeTables(sin, cos), 2), y.detach())


def test_deterministic_run_to_run():
    x, w, b, (sin, cos) = _inputs(2, 3, 40, 64, BF16, norm="layer", affine=True, rope="half",
                                  per_head=False, prefix=1, packed=False, table_grad=True)
    outs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (x, w, b, sin, cos)]
        y = qk_prologue(leaves[0], QKNorm("layer", leaves[1], leaves[2]), RopeTables(leaves[3], leaves[4], "half"), 1)
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), leaves)))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


