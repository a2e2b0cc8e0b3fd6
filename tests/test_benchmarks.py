"""The benchmark suite's own checks (CPU, fast): FLOP/byte formulas against hand counts, the
results schema, the timing helper, and ``python -m benchmarks`` end to end on one tiny op."""

import json
import socket

import pytest
import torch
from _bench_helpers import run_cli

from benchmarks import flops
from benchmarks.cases import ALL_PROVIDERS as PROVIDERS_ALL, PROVIDERS
from benchmarks.cli import main
from benchmarks.results import ROW_FIELDS, SCHEMA_VERSION, SchemaError, validate_results, validate_row
from benchmarks.runner import RunConfig, run
from benchmarks.setups import Case, Setup, discover, shape_label
from benchmarks.timing import Timing, measure

# ------------------------------------------------------------------------------------------------
# FLOPs and bytes
# ------------------------------------------------------------------------------------------------

# ViT-B/16 at 224 px, by hand (D = 768, 12 blocks, 12 heads, MLP 3072, N = 14 * 14 = 196 patches,
# T = 197 tokens with the class token):
#   patch embed   196 * (3*16*16 = 768) * 768                     =    115,605,504 MAC
#   per block     qkv   197 * 768 * 2304                          =    348,585,984
#                 proj  197 * 768 * 768                           =    116,195,328
#                 fc1   197 * 768 * 3072                          =    464,781,312
#                 fc2   197 * 3072 * 768                          =    464,781,312
#                 attn  Q K^T + P V = 2 * 197 * 197 * 768         =     59,610,624
#                 block total                                     =  1,453,954,560
#   12 blocks                                                     = 17,447,454,720
#   head          768 * 1000 (the class token only)               =        768,000
#   total                                                         = 17,563,828,224 MAC
# = 17.56 GMAC = 35.13 GFLOP per image (the commonly quoted ~17.6 GMAC).
VIT_B16_224_MACS = 17_563_828_224


def test_vit_b16_hand_count():
    macs = flops.vit_macs("vit_base_patch16_224", 224, batch=1)
    assert macs == VIT_B16_224_MACS
    assert abs(macs / 17.56e9 - 1) < 0.01
    assert flops.vit_flops("vit_base_patch16", 224) == 2 * VIT_B16_224_MACS
    assert flops.vit_flops("vit_base_patch16", 224, batch=64) == 64 * 2 * VIT_B16_224_MACS
    parts = flops.vit_mac_breakdown("vit_base_patch16", 224)
    assert parts["qkv"] + parts["proj"] + parts["fc1"] + parts["fc2"] == 12 * 1_394_343_936  # ~1.39 GMAC/block
    assert parts["attention"] == 12 * 59_610_624  # ~4% of a block
    # The same architecture as a mapping, and as a config object with extra attributes.
    cfg = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "unused": 1}
    assert flops.vit_macs(cfg, 224) == VIT_B16_224_MACS
    assert flops.vit_macs(flops.VIT_CONFIGS["vit_base_patch16"], (224, 224)) == VIT_B16_224_MACS


def test_vit_flops_other_configs():
    # ViT-L/16 at 224 is commonly quoted at ~61.6 GMAC; ViT-S/16 at ~4.6 GMAC.
    assert abs(flops.vit_macs("vit_large_patch16", 224) / 61.6e9 - 1) < 0.01
    assert abs(flops.vit_macs("vit_small_patch16", 224) / 4.6e9 - 1) < 0.01
    # Register tokens add to T; no head when num_classes == 0.
    base = flops.vit_config("vit_base_patch16")
    reg = flops.ViTConfig(16, 768, 12, 12, reg_tokens=4, num_classes=0)
    parts = flops.vit_mac_breakdown(reg, 224)
    assert parts["head"] == 0 and parts["qkv"] == 12 * 201 * 768 * 3 * 768
    with pytest.raises(ValueError, match="multiple of the patch size"):
        flops.vit_macs(base, 225)
    with pytest.raises(ValueError, match="unknown ViT config"):
        flops.vit_macs("vit_gigantic", 224)


def test_vit_flops_match_torch_flop_counter():
    """An independent count: torch's FlopCounterMode over timm's ViT-Ti/16 forward."""
    timm = pytest.importorskip("timm")
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # shapes are all the counter needs
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    for block in model.blocks:  # explicit matmuls: the counter does not count the CPU SDPA kernel
        block.attn.fused_attn = False
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert counter.get_total_flops() == flops.vit_flops("vit_tiny_patch16", 224)


