"""Backend selection (vitkern._backend): capabilities as data plus a predicate, every reason in an
explicit selection's error, "auto"'s fallback order, and the VITKERN_LOG_BACKEND log."""

from __future__ import annotations

import logging

import pytest
import torch

import vitkern
from vitkern import _backend
from vitkern.ops import _config

OP = "_test_backend_op"


def _ref(x, *, flag=False):
    return ("reference", x)


def _triton(x, *, flag=False):
    return ("triton", x)


def _no_flag(x, *, flag=False):
    return ["flag=True (not implemented here)", "a second reason"] if flag else None


@pytest.fixture
def op(monkeypatch):
    monkeypatch.setitem(_backend._impls, OP, {})
    _backend.register_impl(OP, "reference", _ref)
    _backend.register_impl(OP, "triton", _triton, _no_flag, dtypes=(torch.float16, torch.bfloat16))
    monkeypatch.setattr(_backend, "triton_interpreting", lambda: True)  # CPU tensors may run "triton"
    return OP


def _call(x, **kwargs):
    return _backend.select_impl(OP, x.device, x, **kwargs)(x, **kwargs)[0]


def test_capabilities_are_data(op):
    impl = _backend.backend_impl(op, "triton")
    assert impl.dtypes == frozenset({torch.float16, torch.bfloat16}) and impl.supports is _no_flag
    assert _backend.registered_backends(op) == ("reference", "triton")
    half = torch.zeros(2, dtype=torch.float16)
    assert impl.reasons(half.device, (half,), {}) == []
    assert impl.reasons(half.device, (torch.zeros(2),), {}) == ["dtype float32 (it takes bfloat16, float16)"]


def test_explicit_backend_lists_every_reason(op):
    with vitkern.use_backend("triton"):
        assert _call(torch.zeros(2, dtype=torch.float16)) == "triton"
        with pytest.raises(vitkern.BackendUnavailableError) as err:
            _call(torch.zeros(2, dtype=torch.float64), flag=True)
    message = str(err.value)
    assert message.startswith(f"vitkern.{op}: backend 'triton' cannot run this call: ")
    for reason in ("dtype float64", "flag=True (not implemented here)", "a second reason"):
        assert reason in message
    with vitkern.use_backend("cuda"):  # "cuda" means "auto" for ops the extension does not implement
        assert _call(torch.zeros(2, dtype=torch.float16)) == "triton"


def test_auto_falls_back_in_order(op):
    assert _call(torch.zeros(2, dtype=torch.bfloat16)) == "triton"
    assert _call(torch.zeros(2)) == "reference"                       # dtype refused
    assert _call(torch.zeros(2, dtype=torch.float16), flag=True) == "reference"   # predicate refused


def test_missing_triton_is_a_reason(op, monkeypatch):
    monkeypatch.setattr(_config, "triton_available", lambda: False)
    x = torch.zeros(2, dtype=torch.float16)
    assert _call(x) == "reference"
    with vitkern.use_backend("triton"), pytest.raises(vitkern.BackendUnavailableError, match="Triton is not installed"):
        _call(x)


def test_log_backend_once_per_op_and_shape_class(op, monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_LOG_PICKS", True)
    monkeypatch.setattr(_backend, "_logged", set())
    with caplog.at_level(logging.INFO, logger="vitkern.backend"):
        for tokens in (197, 200, 256):                                # one class: 256 after rounding
            _call(torch.zeros(2, tokens, dtype=torch.float16))
        _call(torch.zeros(2, 257, dtype=torch.float16))               # the next class
        _call(torch.zeros(2, 197))                                    # float32: another class
    records = [r.getMessage() for r in caplog.records if r.name == "vitkern.backend"]
    assert len(records) == 3, records
    assert records[0].startswith(f"auto picked 'triton' for {op} on cpu (argument 0 float16[2, 256])")
    assert "skipping triton: dtype float32" in records[2] and "picked 'reference'" in records[2]


def test_shape_class_rounds_up_to_powers_of_two():
    x = torch.zeros(3, 197, 768, dtype=torch.bfloat16)
    assert _backend.shape_class((x,), {"bias": torch.zeros(0)}) == (
        ("argument 0", "bfloat16", (4, 256, 1024)), ("bias", "float32", (0,)))
