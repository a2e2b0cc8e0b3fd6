"""Every supported model family against its source library, on the same random weights (small
configs, fp32): logits (or features), the intermediates, eval and train (the input gradient), plus
the refusals by name, the preprocessing config and fine-tuning from a checkpoint of another head.

Families: timm (plain ViT, SigLIP with the MAP head, CLIP with QuickGELU, the distilled DeiT),
torchvision, Hugging Face (ViT, DeiT with its distillation head, DINOv2 with and without registers,
CLIP, SigLIP with its head), big_vision .npz (SigLIP's MAP head, in test_convert).
"""

import pytest
import torch

import vitkern
from vitkern.models import ViT, create_model

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture(autouse=True)
def _reference_backend():
    with vitkern.use_backend("reference"):
        yield


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Random weights of a trained model's scale (no zero biases, LayerNorm gains near 1, the tokens
    # and position embeddings away from 0) so that every parameter shows in the outputs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "lambda1" in name or "gamma" in name) and "weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() <= 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() <= 3 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
    return model


def _images(b=2, size=32, seed=0, grad=False):
    x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                patch_size=8)
HF_DINO = {k: v for k, v in HF_SMALL.items() if k != "intermediate_size"}


# ------------------------------------------------------------------------------------------------
# timm: logits, forward_intermediates, train-mode input gradients
# ------------------------------------------------------------------------------------------------

TIMM_FAMILIES = {
    "vit": lambda: timm.models.vision_transformer.VisionTransformer(**SMALL, num_classes=5),
    "siglip-map": lambda: timm.models.vision_transformer.VisionTransformer(
        **SMALL, class_token=False, global_pool="map", num_classes=5),
    "siglip-map-so400m-heads": lambda: timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=14, embed_dim=144, depth=1, num_heads=2, mlp_ratio=3.7362, class_token=False,
        global_pool="map", num_classes=0),  # head dim 72, as the so400m towers
    "clip-quickgelu": lambda: timm.models.vision_transformer.VisionTransformer(
        **SMALL, pre_norm=True, act_layer="quick_gelu", norm_layer=torch.nn.LayerNorm, num_classes=7),
    "deit-distilled": lambda: timm.models.deit.VisionTransformerDistilled(**SMALL, num_classes=5),
}


def _timm_model(family):
    return _randomize(TIMM_FAMILIES[family](), seed=len(family))


@pytest.mark.parametrize("family", list(TIMM_FAMILIES))
def test_timm_family_parity(family):
    src = _timm_model(family).eval()
    ours = ViT.from_timm(src).eval()
    size = src.patch_embed.img_size[0]
    x = _images(size=size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), atol=ATOL, rtol=RTOL)
        want_final, want = src.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", norm=True)
        got_final, got = ours.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", norm=True)
    torch.testing.assert_close(got_final, want_final, atol=ATOL, rtol=RTOL)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    # train mode: the same forward and the same gradient with respect to the images
    src.train()
    ours.train()
    grads = []
    for model in (src, ours):
        xi = _images(size=size, grad=True)
        out = model(xi)
        out = out[0] + out[1] if isinstance(out, tuple) else out
        (out.square().mean()).backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL, rtol=RTOL)
    # and back: the ViT's state_dict loads into the timm model
    back = TIMM_FAMILIES[family]()
    back.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), src.eval()(x), atol=0, rtol=0)


def test_timm_distilled_training_returns_both_heads():
    src = _timm_model("deit-distilled").train()
    ours = ViT.from_timm(src).train()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), atol=ATOL, rtol=RTOL)  # mean of the heads by default
        src.set_distilled_training(True)
        ours.set_distilled_training(True)
        (a, b), (c, d) = src(x), ours(x)
        torch.testing.assert_close(c, a, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(d, b, atol=ATOL, rtol=RTOL)
        src.eval()
        ours.eval()
        torch.testing.assert_close(ours(x), src(x), atol=ATOL, rtol=RTOL)  # inference averages
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   src.forward_head(src.forward_features(x), pre_logits=True), atol=ATOL, rtol=RTOL)
    assert ViT.from_timm(src).distilled_training
    assert ours.num_prefix_tokens == 2 and "dist_token" in ours.no_weight_decay()
    with pytest.raises(ValueError, match="distilled"):
        ViT(**SMALL).set_distilled_training(True)