def test_gemm_and_linear_counts():
    assert flops.gemm_flops(4, 5, 6) == 2 * 4 * 5 * 6
    m, k, n = 128 * 197, 768, 3072  # ViT-B fc1, bf16
    c = flops.linear_cost(m, k, n, torch.bfloat16, activation="gelu")
    assert c.flops["fwd"] == 2 * m * n * k
    assert c.flops["fwd+bwd"] == 3 * 2 * m * n * k
    # read x, W, b; write y: 2 bytes each.
    assert c.bytes["fwd"] == 2 * (m * k + n * k + n + m * n)
    # + residual read: proj with its residual add.
    c = flops.linear_cost(m, k, k, "bf16", residual=True)
    assert c.bytes["fwd"] == 2 * (m * k + k * k + k + m * k + m * k)
    # bwd: dy, x, W read; dx, dW, db written (no pre-activation without an activation).
    assert c.bytes["fwd+bwd"] - c.bytes["fwd"] == 2 * (m * k + m * k + k * k + m * k + k * k + k)


def test_mlp_and_patch_embed_counts():
    m, d, h = 128 * 197, 768, 3072
    c = flops.mlp_cost(m, d, h, d, "bf16")
    assert c.flops["fwd"] == 2 * m * h * d * 2
    assert c.bytes["fwd"] == 2 * (m * d + h * d + h + d * h + d + m * d)  # hidden stays on chip
    # ViT-B/16 stem at 224: 196 patches, K = 768: the hand count above.
    c = flops.patch_embed_cost(1, 3, 224, 224, 16, 768, "fp32", prefix_tokens=1)
    assert c.flops["fwd"] == 2 * 115_605_504
    assert c.flops["fwd+bwd"] == 2 * c.flops["fwd"]  # images need no gradient: weight grad only
    assert c.bytes["fwd"] == 4 * (3 * 224 * 224 + 768 * 768 + 768 + 197 * 768 + 768 + 197 * 768)


def test_attention_counts():
    b, h, t, d = 2, 12, 197, 64
    assert flops.attention_flops(b, h, t, t, d) == 4 * b * h * t * t * d
    assert flops.attention_flops(b, h, t, t, d, causal=True) == 2 * b * h * t * t * d
    c = flops.attention_cost(b, h, t, t, d, torch.bfloat16)
    assert c.flops["fwd+bwd"] == int(3.5 * 4 * b * h * t * t * d)  # backward = 2.5x forward
    assert c.bytes["fwd"] == 2 * 4 * b * h * t * d  # q, k, v read, o written; no T x T scores
    # GQA: fewer k/v heads read.
    c = flops.attention_cost(b, h, t, t, d, "bf16", h_kv=4)
    assert c.bytes["fwd"] == 2 * (2 * b * h * t * d + 2 * b * 4 * t * d)


def test_layer_norm_bytes():
    rows, width = 128 * 197, 768
    c = flops.layer_norm_cost(rows, width, torch.bfloat16)
    assert c.flops["fwd"] is None and c.flops["fwd+bwd"] is None  # memory bound: bytes only
    assert c.bytes["fwd"] == 2 * (2 * rows * width + 2 * width)
    # bwd: dy, x, w, mean/rstd (fp32) read; dx, dw, db written.
    assert c.bytes["fwd+bwd"] - c.bytes["fwd"] == 2 * (3 * rows * width + 3 * width) + 8 * rows
    c = flops.add_layer_norm_cost(rows, width, "fp32")
    assert c.bytes["fwd"] == 4 * (4 * rows * width + 2 * width)  # x, r read; y, s written


def test_dtype_size():
    assert flops.dtype_size(torch.bfloat16) == 2 and flops.dtype_size("fp32") == 4
    with pytest.raises(ValueError):
        flops.dtype_size("int3")


# ------------------------------------------------------------------------------------------------
# Timing, setups, schema
# ------------------------------------------------------------------------------------------------


