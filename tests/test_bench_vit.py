"""The whole-model benchmark (benchmarks/setups/vit.py) on the CPU: its shapes, its cost model, the
agreement of its providers (timm, torchvision, vitkern.ViT) in both modes, and
``python -m benchmarks --quick --ops vit`` end to end."""

import json

import pytest
import torch
from _bench_helpers import run_cli

import vitkern
from benchmarks import flops
from benchmarks.providers import prepare, reference_result
from benchmarks.results import validate_results, validate_row
from benchmarks.runner import RunConfig, run
from benchmarks.setups import discover
from benchmarks.setups import vit as vit_setup

pytest.importorskip("timm")

CPU = torch.device("cpu")
TINY = flops.vit_config(dict(vit_setup.MODELS["tiny"].kwargs, num_classes=10))


def _same(forward):  # train_step's wrap for the eager providers
    return forward


@pytest.fixture(scope="module")
def setup():
    return discover(["vit"])["vit"]


def _case(setup, dtype=torch.float32, **shape):
    torch.manual_seed(0)
    s = dict(setup.shapes("cpu")[0], **shape)
    return s, setup.build(s, dtype, CPU)


# ------------------------------------------------------------------------------------------------
# Shapes and cost
# ------------------------------------------------------------------------------------------------


def test_shapes_cover_the_issue_sweep(setup):
    gpu = setup.shapes("cuda")
    assert {(s["name"], s["batch"]) for s in gpu} == {
        (m, b) for m in ("ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-H/14") for b in (1, 8, 64, 256)
    }
    assert all(s["img_size"] == 224 for s in gpu)
    trained = {(s["name"], s["batch"]) for s in gpu if s.get("train")}
    assert trained == {("ViT-S/16", 256), ("ViT-B/16", 256), ("ViT-L/16", 64), ("ViT-H/14", 64)}
    assert setup.shapes("cuda", quick=True) == [dict(name="ViT-B/16", img_size=224, batch=256, train=True)]
    for s in gpu:
        assert setup.shape_modes(s) == (["fwd", "train"] if s.get("train") else ["fwd"])
    # --batch replaces every batch; shapes that then coincide run once
    overridden = setup.shapes("cuda", batch=32)
    assert len(overridden) == 8 and all(s["batch"] == 32 for s in overridden)
    cpu = setup.shapes("cpu")
    assert cpu == [dict(name="tiny", img_size=32, batch=4, train=True)]


def test_torchvision_configs():
    for name, spec in vit_setup.MODELS.items():
        model, note = vit_setup._torchvision_model(name, spec, 224, "meta")
        if name == "ViT-S/16":
            assert model is None and "torchvision has no ViT-S/16" in note
        else:
            assert model is not None and note.startswith("torchvision")
            k = spec.kwargs
            assert (model.patch_size, model.hidden_dim, len(model.encoder.layers)) == (
                k["patch_size"], k["embed_dim"], k["depth"]
            )


def test_vit_cost_counts():
    for name in ("vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"):
        with torch.device("meta"):
            m = vitkern.create_model(name, num_classes=1000)
        assert flops.vit_params(name) == sum(p.numel() for p in m.parameters()), name
    c = flops.vit_cost("vit_base_patch16", 224, batch=2, dtype="bf16", param_dtype="fp32")
    parts = flops.vit_mac_breakdown("vit_base_patch16", 224, batch=2)
    gemm = sum(parts.values()) - parts["patch_embed"] - parts["attention"]
    assert c.flops["fwd"] == flops.vit_flops("vit_base_patch16", 224, batch=2)
    # backward: 2x each GEMM, the patch embedding's weight gradient only (1x), 2.5x attention
    assert c.flops["train"] == c.flops["fwd+bwd"] == (
        2 * (3 * gemm + 2 * parts["patch_embed"]) + int(2 * 3.5 * parts["attention"])
    )
    p = flops.vit_params("vit_base_patch16")
    assert c.bytes["fwd"] == 4 * p + 4 * 2 * 3 * 224 * 224 + 2 * 2 * 1000
    assert c.bytes["train"] - c.bytes["fwd+bwd"] == 7 * 4 * p  # AdamW: w, g, m, v read; w, m, v written


# ------------------------------------------------------------------------------------------------
# The providers agree
# ------------------------------------------------------------------------------------------------


def test_build_and_forward_agree(setup):
    shape, case = _case(setup)
    assert case.items == shape["batch"] and case.grad_inputs == ()
    assert case.cost.flops["fwd"] == flops.vit_flops(TINY, 32, batch=4)
    tv = case.references["torchvision"]
    assert tv.fn is not None and "torchvision" in tv.label and "SDPA" in case.torch_label
    with torch.no_grad():
        want = case.torch_fn(*case.args)
        assert want.shape == (4, 10)
        torch.testing.assert_close(tv.fn(*case.args), want, atol=1e-5, rtol=1e-5)
        with vitkern.use_backend("reference"):  # (the Triton path of the model: tests/models)
            torch.testing.assert_close(case.vitkern_fn(vitkern)(*case.args), want, atol=1e-5, rtol=1e-5)


def test_train_steps_agree_and_keep_the_weights(setup):
    _, case = _case(setup)
    ref, _ = reference_result(case, "train")
    loss, grad = ref
    assert loss.ndim == 0 and 1.0 < loss.item() < 5.0  # ~log(10) for random logits
    assert grad.shape == (64, 3, 8, 8) and grad.abs().max().item() == pytest.approx(1.0)
    with vitkern.use_backend("reference"):
        vk = case.train_step("vitkern", _same)
        got = vk(*case.args)
        again = vk(*case.args)  # lr 0: the same weights, the same step
    tv = case.train_step("torchvision", _same)(*case.args)
    for result in (got, again, tv):
        torch.testing.assert_close(result[0], loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result[1], grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again[0], got[0], atol=0, rtol=0)


