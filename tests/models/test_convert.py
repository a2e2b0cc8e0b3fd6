"""Weight conversion: timm, torchvision, Hugging Face (5.x and 4.x names), JAX .npz, safetensors.

Every reference model is built with random weights (nothing is downloaded).
"""

import functools
import pickle

import numpy as np
import pytest
import torch

import vitkern
from vitkern.models.convert import convert_hf_state_dict, hf_config, npz_config
from vitkern.models import ViT, create_model

timm_vit = pytest.importorskip("timm.models.vision_transformer")

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _reference_backend():
    with vitkern.use_backend("reference"):
        yield


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                is_norm = ("norm" in name or name.split(".")[-2].startswith("ln")) and name.endswith("weight")
                base = 1.0 if is_norm else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() == 3 else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)


def _images(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# torchvision
# ------------------------------------------------------------------------------------------------


def _torchvision_model(num_classes=7):
    tvm = pytest.importorskip("torchvision.models")
    m = tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=num_classes
    )
    _randomize(m)
    return m.eval()


def test_from_torchvision_logits_match():
    tv = _torchvision_model()
    ours = ViT.from_torchvision(tv).eval()
    assert ours.config["norm_eps"] == 1e-6 and ours.config["num_classes"] == 7
    x = _images(3)
    with torch.no_grad():
        want = tv(x)
        torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=1e-5)
        got = ours.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (got - want).abs().max() <= 0.08 * want.abs().max()


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------


def _hf_config(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128
    )
    cfg.update(kw)
    return transformers.ViTConfig(**cfg)


def _hf_classifier(**kw):
    from transformers import ViTForImageClassification

    m = ViTForImageClassification(_hf_config(num_labels=5, **kw))
    _randomize(m, seed=1)
    return m.eval()


@pytest.mark.parametrize(
    "act,expected", [("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh")]
)
def test_from_hf_classifier_logits_match(act, expected):
    hf = _hf_classifier(hidden_act=act)
    ours = ViT.from_hf(hf).eval()
    assert ours.config["act"] == expected and ours.config["norm_eps"] == 1e-12
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=ATOL, rtol=1e-5)


def test_from_hf_model_features_and_bf16():
    from transformers import ViTModel

    hf = ViTModel(_hf_config(qkv_bias=False, layer_norm_eps=1e-6), add_pooling_layer=True)
    _randomize(hf, seed=2)
    hf.eval()
    ours = ViT.from_hf(hf).eval()
    assert ours.num_classes == 0 and not ours.config["qkv_bias"]
    x = _images(2)
    with torch.no_grad():
        want = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours.forward_features(x), want, atol=ATOL, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours.forward_features(x).float()
    assert (got - want).abs().max() <= 0.08 * want.abs().max()


