"""timm's dense-feature and fine-tuning API on vitkern.ViT against timm's VisionTransformer with the
same config and weights: forward_intermediates, get_intermediate_layers, prune_intermediate_layers,
feature_info, set_input_size(patch_size=), the registry's pretrained_cfg and local-file loading
through create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)).

CPU, reference backend, tiny configs (32 px images, patch 8, depth 3).
"""

import itertools

import pytest
import torch

import vitkern
from vitkern.models import ViT, create_model, get_pretrained_cfg, list_models
from vitkern.models.vit import feature_take_indices

timm = pytest.importorskip("timm")
timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_features = pytest.importorskip("timm.models._features")
timm_patch_embed = pytest.importorskip("timm.layers.patch_embed")

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=10)
ATOL = 1e-5

CONFIGS = {
    "class-token": (dict(), (32, 32)),
    "registers": (dict(reg_tokens=4), (32, 32)),
    "no-class-token-avg": (dict(class_token=False, global_pool="avg"), (32, 32)),
    "dynamic-registers": (dict(dynamic_img_size=True, reg_tokens=4), (48, 40)),
    "dynamic-pad-no-embed-class": (dict(dynamic_img_size=True, dynamic_img_pad=True, no_embed_class=True), (30, 37)),
}


@pytest.fixture(autouse=True)
def _reference_backend():
    with vitkern.use_backend("reference"):
        yield


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (norm scales, biases, tokens), unit-scale activations."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("norm1.weight") or "norm." in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            else:
                fan_in = p[0].numel() if p.shape[0] > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)


def _pair(**kw):
    """(timm model, our model converted from it), eval mode."""
    ref = timm_vit.VisionTransformer(**dict(TINY, **kw))
    _randomize(ref)
    ref.eval()
    return ref, ViT.from_timm(ref).eval()


def _images(size=(32, 32), b=2, seed=0):
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed))


def _assert_same(ours, ref, where=""):
    """Same structure (list / tuple / dict), tensor shapes and values to ATOL."""
    assert type(ours) is type(ref), f"{where}: {type(ours).__name__} vs {type(ref).__name__}"
    if isinstance(ref, torch.Tensor):
        assert ours.shape == ref.shape, f"{where}: {tuple(ours.shape)} vs {tuple(ref.shape)}"
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-5, msg=lambda m: f"{where}: {m}")
    elif isinstance(ref, dict):
        assert sorted(ours) == sorted(ref), where
        for k in ref:
            _assert_same(ours[k], ref[k], f"{where}[{k}]")
    else:
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            _assert_same(a, b, f"{where}[{i}]")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_intermediates_matches_timm(name):
    kw, size = CONFIGS[name]
    ref, ours = _pair(**kw)
    x = _images(size)
    combos = itertools.product(
        (None, 1, 2, [0, 2], [-1], (-3, 1)),  # all, last n, a list, negative (a tuple)
        (False, True),  # norm
        ("NCHW", "NLC"),
        (False, True),  # return_prefix_tokens
        (False, True),  # intermediates_only
    )
    with torch.no_grad():
        for indices, norm, fmt, prefix, only in combos:
            args = dict(
                indices=indices, norm=norm, output_fmt=fmt, return_prefix_tokens=prefix, intermediates_only=only
            )
            got = ours.forward_intermediates(x, **args)
            _assert_same(got, ref.forward_intermediates(x, **args), f"{name} {args}")
        # stop_early and the dict output
        for indices, only, prefix in itertools.product((1, [0, -2]), (False, True), (False, True)):
            args = dict(indices=indices, stop_early=True, intermediates_only=only, return_prefix_tokens=prefix)
            _assert_same(ours.forward_intermediates(x, **args), ref.forward_intermediates(x, **args), f"{args}")
            args.update(output_dict=True, norm=True)
            _assert_same(ours.forward_intermediates(x, **args), ref.forward_intermediates(x, **args), f"{args}")
    # the shapes, spelled out (NCHW: the input's patch grid; prefix tokens split off)
    final, inter = ours.forward_intermediates(x, indices=[0], return_prefix_tokens=True)
    grid = ours.patch_embed.dynamic_feat_size(size)
    k = ours.num_prefix_tokens
    assert final.shape == (2, k + grid[0] * grid[1], 64)
    if k:
        assert inter[0][0].shape == (2, 64, *grid) and inter[0][1].shape == (2, k, 64)
    else:
        assert inter[0].shape == (2, 64, *grid)