def test_train_step_leaves_the_weights_and_fwd_returns_to_eval(setup):
    _, case = _case(setup)
    with vitkern.use_backend("reference"):
        model_fn = case.vitkern_fn(vitkern)
        with torch.no_grad():
            first = model_fn(*case.args)
        vk_model = model_fn.model
        weights = {k: v.clone() for k, v in vk_model.state_dict().items()}
        step = case.train_step("vitkern", _same)
        assert vk_model.training
        step(*case.args)
        assert all(p.grad is None for p in vk_model.parameters())  # zero_grad(set_to_none=True)
        for k, v in vk_model.state_dict().items():
            assert torch.equal(v, weights[k]), k
        with torch.no_grad():
            torch.testing.assert_close(model_fn(*case.args), first, atol=0, rtol=0)
        assert not vk_model.training  # the fwd callables switch back to eval mode


def test_bf16_autocast_agrees_loosely(setup):
    _, case = _case(setup, dtype=torch.bfloat16)
    with torch.no_grad():
        want = case.torch_fn(*case.args)
        assert want.dtype == torch.bfloat16  # fp32 weights under autocast
        with vitkern.use_backend("reference"):
            got = case.vitkern_fn(vitkern)(*case.args)
        tv = case.references["torchvision"].fn(*case.args)
    scale = max(1.0, want.float().abs().max().item())
    assert (got.float() - want.float()).abs().max() <= 4e-2 * scale
    assert (tv.float() - want.float()).abs().max() <= 4e-2 * scale


# ------------------------------------------------------------------------------------------------
# Through the runner
# ------------------------------------------------------------------------------------------------


def test_runner_rows(setup):
    # vitkern's "auto" would run the Triton interpreter here (TRITON_INTERPRET=1): the CLI test runs it without
    providers = ["vitkern-reference", "torch", "torch.compile", "torchvision"]
    config = RunConfig(ops=["vit"], providers=providers, modes=["fwd", "fwd+bwd", "train"], dtype="fp32",
                       device="cpu", warmup_ms=1.0, rep_ms=2.0)
    rows = run({"vit": setup}, config, verbose=False)
    for row in rows:
        validate_row(row)
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert {r["mode"] for r in rows} == {"fwd", "train"}  # the setup has no fwd+bwd mode
    assert {r["provider"] for r in rows} == set(providers)
    for mode in ("fwd", "train"):
        for provider in ("vitkern-reference", "torchvision"):
            r = by[(provider, mode)]
            assert r["status"] == "ok" and r["err_ok"] is True, r
            assert r["items_per_s"] == pytest.approx(4 / (r["median_ms"] * 1e-3))
            assert r["tflops"] > 0 and r["flops"] == flops.vit_cost(TINY, 32, batch=4, dtype="fp32").flops[mode]
        assert by[("torch", mode)]["speedup_vs"] == pytest.approx(
            {"torchvision": by[("torchvision", mode)]["median_ms"] / by[("torch", mode)]["median_ms"]}
        )
        assert set(by[("vitkern-reference", mode)]["speedup_vs"]) == {"torch", "torchvision"}
        assert by[("torch.compile", mode)]["status"] == "skipped"
    assert by[("torch", "train")]["flops"] > 2 * by[("torch", "fwd")]["flops"]


def test_op_setups_get_no_torchvision_rows():
    config = RunConfig(ops=["layer_norm"], providers=["torch", "torchvision"], modes=["fwd", "train"], dtype="fp32",
                       device="cpu", warmup_ms=1.0, rep_ms=2.0)
    rows = run(discover(["layer_norm"]), config, verbose=False)
    assert rows and all(r["provider"] != "torchvision" and r["mode"] == "fwd" for r in rows)


def test_cli_quick_vit_end_to_end(tmp_path):
    out_dir = tmp_path / "bench"
    proc = run_cli(
        "--quick", "--ops", "vit", "--device", "cpu", "--out", str(out_dir), "--warmup-ms", "2", "--rep-ms", "10"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out_dir / "results.json").read_text())
    validate_results(doc)
    assert doc["complete"] and doc["config"]["modes"] == ["fwd", "fwd+bwd", "train"]
    rows = doc["rows"]
    assert {r["op"] for r in rows} == {"vit"} and {r["mode"] for r in rows} == {"fwd", "train"}
    ok = {(r["provider"], r["mode"]) for r in rows if r["status"] == "ok"}
    for mode in ("fwd", "train"):
        assert {("torch", mode), ("vitkern", mode), ("torchvision", mode)} <= ok
    assert all(r["err_ok"] is not False for r in rows)
    summary = (out_dir / "summary.md").read_text()
    assert "## vit" in summary and "img/s" in summary and "vs torchvision" in summary and "| train |" in summary


@pytest.mark.slow
def test_torch_compile_provider_train_on_cpu(setup):
    """The torch.compile provider's training step (a compile of the forward only: ~20 s on a CPU)."""
    _, case = _case(setup)
    ref, _ = reference_result(case, "train")
    prepared = prepare(case, "torch.compile", "train", CPU, compile_on_cpu=True)
    with prepared.context():
        got = prepared.call()
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-3)
