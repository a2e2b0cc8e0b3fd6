"""vitkern.patch_model / unpatch_model on timm, torchvision and Hugging Face ViTs, and the SDPA
routing (patch_sdpa, unpatch_sdpa, sdpa_override), on the CPU with random weights."""

import contextlib
import copy
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.patching import sdpa as sdpa_routing

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402


def _timm(**kw):
    base = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    return TimmViT(**{**base, **kw})


def _torchvision():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    return tv.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                                num_classes=10)


def _hf(kind):
    model = _hf_model(kind)
    # Some versions leave the prefix tokens and position embeddings at zero: zero rows into a
    # LayerNorm of eps 1e-12 have a gradient scaled by 1e6, which would compare rounding noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("cls_token", "distillation_token", "position_embeddings",
                                           "register_tokens", "mask_token"):
                p.normal_(std=0.02)
    return model


def _hf_model(kind):
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                 patch_size=16)
    if kind == "vit":
        return transformers.ViTModel(transformers.ViTConfig(**small), add_pooling_layer=False)
    if kind == "deit":
        return transformers.DeiTModel(transformers.DeiTConfig(**small), add_pooling_layer=False)
    if kind == "dinov2":
        cfg = {k: v for k, v in small.items() if k != "intermediate_size"}
        return transformers.Dinov2Model(transformers.Dinov2Config(**cfg, layerscale_value=0.5))
    if kind == "dinov2-registers":
        cfg = {k: v for k, v in small.items() if k != "intermediate_size"}
        return transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**cfg, layerscale_value=0.5, num_register_tokens=4))
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**small))
    if kind == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**small))
    raise AssertionError(kind)


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _run(model, x, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = _output(model(x))
    out.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@contextlib.contextmanager
def ops_called():
    """The vitkern ops (their public functions' backend selection) called inside the block."""
    from vitkern import _backend

    seen = []
    original = _backend.select_impl

    def spy(op, device, *args, **kwargs):
        seen.append(op)
        return original(op, device, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for module in list(sys.modules.values()):
            if getattr(module, "select_impl", None) is original:
                mp.setattr(module, "select_impl", spy)
        yield seen


# the ops each family's patched forward must run (a patch that silently ran the original would not)
EXPECTED_OPS = {
    "timm": {"patch_embed", "attention_qkvpacked", "linear", "mlp", "layer_norm"},
    "torchvision": {"patch_embed", "attention_qkvpacked", "linear", "mlp", "layer_norm"},
    "hf": {"attention", "linear", "layer_norm"},
}

FAMILIES = {
    "timm-vit": lambda: _timm(),
    "timm-deit3-layerscale": lambda: _timm(init_values=0.1, drop_path_rate=0.0),
    "timm-dinov2-registers": lambda: _timm(reg_tokens=4, no_embed_class=True, init_values=1.0),
    "timm-siglip-avg-qknorm": lambda: _timm(class_token=False, global_pool="avg", qk_norm=True, fc_norm=False),
    "timm-siglip-map": lambda: _timm(class_token=False, global_pool="map"),
    "timm-clip-quickgelu": lambda: _timm(pre_norm=True, act_layer="quick_gelu"),
    "torchvision-vit": _torchvision,
    "hf-vit": lambda: _hf("vit"),
    "hf-deit": lambda: _hf("deit"),
    "hf-dinov2": lambda: _hf("dinov2"),
    "hf-dinov2-registers": lambda: _hf("dinov2-registers"),
    "hf-clip": lambda: _hf("clip"),
    "hf-siglip": lambda: _hf("siglip"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_matches_and_unpatch_restores(family):
    model = FAMILIES[family]().eval()
    x = torch.randn(2, 3, 32, 32)
    want, want_grads = _run(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    with vitkern.use_backend("reference"):
        report = vitkern.patch_model(model)
        assert len(report) > 0 and str(report)
        with ops_called() as ops:
            got, got_grads = _run(model, x)
    expected = set(EXPECTED_OPS[family.split("-")[0]])
    if family == "timm-siglip-avg-qknorm":
        # q / k norm: the attention op with its prologue, on the packed qkv's views
        expected = expected - {"attention_qkvpacked"} | {"attention_prologue"}
    if family in ("hf-vit", "hf-deit", "hf-dinov2", "hf-dinov2-registers", "hf-siglip"):
        expected.add("mlp")
    assert expected <= set(ops), (expected - set(ops), report)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    # no parameter copied or moved, the checkpoint unchanged
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert vitkern.unpatch_model(model) == len({e.name for e in report.patched})
    again, _ = _run(model, x)
    assert torch.equal(again, want)
    assert "_vitkern_patch" not in vars(model) and all("_vitkern_patch" not in vars(m) for m in model.modules())


def _close_to_scale(got, want, tol, msg="", floor=1e-6):
    scale = want.float().abs().max().clamp_min(floor)
    err = (got.float() - want.float()).abs().max()
    assert err <= tol * scale, f"{msg}: max abs err {float(err):.3g} > {tol} x {float(scale):.3g}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_family_under_bf16_autocast(family):
    model = FAMILIES[family]().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _run(model, x)
    with vitkern.use_backend("reference"):
        vitkern.patch_model(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, got_grads = _run(model, x)
    _close_to_scale(got, want, 5e-2, "output")
    # bf16 rounding of the unfused path against fp32 epilogues: the bf16 rule, with a floor of 1/50
    # of the largest gradient for those that are zero in exact arithmetic (a key projection's bias)
    floor = max(float(g.abs().max()) for g in want_grads.values()) / 50
    for name in want_grads:
        _close_to_scale(got_grads[name], want_grads[name], 1e-1, name, floor=floor)


def test_what_each_family_patches():
    kinds = lambda model: {e.kind for e in vitkern.patch_model(model).patched}  # noqa: E731
    assert {"timm Attention", "timm Mlp", "timm Block", "timm PatchEmbed", "timm LayerNorm"} <= kinds(
        _timm(init_values=0.1))
    assert {"torchvision EncoderBlock", "torchvision VisionTransformer", "torch LayerNorm"} <= kinds(_torchvision())
    hf = _hf("vit")
    if hasattr(hf.layers[0].attention, "q_proj") if hasattr(hf, "layers") else False:
        assert {"transformers ViTAttention", "transformers ViTMLP"} <= kinds(hf)


def test_unsupported_modules_are_reported_and_keep_working():
    model = _timm(act_layer=torch.nn.SiLU).eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    with vitkern.use_backend("reference"):
        report = vitkern.patch_model(model)
        got = model(x)
    skipped = {e.kind: e.detail for e in report.skipped}
    assert "SiLU" in skipped["timm Mlp"]
    assert "not patched" in skipped["timm Block"]  # its MLP is not, so the residual adds stay
    assert any(e.kind == "timm Attention" for e in report.patched)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_quick_gelu_mlps_are_patched():
    # OpenAI CLIP's QuickGELU rides in the fc1 epilogue: timm's Mlp and Hugging Face's CLIPMLP
    from timm.layers import QuickGELU

    x = torch.randn(2, 3, 32, 32)
    for model, kind in ((_timm(act_layer=QuickGELU).eval(), "timm Mlp"), (_hf("clip").eval(), "transformers CLIPMLP")):
        want = _output(model(x))
        with vitkern.use_backend("reference"), ops_called() as seen:
            report = vitkern.patch_model(model)
            got = _output(model(x))
        patched = {e.kind: e.detail for e in report.patched}
        assert "quick_gelu" in patched[kind] and "mlp" in seen
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_siglip_map_head_and_its_blocks_are_patched():
    model = _timm(class_token=False, global_pool="map").eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    with vitkern.use_backend("reference"):
        report = vitkern.patch_model(model)
        got = model(x)
    patched = {e.kind: e.detail for e in report.patched}
    assert "MAP head" in patched["timm AttentionPoolLatent"]
    assert sum(e.kind == "timm Block" for e in report.patched) == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # its backward, and a head vitkern does not fuse stays timm's and is reported
    with vitkern.use_backend("reference"), ops_called() as seen:
        model(x).square().mean().backward()
    assert "attention" in seen and model.attn_pool.latent.grad is not None
    qk = _timm(class_token=False, global_pool="map").eval()
    qk.attn_pool.q_norm = torch.nn.LayerNorm(qk.attn_pool.head_dim)
    skipped = {e.kind: e.detail for e in vitkern.patch_model(qk).skipped}
    assert "qk-norm" in skipped["timm AttentionPoolLatent"]


def test_flags_select_what_is_patched():
    report = vitkern.patch_model(_timm(), attention=False, residual_fusion=True, layer_norm=False)
    kinds = {e.kind for e in report.patched}
    assert "timm Attention" not in kinds and "timm LayerNorm" not in kinds and "timm Mlp" in kinds
    assert "timm Block" not in kinds  # the residual needs both attention and MLP patched


def test_patching_twice_patches_only_what_is_new():
    model = _timm()
    first = vitkern.patch_model(model, mlp=False)
    second = vitkern.patch_model(model)
    assert not ({e.name for e in first.patched} & {e.name for e in second.patched})
    assert {e.kind for e in second.patched} >= {"timm Mlp", "timm Block"}


def test_training_with_drop_path_matches_timm():
    model = _timm(init_values=0.1, drop_path_rate=0.5, proj_drop_rate=0.0).train()
    x = torch.randn(4, 3, 32, 32)
    want, want_grads = _run(model, x, seed=3)
    with vitkern.use_backend("reference"):
        vitkern.patch_model(model)
        got, got_grads = _run(model, x, seed=3)  # the same samples dropped from the same stream
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_and_to_after_patching():
    model = _timm(init_values=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x).float()
    with vitkern.use_backend("reference"):
        vitkern.patch_model(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).float()
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
        model.to(torch.bfloat16)  # parameters converted in place: the patched forwards see them
        out = model(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_triton_backend_through_the_interpreter():
    model = _timm(init_values=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    with vitkern.use_backend("triton"):
        vitkern.patch_model(model)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_checkpoint_of_a_patched_model_loads_into_an_unpatched_one(tmp_path):
    model = _timm(init_values=0.1).eval()
    vitkern.patch_model(model)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = _timm(init_values=0.1).eval()
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    x = torch.randn(2, 3, 32, 32)
    with vitkern.use_backend("reference"):
        torch.testing.assert_close(model(x), fresh(x), rtol=1e-4, atol=1e-5)


def test_deepcopy_of_a_patched_model_is_patched_on_its_own_parameters():
    model = _timm().eval()
    vitkern.patch_model(model)
    clone = copy.deepcopy(model)
    block = clone.blocks[0]
    assert block.forward.__self__ is block
    with torch.no_grad():
        clone.head.weight.zero_()
        clone.head.bias.fill_(1.0)
    with vitkern.use_backend("reference"):
        assert torch.equal(clone(torch.randn(1, 3, 32, 32)), torch.ones(1, 10))


@pytest.mark.parametrize("family", ["timm-dinov2-registers", "torchvision-vit", "hf-vit"])
def test_torch_compile_of_the_patched_model(family):
    model = FAMILIES[family]().eval()
    x = torch.randn(2, 3, 32, 32)
    with vitkern.use_backend("reference"):
        vitkern.patch_model(model)
        want = _output(model(x))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(_output(compiled(x)), want, rtol=1e-5, atol=1e-5)


def test_patch_model_argument_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        vitkern.patch_model(object())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        vitkern.unpatch_model("model")


# ------------------------------------------------------------------------------------------------
# SDPA routing
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def sdpa_counter(monkeypatch):
    calls = []
    real = sdpa_routing._vitkern_sdpa

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_routing, "_vitkern_sdpa", counting)
    yield calls
    vitkern.unpatch_sdpa()


def test_sdpa_override_routes_a_hf_bert_in_its_block_only(sdpa_counter):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                  vocab_size=100, attn_implementation="sdpa")
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    want = bert(input_ids=ids).last_hidden_state
    with vitkern.use_backend("reference"), vitkern.sdpa_override():
        got = bert(input_ids=ids).last_hidden_state
    assert len(sdpa_counter) == 2  # one call a layer
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    bert(input_ids=ids)
    assert len(sdpa_counter) == 2  # after the block: torch's path again


def test_sdpa_override_nests_and_leaves_other_threads_alone(sdpa_counter):
    q = torch.randn(1, 2, 8, 16)
    seen = []

    def other_thread():
        F.scaled_dot_product_attention(q, q, q)
        seen.append(len(sdpa_counter))

    with vitkern.sdpa_override():
        with vitkern.sdpa_override():
            F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, q, q)
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    F.scaled_dot_product_attention(q, q, q)
    assert len(sdpa_counter) == 2 and seen == [2]


def test_patch_sdpa_routes_every_thread_and_unpatch_restores(sdpa_counter):
    original = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 8, 16)
    vitkern.patch_sdpa()
    assert vitkern.patching.sdpa_patched()
    worker = threading.Thread(target=lambda: F.scaled_dot_product_attention(q, q, q))
    worker.start()
    worker.join()
    # what vitkern does not take (dropout) goes to torch's builtin: no recursion through the wrapper
    out = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert out.shape == q.shape and len(sdpa_counter) == 2
    vitkern.unpatch_sdpa()
    assert F.scaled_dot_product_attention is (original if original is not sdpa_routing._routed_sdpa
                                              else sdpa_routing._replaced)
    assert not vitkern.patching.sdpa_patched()
    F.scaled_dot_product_attention(q, q, q)
    assert len(sdpa_counter) == 2


def test_sdpa_override_under_torch_compile(sdpa_counter):
    q = torch.randn(1, 2, 8, 16)
    with vitkern.use_backend("reference"), vitkern.sdpa_override():
        torch._dynamo.reset()
        out = torch.compile(lambda t: F.scaled_dot_product_attention(t, t, t), backend="aot_eager")(q)
    torch.testing.assert_close(out, torch._C._nn.scaled_dot_product_attention(q, q, q), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Wrapping after patching: DDP and FSDP2 (one process on gloo), the inductor compile
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_ddp_and_fsdp2_wrap_a_patched_model(one_process_group, wrapper):
    model = _timm(init_values=0.1).train()
    x = torch.randn(2, 3, 32, 32)
    want, want_grads = _run(model, x)
    model.zero_grad(set_to_none=True)
    with vitkern.use_backend("reference"):
        vitkern.patch_model(model)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (1,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        with ops_called() as ops:
            got = _output(wrapped(x))
        got.float().square().mean().backward()
    assert {"attention_qkvpacked", "mlp"} <= set(ops)
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, want_grads[name.replace("module.", "")], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_inductor_compile_of_every_patched_family(family):
    model = FAMILIES[family]().eval()
    x = torch.randn(2, 3, 32, 32)
    with vitkern.use_backend("reference"):
        vitkern.patch_model(model)
        want = _output(model(x))
        torch._dynamo.reset()
        got = _output(torch.compile(model)(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_swiglu_mlps_are_patched():
    """timm's SwiGLUPacked (GluMlp, SiLU gate first) in a ViT (DINOv2 giant's layout) and timm's
    SwiGLU (fc1_g / fc1_x, with and without its sub-LN norm) take the fused SwiGLU forwards; the
    ViT's blocks then carry the residual in fc2's epilogue. A sigmoid GLU (gate last) is left alone."""
    from timm.layers import GluMlp, SwiGLU, SwiGLUPacked

    x = torch.randn(2, 3, 32, 32)
    model = _timm(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.5, init_values=0.1).eval()
    want = model(x)
    with vitkern.use_backend("triton"), ops_called() as seen:
        report = vitkern.patch_model(model)
        got = model(x)
    patched = {e.kind for e in report.patched}
    assert {"timm GluMlp", "timm Block"} <= patched and "swiglu_mlp" in seen
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    vitkern.unpatch_model(model)
    torch.testing.assert_close(model(x), want)

    tokens = torch.randn(2, 9, 40)
    for norm in (None, torch.nn.LayerNorm):
        m = SwiGLU(40, 56, norm_layer=norm).eval()
        want = m(tokens)
        with vitkern.use_backend("triton"), ops_called() as seen:
            report = vitkern.patch_model(m)
            got = m(tokens)
        assert "timm SwiGLU" in [e.kind for e in report.patched]
        assert ("swiglu_mlp" if norm is None else "swiglu") in seen
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    glu = GluMlp(40, 64)  # timm's default: a sigmoid gate in the second half
    report = vitkern.patch_model(glu)
    assert {e.kind: e.detail for e in report.skipped}["timm GluMlp"].startswith("a Sigmoid gate")