@pytest.mark.parametrize("size", [(48, 48), (32, 48), (16, 24)], ids=["48", "32x48", "down-16x24"])
def test_from_hf_dynamic_size_resamples_as_interpolate_pos_encoding(size):
    """Hugging Face resamples bicubic to the new grid size without antialias; the timm rule
    (antialiased bicubic, another kernel even when upsampling) once gave other logits."""
    hf = _hf_classifier()
    ours = ViT.from_hf(hf, dynamic_img_size=True).eval()
    assert ours.config["pos_embed_antialias"] is False
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf(pixel_values=x, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=1e-5)
        timm_rule = ViT.from_hf(hf, dynamic_img_size=True, pos_embed_antialias=True).eval()(x)
    assert (timm_rule - want).abs().max() > 10 * ATOL  # the rule matters at these sizes
    fixed = ViT.from_hf(hf)
    fixed.set_input_size(size)
    emb = hf.vit.embeddings
    with torch.no_grad():
        tokens = torch.zeros(1, 1 + (size[0] // 8) * (size[1] // 8), 64)
        torch.testing.assert_close(fixed.pos_embed, emb.interpolate_pos_encoding(tokens, *size), atol=1e-6, rtol=1e-6)


def _to_hf4_names(sd):
    """transformers 5.x ViT state_dict keys -> the 4.x names (encoder.layer.N.attention.attention.query ...)."""
    renames = [
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    out = {}
    for k, v in sd.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for a, b in renames:
            k = k.replace(a, b)
        out[k] = v
    return out


def test_from_hf_v4_state_dict_names():
    hf = _hf_classifier()
    old = _to_hf4_names(hf.state_dict())
    assert "vit.encoder.layer.1.attention.attention.query.weight" in old
    assert "vit.encoder.layer.0.intermediate.dense.weight" in old
    ours = ViT.from_hf(hf.config, state_dict=old).eval()
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, atol=ATOL, rtol=1e-5)
    assert set(convert_hf_state_dict(old)) == set(convert_hf_state_dict(hf.state_dict()))
    with pytest.raises(ValueError, match="unexpected"):
        convert_hf_state_dict({"vit.encoder.layer.0.attention.weird.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------


def test_from_timm_rejects_unsupported():
    m = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, global_pool="prr")
    with pytest.raises(ValueError, match="AttentionPoolPrr attention pooling"):
        ViT.from_timm(m)
    m = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, global_pool="map",
                                   class_token=False)
    m.attn_pool.pool = "avg"
    with pytest.raises(ValueError, match="pool_type 'avg'"):
        ViT.from_timm(m)
    m = timm_vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, act_layer="silu")
    with pytest.raises(ValueError):
        ViT.from_timm(m)


def test_from_timm_keeps_dtype_and_training_mode():
    m = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3
    ).to(torch.bfloat16)
    ours = ViT.from_timm(m)
    assert ours.training and ours.cls_token.dtype == torch.bfloat16
    assert ours.config["num_classes"] == 3


# ------------------------------------------------------------------------------------------------
# Original JAX .npz checkpoints
# ------------------------------------------------------------------------------------------------


