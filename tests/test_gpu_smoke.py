"""scripts/gpu_smoke.py, the first stage of gpu_check: its rows' logic on the CPU (Triton through
the interpreter), so that a GPU session's first minute is not spent on a broken script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import vitkern
from vitkern.testing.numerics import RELATIVE_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "scripts" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the rows that run a public op in one of its other modes (its own row runs the plain call)
VARIANT_ROWS = {"pre_norm", "add_pre_norm", "attention_prologue", "linear_branch"}


def test_every_public_op_has_a_row(smoke):
    public = {"layer_norm", "add_layer_norm", "attention", "attention_qkvpacked", "scaled_dot_product_attention",
              "attention_varlen", "attention_qkvpacked_varlen", "linear", "mlp", "swiglu", "swiglu_mlp",
              "patch_embed", "resample_pos_embed", "resample_pos_embed_packed"}
    assert set(smoke.BACKENDS) == public | VARIANT_ROWS == set(smoke._cases(torch.device("cpu")))
    assert all(getattr(vitkern, op) for op in public)


@pytest.mark.parametrize("op", sorted(VARIANT_ROWS))
def test_variant_rows_pass(smoke, device, op):
    """The newer rows, each backend in bfloat16. Off the GPU without "auto" (the same kernels as
    "triton" there) and the attention prologue's Triton row (the interpreter takes minutes at the
    smoke shape; its kernels have their own tests)."""
    make = smoke._cases(device)[op]
    for backend in smoke.BACKENDS[op]:
        if device.type != "cuda" and (backend == "auto" or (op == "attention_prologue" and backend != "torch")):
            continue
        row = smoke.check(op, make, backend, torch.bfloat16)
        assert row["ok"], row


def test_the_packed_resampling_row_runs_both_pass_orders(smoke, device, monkeypatch):
    """The smoke row's two batches take the kernel's one-pass and a separable order, so a GPU
    run checks both against the reference; each backend in bfloat16 (off the GPU without
    "auto"). Off the GPU the row runs 64 channels wide instead of the smoke width (the
    interpreter took minutes a backend at 768), with the second pass's charge scaled alike:
    the order's cost is bytes linear in the width, so each batch picks the order it picks at
    the smoke width."""
    from vitkern.ops.pos_resample import op, plan

    if device.type != "cuda":
        monkeypatch.setattr(plan, "SECOND_PASS_BYTES", plan.SECOND_PASS_BYTES * 64 // smoke.D)
        monkeypatch.setattr(smoke, "D", 64)
    picked, real = [], op.pick_pass_order
    monkeypatch.setattr(op, "pick_pass_order", lambda *a: picked.append(real(*a)) or picked[-1])
    make = smoke._cases(device)["resample_pos_embed_packed"]
    for backend in smoke.BACKENDS["resample_pos_embed_packed"]:
        if device.type != "cuda" and backend == "auto":
            continue
        row = smoke.check("resample_pos_embed_packed", make, backend, torch.bfloat16)
        assert row["ok"], row
    assert "joint" in picked and {"x_first", "y_first"} & set(picked)


def test_rows_pass_and_fail_as_they_should(smoke, device, monkeypatch):
    cases = smoke._cases(device)
    row = smoke.check("layer_norm", cases["layer_norm"], "triton", torch.bfloat16)
    assert row["ok"], row
    assert 0 < row["fwd_err"] <= RELATIVE_TOLERANCE[torch.bfloat16] and row["bwd_err"] > 0
    row = smoke.check("layer_norm", cases["layer_norm"], "triton", torch.bfloat16, where="worker thread")
    assert row["ok"], row
    # a wrong result fails its row, an exception fails its row with the reason; neither stops the run
    real = vitkern.layer_norm
    wrong_on_triton = lambda x, w, b, eps: real(x, w, b, eps) * (1.5 if vitkern.get_backend() == "triton" else 1.0)  # noqa: E731
    monkeypatch.setattr(vitkern, "layer_norm", wrong_on_triton)
    row = smoke.check("layer_norm", cases["layer_norm"], "triton", torch.float32)
    assert not row["ok"] and "error above" in row["error"]
    monkeypatch.setattr(vitkern, "layer_norm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel")))
    row = smoke.check("layer_norm", cases["layer_norm"], "reference", torch.float32, where="worker thread")
    assert not row["ok"] and row["error"] == "RuntimeError: no kernel" and "Traceback" in row["traceback"]
