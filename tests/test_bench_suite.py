"""The benchmark suite around the runner core (CPU, fast): rotating input buffers, the CUDA-graph and
rotation choices (with a fake graph capture), the SDPA-backend / library / vitkern-cuda providers'
skip logic, --models and batch sweeps, the schema's new fields, the headline table, the plots and
the README section generated from a synthetic GPU results.json, and ``python -m benchmarks`` end to
end on the CPU with the tiny ViT (in process)."""

import copy
import json

import pytest
import torch
from _bench_helpers import REPO_ROOT

from benchmarks import cases, cli, flops, plot, readme, render, runner, timing
from benchmarks.cli import select_setups
from benchmarks.environment import DEFAULT_RIDGE, environment
from benchmarks.providers import Prepared, prepare, reference_result
from benchmarks.results import ROW_FIELDS, SCHEMA_VERSION, SchemaError, fill_speedups, validate_results, validate_row
from benchmarks.runner import RunConfig, run
from benchmarks.setups import Case, Setup, Unavailable, discover, shape_label
from benchmarks.setups import _attention_refs
from benchmarks.timing import RotatingCall, input_pool, measure, rotation_copies, should_rotate

CPU = torch.device("cpu")
MB = 1024 * 1024

# ------------------------------------------------------------------------------------------------
# Rotating input buffers
# ------------------------------------------------------------------------------------------------


def test_rotation_copies():
    l2 = 50 * MB
    assert rotation_copies(200 * MB, l2) == 1  # one copy already exceeds 2x the L2
    assert rotation_copies(100 * MB, l2) == 1
    assert rotation_copies(30 * MB, l2) == 5  # ceil(100 / 30) + 1: the other four hold 120 MB
    n = rotation_copies(30 * MB, l2)
    assert (n - 1) * 30 * MB >= 2 * l2
    assert rotation_copies(1000, l2) == timing.ROTATE_MAX_COPIES
    assert rotation_copies(10 * MB, l2, max_pool_bytes=40 * MB) == 4
    assert rotation_copies(0, l2) == 1 and rotation_copies(10, 0) == 1


def test_input_pool_copies_are_distinct_and_equal():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8)
    pool = input_pool((x, w, 3, "gelu"), 4)
    assert len(pool) == 4 and pool[0][0] is x and pool[0][1] is w  # the originals first
    ptrs = {p[0].data_ptr() for p in pool} | {p[1].data_ptr() for p in pool}
    assert len(ptrs) == 8  # every tensor in its own storage
    for args in pool[1:]:
        assert torch.equal(args[0], x) and torch.equal(args[1], w)
        assert args[0].requires_grad and args[0].is_leaf and not args[1].requires_grad
        assert args[2:] == (3, "gelu")  # non-tensors shared


def test_rotating_call_cycles_through_the_pool():
    pool = input_pool((torch.zeros(3),), 3)
    seen = []
    call = RotatingCall(lambda args: seen.append(args[0].data_ptr()), pool)
    for _ in range(7):
        call()
    ptrs = [p[0].data_ptr() for p in pool]
    assert seen == [ptrs[i % 3] for i in range(7)]
    # measure() calls it once per repetition (and for its estimate and warmup): every rep moves on
    seen.clear()
    t = measure(call, "cpu", warmup=2, reps=6)
    assert t.n_reps == 6 and len(seen) == 1 + 2 + 6
    assert all(a != b for a, b in zip(seen, seen[1:]))
    with pytest.raises(ValueError):
        RotatingCall(lambda args: None, [])