@pytest.mark.parametrize("family", [
    "siglip-map", "clip-quickgelu",
    pytest.param("siglip-map-so400m-heads", marks=pytest.mark.slow),
    pytest.param("deit-distilled", marks=pytest.mark.slow),
])
def test_timm_families_under_the_triton_interpreter(family):
    """The MAP head's single-query attention (head dim 72 too), QuickGELU's epilogue and the
    two-prefix-token patch embedding through the Triton kernels (the interpreter on the CPU)."""
    src = _timm_model(family).eval()
    ours = ViT.from_timm(src).eval()
    size = src.patch_embed.img_size[0]
    x = _images(size=size)
    with vitkern.use_backend("triton"):
        got = ours(x)
    want = src(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # backward through the kernels: the MAP head's broadcast query, QuickGELU's derivative
    got.square().mean().backward()
    want.square().mean().backward()
    ref_grads = dict(src.named_parameters())
    for name, p in ours.named_parameters():
        g = ref_grads[name].grad
        torch.testing.assert_close(p.grad, g, atol=1e-4 * (1 + g.abs().max().item()), rtol=1e-3, msg=name)


def test_map_head_reset_classifier_and_prune_follow_timm():
    src = _timm_model("siglip-map").eval()
    ours = ViT.from_timm(src)
    ours.reset_classifier(3)
    assert ours.attn_pool is not None and ours.head.out_features == 3
    with pytest.raises(ValueError, match="cannot add attention pooling"):
        ViT(**SMALL, num_classes=2).reset_classifier(2, "map")
    ours.reset_classifier(0, "avg")
    src.reset_classifier(0, "avg")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), src(x), atol=ATOL, rtol=RTOL)
    assert ours.attn_pool is None


# ------------------------------------------------------------------------------------------------
# Hugging Face: logits / features, hidden states, train-mode input gradients
# ------------------------------------------------------------------------------------------------

T = transformers
HF_FAMILIES = {
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(**HF_SMALL, num_labels=5)),
    "deit-teacher": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**HF_SMALL, num_labels=5)),
    "deit-model": lambda: T.DeiTModel(T.DeiTConfig(**HF_SMALL), add_pooling_layer=False),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**HF_DINO, layerscale_value=0.5)),
    "dinov2-registers": lambda: T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(**HF_DINO, layerscale_value=0.5, num_register_tokens=4)),
    "clip-quickgelu": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**HF_SMALL, hidden_act="quick_gelu")),
    "siglip-head": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**HF_SMALL)),
}


def _hf_model(family):
    return _randomize(HF_FAMILIES[family](), seed=len(family))


def _hf_out(model, x):
    out = model(pixel_values=x, output_hidden_states=True)
    return out


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_hf_family_parity(family):
    src = _hf_model(family).eval()
    ours = ViT.from_hf(src).eval()
    x = _images()
    with torch.no_grad():
        out = _hf_out(src, x)
        feats = ours.forward_features(x)
        if getattr(out, "logits", None) is not None:
            torch.testing.assert_close(ours(x), out.logits, atol=ATOL, rtol=RTOL)
        else:
            torch.testing.assert_close(feats, out.last_hidden_state, atol=ATOL, rtol=RTOL)
        if getattr(out, "pooler_output", None) is not None:  # CLIP: the normed class token; SigLIP: the MAP head
            torch.testing.assert_close(ours.forward_head(feats, pre_logits=True), out.pooler_output,
                                       atol=ATOL, rtol=RTOL)
        # hidden_states[i + 1] is block i's output; the ViT's intermediates are its patch tokens
        got = ours.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", intermediates_only=True)
        k = ours.num_prefix_tokens
        for i, y in enumerate(got):
            torch.testing.assert_close(y, out.hidden_states[i + 1][:, k:], atol=ATOL, rtol=RTOL)
    src.train()
    ours.train()
    grads = []
    for model in (src, ours):
        xi = _images(grad=True)
        if model is ours:
            out = ours(xi) if ours.num_classes else ours.forward_features(xi)
        else:
            o = src(pixel_values=xi)
            out = o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
        out.square().mean().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family,antialias", [("dinov2", False), ("dinov2-registers", True)])
def test_hf_dinov2_interpolates_as_hugging_face(family, antialias):
    # DINOv2 always interpolates its position embedding; with registers antialiased, without not
    src = _hf_model(family).eval()
    ours = ViT.from_hf(src).eval()
    assert ours.dynamic_img_size and ours.pos_embed_antialias is antialias
    for size in (48, 24):
        x = _images(size=size)
        with torch.no_grad():
            torch.testing.assert_close(ours.forward_features(x), src(pixel_values=x).last_hidden_state,
                                       atol=ATOL, rtol=RTOL)


def test_hf_siglip_so400m_head_dim():
    cfg = T.SiglipVisionConfig(hidden_size=144, num_hidden_layers=1, num_attention_heads=2, intermediate_size=538,
                               image_size=28, patch_size=14)
    src = _randomize(T.SiglipVisionModel(cfg)).eval()
    ours = ViT.from_hf(src).eval()
    assert ours.attn_pool.head_dim == 72
    x = _images(size=28)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                   src(pixel_values=x).pooler_output, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Refusals: a ValueError naming the class
