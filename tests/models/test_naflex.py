"""vitkern's NaFlexViT against timm's NaFlexVit with the same random weights, on mixed-size batches:
timm's padded layout (patches, coordinates, validity: the key-padding path) and vitkern's packed
layout (pack_images + forward_packed: the varlen path) must both give timm's logits and gradients;
the packing helpers; what from_timm refuses."""

from __future__ import annotations

import pytest
import torch

import vitkern

from vitkern.models.naflex import NaFlexViT, PackedBatch, cu_seqlens_from_mask, pack_images, patchify
from vitkern.nn.block import DropPath, drop_path_row_scale

timm = pytest.importorskip("timm")
pytest.importorskip("timm.models.naflexvit")

SMALL = dict(embed_dim=64, depth=2, num_heads=4, num_classes=7, pos_embed_grid_size=(4, 4))
CASES = {
    "map_reg": ("naflexvit_base_patch16_map", dict(SMALL, reg_tokens=1)),
    "gap_reg4": ("naflexvit_base_patch16_gap", SMALL),
    "parfac_gap": ("naflexvit_base_patch16_parfac_gap", SMALL),
    "par_gap": ("naflexvit_base_patch16_par_gap", SMALL),
    "siglip": ("naflexvit_base_patch16_siglip", SMALL),
    "token_qknorm": ("naflexvit_base_patch16_gap", dict(SMALL, class_token=True, reg_tokens=0,
                                                       global_pool="token", qk_norm=True, fc_norm=False)),
    "max_prenorm": ("naflexvit_base_patch16_gap", dict(SMALL, global_pool="max", pre_norm=True)),
    "avgmax_prefix": ("naflexvit_base_patch16_gap", dict(SMALL, global_pool="avgmax", pool_include_prefix=True,
                                                        qkv_bias=False)),
}
# (rows, cols) of patches of each image: below, at and above the 4x4 learned grid, both aspects
GRIDS = [(3, 5), (4, 4), (6, 2), (1, 1), (2, 7)]


@pytest.fixture(autouse=True)
def _reference_backend(request):
    # the model-level parity matrix on the ops' references (fast); the kernels themselves are
    # tested by the op tests, and through this model by test_naflex_through_the_kernels
    if request.node.name.startswith("test_naflex_through_the_kernels"):
        yield
        return
    import vitkern

    with vitkern.use_backend("reference"):
        yield


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shift = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + shift)
    return model


def _images(grids=GRIDS, patch=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, patch * h, patch * w, generator=g) for h, w in grids]


def _padded(packed: PackedBatch, pad_value: float = 0.0):
    """timm's collator layout, with extra padding columns on every row."""
    return packed.padded(packed.max_seqlen + 3, pad_value)


def _pair(case):
    name, kwargs = CASES[case]
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(name, pretrained=False, **kwargs)).eval()
    return ref, NaFlexViT.from_timm(ref).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_naflex_padded_and_packed_match_timm(case):
    ref, ours = _pair(case)
    packed = pack_images(_images(), 16)
    batch = _padded(packed)
    with torch.no_grad():
        expected = ref(batch)
        torch.testing.assert_close(ours(batch), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.forward_packed(packed), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(packed), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["map_reg", "gap_reg4", "token_qknorm"])