def _write_jax_npz(path, model, prefix="", extra=None):
    """Write a timm ViT's weights in the google-research/vision_transformer .npz layout (plus the
    arrays of ``extra``, names relative to the prefix)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    d = dim // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = (
                qkv_w[j * dim : (j + 1) * dim].T.reshape(dim, heads, d)
            )
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * dim : (j + 1) * dim].reshape(heads, d)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, d, dim)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    w.update(extra or {})
    np.savez(path, **{prefix + k: np.ascontiguousarray(v) for k, v in w.items()})


def _timm(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    cfg.update(kw)
    return timm_vit.VisionTransformer(**cfg)


@pytest.mark.parametrize("prefix", ["", "opt/target/"])
def test_npz_agrees_with_timm_loader(tmp_path, prefix):
    src = _timm()
    _randomize(src, seed=3)
    path = tmp_path / "vit.npz"
    _write_jax_npz(path, src, prefix=prefix)

    ref = _timm().eval()
    timm_vit._load_weights(ref, str(path))
    x = _images(2)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(want, src.eval()(x), atol=ATOL, rtol=1e-5)  # the writer is right

        ours = ViT.from_npz(path, act="gelu").eval()  # timm runs these with the erf GELU
        torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=1e-5)

        into = ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
        assert into.load_npz(path) is into
        torch.testing.assert_close(into.eval()(x), want, atol=ATOL, rtol=1e-5)

    cfg = npz_config(path)
    assert cfg["act"] == "gelu_tanh"  # what the JAX checkpoints were trained with
    assert (cfg["img_size"], cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == (32, 8, 64, 2, 2)
    assert cfg["num_classes"] == 10 and cfg["mlp_ratio"] * 64 == pytest.approx(256, abs=1)


def test_npz_resampled_pos_embed_and_other_head(tmp_path):
    src = _timm()
    _randomize(src, seed=4)
    path = tmp_path / "vit.npz"
    _write_jax_npz(path, src)
    ref = _timm(img_size=48, num_classes=10).eval()
    timm_vit._load_weights(ref, str(path))  # 4x4 grid -> 6x6, bilinear
    ours = ViT.from_npz(path, act="gelu", img_size=48).eval()
    x = _images(2, size=48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=1e-5)
    other = ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=4)
    head = other.head.weight.clone()
    with pytest.warns(UserWarning, match="head"):
        other.load_npz(path)
    assert torch.equal(other.head.weight, head)


def test_npz_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ValueError, match="embedding/kernel"):
        ViT.from_npz(bad)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError):
        ViT.from_npz(pickled)  # object arrays need pickle, which is never allowed


# ------------------------------------------------------------------------------------------------
# safetensors and torch checkpoints
# ------------------------------------------------------------------------------------------------


def test_safetensors_round_trip_and_timm_compatibility(tmp_path):
    from safetensors.torch import load_file

    ours = ViT(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
        reg_tokens=2, init_values=0.1, norm_eps=1e-5,
    )
    _randomize(ours, seed=5)
    ours.eval()
    path = tmp_path / "vit.safetensors"
    ours.save_safetensors(path)
    back = ViT.load_safetensors(path).eval()
    assert back.config == ours.config
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)
    ref = _timm(reg_tokens=2, init_values=0.1, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)).eval()
    ref.load_state_dict(load_file(path))
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), atol=ATOL, rtol=1e-5)
    bf16 = ViT.load_safetensors(path, dtype=torch.bfloat16)
    assert bf16.pos_embed.dtype == torch.bfloat16


def test_torch_checkpoint_and_create_model(tmp_path):
    src = ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    _randomize(src, seed=6)
    pt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, pt)
    dst = ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    assert dst.load_checkpoint(pt) is dst
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    st = tmp_path / "w.safetensors"
    src.save_safetensors(st)
    made = create_model(
        "vit_tiny_patch16_224", checkpoint_path=st,
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10,
    )
    assert torch.equal(made.pos_embed, src.pos_embed)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": src.state_dict(), "obj": Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        dst.load_checkpoint(evil)  # weights_only=True refuses arbitrary objects


# ------------------------------------------------------------------------------------------------
# Hostile or broken checkpoints: clear errors naming the file, and a failed load changes nothing
# ------------------------------------------------------------------------------------------------


def _small_vit(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    cfg.update(kw)
    return ViT(**cfg)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_npz_failed_load_leaves_the_model_unchanged(tmp_path):
    """The depth check once ran after the embedding, class token, pos_embed, norm and head were
    copied: a failed load left the model half-loaded."""
    src = _timm(depth=3)
    _randomize(src, seed=7)
    path = tmp_path / "deep.npz"
    _write_jax_npz(path, src)
    dst = _small_vit()  # depth 2: the checkpoint's 3 blocks do not fit
    snap = _snapshot(dst)
    with pytest.raises(ValueError, match="3 blocks"):
        dst.load_npz(path)
    assert _unchanged(dst, snap)
    # a shape mismatch in the last block is found before anything is copied too
    src2 = _timm(mlp_ratio=2.0)
    _write_jax_npz(path, src2)
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        dst.load_npz(path)
    assert _unchanged(dst, snap)


@pytest.mark.parametrize("obj, match", [
    (torch.zeros(3), "does not hold a state_dict"),
    ([torch.zeros(3)], "does not hold a state_dict"),
    ({1: torch.zeros(3)}, "not strings"),
    ({"pos_embed": 3}, "not tensors"),
])
def test_load_checkpoint_rejects_non_state_dicts(tmp_path, obj, match):
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=match) as info:
        _small_vit().load_checkpoint(path)
    assert "ckpt.pth" in str(info.value)


def test_load_checkpoint_failure_leaves_the_model_unchanged(tmp_path):
    src = _small_vit()
    _randomize(src, seed=8)
    state = src.state_dict()
    state["head.weight"] = torch.zeros(3, 64)  # the wrong class count
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    dst = _small_vit()
    snap = _snapshot(dst)
    with pytest.raises(ValueError, match="head.weight"):
        dst.load_checkpoint(path)
    assert _unchanged(dst, snap)


def _write_safetensors(path, model, config_json):
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt"}
    if config_json is not None:
        meta["vitkern_config"] = config_json
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize("config_json, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"depth": 1000000000}', "depth must be an int"),
    ('{"embed_dim": -3}', "embed_dim must be an int"),
    ('{"img_size": [32, 32, 32]}', "img_size"),
    ('{"no_such_option": 1}', "does not take"),
    ('{"global_pool": "bogus"}', "does not build a ViT"),
])
def test_load_safetensors_bad_config(tmp_path, config_json, match):
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, _small_vit(), config_json)
    with pytest.raises(ValueError, match=match) as info:
        ViT.load_safetensors(path)
    assert "bad.safetensors" in str(info.value)


def test_load_safetensors_checks_config_against_tensors_before_allocating(tmp_path, monkeypatch):
    """A config that does not match the stored tensors fails on the meta device: no real model
    (and no tensor) is built."""
    import json

    from vitkern.models import convert

    path = tmp_path / "w.safetensors"
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    wrong = dict(cfg, depth=24, embed_dim=4096, num_heads=32)
    _write_safetensors(path, _small_vit(), json.dumps(wrong))
    built = []
    real_vit = convert.ViT

    def spy(*args, **kwargs):
        built.append(kwargs.get("device"))
        return real_vit(*args, **kwargs)

    monkeypatch.setattr(convert, "ViT", spy)
    with pytest.raises(ValueError, match="does not fit the model|shapes differ"):
        convert.load_safetensors(path)
    assert built == ["meta"]


@pytest.mark.parametrize("act", ["relu", "silu", "linear", None])
def test_from_hf_refuses_activations_the_epilogues_do_not_compute(act):
    with pytest.raises(ValueError, match=f"hidden_act {act!r} is not supported"):
        hf_config({"hidden_act": act, "hidden_size": 64, "num_attention_heads": 2})


# ------------------------------------------------------------------------------------------------
# Unmapped parameters raise, naming them; nothing loads partly
# ------------------------------------------------------------------------------------------------


def _write_big_vision_npz(path, model, prefix="params/img/", extra=None):
    """A timm ViT (no class token, avg pool) in the big_vision .npz layout under ``prefix``, next to
    arrays that are not the image tower's (a text tower and SigLIP's temperature and bias)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    d = dim // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_1/scale"], w[p + "LayerNorm_1/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            w[p + f"MultiHeadDotProductAttention_0/{n}/kernel"] = qkv_w[rows].T.reshape(dim, heads, d)
            w[p + f"MultiHeadDotProductAttention_0/{n}/bias"] = qkv_b[j * dim : (j + 1) * dim].reshape(heads, d)
        w[p + "MultiHeadDotProductAttention_0/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, d, dim)
        w[p + "MultiHeadDotProductAttention_0/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_0/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_0/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    w.update(extra or {})
    arrays = {prefix + k: np.ascontiguousarray(v) for k, v in w.items()}
    arrays["params/txt/Embed_0/embedding"] = np.zeros((11, dim), np.float32)
    arrays["params/t"] = np.zeros((1,), np.float32)
    arrays["params/b"] = np.zeros((1,), np.float32)
    np.savez(path, **arrays)


def _siglip_map_head(dim, heads, hidden):
    """The arrays of big_vision's MAPHead (a probe token, attention, LayerNorm and MLP)."""
    d = dim // heads
    g = np.random.default_rng(0)
    w = {"MAPHead_0/probe": g.standard_normal((1, 1, dim), np.float32)}
    mha = "MAPHead_0/MultiHeadDotProductAttention_0/"
    for n in ("query", "key", "value"):
        w[mha + f"{n}/kernel"] = g.standard_normal((dim, heads, d), np.float32)
        w[mha + f"{n}/bias"] = np.zeros((heads, d), np.float32)
    w[mha + "out/kernel"] = g.standard_normal((heads, d, dim), np.float32)
    w[mha + "out/bias"] = np.zeros((dim,), np.float32)
    w["MAPHead_0/LayerNorm_0/scale"] = np.ones((dim,), np.float32)
    w["MAPHead_0/LayerNorm_0/bias"] = np.zeros((dim,), np.float32)
    for r, shape in enumerate(((dim, hidden), (hidden, dim))):
        w[f"MAPHead_0/MlpBlock_0/Dense_{r}/kernel"] = g.standard_normal(shape, np.float32)
        w[f"MAPHead_0/MlpBlock_0/Dense_{r}/bias"] = np.zeros((shape[1],), np.float32)
    return w


def _timm_avg(**kw):
    return _timm(class_token=False, global_pool="avg", fc_norm=False, num_classes=12, **kw)


def test_big_vision_npz_without_map_head_agrees_with_timm(tmp_path):
    """The synthetic big_vision writer is right: timm's loader and ours agree on it, and the arrays
    outside the image tower's prefix (text tower, temperature) are not read."""
    src = _timm_avg()
    _randomize(src, seed=11)
    path = tmp_path / "img.npz"
    _write_big_vision_npz(path, src)
    ref = _timm_avg().eval()
    timm_vit._load_weights(ref, str(path), prefix="params/img/")
    ours = ViT.from_npz(path, act="gelu").eval()
    assert ours.global_pool == "avg" and ours.cls_token is None and ours.num_classes == 12
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), src.eval()(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=1e-5)


def test_siglip_npz_map_head_loads_as_timm_and_is_refused_by_a_model_without_one(tmp_path):
    """A SigLIP-style image tower (MAPHead_0 + head) once built an average-pool model and applied the
    projection head to the mean of the tokens, without a word: now the MAP head is inferred and
    loads as timm's loader loads it, and a model without one refuses it by name."""
    src = _timm_avg()
    _randomize(src, seed=3)
    path = tmp_path / "siglip.npz"
    _write_big_vision_npz(path, src, extra=_siglip_map_head(64, 2, 256))
    cfg = npz_config(path)
    assert cfg["global_pool"] == "map" and not cfg["class_token"]
    ours = ViT.from_npz(path, act="gelu").eval()
    ref = _timm(class_token=False, global_pool="map", fc_norm=False, num_classes=12).eval()
    timm_vit._load_weights(ref, str(path), prefix="params/img/")
    x = _images(2)
    with torch.no_grad():  # the head's unscaled random kernels give outputs of a few units: rtol 1e-4
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=1e-4)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    dst = ViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=12,
              class_token=False, global_pool="avg", fc_norm=False)
    snap = _snapshot(dst)
    with pytest.raises(ValueError, match="MAP"):
        dst.load_npz(path)
    assert _unchanged(dst, snap)


