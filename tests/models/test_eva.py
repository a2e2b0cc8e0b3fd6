"""vitkern's Eva against timm's Eva with the same random weights: EVA-02 (RoPE with a reference
grid, separate q / k / v, SwiGLU with its norm), the RoPE-Mixed ViT (learnable per-block
frequencies, register token, avg pool), a DINOv3-style model (half-layout RoPE, registers,
LayerScale, dynamic image size), a fused-qkv model with QK-norm and the packed SwiGLU; eval and
train mode, logits and every parameter gradient, fp32."""

from __future__ import annotations

import pytest
import torch

from vitkern.models.eva import Eva

timm = pytest.importorskip("timm")

SMALL = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=7)

CASE_EVA02 = dict(img_size=56, embed_dim=64, depth=2, num_heads=2, num_classes=7, ref_feat_shape=(16, 16))
CASES = {
    "eva02": ("eva02_tiny_patch14_224", CASE_EVA02),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(SMALL, num_reg_tokens=1, global_pool="avg")),
    "rope_axial_ape": ("vit_small_patch16_rope_ape_224", SMALL),
    "dinov3": ("vit_small_patch16_dinov3", SMALL),
    "qknorm_packed_swiglu": ("vit_small_patch16_rope_224", dict(SMALL, qk_norm=True, swiglu_mlp=True,
                                                               qkv_fused=True, init_values=0.1)),
    "gqa_rms": ("vit_small_patch16_rope_224", dict(SMALL, embed_dim=128, num_heads=4, num_kv_heads=2,
                                                   qkv_fused=False, attn_type="rope", qk_norm=True,
                                                   scale_attn_inner=True)),
    "eva_attention_qkv_bias": ("eva02_tiny_patch14_224", dict(CASE_EVA02, qkv_fused=True, qk_norm=True)),
}


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norm weights around 1, everything else around 0 (zero-initialised biases included)
            shift = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + shift)
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_eva_matches_timm(case, train):
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(name, pretrained=False, **kwargs)).train(train)
    ours = Eva.from_timm(ref)
    assert ours.training == train
    x = torch.randn(2, 3, *ref.patch_embed.img_size)
    expected = ref(x)
    got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    if train:
        g = torch.randn_like(expected)
        ref_grads = torch.autograd.grad(expected, list(ref.parameters()), g, allow_unused=True)
        our_params = dict(ours.named_parameters())
        our_grads = torch.autograd.grad(got, [our_params[n] for n, _ in ref.named_parameters()], g, allow_unused=True)
        for (n, _), a, b in zip(ref.named_parameters(), our_grads, ref_grads):
            if b is None:
                assert a is None or a.abs().max() == 0, n
                continue
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m: f"{n}: {m}")


def test_dynamic_image_size_matches_timm():
    ref = _randomize(timm.create_model("vit_small_patch16_dinov3", pretrained=False, **SMALL)).eval()
    ours = Eva.from_timm(ref)
    x = torch.randn(1, 3, 48, 80)  # a 3 x 5 grid, not the model's 4 x 4
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_state_dict_keys_are_timms():
    ref = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **CASES["eva02"][1])
    ours = Eva.from_timm(ref)
    assert set(ours.state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_post_norm=True), "EvaBlockPostNorm"),
    (dict(patch_drop_rate=0.1), "patch dropout"),
])
def test_refusals_name_what_is_not_supported(kwargs, match):
    try:
        ref = timm.create_model("vit_small_patch16_rope_224", pretrained=False, **SMALL, **kwargs)
    except TypeError as e:  # an option this timm does not have
        pytest.skip(str(e))
    with pytest.raises(ValueError, match=match):
        Eva.from_timm(ref)
    with pytest.raises(ValueError, match="expected a timm.models.eva.Eva"):
        Eva.from_timm(torch.nn.Linear(2, 2))


def test_gated_attention_is_refused():
    ref = timm.create_model("vit_small_patch16_rope_224", pretrained=False, **SMALL)
    ref.blocks[0].attn.gate = torch.nn.Linear(64, 64)  # what EvaBlock(gated_attn=True) builds
    with pytest.raises(ValueError, match="gated attention"):
        Eva.from_timm(ref)


def test_bf16_autocast_close_to_timm():
    ref = _randomize(timm.create_model("eva02_tiny_patch14_224", pretrained=False, **CASE_EVA02)).eval()
    ours = Eva.from_timm(ref)
    x = torch.randn(2, 3, 56, 56)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x)
    expected = ref(x)
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err < 5e-2, err


def test_rope_augmentation_warns():
    ref = timm.create_model("vit_small_patch16_rope_224", pretrained=False, **SMALL, rope_jitter_coords=2.0)
    with pytest.warns(UserWarning, match="augments RoPE coordinates"):
        Eva.from_timm(ref)


@pytest.mark.parametrize("gated, registers, key_bias", [(False, 0, False), (True, 4, False), (True, 1, True)])
def test_from_hf_dinov3_matches_transformers(gated, registers, key_bias):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DINOv3ViTModel"):
        pytest.skip("this transformers has no DINOv3ViTModel")
    cfg = transformers.DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=96, image_size=64, patch_size=16,
                                       num_register_tokens=registers, use_gated_mlp=gated,
                                       hidden_act="silu" if gated else "gelu", key_bias=key_bias,
                                       pos_embed_rescale=None)
    torch.manual_seed(0)
    ref = _randomize(transformers.DINOv3ViTModel(cfg)).eval()
    ours = Eva.from_hf(ref)
    for hw in ((64, 64), (48, 80)):
        x = torch.randn(2, 3, *hw)
        out = ref(pixel_values=x)
        torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(x), out.pooler_output, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected a transformers DINOv3ViTModel"):
        Eva.from_hf(torch.nn.Linear(2, 2))