def test_naflex_gradients_match_timm(case):
    ref, ours = _pair(case)
    ref.train()
    ours.train()
    packed = pack_images(_images(GRIDS[:3]), 16)
    batch = _padded(packed)
    expected = ref(batch)
    g = torch.randn_like(expected)
    names = [n for n, _ in ref.named_parameters()]
    ref_grads = torch.autograd.grad(expected, list(ref.parameters()), g, allow_unused=True)
    params = dict(ours.named_parameters())
    for got in (ours(batch), ours.forward_packed(packed)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        grads = torch.autograd.grad(got, [params[n] for n in names], g, allow_unused=True)
        for n, a, b in zip(names, grads, ref_grads):
            if b is None:
                assert a is None or not a.any(), n
                continue
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_naflex_through_the_kernels():
    """The default backend choice (the Triton kernels under the interpreter): padded (key-padding
    attention) and packed (varlen attention) forward and gradients against timm."""
    ref, ours = _pair("map_reg")
    ref.train()
    ours.train()
    packed = pack_images(_images(GRIDS[:3]), 16)
    batch = _padded(packed)
    expected = ref(batch)
    g = torch.randn_like(expected)
    names = ["embeds.pos_embed", "blocks.0.attn.qkv.weight", "attn_pool.kv.weight"]
    ref_params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad(expected, [ref_params[n] for n in names], g)
    params = dict(ours.named_parameters())
    for got in (ours(batch), ours.forward_packed(packed)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        for n, a, b in zip(names, torch.autograd.grad(got, [params[n] for n in names], g), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_naflex_image_input_matches_timm():
    ref, ours = _pair("map_reg")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of the patch"):
        ours(torch.randn(1, 3, 60, 48))


def test_naflex_padding_never_reaches_valid_outputs():
    _, ours = _pair("gap_reg4")
    packed = pack_images(_images(), 16)
    with torch.no_grad():
        a = ours(_padded(packed, pad_value=0.0))
        b = ours(_padded(packed, pad_value=1e3))
        feats = ours.forward_features(**{k: v for k, v in _padded(packed).items()})
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(feats) == {"patches", "patch_valid"}


def test_naflex_packed_tokens_are_the_valid_padded_tokens():
    _, ours = _pair("map_reg")
    packed = pack_images(_images(), 16)
    batch = _padded(packed)
    with torch.no_grad():
        padded = ours.forward_features(**batch)["patches"]
        tokens, cu = ours.forward_features_packed(packed)
    K = ours.num_prefix_tokens
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.tensor(
        [K + h * w for h, w in GRIDS]).cumsum(0).tolist()
    bounds = cu.tolist()
    for i, (h, w) in enumerate(GRIDS):
        torch.testing.assert_close(tokens[bounds[i]:bounds[i + 1]], padded[i, :K + h * w], rtol=1e-5, atol=1e-5)


def test_pack_images_layout_and_round_trip():
    imgs = [torch.randn(3, 32, 48), torch.randn(3, 16, 16), torch.randn(3, 40, 20)]  # the last is padded
    packed = pack_images(imgs, 16)
    assert packed.grid_sizes == ((2, 3), (1, 1), (3, 2))
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 6, 7, 13]
    assert packed.patches.shape == (13, 16 * 16 * 3) and packed.max_seqlen == 6
    assert packed.patch_coord[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    # patch (y=1, x=2) of image 0 is its pixels [16:32, 32:48] in (ph, pw, C) order
    torch.testing.assert_close(packed.patches[5], imgs[0][:, 16:32, 32:48].permute(1, 2, 0).flatten())
    # zero padding at the bottom / right of the 40x20 image
    last = packed.patches[7:].reshape(3, 2, 16, 16, 3)
    assert not last[2, :, 8:].any() and not last[:, 1, :, 4:].any()
    torch.testing.assert_close(last[0, 0], imgs[2][:, :16, :16].permute(1, 2, 0))
    # (C, ph, pw) order, timm's channels_last=False
    chw = pack_images(imgs, 16, channels_last=False)
    torch.testing.assert_close(chw.patches[5], imgs[0][:, 16:32, 32:48].flatten())
    torch.testing.assert_close(patchify(imgs[0], (16, 16)), packed.patches[:6])
    # timm's padded layout of the same images
    batch = packed.padded()
    assert batch["patches"].shape == (3, 6, 16 * 16 * 3) and batch["patch_valid"].sum(1).tolist() == [6, 1, 6]
    torch.testing.assert_close(batch["patches"][2], packed.patches[7:])
    assert not batch["patches"][1, 1:].any() and batch["patch_coord"][0, 5].tolist() == [1, 2]
    with pytest.raises(ValueError, match="seq_len"):
        packed.padded(seq_len=5)
    # a (B, C, H, W) batch packs like its images
    batch = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pack_images(batch, 16).patches, pack_images(list(batch), 16).patches)


def test_pack_images_max_tokens_keeps_aspect():
    imgs = [torch.randn(3, 160, 320), torch.randn(3, 32, 32)]
    packed = pack_images(imgs, 16, max_tokens=50)
    (gh, gw), small = packed.grid_sizes
    assert gh * gw <= 50 and abs(gw / gh - 2.0) < 0.3 and small == (2, 2)
    assert packed.cu_seqlens.tolist() == [0, gh * gw, gh * gw + 4]


@pytest.mark.parametrize("bad, match", [
    (dict(images=[]), "no images"),
    (dict(images=[torch.randn(3, 16, 16), torch.randn(1, 16, 16)]), "image 1"),
    (dict(images=[torch.randn(16, 16)]), "image 0"),
    (dict(images=[torch.randn(3, 16, 16)], max_tokens=0), "max_tokens"),
    (dict(images=[torch.randn(3, 16, 16)], patch_size=0), "patch_size"),
])
def test_pack_images_errors(bad, match):
    kwargs = {"patch_size": 16, **bad}
    with pytest.raises(ValueError, match=match):
        pack_images(kwargs.pop("images"), kwargs.pop("patch_size"), **kwargs)


def test_cu_seqlens_from_mask():
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    cu = cu_seqlens_from_mask(valid)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 4]
    assert cu_seqlens_from_mask(valid, num_prefix_tokens=2).tolist() == [0, 5, 8, 10]
    with pytest.raises(ValueError, match="patch_valid"):
        cu_seqlens_from_mask(valid[0])


def test_packed_drop_path_draws_one_sample_per_image():
    dp = DropPath(0.5).train()
    cu = torch.tensor([0, 3, 3, 8, 9], dtype=torch.int32)
    torch.manual_seed(3)
    scale = drop_path_row_scale(dp, torch.zeros(1, 9, 4), cu)
    assert scale.shape == (9,)
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert len(set(scale[lo:hi].tolist())) <= 1
    assert set(scale.tolist()) <= {0.0, 2.0}
    assert drop_path_row_scale(dp.eval(), torch.zeros(1, 9, 4), cu) is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_type="axial"), "RoPE"),
    (dict(patch_drop_rate=0.1), "patch dropout"),
    (dict(embed_proj_type="conv"), "conv patch projection"),
    (dict(pos_embed_use_grid_sample=True), "grid-sample"),
    (dict(swiglu_mlp=True), "blocks of"),
])
def test_from_timm_refuses_by_name(kwargs, match):
    ref = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, **SMALL, **kwargs)
    with pytest.raises(ValueError, match=match):
        NaFlexViT.from_timm(ref)