def test_forward_intermediates_final_is_forward_features_and_stop_early_skips_blocks():
    ref, ours = _pair(reg_tokens=4)
    x = _images()
    calls = []
    hooks = [blk.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, blk in enumerate(ours.blocks)]
    with torch.no_grad():
        final, inter = ours.forward_intermediates(x, indices=[0], stop_early=True)
        assert calls == [0]
        calls.clear()
        final, inter = ours.forward_intermediates(x, indices=[0])
        assert calls == [0, 1, 2]
        torch.testing.assert_close(final, ours.forward_features(x), atol=0, rtol=0)
    for h in hooks:
        h.remove()


def test_forward_intermediates_grad_checkpointing_same_grads():
    _, ours = _pair(reg_tokens=1)
    ours.train()
    x = _images()

    def grads():
        ours.zero_grad()
        final, inter = ours.forward_intermediates(x, indices=[0, 2], norm=True)
        (final.square().mean() + sum(y.square().mean() for y in inter)).backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}

    plain = grads()
    assert "blocks.2.mlp.fc2.weight" in plain and "head.weight" not in plain
    ours.set_grad_checkpointing(True)
    checkpointed = grads()
    assert sorted(checkpointed) == sorted(plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["registers", "no-class-token-avg", "dynamic-registers"])
def test_get_intermediate_layers_matches_timm(name):
    kw, size = CONFIGS[name]
    ref, ours = _pair(**kw)
    x = _images(size)
    with torch.no_grad():
        for n, reshape, prefix, norm in itertools.product((1, 2, [0, 2], (-1,)), *[(False, True)] * 3):
            args = dict(n=n, reshape=reshape, return_prefix_tokens=prefix, norm=norm)
            _assert_same(ours.get_intermediate_layers(x, **args), ref.get_intermediate_layers(x, **args), f"{args}")
        out = ours.get_intermediate_layers(x)  # defaults: the last block, NLC
        assert isinstance(out, list) and len(out) == 1 and out[0].dim() == 3


@pytest.mark.parametrize("kw", [dict(reg_tokens=4), dict(class_token=False, global_pool="avg")], ids=["token", "avg"])
def test_prune_intermediate_layers_matches_timm(kw):
    x = _images()
    for indices, prune_norm, prune_head in itertools.product((1, [0, 1], [-2]), (False, True), (False, True)):
        ref, ours = _pair(**kw)
        kept = ours.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        where = f"{indices} prune_norm={prune_norm} prune_head={prune_head}"
        assert kept == ref.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head), where
        assert len(ours.blocks) == len(ref.blocks), where
        sd, ref_sd = ours.state_dict(), ref.state_dict()
        assert list(sd) == list(ref_sd), where
        for name in ("norm", "fc_norm", "head"):
            assert isinstance(getattr(ours, name), torch.nn.Identity) == isinstance(
                getattr(ref, name), torch.nn.Identity
            ), f"{where}: {name}"
        assert (ours.num_classes, ours.global_pool) == (ref.num_classes, ref.global_pool), where
        assert ours.feature_info == ref.feature_info, where
        with torch.no_grad():
            for norm, only in itertools.product((False, True), (False, True)):
                args = dict(indices=kept, norm=norm, intermediates_only=only, return_prefix_tokens=True)
                _assert_same(ours.forward_intermediates(x, **args), ref.forward_intermediates(x, **args), where)
            _assert_same(ours(x), ref(x), where)
        # the recorded config rebuilds the pruned model
        rebuilt = ViT(**ours.config)
        assert list(rebuilt.state_dict()) == list(sd), where
        rebuilt.load_state_dict(sd)
    _, ours = _pair(**kw)
    with pytest.raises(ValueError, match="out of range"):
        ours.prune_intermediate_layers([3])