def test_compiles_fullgraph():
    ref = _randomize(timm.create_model("eva02_tiny_patch14_224", pretrained=False, **CASE_EVA02)).eval()
    ours = Eva.from_timm(ref)
    x = torch.randn(1, 3, 56, 56)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ours(x))


EVA_NAMES = [n for n in __import__("vitkern").list_models()
             if n.startswith("eva02_") or "_rope_" in n or n.endswith(("_dinov3", "_dinov3_qkvb"))]


@pytest.mark.parametrize("name", EVA_NAMES)
def test_registered_names_build_timms_architecture(name):
    """create_model(name) has timm's parameters (names and shapes), config and preprocessing."""
    import vitkern
    from vitkern.models.eva import _config_from_timm

    ours = vitkern.create_model(name, device="meta")
    ref = timm.create_model(name, pretrained=False, device="meta")
    assert isinstance(ours, Eva)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: v for k, v in vitkern.models.model_config(name).items()}
    theirs = _config_from_timm(ref)
    for k in ("img_size", "patch_size", "global_pool", "num_classes", "rope_type", "rope_temperature",
              "rope_grid_indexing", "rope_rotate_half", "ref_feat_shape", "num_reg_tokens", "dynamic_img_size"):
        if k in theirs:
            want = theirs[k] if k != "img_size" else theirs[k][0]
            got = mine.get(k, __import__("inspect").signature(Eva.__init__).parameters[k].default)
            assert got == want, (k, got, want)
    assert ours.blocks[0].norm1.eps == ref.blocks[0].norm1.eps
    assert mine.get("init_values") == ref.blocks[0].init_values  # LayerScale's initial value
    assert timm.data.resolve_model_data_config(ours) == timm.data.resolve_model_data_config(ref)


def test_checkpoint_with_another_head_loads_and_fine_tunes(tmp_path):
    import vitkern

    src = _randomize(timm.create_model("vit_small_patch16_rope_224", pretrained=False, **SMALL))
    path = tmp_path / "rope.pth"
    torch.save(src.state_dict(), path)
    kw = {k: v for k, v in SMALL.items() if k != "num_classes"}
    with pytest.warns(UserWarning, match="another class count"):
        ours = vitkern.create_model("vit_small_patch16_rope_224", checkpoint_path=str(path), num_classes=3, **kw)
    torch.testing.assert_close(ours.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    x = torch.randn(2, 3, 64, 64)
    loss = torch.nn.functional.cross_entropy(ours(x), torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    assert ours(x).shape == (2, 3)
    bad = tmp_path / "bad.pth"
    state = src.state_dict()
    state["blocks.0.norm1.weight"] = torch.zeros(5)
    torch.save(state, bad)
    with pytest.raises(ValueError, match="blocks.0.norm1.weight"):
        vitkern.create_model("vit_small_patch16_rope_224", checkpoint_path=str(bad), **kw)


@pytest.mark.parametrize("case", ["eva02", "rope_mixed", "dinov3", "gqa_rms"])
def test_patch_model_runs_timm_eva_attention_through_the_prologue(case):
    import copy

    import vitkern

    name, kwargs = CASES[case]
    ref = _randomize(timm.create_model(name, pretrained=False, **kwargs)).eval()
    patched = copy.deepcopy(ref)
    report = vitkern.patch_model(patched)
    attn = f"timm {type(ref.blocks[0].attn).__name__}"
    assert sum(e.kind == attn for e in report.patched) == len(ref.blocks), str(report)
    x = torch.randn(2, 3, *ref.patch_embed.img_size, requires_grad=True)
    torch.testing.assert_close(patched(x), ref(x), rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(patched(x).square().sum(), x)[0]
    torch.testing.assert_close(g, torch.autograd.grad(ref(x).square().sum(), x)[0], rtol=1e-3, atol=1e-4)
    vitkern.unpatch_model(patched)
    torch.testing.assert_close(patched(x), ref(x), rtol=0, atol=0)


def test_deferred_residuals_and_the_plain_blocks_agree():
    """Eva.forward_features runs its blocks with the residual adds deferred into the next norm
    (the timm comparisons above run that path); a forward hook on a block takes the plain blocks,
    with the same output."""
    from vitkern.nn.block import can_defer_residuals

    name, kwargs = CASES["qknorm_packed_swiglu"]
    torch.manual_seed(0)
    ours = Eva.from_timm(_randomize(timm.create_model(name, pretrained=False, **kwargs))).eval()
    x = torch.randn(2, 3, *ours.patch_embed.img_size)
    assert can_defer_residuals(ours.blocks)
    deferred = ours(x)
    seen = []
    handle = ours.blocks[-1].register_forward_hook(lambda m, args, out: seen.append(out))
    assert not can_defer_residuals(ours.blocks)
    plain = ours(x)
    handle.remove()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor)
    torch.testing.assert_close(deferred, plain, rtol=1e-5, atol=1e-5)