def test_measure_cpu():
    calls = []
    t = measure(lambda: calls.append(1), "cpu", warmup=2, reps=7)
    assert isinstance(t, Timing) and t.n_reps == 7 and len(calls) == 1 + 2 + 7
    assert 0 <= t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms
    t = Timing.from_times([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (t.median_ms, t.min_ms, t.p20_ms, t.p80_ms) == (3.0, 1.0, 1.8, 4.2)


def test_setups_discovered_and_buildable():
    setups = discover()
    for name in ("layer_norm", "attention", "linear", "mlp", "patch_embed"):
        assert name in setups
    with pytest.raises(KeyError, match="unknown op"):
        discover(["no_such_op"])
    for setup in setups.values():
        assert setup.gpu_shapes and setup.cpu_shapes and setup.formula
        shape = setup.shapes("cpu", quick=True, batch=1)[0]
        assert shape.get("batch", 1) == 1 and shape_label(shape)
        case = setup.build(shape, torch.float32, torch.device("cpu"))
        assert all(t.requires_grad and t.is_leaf for t in case.grad_inputs)
        out = case.torch_fn(*case.args)
        assert out is not None
        assert case.cost.bytes["fwd+bwd"] > case.cost.bytes["fwd"] > 0
        if case.cost.flops["fwd"] is not None:
            assert case.cost.flops["fwd+bwd"] > case.cost.flops["fwd"] > 0


def _row(**overrides):
    row = {k: None for k in ROW_FIELDS}
    row.update(
        op="layer_norm", provider="vitkern", mode="fwd", shape={"batch": 2, "tokens": 197, "dim": 192},
        label="B=2 T=197 D=192", dtype="fp32", device="cpu", status="ok", median_ms=1.0, p20_ms=0.9,
        p80_ms=1.2, min_ms=0.8, n_reps=10, bytes=1000, gbps=0.001, speedup_vs={"torch": 1.1}, max_abs_err=0.0,
        err_ok=True,
    )
    row.update(overrides)
    return row


def test_row_schema():
    validate_row(_row())
    validate_row(_row(status="skipped", note="why", median_ms=None, p20_ms=None, p80_ms=None, n_reps=None))
    bad = [
        _row(mode="bwd"),
        _row(status="fine"),
        _row(median_ms=None),
        _row(status="error"),  # no note
        _row(p20_ms=2.0),  # p20 > median
        _row(pct_of_ceiling=50.0),  # on the CPU
        _row(speedup_vs={"vitkern": 1.0}),  # not a reference provider
        _row(dtype="float32"),
        _row(n_reps="10"),
        _row(err_ok=1.0),
        _row(shape={"batch": [2]}),
        {**_row(), "hostname": "x"},
    ]
    for row in bad:
        with pytest.raises(SchemaError):
            validate_row(row)
    missing = _row()
    del missing["peak_mem_bytes"]
    with pytest.raises(SchemaError, match="missing"):
        validate_row(missing)


class _Unavailable(RuntimeError):
    pass


_Unavailable.__name__ = "BackendUnavailableError"


def _toy_setup(vitkern_error=None, nan=False):
    def build(shape, dtype, device):
        x = torch.randn(shape["batch"], 8, dtype=dtype, device=device, requires_grad=True)

        def vitkern_fn(vk):
            def fn(x):
                if vitkern_error is not None:
                    raise vitkern_error
                if nan:
                    return (x * 2.0).index_fill(0, torch.tensor([0]), float("nan"))
                return x * 2.0 + 1e-3

            return fn

        return Case(
            args=(x,), torch_fn=lambda x: x * 2.0, vitkern_fn=vitkern_fn,
            cost=flops.Cost(flops={"fwd": 16, "fwd+bwd": 48}, bytes={"fwd": 64, "fwd+bwd": 160}), grad_inputs=(x,),
        )

    return Setup(name="toy", description="x * 2", build=build, gpu_shapes=(dict(batch=2),), cpu_shapes=(dict(batch=2),))


def _config(**kw):
    base = dict(ops=["toy"], providers=list(PROVIDERS), modes=["fwd", "fwd+bwd"], dtype="fp32", device="cpu",
                warmup_ms=1.0, rep_ms=2.0)
    base.update(kw)
    return RunConfig(**base)


def test_run_rows_and_results_schema():
    rows = run({"toy": _toy_setup()}, _config(), verbose=False)
    assert len(rows) == 2 * len(PROVIDERS)
    for row in rows:
        validate_row(row)
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert by[("torch.compile", "fwd")]["status"] == "skipped"  # CPU: no compile by default
    for mode in ("fwd", "fwd+bwd"):
        vk = by[("vitkern-reference", mode)]
        assert vk["status"] == "ok", vk["note"]
        assert vk["err_ok"] is True
        assert vk["max_abs_err"] == (pytest.approx(1e-3, rel=1e-2) if mode == "fwd" else 0.0)
        assert set(vk["speedup_vs"]) == {"torch"}
        assert vk["speedup_vs"]["torch"] == pytest.approx(by[("torch", mode)]["median_ms"] / vk["median_ms"])
        assert vk["pct_of_ceiling"] is None and vk["peak_mem_bytes"] is None
        assert vk["gbps"] == pytest.approx(vk["bytes"] / (vk["median_ms"] * 1e-3) / 1e9)
    doc = {
        "schema_version": SCHEMA_VERSION, "environment": {}, "config": {}, "ceilings": None,
        "rows": rows, "wall_s": 1.0, "complete": True,
    }
    with pytest.raises(SchemaError, match="environment lacks"):
        validate_results(doc)


def test_run_classifies_provider_failures():
    rows = run({"toy": _toy_setup(_Unavailable("no triton here"))}, _config(modes=["fwd"]), verbose=False)
    by = {r["provider"]: r for r in rows}
    assert by["vitkern"]["status"] == "skipped" and "no triton here" in by["vitkern"]["note"]
    assert by["torch"]["status"] == "ok"
    rows = run({"toy": _toy_setup(ValueError("boom"))}, _config(modes=["fwd"]), verbose=False)
    by = {r["provider"]: r for r in rows}
    assert by["vitkern"]["status"] == "error" and "boom" in by["vitkern"]["note"]
    rows = run({"toy": _toy_setup(nan=True)}, _config(modes=["fwd"]), verbose=False)
    by = {r["provider"]: r for r in rows}
    assert by["vitkern"]["err_ok"] is False and "non-finite" in by["vitkern"]["note"]
    json.dumps(rows, allow_nan=False)  # strict JSON: no NaN / Infinity
    rows = run({"toy": _toy_setup()}, _config(modes=["fwd"], budget_s=0.0), verbose=False)
    assert all(r["status"] == "skipped" and "time budget" in r["note"] for r in rows)


def test_a_setup_runs_only_its_providers():
    import dataclasses

    setup = dataclasses.replace(_toy_setup(), providers=("vitkern-reference", "torch"))
    for budget in (None, 0.0):   # run, and past the time budget
        rows = run({"toy": setup}, _config(modes=["fwd"], budget_s=budget), verbose=False)
        assert [r["provider"] for r in rows] == ["torch", "vitkern-reference"]   # torch first, as always


def test_attention_launch_variants_say_when_they_are_the_plan():
    from benchmarks.setups import attention_variants as av

    plan = dict(arch=90, tma=True, splits=4, mode="fused", masked=False, fused_tile=True, width=64)
    refs = {name: av._variant(name, plan) for name in av.FWD_VARIANTS + av.BWD_VARIANTS}
    assert all(r.fn is not None for r in refs.values())
    assert "plan's choice" in refs["vitkern-bwd-fused"].label and "4 ways" in refs["vitkern-no-split"].label
    plan.update(arch=80, tma=False, splits=1, mode="dq_kernel", masked=True, fused_tile=False, width=80)
    refs = {name: av._variant(name, plan) for name in av.FWD_VARIANTS + av.BWD_VARIANTS}
    assert [n for n, r in refs.items() if r.fn is not None] == ["vitkern-bwd-dq-kernel"]
    assert "pointers" in refs["vitkern-pointer-loads"].label and "masked tail" in refs["vitkern-bwd-atomic"].label
    assert set(av.FWD_VARIANTS + av.BWD_VARIANTS) <= set(PROVIDERS_ALL)


def test_cli_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm" in out and "attention" in out and "providers:" in out
    assert main(["--ops", "nope", "--list"]) == 2


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_cli_cpu_end_to_end(tmp_path):
    out_dir = tmp_path / "bench"
    proc = run_cli("--quick", "--ops", "layer_norm", "--device", "cpu", "--out", str(out_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel timings need a GPU" in proc.stdout
    text = (out_dir / "results.json").read_text()
    doc = json.loads(text)
    validate_results(doc)
    assert doc["complete"] and doc["ceilings"] is None
    env_block = doc["environment"]
    assert env_block["device_type"] == "cpu" and env_block["torch"] == torch.__version__
    assert env_block["vitkern"] and env_block["date"].endswith("Z")
    hostname = socket.gethostname()
    if len(hostname) >= 6:
        assert hostname not in text
    rows = doc["rows"]
    assert {r["op"] for r in rows} == {"layer_norm"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    ok = {(r["provider"], r["mode"]): r for r in rows if r["status"] == "ok"}
    for mode in ("fwd", "fwd+bwd"):
        assert ("torch", mode) in ok and ("vitkern", mode) in ok
        vk = ok[("vitkern", mode)]
        assert vk["err_ok"] is True and vk["max_abs_err"] < 1e-4
        assert vk["gbps"] > 0 and vk["tflops"] is None and vk["pct_of_ceiling"] is None
        assert "torch" in vk["speedup_vs"]
    summary = (out_dir / "summary.md").read_text()
    assert summary.startswith("# vitkern benchmarks") and "## layer_norm" in summary and "| vitkern |" in summary