# ------------------------------------------------------------------------------------------------

HF_REFUSED = {
    "DeiTForImageClassification": lambda: T.DeiTForImageClassification(T.DeiTConfig(**HF_SMALL, num_labels=3)),
    "Dinov2ForImageClassification": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**HF_DINO, num_labels=3)),
    "CLIPVisionModelWithProjection": lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**HF_SMALL)),
    "Siglip2VisionModel": lambda: T.Siglip2VisionModel(T.Siglip2VisionConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, patch_size=8,
        num_patches=16)),
    "CLIPModel": lambda: T.CLIPModel(T.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        vision_config=HF_SMALL, projection_dim=16)),
    "BeitModel": lambda: T.BeitModel(T.BeitConfig(**HF_SMALL)),
}


@pytest.mark.parametrize("name", list(HF_REFUSED))
def test_hf_refusals_name_the_class(name):
    with pytest.raises(ValueError, match=name):
        ViT.from_hf(HF_REFUSED[name]())


def test_dinov2_giant_swiglu_from_timm_and_hf():
    """DINOv2 giant's SwiGLU MLP (fc1 -> silu(gate) * value -> fc2; the gate in the SwiGLU GEMM):
    timm's SwiGLUPacked and Hugging Face's use_swiglu_ffn (transformers 5.x gate / up / down)."""
    from timm.layers import SwiGLUPacked

    src = _randomize(timm.models.vision_transformer.VisionTransformer(
        **SMALL, init_values=1e-1, mlp_ratio=4.0, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
        num_classes=4)).eval()
    ours = ViT.from_timm(src).eval()
    assert ours.config["mlp_layer"] == "swiglu_packed"
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), atol=ATOL, rtol=RTOL)
    hf = _randomize(T.Dinov2Model(T.Dinov2Config(**HF_DINO, use_swiglu_ffn=True, layerscale_value=0.5))).eval()
    ours = ViT.from_hf(hf).eval()
    assert ours.blocks[0].mlp.fc1.out_features == 2 * hf.encoder.layer[0].mlp.down_proj.in_features
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), hf(pixel_values=x).last_hidden_state,
                                   atol=ATOL, rtol=RTOL)
    ours.train()
    xi = _images(grad=True)
    ours.forward_features(xi).square().mean().backward()
    xh = _images(grad=True)
    hf.train()(pixel_values=xh).last_hidden_state.square().mean().backward()
    torch.testing.assert_close(xi.grad, xh.grad, atol=ATOL, rtol=RTOL)


def test_timm_refusals_name_the_class():
    cases = {
        "Eva": lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1),
        "VisionTransformer with HybridEmbed": lambda: timm.create_model(
            "vit_tiny_r_s16_p8_224", pretrained=False, img_size=32),
    }
    for name, build in cases.items():
        with pytest.raises(ValueError, match=name):
            ViT.from_timm(build())


# ------------------------------------------------------------------------------------------------
# Preprocessing config and fine-tuning from a checkpoint of another head size
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_256", "vit_large_patch14_clip_quickgelu_336",
                                  "deit_base_distilled_patch16_384"])
def test_resolve_model_data_config_is_the_sources(name):
    src = timm.create_model(name, pretrained=False, device="meta")
    want = timm.data.resolve_model_data_config(src)
    assert timm.data.resolve_model_data_config(create_model(name, device="meta")) == want
    # a converted model keeps its source's config (small shapes: the name's config is what counts)
    small = timm.create_model(name, pretrained=False, img_size=32, patch_size=16, depth=1)
    assert timm.data.resolve_model_data_config(ViT.from_timm(small)) == timm.data.resolve_model_data_config(small)


@pytest.mark.parametrize("family", ["siglip-map", "deit-distilled"])
def test_checkpoint_of_another_head_fine_tunes_one_step(tmp_path, family):
    src = _timm_model(family)
    path = tmp_path / "ckpt.pth"
    torch.save(src.state_dict(), path)
    cfg = dict(ViT.from_timm(src).config, num_classes=3)
    model = ViT(**cfg)
    with pytest.warns(UserWarning, match="left as initialised"):
        model.load_checkpoint(path)
    ref = ViT.from_timm(src)
    for k, v in model.state_dict().items():
        if not k.startswith("head"):
            torch.testing.assert_close(v, ref.state_dict()[k], atol=0, rtol=0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _images(4), torch.tensor([0, 1, 2, 0])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"head.weight", "blocks.0.attn.qkv.weight"} <= changed
    if family == "siglip-map":
        assert "attn_pool.latent" in changed
    else:
        assert {"head_dist.weight", "dist_token"} <= changed


