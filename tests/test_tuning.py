"""The measured "auto" choice (vitkern._tuning), tested on the CPU with fake backends and a fake
timer: the CPU is made a tuned device, and a probe op has a "triton" and a "torch" backend whose
times the test sets."""

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import vitkern
from vitkern import _backend, _tuning
from vitkern._backend import register_impl, select_impl

OP = "tuning_probe"


def probe(x, *, flag=False, extra=None):
    impl = select_impl(OP, x.device, x, flag=flag, extra=extra)
    return impl(x, flag=flag, extra=extra)


class FakeTimer:
    """Returns the set time of each candidate; runs each one once (so the runs are exercised)."""

    def __init__(self, times):
        self.times = times
        self.calls = 0
        self.ran = []

    def __call__(self, runs, device):
        self.calls += 1
        for name, run in runs.items():
            run()
            self.ran.append(name)
        return {name: self.times[name] for name in runs}


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """The CPU as a tuned device, a probe op with two fast backends, a private cache directory."""
    monkeypatch.setenv("VITKERN_TUNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VITKERN_AUTOTUNE", raising=False)
    monkeypatch.setattr(_tuning, "TUNED_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(_backend, "AUTO_CUDA_PREFERENCE", {})
    monkeypatch.setattr(_tuning, "_warned", set())
    monkeypatch.setattr(_tuning, "_decisions", {})
    monkeypatch.setitem(_backend._impls, OP, {})
    calls = {"triton": 0, "torch": 0, "reference": 0}

    def backend(name, factor):
        def fn(x, flag, extra):
            calls[name] += 1
            return x * factor
        return fn

    register_impl(OP, "reference", backend("reference", 2.0))
    register_impl(OP, "triton", backend("triton", 2.0), lambda x, flag, extra: "no flag" if flag else None)
    register_impl(OP, "torch", backend("torch", 2.0))
    _tuning.clear_memory_cache()
    timer = FakeTimer({"triton": 1.0, "torch": 2.0})
    monkeypatch.setattr(_tuning, "timer", timer)
    yield timer, calls
    _tuning.clear_memory_cache()


def _cache_entries(device=torch.device("cpu")):
    data = json.loads(_tuning.cache_path(device).read_text())
    return data["entries"]


def test_winner_is_measured_cached_and_written(tuned):
    timer, calls = tuned
    x = torch.randn(4, 197)
    torch.testing.assert_close(probe(x), x * 2)
    assert timer.calls == 1 and sorted(timer.ran) == ["torch", "triton"]
    assert calls["triton"] == 2 and calls["torch"] == 1  # timed once each, then the winner ran
    probe(torch.randn(4, 200))  # same bucket: no new measurement
    assert timer.calls == 1 and calls["triton"] == 3
    (entry,) = _cache_entries().values()
    assert entry == {"backend": "triton", "times_ms": {"triton": 1.0, "torch": 2.0}}
    probe(torch.randn(4, 300))  # another bucket
    assert timer.calls == 2


def test_slower_kernel_loses_to_torch(tuned):
    timer, calls = tuned
    timer.times = {"triton": 3.0, "torch": 2.0}
    probe(torch.randn(8, 8))
    probe(torch.randn(8, 8))
    assert calls["torch"] == 3 and calls["triton"] == 1


def test_options_and_backward_split_shape_classes(tuned):
    timer, _ = tuned
    x = torch.randn(8, 8)
    probe(x)
    probe(x, extra=torch.ones(3))
    probe(x.requires_grad_())
    with torch.no_grad():
        probe(x)  # the no-grad class is the first one
    assert timer.calls == 3
    keys = sorted(_cache_entries())
    assert any("fwd+bwd" in k for k in keys) and any("extra:float32[4]" in k for k in keys)


def test_only_accepting_backends_are_candidates(tuned):
    timer, calls = tuned
    probe(torch.randn(8, 8), flag=True)  # triton's predicate rejects flag=True
    assert timer.calls == 0 and calls["torch"] == 1
    assert _tuning.decisions()[0].source == "only"


def test_failed_candidate_is_excluded(tuned):
    timer, calls = tuned
    timer.times = {"triton": math.inf, "torch": 5.0}
    probe(torch.randn(8, 8))
    assert calls["torch"] == 2
    assert _cache_entries()[_tuning.decisions()[0].key]["times_ms"]["triton"] is None


def test_backward_is_timed_on_private_leaves(tuned):
    timer, _ = tuned
    seen = {}

    def timing(runs, device):
        for name, run in runs.items():
            run()
            seen[name] = True
        return {"triton": 1.0, "torch": 2.0}

    _tuning.timer = timing
    x = torch.randn(8, 8, requires_grad=True)
    out = probe(x)
    assert x.grad is None and seen == {"triton": True, "torch": True}
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_cache_round_trips_across_processes(tuned, tmp_path):
    timer, _ = tuned
    probe(torch.randn(4, 197))
    assert timer.calls == 1
    script = tmp_path / "reader.py"
    script.write_text(textwrap.dedent(f"""
        import torch, vitkern
        from vitkern import _backend, _tuning
        from vitkern._backend import register_impl, select_impl
        _tuning.TUNED_DEVICES = frozenset({{"cpu"}})
        def never(runs, device):
            raise AssertionError("timed although the cache has the shape class")
        _tuning.timer = never
        register_impl({OP!r}, "reference", lambda x, flag, extra: x)
        register_impl({OP!r}, "triton", lambda x, flag, extra: x)
        register_impl({OP!r}, "torch", lambda x, flag, extra: x)
        x = torch.randn(4, 197)
        fn = select_impl({OP!r}, x.device, x, flag=False, extra=None)
        print(_tuning.decisions()[0].backend, _tuning.decisions()[0].source)
    """))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["triton", "cache"]


def test_concurrent_writers_keep_every_entry(tuned, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent("""
        import sys, torch
        from vitkern import _tuning
        rank = int(sys.argv[1])
        device = torch.device("cpu")
        path, env = _tuning.cache_path(device), _tuning.environment(device)
        for i in range(25):
            _tuning._write_file(path, env, {f"rank{rank}-{i}": {"backend": "torch", "times_ms": {}}})
    """))
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=dict(os.environ)) for r in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    entries = _cache_entries()
    assert set(entries) == {f"rank{r}-{i}" for r in range(4) for i in range(25)}
    assert not [p for p in _tuning.cache_path(torch.device("cpu")).parent.iterdir() if p.suffix == ".tmp"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99}), "FOREIGN"])