def test_npz_arrays_the_model_has_no_place_for_raise_by_name(tmp_path):
    src = _timm()
    _randomize(src, seed=12)
    path = tmp_path / "extra.npz"
    extra = {f"Transformer/encoderblock_{i}/Adapter_0/kernel": np.zeros((64, 8), np.float32) for i in range(2)}
    extra["Transformer/extra_norm/scale"] = np.ones((64,), np.float32)
    _write_jax_npz(path, src, extra=extra)
    dst = _small_vit()
    snap = _snapshot(dst)
    with pytest.raises(ValueError, match=r"3 array\(s\).*Adapter_0/kernel") as info:
        dst.load_npz(path)
    assert "Transformer/extra_norm/scale" in str(info.value)
    assert _unchanged(dst, snap)
    with pytest.raises(ValueError, match="Adapter_0"):
        ViT.from_npz(path)
    # arrays the model lacks the parameter for: an encoder norm into a model without a final norm
    _write_jax_npz(path, src)
    headless_norm = _small_vit(final_norm=False)
    with pytest.raises(ValueError, match="encoder_norm/scale"):
        headless_norm.load_npz(path)


def test_npz_representation_layer_needs_the_head_dropped(tmp_path):
    """pre_logits (dense + tanh before the head): loading the head without it is a wrong classifier;
    dropping the head drops it too."""
    src = _timm()
    _randomize(src, seed=13)
    path = tmp_path / "pre_logits.npz"
    pre = {"pre_logits/kernel": np.eye(64, dtype=np.float32), "pre_logits/bias": np.zeros(64, np.float32)}
    _write_jax_npz(path, src, extra=pre)
    with pytest.raises(ValueError, match="pre_logits"):
        ViT.from_npz(path)
    feats = ViT.from_npz(path, num_classes=0, act="gelu").eval()
    assert isinstance(feats.head, torch.nn.Identity)
    other = _small_vit(num_classes=4)
    with pytest.warns(UserWarning, match="pre_logits"):
        other.load_npz(path)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(feats.forward_features(x), src.eval().forward_features(x), atol=ATOL, rtol=1e-5)