@pytest.mark.parametrize("family", ["siglip-map", "deit-distilled", "clip-quickgelu"])
def test_layer_decay_groups_equal_timms(family):
    from timm.optim import param_groups_layer_decay

    def groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"])
                for g in param_groups_layer_decay(model, weight_decay=0.05,
                                                  no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
                for p in g["params"]}

    src = _timm_model(family)
    ours = ViT.from_timm(src)
    assert ours.group_matcher() == src.group_matcher() and ours.no_weight_decay() == src.no_weight_decay()
    assert groups(ours) == groups(src)


@pytest.mark.parametrize("config", [
    dict(class_token=False, global_pool="map"),
    dict(distilled=True),
    dict(act="quick_gelu", pre_norm=True),
    dict(mlp_layer="swiglu_packed", init_values=0.1),
], ids=["siglip-map", "deit-distilled", "clip-quickgelu", "dinov2-swiglu"])
def test_compile_fullgraph_of_each_family(config):
    """torch.compile(fullgraph=True) over the Triton custom ops (their fakes: the MAP head's
    broadcast query, two prefix tokens, QuickGELU, the SwiGLU gate), forward and backward."""
    torch._dynamo.reset()
    model = ViT(**dict(SMALL, depth=1), num_classes=5, **config).eval()
    x = _images()
    with vitkern.use_backend("triton"):
        want = model(x)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        got.square().mean().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("family", ["siglip-map", "deit-distilled", "clip-quickgelu"])
def test_safetensors_round_trip_keeps_the_family(tmp_path, family):
    src = _timm_model(family).eval()
    ours = ViT.from_timm(src).eval()
    path = tmp_path / "model.safetensors"
    ours.save_safetensors(path)
    back = ViT.load_safetensors(path).eval()
    assert back.config == ours.config
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(back(x), src(x), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Export: vitkern weights back into Hugging Face / torchvision models
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_hf_export_round_trip(family):
    """HF -> vitkern -> a freshly initialised HF model of the same config gives the source's weights
    back (parameter for parameter, in the target's own naming) and its outputs."""
    src = _hf_model(family).eval()
    ours = ViT.from_hf(src)
    fresh = _randomize(HF_FAMILIES[family](), seed=99).eval()
    # what vitkern has no counterpart for (a pooler, the mask token) stays as the target has it
    kept = tuple(k for k in fresh.state_dict() if ".pooler." in f".{k}" or k.endswith("mask_token"))
    if kept:
        with pytest.warns(UserWarning, match="keep their values"):
            out = ours.to_hf(fresh)
    else:
        out = ours.to_hf(fresh)
    assert out is fresh
    want, got = src.state_dict(), fresh.state_dict()
    for key, value in want.items():
        if key.startswith(kept):
            continue
        if family == "dinov2-registers" and key.endswith("position_embeddings"):
            # the class token's position row folds into the class token: exported as 0, the sum kept
            torch.testing.assert_close(got[key][:, 1:], value[:, 1:], rtol=0, atol=0)
            assert not got[key][:, :1].any()
            torch.testing.assert_close(got["embeddings.cls_token"], want["embeddings.cls_token"] + value[:, :1])
            continue
        if family == "dinov2-registers" and key.endswith("cls_token"):
            continue
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    if kept:
        fresh.load_state_dict({k: v for k, v in want.items() if k.startswith(kept)}, strict=False)
    x = _images()
    with torch.no_grad():
        a, b = src(pixel_values=x), fresh(pixel_values=x)
        for name in ("logits", "last_hidden_state", "pooler_output"):
            if getattr(a, name, None) is not None:
                torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=ATOL, rtol=RTOL)


def test_hf_export_refuses_another_config():
    ours = ViT.from_hf(_hf_model("vit"))
    other = T.ViTForImageClassification(T.ViTConfig(**dict(HF_SMALL, num_hidden_layers=1), num_labels=5))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="model parameters the target lacks .*blocks.1"):
        ours.to_hf(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # nothing copied
    with pytest.raises(ValueError, match="shapes"):
        ours.to_hf(T.ViTForImageClassification(T.ViTConfig(**HF_SMALL, num_labels=3)))


def test_torchvision_export_round_trip():
    tvm = pytest.importorskip("torchvision.models")
    src = _randomize(tvm.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                           mlp_dim=64, num_classes=3)).eval()
    ours = ViT.from_torchvision(src)
    fresh = tvm.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                  num_classes=3).eval()
    assert ours.to_torchvision(fresh) is fresh
    for key, value in src.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