def test_should_rotate_policy():
    ridge = DEFAULT_RIDGE
    ln = flops.layer_norm_cost(256 * 197, 768, "bf16")
    gemm = flops.linear_cost(128 * 197, 768, 3072, "bf16")
    assert timing.is_memory_bound(ln.flops["fwd"], ln.bytes["fwd"], ridge)  # no FLOPs: bytes only
    assert not timing.is_memory_bound(gemm.flops["fwd"], gemm.bytes["fwd"], ridge)
    assert should_rotate("auto", True, "fwd", None, ln.bytes["fwd"], ridge)
    assert should_rotate("auto", True, "fwd+bwd", None, ln.bytes["fwd+bwd"], ridge)
    assert not should_rotate("auto", True, "fwd", gemm.flops["fwd"], gemm.bytes["fwd"], ridge)
    assert not should_rotate("auto", True, "train", None, 100, ridge)
    assert not should_rotate("auto", False, "fwd", None, ln.bytes["fwd"], ridge)  # CPU
    assert should_rotate("always", False, "train", 1, 1, ridge)
    assert not should_rotate("never", True, "fwd", None, 100, ridge)


def _toy_setup():
    def build(shape, dtype, device):
        x = torch.randn(shape["batch"], 8, dtype=dtype, device=device, requires_grad=True)
        w = torch.randn(8, dtype=dtype, device=device, requires_grad=True)

        return Case(
            args=(x, w), torch_fn=lambda x, w: x * w, vitkern_fn=lambda vk: (lambda x, w: x * w),
            cost=flops.Cost(flops={"fwd": None, "fwd+bwd": None}, bytes={"fwd": 96, "fwd+bwd": 300}),
            grad_inputs=(x, w),
        )

    return Setup(name="toy", description="x * w", build=build, gpu_shapes=(dict(batch=2),), cpu_shapes=(dict(batch=2),))


def test_rotated_fwd_bwd_uses_each_copys_leaves():
    setup = _toy_setup()
    case = setup.build({"batch": 2}, torch.float32, CPU)
    ref, grad_outputs = reference_result(case, "fwd+bwd")
    prepared = prepare(case, "torch", "fwd+bwd", CPU, grad_outputs)
    pool = input_pool(prepared.args, 3)
    with torch.no_grad():
        pool[1][0].mul_(2.0)  # a different x in copy 1: d(x*w)/dw changes, d/dx does not
    g0 = prepared.call_with(pool[0])
    g1 = prepared.call_with(pool[1])
    torch.testing.assert_close(g0[0], ref[0]) and torch.testing.assert_close(g0[1], ref[1])
    torch.testing.assert_close(g1[0], ref[0])
    torch.testing.assert_close(g1[1], 2.0 * ref[1])
    assert case.args[0].grad is None and pool[1][0].grad is None  # autograd.grad: nothing accumulates


def test_run_with_rotation_always_on_the_cpu():
    config = RunConfig(ops=["toy"], providers=["torch", "vitkern-reference"], modes=["fwd", "fwd+bwd"], dtype="fp32",
                       device="cpu", warmup_ms=1.0, rep_ms=2.0, rotate="always")
    rows = run({"toy": _toy_setup()}, config, verbose=False)
    for row in rows:
        validate_row(row)
        assert row["status"] == "ok" and row["input_copies"] == timing.ROTATE_MAX_COPIES  # 96-byte inputs
        assert row["cuda_graph"] is None and row["l2_flush"] is False
    config.rotate = "never"
    rows = run({"toy": _toy_setup()}, config, verbose=False)
    assert all(r["input_copies"] == 1 for r in rows)


# ------------------------------------------------------------------------------------------------
# The GPU timing choices, with a fake CUDA graph capture (no GPU needed)
# ------------------------------------------------------------------------------------------------


def _prepared(calls):
    def call_with(args):
        calls.append(args)
        return args

    args = (torch.zeros(1024),)
    return Prepared(call=lambda: call_with(args), context=lambda: None, call_with=call_with, args=args)


def _gpu_row(mode="fwd", flops_=None, bytes_=4096):
    row = {k: None for k in ROW_FIELDS}
    row.update(mode=mode, flops=flops_, bytes=bytes_, note=None)
    return row