def test_from_timm_extra_parameter_raises_by_name():
    m = _timm()
    m.register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match="extra_scale"):
        ViT.from_timm(m)
    m = _timm()
    m.blocks[1].attn.register_buffer("rel_bias", torch.zeros(2, 17, 17))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.rel_bias"):
        ViT.from_timm(m)


def test_from_torchvision_extra_parameter_raises_by_name():
    tv = _torchvision_model()
    tv.encoder.layers[1].register_parameter("gate", torch.nn.Parameter(torch.ones(64)))
    with pytest.raises(ValueError, match=r"encoder\.layers\.encoder_layer_1\.gate"):
        ViT.from_torchvision(tv)
    tv = _torchvision_model()
    tv.register_parameter("dist_token", torch.nn.Parameter(torch.zeros(1, 1, 64)))
    with pytest.raises(ValueError, match="dist_token"):
        ViT.from_torchvision(tv)


def test_from_hf_extra_parameter_raises_by_name():
    hf = _hf_classifier()
    hf.vit.embeddings.register_parameter("distillation_token", torch.nn.Parameter(torch.zeros(1, 1, 64)))
    with pytest.raises(ValueError, match=r"vit\.embeddings\.distillation_token"):
        ViT.from_hf(hf)
    hf = _hf_classifier()
    hf.vit.layers[0].register_parameter("lambda1", torch.nn.Parameter(torch.ones(64)))
    with pytest.raises(ValueError, match="lambda1"):
        ViT.from_hf(hf)