def test_corrupt_or_foreign_cache_is_ignored_with_one_warning(tuned, content):
    timer, _ = tuned
    path = _tuning.cache_path(torch.device("cpu"))
    path.parent.mkdir(parents=True)
    if content == "FOREIGN":
        env = dict(_tuning.environment(torch.device("cpu")), device="another GPU")
        content = json.dumps({"format": 1, "environment": env, "entries": {"k": {"backend": "torch"}}})
    path.write_text(content)
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        probe(torch.randn(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe(torch.randn(4, 40))
    assert timer.calls == 2
    assert len(_cache_entries()) == 2  # rewritten valid, the foreign entries dropped


def test_unwritable_cache_warns_and_keeps_the_choice(tuned, tmp_path, monkeypatch):
    timer, _ = tuned
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VITKERN_TUNING_CACHE", str(blocker / "sub"))
    _tuning.clear_memory_cache()
    with pytest.warns(UserWarning, match="cannot write the tuning cache"):
        probe(torch.randn(4, 4))
    probe(torch.randn(4, 4))
    assert timer.calls == 1


def test_no_timing_while_compiling(tuned):
    timer, calls = tuned
    compiled = torch.compile(lambda x: probe(x) + 1, backend="eager", fullgraph=True)
    x = torch.randn(8, 8)
    torch.testing.assert_close(compiled(x), x * 2 + 1)
    assert timer.calls == 0 and calls["torch"] >= 1 and calls["triton"] == 0  # static fallback: torch
    # a measured class is read from the cache at trace time
    probe(torch.randn(16, 16))
    assert timer.calls == 1
    torch._dynamo.reset()
    before = calls["triton"]
    compiled(torch.randn(16, 16))
    assert timer.calls == 1 and calls["triton"] > before


def test_no_timing_under_graph_capture(tuned, monkeypatch):
    timer, calls = tuned
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    probe(torch.randn(8, 8))
    assert timer.calls == 0 and calls["torch"] == 1
    assert _tuning.decisions()[0].source == "static"


def test_no_timing_under_deterministic_algorithms(tuned):
    timer, calls = tuned
    torch.use_deterministic_algorithms(True)
    try:
        probe(torch.randn(8, 8))
    finally:
        torch.use_deterministic_algorithms(False)
    assert timer.calls == 0 and calls["torch"] == 1


def test_autotune_off_uses_the_static_table_then_torch(tuned, monkeypatch):
    timer, calls = tuned
    monkeypatch.setenv("VITKERN_AUTOTUNE", "0")
    probe(torch.randn(8, 8))
    assert calls["torch"] == 1
    monkeypatch.setattr(_backend, "AUTO_CUDA_PREFERENCE", {OP: ("cuda", "triton")})
    probe(torch.randn(64, 64))
    assert calls["triton"] == 1 and timer.calls == 0


def test_tensor_subclass_is_not_timed(tuned):
    timer, _ = tuned

    class Tagged(torch.Tensor):
        pass

    probe(torch.randn(8, 8).as_subclass(Tagged))
    assert timer.calls == 0


def test_pinned_backend_still_raises_when_it_cannot_serve(tuned):
    timer, calls = tuned
    with vitkern.use_backend("triton"), pytest.raises(vitkern.BackendUnavailableError, match="no flag"):
        probe(torch.randn(8, 8), flag=True)
    with vitkern.use_backend("torch"):
        probe(torch.randn(8, 8))
    assert timer.calls == 0 and calls["torch"] == 1


def test_reference_runs_only_when_no_fast_backend_accepts(tuned, monkeypatch):
    _, calls = tuned
    monkeypatch.setitem(_backend._impls, OP, {"reference": _backend._impls[OP]["reference"],
                                              "triton": _backend._impls[OP]["triton"]})
    probe(torch.randn(8, 8), flag=True)
    assert calls["reference"] == 1


def _ops_called(model, x):
    seen = []
    original = _backend.select_impl

    def spy(op, device, *args, **kwargs):
        seen.append(op)
        return original(op, device, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for module in list(sys.modules.values()):
            if getattr(module, "select_impl", None) is original:
                mp.setattr(module, "select_impl", spy)
        model(x)
    return set(seen)


def test_tune_covers_every_op_of_a_tiny_vit(tuned, capsys):
    timer, _ = tuned
    _tuning.timer = FakeTimer({"triton": 2.0, "torch": 1.0, "cuda": 3.0})
    model = vitkern.ViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                        drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    table = vitkern.tune(model, x, backward=True)
    assert torch.equal(torch.get_rng_state(), rng)  # drop path drew in the tuning forward only
    expected = _ops_called(model, x)
    assert {c.op for c in table} == expected and len(expected) >= 4
    assert all("fwd+bwd" in c.key for c in table)
    assert all(p.grad is None for p in model.parameters())
    printed = capsys.readouterr().out
    assert "winner" in printed and all(op in printed for op in expected)
    # every class is now known: a second tune measures nothing new
    calls = _tuning.timer.calls
    vitkern.tune(model, x, backward=True, verbose=False)
    assert _tuning.timer.calls == calls


def test_tuning_key_keeps_dtype_options():
    """An output dtype (layer_norm's out_dtype) is part of the shape class."""
    x = torch.empty(2, 197, 64)
    keys = {_tuning.tuning_key("layer_norm", "sm_90", (x,), {"out_dtype": d}, False)
            for d in (None, torch.bfloat16, torch.float16)}
    assert len(keys) == 3 and any("out_dtype=bfloat16" in k for k in keys)


def test_tuning_key_buckets_and_options():
    a = _tuning.tuning_key("op", "sm_90", (torch.empty(2, 197, 64),), {"causal": True, "scale": 0.1}, False)
    b = _tuning.tuning_key("op", "sm_90", (torch.empty(2, 256, 64),), {"causal": True, "scale": 0.3}, False)
    c = _tuning.tuning_key("op", "sm_90", (torch.empty(2, 257, 64),), {"causal": True, "scale": 0.1}, False)
    assert a == b != c and "causal=True" in a and "scale" not in a


@pytest.mark.gpu
def test_real_timer_measures_attention_on_the_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("VITKERN_TUNING_CACHE", str(tmp_path))
    _tuning.clear_memory_cache()
    q = torch.randn(2, 4, 197, 64, device="cuda", dtype=torch.bfloat16)
    vitkern.attention(q, q, q)
    (choice,) = [c for c in _tuning.decisions() if c.op == "attention"]
    assert choice.source in ("measured", "only")
    if choice.source == "measured":
        assert all(t > 0 for t in choice.times_ms.values())
    _tuning.clear_memory_cache()


@pytest.mark.gpu
def test_graph_capture_of_a_new_shape_class_does_not_time(monkeypatch, tmp_path):
    monkeypatch.setenv("VITKERN_TUNING_CACHE", str(tmp_path))
    _tuning.clear_memory_cache()
    timed = []
    real = _tuning.timer
    monkeypatch.setattr(_tuning, "timer", lambda runs, device: timed.append(tuple(runs)) or real(runs, device))
    w = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(300, 384, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        vitkern.linear(torch.randn(8, 384, device="cuda", dtype=torch.bfloat16), w)  # warm the libraries
    torch.cuda.current_stream().wait_stream(side)
    before = len(timed)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = vitkern.linear(x, w)  # a new shape class: a timing here would break the capture
    graph.replay()
    torch.cuda.synchronize()
    assert len(timed) == before
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), atol=2e-2, rtol=2e-2)
    _tuning.clear_memory_cache()