def test_naflex_state_dict_keys_are_timms():
    ref, ours = _pair("parfac_gap")
    assert list(ours.state_dict()) == list(ref.state_dict())


NAFLEX_NAMES = [n for n in __import__("vitkern").list_models() if n.startswith("naflexvit_")]


@pytest.mark.parametrize("name", NAFLEX_NAMES)
def test_registered_names_build_timms_architecture(name):
    """create_model(name) is a NaFlexViT with timm's parameters (names and shapes), config and
    preprocessing."""
    import vitkern
    from vitkern.models.naflex import _config_from_timm

    ours = vitkern.create_model(name, device="meta")
    ref = timm.create_model(name, pretrained=False, device="meta")
    assert isinstance(ours, NaFlexViT)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for attr in ("global_pool", "num_prefix_tokens", "pool_include_prefix", "num_classes", "embed_dim"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    for attr in ("pos_embed_type", "pos_embed_interp_mode", "pos_embed_ar_preserving", "pos_embed_antialias",
                 "pos_embed_align_corners", "channels_last", "patch_size"):
        assert getattr(ours.embeds, attr) == getattr(ref.embeds, attr), attr
    for a, b in ((ours.norm, ref.norm), (ours.fc_norm, ref.fc_norm), (ours.norm_pre, ref.norm_pre)):
        assert isinstance(a, torch.nn.Identity) == isinstance(b, torch.nn.Identity)
    assert ours.blocks[0].norm1.eps == ref.blocks[0].norm1.eps
    assert ours.act == _config_from_timm(ref)["act"]
    assert timm.data.resolve_model_data_config(ours) == timm.data.resolve_model_data_config(ref)


def test_checkpoint_with_another_head_loads(tmp_path):
    import vitkern

    src = _randomize(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, **SMALL))
    path = tmp_path / "naflex.pth"
    torch.save(src.state_dict(), path)
    kw = {k: v for k, v in SMALL.items() if k != "num_classes"}
    with pytest.warns(UserWarning, match="another class count"):
        ours = vitkern.create_model("naflexvit_base_patch16_gap", checkpoint_path=str(path), num_classes=3, **kw)
    torch.testing.assert_close(ours.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert ours.forward_packed(pack_images(_images(GRIDS[:2]), 16)).shape == (2, 3)
    state = src.state_dict()
    state["embeds.pos_embed"] = torch.zeros(1, 5, 5, 64)
    torch.save(state, path)
    with pytest.raises(ValueError, match="embeds.pos_embed"):
        vitkern.create_model("naflexvit_base_patch16_gap", checkpoint_path=str(path), **kw)


def test_naflex_through_the_kernels_compiles_fullgraph():
    """forward_packed traces into one graph (aot_eager): the grid sizes are host values of the
    PackedBatch and the varlen op never syncs, so there is no graph break."""
    ref, ours = _pair("map_reg")
    packed = pack_images(_images(GRIDS[:2]), 16)
    with torch.no_grad():
        expected = ours.forward_packed(packed)
        explained = torch._dynamo.explain(ours.forward_packed)(packed)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        got = torch.compile(ours.forward_packed, fullgraph=True, backend="aot_eager")(packed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_from_hf_siglip2_naflex():
    """Hugging Face's Siglip2VisionModel (the SigLIP2 NaFlex tower): its processor's padded inputs
    through hf_batch, and the same images packed, give its pooler output and hidden states."""
    T = pytest.importorskip("transformers")
    from vitkern.models.naflex import hf_batch

    cfg = T.Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_patches=16, patch_size=16)
    hf = _randomize(T.Siglip2VisionModel(cfg)).eval()
    ours = NaFlexViT.from_hf(hf).eval()
    packed = pack_images(_images(), 16)
    B, N, cu = packed.num_images, packed.max_seqlen + 2, packed.cu_seqlens.tolist()
    pixel_values = torch.zeros(B, N, packed.patches.shape[1])
    mask = torch.zeros(B, N, dtype=torch.long)
    for i in range(B):
        pixel_values[i, :cu[i + 1] - cu[i]] = packed.patches[cu[i]:cu[i + 1]]
        mask[i, :cu[i + 1] - cu[i]] = 1
    shapes = torch.tensor(packed.grid_sizes)
    with torch.no_grad():
        out = hf(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        batch = hf_batch(pixel_values, mask, shapes)
        torch.testing.assert_close(ours(batch), out.pooler_output, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(ours.forward_packed(packed), out.pooler_output, rtol=1e-4, atol=2e-5)
        feats = ours.forward_features(**batch)["patches"]
    for i in range(B):
        n = cu[i + 1] - cu[i]
        torch.testing.assert_close(feats[i, :n], out.last_hidden_state[i, :n], rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="Siglip2VisionModel"):
        NaFlexViT.from_hf(T.SiglipVisionModel(T.SiglipVisionConfig(hidden_size=64, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=128)))


def test_packed_forward_reuses_its_layout_plan(monkeypatch):
    """A packed batch of a layout seen before copies no tap tables from the host: the position
    embeddings' plan stays on the device (what lets a CUDA graph capture the packed model)."""
    from vitkern.ops.pos_resample import clear_plan_cache, plan as plan_module

    _, ours = _pair("map_reg")
    ours.eval()
    packed = pack_images(_images(GRIDS[:3]), 16)
    clear_plan_cache()
    built = []
    real = plan_module.build_plan
    monkeypatch.setattr(plan_module, "build_plan", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    with torch.no_grad(), vitkern.use_backend("triton"):
        first = ours.forward_packed(packed)
        again = ours.forward_packed(pack_images(_images(GRIDS[:3]), 16))
    clear_plan_cache()
    assert torch.equal(first, again) and len(built) == 1