# ------------------------------------------------------------------------------------------------
# timm classes other than VisionTransformer: refused by name
# ------------------------------------------------------------------------------------------------


def _naflexvit():
    naflexvit = pytest.importorskip("timm.models.naflexvit")
    cfg = naflexvit.NaFlexVitCfg(embed_dim=64, depth=1, num_heads=2, patch_size=16, global_pool="avg")
    return naflexvit.NaFlexVit(cfg, img_size=32)


_TIMM_OTHER = {
    "Beit": ("timm.models.beit", dict(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2)),
    "VisionTransformerRelPos": (
        "timm.models.vision_transformer_relpos", dict(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2)
    ),
}


@pytest.mark.parametrize("name", list(_TIMM_OTHER))
def test_from_timm_refuses_other_architectures_by_class(name):
    module, kw = _TIMM_OTHER[name]
    cls = getattr(pytest.importorskip(module), name, None)
    if cls is None:
        pytest.skip(f"no {name} in this timm")
    m = cls(**kw)
    with pytest.raises(ValueError, match=rf"\.{name} is not supported: only timm"):
        ViT.from_timm(m)


def test_from_timm_points_naflexvit_to_its_converter():
    with pytest.raises(ValueError, match=r"NaFlex ViT: convert it with vitkern.NaFlexViT.from_timm"):
        ViT.from_timm(_naflexvit())


def test_from_timm_points_eva_to_its_converter():
    eva = pytest.importorskip("timm.models.eva")
    m = eva.Eva(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"Eva\.from_timm"):
        ViT.from_timm(m)