def test_timed_call_cuda_graph_and_fallback(monkeypatch):
    cuda = torch.device("cuda")
    config = RunConfig(ops=[], providers=[], modes=[], dtype="bf16", device="cuda", cuda_graphs=True)
    replays = []
    monkeypatch.setattr(runner, "cuda_graph_call", lambda call, device: (lambda: replays.append(1)))
    row = _gpu_row()
    fn, flush = runner._timed_call(_prepared([]), row, config, cuda, DEFAULT_RIDGE)
    fn()
    assert replays == [1] and row["cuda_graph"] is True and row["input_copies"] == 1 and flush and row["l2_flush"]

    def refuse(call, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(runner, "cuda_graph_call", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []
    prepared = _prepared(calls)
    row = _gpu_row()
    fn, _ = runner._timed_call(prepared, row, config, cuda, DEFAULT_RIDGE)
    assert fn is prepared.call and row["cuda_graph"] is False
    assert "CUDA graph capture failed" in row["note"] and "stream is capturing" in row["note"]


def test_cuda_graphs_leave_training_steps_eager_and_check_replays(monkeypatch):
    cuda = torch.device("cuda")
    config = RunConfig(ops=[], providers=[], modes=[], dtype="bf16", device="cuda", cuda_graphs=True)
    monkeypatch.setattr(runner, "cuda_graph_call", lambda call, device: pytest.fail("a training step was captured"))
    prepared = _prepared([])
    row = _gpu_row(mode="train", flops_=10**12, bytes_=10**6)
    fn, _ = runner._timed_call(prepared, row, config, cuda, DEFAULT_RIDGE)
    assert fn is prepared.call and row["cuda_graph"] is False and "not captured" in row["note"]
    # a replay whose output differs from the reference marks the row
    ref = [torch.ones(4)]
    row = {"note": None, "err_ok": True}
    runner._check_replay(row, torch.ones(4), ref, "bf16", CPU)
    assert row["err_ok"] is True and row["note"] is None
    runner._check_replay(row, torch.zeros(4), ref, "bf16", CPU)
    assert row["err_ok"] is False and "CUDA graph replay output differs" in row["note"]


def test_timed_call_rotates_memory_bound_cases_on_a_gpu(monkeypatch):
    cuda = torch.device("cuda")
    config = RunConfig(ops=[], providers=[], modes=[], dtype="bf16", device="cuda")
    monkeypatch.setattr(runner, "l2_bytes", lambda device: 64 * 1024)  # a 64 KiB L2: 4 KiB inputs need 33 copies
    calls = []
    row = _gpu_row()  # bytes only: memory bound
    fn, flush = runner._timed_call(_prepared(calls), row, config, cuda, DEFAULT_RIDGE)
    assert isinstance(fn, RotatingCall) and row["input_copies"] == len(fn.pool) == 33
    assert flush is False and row["l2_flush"] is False and row["cuda_graph"] is False  # the copies evict the L2
    fn(), fn()
    assert calls[0][0].data_ptr() != calls[1][0].data_ptr()
    # copies capped below 2x the L2 (tiny inputs, a 50 MB L2): rotate, and flush as well
    monkeypatch.setattr(runner, "l2_bytes", lambda device: 50 * MB)
    row = _gpu_row()
    fn, flush = runner._timed_call(_prepared([]), row, config, cuda, DEFAULT_RIDGE)
    assert row["input_copies"] == timing.ROTATE_MAX_COPIES and flush is True and row["l2_flush"] is True
    row = _gpu_row(flops_=10**12, bytes_=10**6)  # compute bound: the L2 flush instead
    fn, flush = runner._timed_call(_prepared([]), row, config, cuda, DEFAULT_RIDGE)
    assert not isinstance(fn, RotatingCall) and flush and row["input_copies"] == 1 and row["l2_flush"] is True


# ------------------------------------------------------------------------------------------------
# Providers: SDPA backends, flash-attn / xformers, vitkern-cuda
# ------------------------------------------------------------------------------------------------


def test_sdpa_backend_providers_on_the_cpu():
    setup = discover(["attention"])["attention"]
    torch.manual_seed(0)
    case = setup.build(setup.shapes("cpu", quick=True)[0], torch.float32, CPU)
    refs = case.references
    assert set(cases.ATTENTION_PROVIDERS) <= set(refs)
    for name in ("sdpa-cudnn", "sdpa-efficient"):
        assert refs[name].fn is None and "no CPU kernel" in refs[name].label
    providers = ["torch", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flash-attn", "xformers"]
    config = RunConfig(ops=["attention"], providers=providers, modes=["fwd", "fwd+bwd"], dtype="fp32", device="cpu",
                       warmup_ms=1.0, rep_ms=2.0)
    rows = run({"attention": setup}, config, verbose=False)
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        for name in ("sdpa-flash", "sdpa-math"):
            assert by[(name, mode)]["status"] == "ok" and by[(name, mode)]["err_ok"] is True, by[(name, mode)]
        for name in ("sdpa-cudnn", "sdpa-efficient"):
            assert by[(name, mode)]["status"] == "skipped" and "no CPU kernel" in by[(name, mode)]["note"]
        for name in ("flash-attn", "xformers"):
            assert by[(name, mode)]["status"] == "skipped" and by[(name, mode)]["note"]
        assert set(by[("torch", mode)]["speedup_vs"]) == {"sdpa-flash", "sdpa-math"}
    if _attention_refs._import("flash_attn")[0] is None:
        assert "not installed" in by[("flash-attn", "fwd")]["note"]


def test_sdpa_refusal_becomes_unavailable():
    from torch.nn.attention import SDPBackend

    q = k = v = torch.randn(1, 2, 16, 8)
    fn = _attention_refs.with_sdpa_backend(
        torch.nn.functional.scaled_dot_product_attention, SDPBackend.EFFICIENT_ATTENTION, "sdpa-efficient"
    )
    with pytest.raises(Unavailable, match="sdpa-efficient: SDPA backend EFFICIENT_ATTENTION refused"):
        fn(q, k, v)
    ok = _attention_refs.with_sdpa_backend(
        torch.nn.functional.scaled_dot_product_attention, SDPBackend.MATH, "sdpa-math"
    )
    torch.testing.assert_close(ok(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))

    def broken(*args):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):  # only refusals are skips
        _attention_refs.with_sdpa_backend(broken, SDPBackend.MATH, "sdpa-math")(q)
    # a refusal at the first call in the runner: a skipped row, not an error
    refusing = Setup(
        name="refusing", description="", gpu_shapes=({},), cpu_shapes=({},),
        build=lambda shape, dtype, device: Case(
            args=(q, k, v), torch_fn=torch.nn.functional.scaled_dot_product_attention, vitkern_fn=lambda vk: None,
            cost=flops.attention_cost(1, 2, 16, 16, 8, "fp32"),
            references={
                "sdpa-efficient": __import__("benchmarks.setups", fromlist=["Reference"]).Reference(fn, "SDPA")
            },
        ),
    )
    config = RunConfig(ops=["refusing"], providers=["torch", "sdpa-efficient"], modes=["fwd"], dtype="fp32",
                       device="cpu", warmup_ms=1.0, rep_ms=2.0)
    rows = {r["provider"]: r for r in run({"refusing": refusing}, config, verbose=False)}
    assert rows["sdpa-efficient"]["status"] == "skipped" and "refused" in rows["sdpa-efficient"]["note"]


def test_packed_attention_has_the_same_references():
    setup = discover(["attention_qkvpacked"])["attention_qkvpacked"]
    case = setup.build(setup.shapes("cpu")[0], torch.float32, CPU)
    assert set(cases.ATTENTION_PROVIDERS) <= set(case.references)
    out = case.references["sdpa-math"].fn(*case.args)
    torch.testing.assert_close(out, case.torch_fn(*case.args), atol=1e-5, rtol=1e-5)


def test_vitkern_cuda_provider_skips():
    setup = discover(["layer_norm"])["layer_norm"]
    case = setup.build(setup.shapes("cpu")[0], torch.float32, CPU)
    with pytest.raises(Unavailable, match="CUDA tensors only"):
        prepare(case, "vitkern-cuda", "fwd", CPU, op="layer_norm")
    # on a GPU: an op the extension does not implement is skipped before anything runs
    with pytest.raises(Unavailable, match="has no layer_norm kernel"):
        prepare(case, "vitkern-cuda", "fwd", torch.device("cuda"), op="layer_norm")


# ------------------------------------------------------------------------------------------------
# Selection: --models, batch sweeps
# ------------------------------------------------------------------------------------------------


def test_models_and_batch_selection():
    setups, names = select_setups(None, ["ViT-B/16"])
    assert list(setups) == ["vit"] and names == ["ViT-B/16"]
    setups, names = select_setups(["layer_norm"], ["vit"])
    assert list(setups) == ["layer_norm", "vit"] and names is None
    with pytest.raises(KeyError, match="unknown model"):
        select_setups(None, ["ViT-Q/99"])
    vit = discover(["vit"])["vit"]
    config = RunConfig(ops=["vit"], providers=[], modes=[], dtype="bf16", device="cuda", models=["ViT-L/16"])
    plan = runner.plan_cases({"vit": vit}, config, "cuda")
    assert plan and {s["name"] for *_, s in plan} == {"ViT-L/16"}
    ln = discover(["layer_norm"])["layer_norm"]
    shapes = ln.shapes("cuda", quick=True, batch=[1, 8, 8, 64])
    assert [s["batch"] for s in shapes] == [1, 8, 64] and len({s["name"] for s in shapes}) == 1
    assert cli._parse_batch("1, 8,64") == [1, 8, 64] and cli._parse_batch("32") == 32
    with pytest.raises(ValueError):
        cli._parse_batch("0")


# ------------------------------------------------------------------------------------------------
# Schema, headline, plots and README from a synthetic GPU results.json (fake timings)
# ------------------------------------------------------------------------------------------------


def _row(op, shape, provider, mode, ms, **kw):
    row = {k: None for k in ROW_FIELDS}
    row.update(
        op=op, provider=provider, mode=mode, shape=dict(shape), label=shape_label(shape), dtype="bf16",
        device="cuda", status="ok", median_ms=ms, n_reps=50, speedup_vs={}, cuda_graph=False, input_copies=1,
        l2_flush=True,
    )
    if ms is not None:
        row.update(p20_ms=0.95 * ms, p80_ms=1.05 * ms, min_ms=0.9 * ms)
    row.update(kw)
    return row


def _synthetic_doc():
    rows = []

    def case(op, shape, mode, times, pct=None):
        group = []
        for provider, ms in times.items():
            if ms is None:
                group.append(_row(op, shape, provider, mode, None, status="skipped", note="refused", median_ms=None,
                                  p20_ms=None, p80_ms=None, min_ms=None, n_reps=None, cuda_graph=None,
                                  input_copies=None, l2_flush=None))
            else:
                group.append(_row(op, shape, provider, mode, ms, pct_of_ceiling=pct if provider == "vitkern" else None))
        fill_speedups(group)
        rows.extend(group)

    ln = dict(name="ViT-B/16", batch=256, tokens=197, dim=768)
    for mode in ("fwd", "fwd+bwd"):
        case("layer_norm", ln, mode, {"vitkern": 0.1, "torch": 0.15, "torch.compile": 0.12}, pct=80.0)
    for name, b, t in (("ViT-B/16", 128, 197), ("ViT-B/16@384", 32, 577), ("ViT-B/16@448", 16, 785)):
        shape = dict(name=name, batch=b, heads=12, tokens=t, head_dim=64)
        case("attention", shape, "fwd", {"vitkern": 0.5, "torch": 0.6, "sdpa-flash": 0.55, "sdpa-cudnn": 0.52,
                                         "sdpa-math": 3.0, "sdpa-efficient": None}, pct=60.0)
    for b, ms in ((256, 90.0), (1, 2.0), (8, 3.5), (64, 25.0)):
        shape = dict(name="ViT-B/16", img_size=224, batch=b)
        case("vit", shape, "fwd",
             {"vitkern": ms, "torch": ms * 1.3, "torch.compile": ms * 1.15, "torchvision": ms * 1.4}, pct=55.0)
    for r in rows:
        if r["op"] == "vit" and r["status"] == "ok":
            r["items_per_s"] = r["shape"]["batch"] / (r["median_ms"] * 1e-3)
    env = environment(CPU)
    env.update(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
               driver_version="570.00", date="2025-01-31T12:00:00Z", git_commit="0123456789abcdef", git_dirty=False)
    config = dict(ops=["layer_norm", "attention", "vit"], model_ops=["vit"], providers=list(cases.ALL_PROVIDERS),
                  modes=["fwd", "fwd+bwd"], dtype="bf16", device="cuda", quick=False, batch=None, models=None,
                  flush_l2=True, rotate="auto", cuda_graphs=False, warmup_ms=25.0, rep_ms=100.0, compile_on_cpu=False,
                  budget_s=None, check=True)
    ceilings = {"gemm_tflops": 750.0, "gemm_shape": [8192] * 3, "gemm_dtype": "bf16",
                "copy_gbps": 3000.0, "copy_bytes": 1 << 30}
    return {"schema_version": SCHEMA_VERSION, "environment": env, "config": config, "ceilings": ceilings, "rows": rows,
            "wall_s": 500.0, "complete": True}


def test_schema_new_fields():
    doc = json.loads(json.dumps(_synthetic_doc()))
    validate_results(doc)
    vk = next(r for r in doc["rows"] if r["op"] == "attention" and r["provider"] == "vitkern")
    assert vk["best_reference"] == "sdpa-cudnn" and vk["speedup_vs_best"] == pytest.approx(0.52 / 0.5)
    assert set(vk["speedup_vs"]) == {"torch", "sdpa-flash", "sdpa-cudnn", "sdpa-math"}
    torch_row = next(r for r in doc["rows"] if r["op"] == "attention" and r["provider"] == "torch")
    assert torch_row["best_reference"] is None  # references get no best-reference ratio
    bad = [
        dict(vk, best_reference="vitkern-triton"),
        dict(vk, speedup_vs_best=None),
        dict(vk, input_copies=0),
        dict(vk, cuda_graph="yes"),
        dict(vk, device="cpu", pct_of_ceiling=None, cuda_graph=True),
        dict(vk, speedup_vs={"vitkern-cuda": 1.0}),
    ]
    for row in bad:
        with pytest.raises(SchemaError):
            validate_row(row)
    for key in ("l2_cache_bytes", "torchvision", "flash_attn", "xformers"):
        broken = copy.deepcopy(doc)
        del broken["environment"][key]
        with pytest.raises(SchemaError, match="environment lacks"):
            validate_results(broken)
    broken = copy.deepcopy(doc)
    del broken["config"]["cuda_graphs"]
    with pytest.raises(SchemaError, match="config"):
        validate_results(broken)
    with pytest.raises(SchemaError, match="schema_version"):
        validate_results(dict(doc, schema_version=1))


def test_headline_table():
    doc = _synthetic_doc()
    table = cases.headline_table(doc)
    keys = [(t["op"], t["shape"], t["mode"]) for t in table]
    # each op's first shape in every mode; the model's whole batch sweep, by batch
    assert keys[:3] == [
        ("layer_norm", "ViT-B/16 B=256 T=197 D=768", "fwd"),
        ("layer_norm", "ViT-B/16 B=256 T=197 D=768", "fwd+bwd"),
        ("attention", "ViT-B/16 B=128 H=12 T=197 d=64", "fwd"),
    ]
    assert [t["shape"] for t in table if t["op"] == "vit"] == [f"ViT-B/16 img=224 B={b}" for b in (1, 8, 64, 256)]
    ln = table[0]
    assert ln["best_reference"] == "torch.compile"
    assert ln["speedup"] == pytest.approx(1.2) and ln["pct_of_ceiling"] == 80.0
    md = render.render_headline(doc)
    assert md.count("\n") == len(table) + 2 and "| layer_norm |" in md and "**1.20x**" in md and "80%" in md
    assert "vitkern img/s" in md


def test_plots_from_a_synthetic_results_json(tmp_path):
    pytest.importorskip("matplotlib")
    doc = _synthetic_doc()
    series = plot.speedup_series(doc["rows"], "batch")
    assert list(series) == ["vit ViT-B/16 img=224 (fwd)"]
    assert [x for x, _ in series["vit ViT-B/16 img=224 (fwd)"]] == [1, 8, 64, 256]
    assert all(y == pytest.approx(1.15) for _, y in series["vit ViT-B/16 img=224 (fwd)"])
    seq = plot.speedup_series(doc["rows"], "tokens", ("batch", "name"))
    assert list(seq) == ["attention H=12 d=64 (fwd)"]
    assert [x for x, _ in seq["attention H=12 d=64 (fwd)"]] == [197, 577, 785]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "plots"
    assert plot.main([str(path), "--out", str(out)]) == 0
    for name in plot.PLOTS:
        png = out / name
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a run with no sweep writes the headline plot only
    flat = dict(doc, rows=[r for r in doc["rows"] if r["op"] == "layer_norm"])
    written = plot.write_plots(flat, tmp_path)
    assert [p.name for p in written] == ["speedup_headline.png"]
    assert plot.main([str(tmp_path / "missing.json")]) == 2


def test_readme_section(tmp_path):
    doc = _synthetic_doc()
    results = tmp_path / "benchmarks" / "results" / "2025-01-31-nvidia-h100"
    results.mkdir(parents=True)
    (results / "results.json").write_text(json.dumps(doc))
    (results / "speedup_vs_batch.png").write_bytes(b"\x89PNG fake")
    md = tmp_path / "README.md"
    md.write_text(
        f"# x\n\n## Latest GPU results\n\n{readme.START}\n{readme.NO_RESULTS}\n{readme.END}\n\n## Next\ntext\n"
    )
    assert readme.main([str(results), "--readme", str(md), "--check"]) == 1
    assert readme.main([str(results), "--readme", str(md)]) == 0
    text = md.read_text()
    assert readme.NO_RESULTS not in text and text.endswith("## Next\ntext\n") and text.startswith("# x\n")
    section = text[text.index(readme.START):text.index(readme.END)]
    assert "NVIDIA H100 80GB HBM3, 2025-01-31, bf16" in section and "driver 570.00" in section
    assert "commit `0123456789`" in section
    assert "](benchmarks/results/2025-01-31-nvidia-h100/results.json)" in section
    assert "![speedup vs batch](benchmarks/results/2025-01-31-nvidia-h100/speedup_vs_batch.png)" in section
    assert "| vit | ViT-B/16 img=224 B=1 | fwd |" in section
    assert readme.main([str(results), "--readme", str(md), "--check"]) == 0  # idempotent
    assert readme.main([str(results), "--readme", str(md)]) == 0 and md.read_text() == text
    # refused: a CPU run, a folder outside the README's directory, a README without markers
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    cpu_doc = copy.deepcopy(doc)
    cpu_doc["environment"]["device_type"] = "cpu"
    (cpu / "results.json").write_text(json.dumps(cpu_doc))
    assert readme.main([str(cpu), "--readme", str(md)]) == 2
    inner = tmp_path / "sub" / "README.md"
    inner.parent.mkdir()
    inner.write_text(f"{readme.START}\n{readme.END}\n")
    assert readme.main([str(results), "--readme", str(inner)]) == 2
    with pytest.raises(readme.ReadmeError, match="markers"):
        readme.replace_section("no markers", "x")


def test_repository_readme_has_the_markers():
    text = (REPO_ROOT / "README.md").read_text()
    assert text.count(readme.START) == 1 and text.count(readme.END) == 1
    assert text.index(readme.START) < text.index(readme.END)


# ------------------------------------------------------------------------------------------------
# End to end on the CPU: the tiny ViT at two batch sizes, in process
# ------------------------------------------------------------------------------------------------


def test_cli_cpu_end_to_end_tiny_model(tmp_path, capsys, monkeypatch):
    # the reference path, as a user's CPU run (tests/conftest.py turns the Triton interpreter on)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    threads = torch.get_num_threads()
    try:
        code = cli.main([
            "--models", "vit", "--device", "cpu", "--batch", "2,4",
            "--providers", "vitkern,torch,torchvision,vitkern-cuda",
            "--out", str(tmp_path), "--warmup-ms", "1", "--rep-ms", "5", "--quiet",
        ])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "kernel timings need a GPU" in out
    doc = json.loads((tmp_path / "results.json").read_text())
    validate_results(doc)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["complete"]
    assert doc["config"]["batch"] == [2, 4]
    assert doc["config"]["model_ops"] == ["vit"] and doc["config"]["ops"] == ["vit"]
    rows = doc["rows"]
    assert {r["shape"]["batch"] for r in rows} == {2, 4} and {r["mode"] for r in rows} == {"fwd", "train"}
    for r in rows:
        if r["provider"] == "vitkern-cuda":
            assert r["status"] == "skipped" and "CUDA" in r["note"]
        else:
            assert r["status"] == "ok" and r["err_ok"] is not False, r
        if r["provider"] == "vitkern":
            assert r["best_reference"] in ("torch", "torchvision") and r["speedup_vs_best"] > 0
    for name in ("speedup_headline.png", "speedup_vs_batch.png"):
        assert (tmp_path / name).stat().st_size > 1000
    summary = (tmp_path / "summary.md").read_text()
    assert "## Headline" in summary and "![speedup_vs_batch](speedup_vs_batch.png)" in summary
    assert "| vit | tiny img=32 B=2 train | fwd |" in summary


# ------------------------------------------------------------------------------------------------
# What "auto" chose: recorded on the vitkern rows, rendered in summary.md
# ------------------------------------------------------------------------------------------------


def test_auto_choices_are_recorded_for_the_auto_provider_only(monkeypatch, tmp_path):
    import vitkern
    from benchmarks.providers import auto_choices
    from benchmarks.render import render_auto_choices
    from vitkern import _tuning

    monkeypatch.setenv("VITKERN_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(_tuning, "TUNED_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(_tuning, "timer", lambda runs, device: {b: float(i + 1) for i, b in enumerate(runs)})
    _tuning.clear_memory_cache()
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    try:
        with auto_choices("vitkern") as choices:
            vitkern.linear(x, w)
        with auto_choices("vitkern-triton") as pinned:
            vitkern.linear(x, w)
    finally:
        _tuning.clear_memory_cache()
    assert pinned is None
    (choice,) = choices
    assert choice["op"] == "linear" and choice["source"] in ("measured", "only")
    if choice["source"] == "measured":
        assert choice["times_ms"][choice["backend"]] == min(choice["times_ms"].values())
    row = {k: None for k in ROW_FIELDS}
    row.update(op="linear", provider="vitkern", mode="fwd", shape={}, label="x", dtype="fp32", device="cpu",
               status="ok", speedup_vs={}, median_ms=1.0, p20_ms=1.0, p80_ms=1.0, n_reps=3, auto_choices=choices)
    validate_row(row)
    text = "\n".join(render_auto_choices([row]))
    assert "## What auto chose" in text and f"**{choice['backend']}**" in text and "| linear |" in text