def test_feature_getter_net_wraps_vit_as_timm():
    ref, ours = _pair(reg_tokens=4)
    x = _images()
    for out_indices, norm in ((2, False), ((0, -1), True)):
        r, o = _pair(reg_tokens=4)
        ref_net = timm_features.FeatureGetterNet(r, out_indices=out_indices, norm=norm)
        our_net = timm_features.FeatureGetterNet(o, out_indices=out_indices, norm=norm)
        assert our_net.feature_info.channels() == ref_net.feature_info.channels()
        assert our_net.feature_info.reduction() == ref_net.feature_info.reduction()
        with torch.no_grad():
            _assert_same(our_net(x), ref_net(x), f"{out_indices}")


def test_feature_info_matches_timm():
    for kw in (dict(), dict(reg_tokens=4, embed_dim=96), dict(patch_size=4, depth=2), dict(patch_size=(8, 4))):
        ref = timm_vit.VisionTransformer(**dict(TINY, **kw))
        ours = ViT(**dict(TINY, **kw))
        assert ours.feature_info == ref.feature_info, kw
    assert ours.feature_info[0] == dict(module="blocks.0", num_chs=64, reduction=8)


def test_feature_take_indices_matches_timm():
    for indices in (None, 1, 4, [0], [-1, 0, 2], (1, -2)):
        assert feature_take_indices(4, indices) == timm_features.feature_take_indices(4, indices), indices
    for bad in (0, 5, [4], [-5]):
        with pytest.raises(ValueError, match="out of range"):
            feature_take_indices(4, bad)
    _, ours = _pair()
    with pytest.raises(ValueError, match="output_fmt"):
        ours.forward_intermediates(_images(), output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(_images(), indices=[5])


@pytest.mark.parametrize(
    "img_size, patch_size",
    [(64, 16), (None, 4), (48, None), (32, (4, 8))],
    ids=["both", "patch-only", "img-only", "non-square-patch"],
)
def test_set_input_size_with_patch_size_matches_timm(img_size, patch_size):
    ref, ours = _pair(reg_tokens=2)
    ref.set_input_size(img_size=img_size, patch_size=patch_size)
    ours.set_input_size(img_size=img_size, patch_size=patch_size)
    assert ours.patch_embed.patch_size == ref.patch_embed.patch_size
    assert ours.patch_embed.grid_size == ref.patch_embed.grid_size
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
        torch.testing.assert_close(ours.state_dict()[key], ref.state_dict()[key], atol=ATOL, rtol=1e-5)
    assert ours.config["img_size"] == list(ref.patch_embed.img_size)
    assert ours.config["patch_size"] == list(ref.patch_embed.patch_size)
    assert ours.feature_info[0]["reduction"] == max(ref.patch_embed.patch_size)
    x = _images(ref.patch_embed.img_size)
    with torch.no_grad():
        _assert_same(ours(x), ref(x), "logits")
        args = dict(indices=2, return_prefix_tokens=True)
        _assert_same(ours.forward_intermediates(x, **args), ref.forward_intermediates(x, **args), "intermediates")
    rebuilt = ViT(**ours.config)  # the config records the new sizes
    rebuilt.load_state_dict(ours.state_dict())


def test_resample_patch_embed_matches_timm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 8, 8, generator=g)
    for new in ((16, 16), (4, 4), (8, 12), (5, 7)):
        expected = timm_patch_embed.resample_patch_embed(w, list(new))
        torch.testing.assert_close(vitkern.resample_patch_embed(w, new), expected, atol=1e-5, rtol=1e-5)
    assert vitkern.resample_patch_embed(w, 8) is w
    half = vitkern.resample_patch_embed(w.bfloat16(), 16)
    assert half.dtype == torch.bfloat16 and half.shape == (6, 3, 16, 16)
    with pytest.raises(ValueError, match="new_size"):
        vitkern.resample_patch_embed(w, 0)
    # FlexiViT's property: a patch resized to the new size, through the new kernel, embeds as before
    patch = torch.randn(1, 3, 8, 8, generator=g)
    up = torch.nn.functional.interpolate(patch, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    new_w = vitkern.resample_patch_embed(w, 16)
    torch.testing.assert_close((up * new_w).sum((1, 2, 3)), (patch * w).sum((1, 2, 3)), atol=1e-4, rtol=1e-4)


def test_pretrained_cfg_per_name_matches_timm():
    sources = ("url", "hf_hub_id", "custom_load", "file", "hf_hub_filename")
    for name in list_models():
        ours = create_model(name, device="meta")
        ref = timm.create_model(name, pretrained=False, device="meta")
        expected = {k: v for k, v in ref.pretrained_cfg.items() if k not in sources}
        assert ours.pretrained_cfg == expected, name
        assert ours.default_cfg is ours.pretrained_cfg
        assert get_pretrained_cfg(name) == expected
        assert timm.data.resolve_model_data_config(ours) == timm.data.resolve_model_data_config(ref), name
    # constructor keywords describe the model, the cfg the source weights (as timm); each model its own copy
    small = create_model("vit_base_patch16_384", num_classes=3, img_size=224, device="meta")
    assert small.pretrained_cfg["num_classes"] == 1000 and small.pretrained_cfg["input_size"] == (3, 384, 384)
    small.pretrained_cfg["mean"] = (0.0,)
    assert get_pretrained_cfg("vit_base_patch16_384")["mean"] == (0.5, 0.5, 0.5)
    over = create_model("vit_tiny_patch16_224", device="meta", pretrained_cfg_overlay=dict(crop_pct=1.0))
    assert over.pretrained_cfg["crop_pct"] == 1.0 and over.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k"


def test_pretrained_true_without_file_says_what_to_do():
    for kw in (dict(), dict(pretrained_cfg_overlay=dict(crop_pct=1.0)), dict(checkpoint_path="x.safetensors")):
        with pytest.raises(ValueError) as err:
            create_model("vit_tiny_patch16_224", pretrained=True, **kw)
        msg = str(err.value)
        assert "never downloads" in msg and "pretrained_cfg_overlay=dict(file=" in msg and "checkpoint_path=" in msg
    with pytest.raises(ValueError, match="never downloads"):
        vitkern.vit_tiny_patch16_224(pretrained=True)


SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def test_pretrained_cfg_overlay_file_loads_as_timm(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)
    _randomize(ref)
    path = tmp_path / "weights.pth"
    torch.save(ref.state_dict(), path)
    # the file's class count stated, so that timm keeps its head (timm drops the head whenever the
    # cfg's num_classes differs from the model's; vitkern decides from the tensor shapes)
    overlay = dict(file=str(path), num_classes=10)
    ours = create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL).eval()
    assert ours.pretrained_cfg["file"] == str(path) and ours.pretrained_cfg["num_classes"] == 10
    loaded = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL).eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), loaded(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref.eval()(x), atol=ATOL, rtol=1e-5)
    same = create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path), **SMALL)
    torch.testing.assert_close(same.head.weight, ref.head.weight, atol=0, rtol=0)
    # a safetensors file, through the same loader; another class count drops the head as timm does
    st = tmp_path / "weights.safetensors"
    ours.save_safetensors(st)
    with pytest.warns(UserWarning):
        other = create_model(
            "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=st), **dict(SMALL, num_classes=3)
        )
    torch.testing.assert_close(other.blocks[0].attn.qkv.weight, ours.blocks[0].attn.qkv.weight, atol=0, rtol=0)
    # pretrained=False records the file and loads nothing (as timm)
    fresh = create_model("vit_tiny_patch16_224", pretrained_cfg_overlay=overlay, **SMALL)
    assert fresh.pretrained_cfg["file"] == str(path)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, ours.blocks[0].attn.qkv.weight)