def test_from_timm_refuses_distillation_tokens_outside_the_distilled_deit():
    m = timm_vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2)
    m.head_dist = torch.nn.Linear(64, 1000)
    with pytest.raises(ValueError, match=r"VisionTransformer has a distillation token or head but is not"):
        ViT.from_timm(m)


def test_from_timm_subclasses_convert_unless_they_override_the_forward():
    class Plain(timm_vit.VisionTransformer):
        def describe(self):
            return "a method off the forward path"

    class Custom(timm_vit.VisionTransformer):
        def forward_head(self, x, pre_logits=False):
            return super().forward_head(x, pre_logits) * 2

    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=3)
    plain = Plain(**kw).eval()
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(ViT.from_timm(plain).eval()(x), plain(x), atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="Custom overrides VisionTransformer's forward_head"):
        ViT.from_timm(Custom(**kw))


# ------------------------------------------------------------------------------------------------
# from_timm keeps pretrained_cfg
# ------------------------------------------------------------------------------------------------


def test_from_timm_keeps_pretrained_cfg_for_the_data_config():
    timm = pytest.importorskip("timm")
    from timm.data import resolve_model_data_config

    overlay = dict(input_size=(3, 48, 48), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bilinear",
                   crop_pct=0.75)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=8, embed_dim=64,
                          depth=1, num_heads=2, num_classes=3, pretrained_cfg_overlay=overlay)
    ours = ViT.from_timm(m)
    want = resolve_model_data_config(m)
    assert want["input_size"] == (3, 48, 48) and want["mean"] == (0.1, 0.2, 0.3)
    assert resolve_model_data_config(ours) == want
    assert ours.default_cfg is ours.pretrained_cfg and ours.pretrained_cfg == m.pretrained_cfg
    ours.pretrained_cfg["mean"] = (0.0, 0.0, 0.0)
    assert m.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)  # a copy, not the source's dict
    bare = ViT.from_timm(_timm())  # built from the class: no pretrained_cfg to keep
    assert not hasattr(bare, "pretrained_cfg")


# ------------------------------------------------------------------------------------------------
# load_checkpoint / create_model(checkpoint_path=) into another class count or image size
# ------------------------------------------------------------------------------------------------


def _save(tmp_path, model, fmt):
    path = tmp_path / f"src.{fmt}"
    if fmt == "safetensors":
        model.save_safetensors(path)
    else:
        torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_into_another_class_count_and_image_size_loads_as_timm(tmp_path, fmt):
    """The head of another class count is dropped (the model's kept as initialised) and pos_embed
    resampled, as timm adapts pretrained weights (checkpoint_filter_fn, classifier removed); this
    once failed with a shape mismatch even with strict=False."""
    src = _small_vit(reg_tokens=1)  # 4x4 grid, 2 prefix rows, 10 classes
    _randomize(src, seed=14)
    path = _save(tmp_path, src, fmt)
    dst = _small_vit(reg_tokens=1, img_size=48, num_classes=4)
    head = {k: v.clone() for k, v in dst.head.state_dict().items()}
    with pytest.warns(UserWarning, match="10 classes, the model 4"):
        assert dst.load_checkpoint(path) is dst  # strict=True

    ref = _timm(reg_tokens=1, img_size=48, num_classes=4)
    want = timm_vit.checkpoint_filter_fn(dict(src.state_dict()), ref)
    want.pop("head.weight")
    want.pop("head.bias")
    ref.load_state_dict(want, strict=False)
    got, ref_sd = dst.state_dict(), ref.state_dict()
    assert got["pos_embed"].shape == (1, 38, 64)
    for k, v in want.items():
        torch.testing.assert_close(got[k], ref_sd[k], atol=1e-6, rtol=1e-6, msg=k)
    assert all(torch.equal(dst.head.state_dict()[k], v) for k, v in head.items())
    assert dst.head.weight.std() > 0  # initialised, not left empty

    made_kw = dict(img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=4, reg_tokens=1)
    with pytest.warns(UserWarning, match="head is left as initialised"):
        made = create_model("vit_tiny_patch16_224", checkpoint_path=path, **made_kw)
    assert torch.equal(made.pos_embed, dst.pos_embed)
    if fmt == "safetensors":
        with pytest.warns(UserWarning, match="head is left as initialised"):
            built = ViT.load_safetensors(path, img_size=48, num_classes=4)
        assert torch.equal(built.pos_embed, dst.pos_embed) and built.head.weight.std() > 0

    # one training step of the adapted model
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    x, y = _images(2, size=48), torch.tensor([1, 3])
    before = {k: v.clone() for k, v in dst.named_parameters()}
    loss = torch.nn.functional.cross_entropy(dst.train()(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, before[k]) for k, p in dst.named_parameters() if p.grad is not None)
    assert dst.head.weight.grad is not None and dst.pos_embed.grad is not None


def test_checkpoint_into_a_headless_model_and_the_stored_grid(tmp_path):
    src = _small_vit(img_size=(32, 48))  # a 4x6 grid: the stored config says so
    _randomize(src, seed=15)
    path = _save(tmp_path, src, "safetensors")
    dst = _small_vit(img_size=48, num_classes=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # num_classes=0 drops the head without a warning
        dst.load_checkpoint(path)
    from vitkern.ops.patch_embed import resample_pos_embed

    want = resample_pos_embed(src.pos_embed.detach(), new_size=(6, 6), old_size=(4, 6), num_prefix_tokens=1,
                              antialias=True)
    torch.testing.assert_close(dst.pos_embed.detach(), want, atol=0, rtol=0)
    # without a stored config a non-square grid is not guessed
    pt = _save(tmp_path, src, "pth")
    with pytest.raises(ValueError, match="no square grid"):
        _small_vit(img_size=48).load_checkpoint(pt)


def test_checkpoint_adaptation_is_only_the_head_and_the_grid(tmp_path):
    src = _small_vit()
    path = _save(tmp_path, src, "pth")
    dst = _small_vit(patch_size=16, num_classes=4)  # another patch size: not adapted
    snap = _snapshot(dst)
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        dst.load_checkpoint(path)
    assert _unchanged(dst, snap)
    wide = _small_vit(depth=3)
    with pytest.raises(ValueError, match=r"missing \['blocks\.2\."):
        wide.load_checkpoint(path)


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="map", class_token=False, act="gelu_tanh"),
                                dict(num_classes=0, qkv_bias=False, global_pool="avg", class_token=False,
                                     fc_norm=False)],
                         ids=["vit", "siglip-map", "no-head-no-qkv-bias"])
def test_save_npz_round_trip_and_timm_reads_it(tmp_path, kw):
    """ViT.save_npz writes the JAX layout load_npz reads back exactly, and that timm's npz loader
    reads into the same model (the original layout for a ViT, big_vision's with a MAP head)."""
    cfg = dict(dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5), **kw)
    src = ViT(**cfg).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "vit.npz"
    src.save_npz(path)
    back = ViT(**cfg).load_npz(path)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    if cfg.get("qkv_bias", True):  # timm's loader always reads q / k / v biases
        timm_vit = pytest.importorskip("timm.models.vision_transformer")
        ref = timm_vit.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=cfg["num_classes"],
            global_pool=cfg.get("global_pool", "token"), class_token=cfg.get("class_token", True),
            act_layer="gelu_tanh" if cfg.get("act") == "gelu_tanh" else None).eval()
        timm_vit._load_weights(ref, str(path))
        x = torch.randn(2, 3, 32, 32)
        with vitkern.use_backend("reference"), torch.no_grad():
            torch.testing.assert_close(src(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(reg_tokens=1), "register tokens"), (dict(init_values=0.1), "LayerScale"), (dict(qk_norm=True), "QK-norm"),
    (dict(pre_norm=True), "pre-norm"),
])
def test_save_npz_refuses_what_the_layout_cannot_hold(tmp_path, kw, match):
    model = ViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, **kw)
    with pytest.raises(ValueError, match=match):
        model.save_npz(tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
