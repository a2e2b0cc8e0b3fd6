"""vitkern.models.vit.ViT against timm's VisionTransformer with the same config and weights.

CPU, reference backend, tiny configs (32 px images, patch 8, depth 2).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.models import ViT, create_model, list_models, model_config

timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm = pytest.importorskip("timm")

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _reference_backend():
    with vitkern.use_backend("reference"):
        yield


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (norm scales, biases, tokens, LayerScale), unit-scale activations."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            else:
                fan_in = p[0].numel() if p.shape[0] > 1 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)


def _pair(**kw):
    """(timm model, our model) with identical random weights, in eval mode."""
    cfg = dict(TINY, **kw)
    ref = timm_vit.VisionTransformer(**cfg)
    _randomize(ref)
    ours = ViT(**cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def _images(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "token": dict(),
    "avg": dict(global_pool="avg"),
    "avgmax-no-class-token": dict(global_pool="avgmax", class_token=False),
    "registers-no-embed-class": dict(reg_tokens=3, no_embed_class=True),
    "registers-embed-class": dict(reg_tokens=2),
    "layerscale": dict(init_values=0.1),
    "head-dim-80": dict(embed_dim=160, num_heads=2),
    "qk-norm": dict(qk_norm=True),
    "pre-norm-no-qkv-bias": dict(pre_norm=True, qkv_bias=False),
    "max-fc-norm-off": dict(global_pool="max", fc_norm=False),
    "gelu-tanh-mlp-ratio-3": dict(act_layer="gelu_tanh", mlp_ratio=3.0),
    "no-pool-all-tokens": dict(global_pool=""),
    "final-norm-off-avg": dict(final_norm=False, global_pool="avg"),
    "no-pos-embed-no-class-token": dict(pos_embed="none", class_token=False, global_pool="avg"),
    "avg-with-prefix-tokens": dict(global_pool="avg", reg_tokens=2, pool_include_prefix=True),
    "scale-norms-no-proj-bias": dict(scale_attn_norm=True, scale_mlp_norm=True, proj_bias=False),
    "no-head": dict(num_classes=0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_timm_fp32(name):
    kw = dict(CONFIGS[name])
    ours_kw = dict(kw)
    if "act_layer" in kw:
        ours_kw["act"] = ours_kw.pop("act_layer")
    cfg = dict(TINY, **kw)
    ref = timm_vit.VisionTransformer(**cfg)
    _randomize(ref)
    ours = ViT(**dict(TINY, **ours_kw))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ref.eval(), ours.eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=1e-5)
        feats = ours.forward_features(x)
        torch.testing.assert_close(
            ours.forward_head(feats, pre_logits=True), ref.forward_head(feats, pre_logits=True), atol=ATOL, rtol=1e-5
        )
    assert ours.num_features == ref.num_features and ours.num_prefix_tokens == ref.num_prefix_tokens


def test_from_timm_infers_config():
    ref, _ = _pair(global_pool="avg", reg_tokens=1, init_values=0.2, qk_norm=True, no_embed_class=True)
    ours = ViT.from_timm(ref).eval()
    assert ours.config["reg_tokens"] == 1 and ours.config["qk_norm"] and ours.config["init_values"] == 0.2
    assert ours.config["norm_eps"] == 1e-6 and ours.config["act"] == "gelu"
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=1e-5)


def test_bf16_weights_and_autocast_loose():
    ref, ours = _pair(init_values=0.5)
    x = _images(4)
    with torch.no_grad():
        want = ref(x)
        scale = want.abs().max()
        ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
        got = ours_bf16(x.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16
        assert (got.float() - want).abs().max() <= 0.08 * scale
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_ac = ours(x)
            want_ac = ref(x)
        assert got_ac.dtype == want_ac.dtype == torch.bfloat16
        assert (got_ac.float() - want_ac.float()).abs().max() <= 0.05 * scale
        assert (got_ac.float() - want).abs().max() <= 0.08 * scale
        # the residual stream stays float32 under autocast, as in timm
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours.forward_features(x).dtype == ref.forward_features(x).dtype == torch.float32


def test_fp16_weights_autocast_and_training_loose():
    ref, ours = _pair(init_values=0.5)
    x, y = _images(2), torch.tensor([1, 2])
    with torch.no_grad():
        want = ref(x)
        scale = want.abs().max()
        got = copy.deepcopy(ours).half()(x.half())
        assert got.dtype == torch.float16
        assert (got.float() - want).abs().max() <= 0.02 * scale
        with torch.autocast("cpu", dtype=torch.float16):
            got_ac, want_ac = ours(x), ref(x)
        assert got_ac.dtype == want_ac.dtype == torch.float16
        assert (got_ac.float() - want_ac.float()).abs().max() <= 0.01 * scale
        assert (got_ac.float() - want).abs().max() <= 0.02 * scale
    # a training step in fp16 weights: finite gradients close to fp32's
    F.cross_entropy(ours(x), y).backward()
    half = copy.deepcopy(ours).half()
    half.zero_grad()
    F.cross_entropy(half(x.half()).float(), y).backward()
    for (n, p32), p16 in zip(ours.named_parameters(), half.parameters()):
        assert p16.grad is not None and p16.grad.dtype == torch.float16, n
        assert torch.isfinite(p16.grad).all(), n
        assert (p16.grad.float() - p32.grad).abs().max() <= 0.05 * p32.grad.abs().max() + 1e-3, n


def test_dynamic_img_size_non_native_input():
    ref, ours = _pair(dynamic_img_size=True, reg_tokens=1)
    with torch.no_grad():
        for h, w in ((48, 40), (16, 24), (32, 32)):
            x = torch.randn(2, 3, h, w)
            torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=1e-5)
    ref2, ours2 = _pair(dynamic_img_size=True, no_embed_class=True, global_pool="avg")
    with torch.no_grad():
        x = torch.randn(1, 3, 56, 24)
        torch.testing.assert_close(ours2(x), ref2(x), atol=ATOL, rtol=1e-5)
    ref3, ours3 = _pair(dynamic_img_size=True, dynamic_img_pad=True)
    with torch.no_grad():
        x = torch.randn(2, 3, 30, 37)  # padded up to whole patches
        torch.testing.assert_close(ours3(x), ref3(x), atol=ATOL, rtol=1e-5)
    static = ViT(**TINY)
    with pytest.raises(ValueError, match="img_size"):
        static(torch.randn(1, 3, 48, 48))


def test_set_input_size_resamples_like_timm():
    ref, ours = _pair(reg_tokens=1)
    ref.set_input_size(img_size=48)
    ours.set_input_size(48)
    assert ours.pos_embed.shape == ref.pos_embed.shape and ours.config["img_size"] == [48, 48]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=1e-5)


def test_training_decreases_loss_and_grads_match_timm():
    ref, ours = _pair(init_values=0.3, qk_norm=True)
    ref.train(), ours.train()
    x, y = _images(4), torch.tensor([1, 3, 5, 7])
    F.cross_entropy(ref(x), y).backward()
    F.cross_entropy(ours(x), y).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in ours.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, ref_grads[n], atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")

    opt = torch.optim.AdamW(ours.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(ours(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_drop_path_training_matches_timm_per_sample():
    ref, ours = _pair(drop_path_rate=0.5, init_values=0.5, depth=3)
    ref.train(), ours.train()
    x = _images(8)
    torch.manual_seed(11)
    a = ours(x)
    torch.manual_seed(11)
    b = ref(x)  # same Bernoulli draws, same order: per sample, per branch
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    a.sum().backward()
    # linear drop-path schedule as timm: 0 for the first block
    rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in ours.blocks]
    assert rates == pytest.approx([0.0, 0.25, 0.5])
    # stochastic in training, deterministic in eval
    torch.manual_seed(12)
    assert not torch.allclose(ours(x), a)
    ours.eval()
    torch.testing.assert_close(ours(x), ours(x))


def test_grad_checkpointing_same_grads():
    _, ours = _pair(init_values=0.2)
    ours.train()
    x, y = _images(2), torch.tensor([0, 1])
    F.cross_entropy(ours(x), y).backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.set_grad_checkpointing(True)
    F.cross_entropy(ours(x), y).backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    _, ours = _pair(reg_tokens=1, init_values=0.1)
    x = _images(2)
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ours(x), atol=1e-5, rtol=1e-5)


def test_reset_classifier_and_head_api():
    _, ours = _pair()
    ours.reset_classifier(5)
    assert ours.head.out_features == 5 and ours(_images(1)).shape == (1, 5)
    ours.reset_classifier(0, global_pool="avg")
    assert isinstance(ours.head, torch.nn.Identity)
    assert ours(_images(1)).shape == (1, 64)
    assert ours.get_classifier() is ours.head
    assert ours.no_weight_decay() == {"pos_embed", "cls_token", "reg_token", "dist_token"}  # timm's
    with pytest.raises(ValueError, match="global_pool"):
        ours.reset_classifier(3, global_pool="map")


def test_constructor_errors_and_init():
    with pytest.raises(ValueError, match="global_pool"):
        ViT(**dict(TINY, global_pool="prr"))
    with pytest.raises(ValueError, match="distilled"):
        ViT(**dict(TINY, distilled=True, class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="mlp_layer"):
        ViT(**dict(TINY, mlp_layer="glu"))
    with pytest.raises(ValueError, match="class_token"):
        ViT(**dict(TINY, class_token=False))
    with pytest.raises(ValueError, match="act"):
        ViT(**dict(TINY, act="relu"))
    m = ViT(**TINY)
    assert m.cls_token.abs().max() < 1e-4  # timm's init: N(0, 1e-6) tokens
    assert m.blocks[0].attn.qkv.bias.abs().max() == 0
    assert 0.01 < m.blocks[0].mlp.fc1.weight.std() < 0.03
    jax = ViT(**TINY, weight_init="jax")
    assert jax.head.weight.abs().max() == 0


def test_factories_match_timm_shapes():
    assert [n for n in list_models() if vitkern.models.model_class(n) is ViT] == sorted(
        [
            "vit_tiny_patch16_224",
            "vit_small_patch16_224",
            "vit_base_patch16_224",
            "vit_base_patch32_224",
            "vit_large_patch16_224",
            "vit_huge_patch14_224",
            "vit_base_patch16_384",
            "vit_base_patch16_siglip_224",
            "vit_base_patch16_siglip_256",
            "vit_large_patch16_siglip_256",
            "vit_so400m_patch14_siglip_224",
            "vit_so400m_patch14_siglip_384",
            "vit_base_patch32_clip_quickgelu_224",
            "vit_base_patch16_clip_quickgelu_224",
            "vit_large_patch14_clip_quickgelu_224",
            "vit_large_patch14_clip_quickgelu_336",
            "deit_tiny_distilled_patch16_224",
            "deit_small_distilled_patch16_224",
            "deit_base_distilled_patch16_224",
            "deit_base_distilled_patch16_384",
            "vit_small_patch14_dinov2",
            "vit_base_patch14_dinov2",
            "vit_large_patch14_dinov2",
            "vit_giant_patch14_dinov2",
            "vit_small_patch14_reg4_dinov2",
            "vit_base_patch14_reg4_dinov2",
            "vit_giant_patch14_reg4_dinov2",
        ]
    )
    for name in list_models():
        ours = create_model(name, device="meta")
        ref = timm.create_model(name, pretrained=False, device="meta")
        ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
        assert list(ours_sd) == list(ref_sd), name
        assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd), name
    huge = model_config("vit_huge_patch14_224")
    assert huge["embed_dim"] // huge["num_heads"] == 80
    so400m = create_model("vit_so400m_patch14_siglip_224", device="meta")
    assert so400m.attn_pool.head_dim == 72 and so400m.blocks[0].mlp.fc1.out_features == 4304
    assert vitkern.models.vit_tiny_patch16_224(num_classes=3, device="meta").head.out_features == 3
    for name in list_models():  # every registered factory is exported, under its name, with a docstring
        factory = getattr(vitkern.models, name)
        assert factory is getattr(vitkern, name) and factory.__name__ == name and factory.__doc__, name
        assert name in vitkern.__all__ and name in vitkern.models.__all__ and name in dir(vitkern), name
    with pytest.raises(ValueError, match="download"):
        create_model("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vit_gigantic")


def test_kernel_path_matches_timm(device):
    """The default backend on the test device: the Triton kernels where they exist (on the CPU
    through the interpreter; ops without one take the reference), forward and backward."""
    ref, ours = _pair(init_values=0.3, reg_tokens=1)
    ref, ours = ref.to(device).train(), ours.to(device).train()
    x, y = _images(2).to(device), torch.tensor([3, 8], device=device)
    with vitkern.use_backend("auto"):
        got = ours(x)
        F.cross_entropy(got, y).backward()
    want = ref(x)
    F.cross_entropy(want, y).backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ref_grads = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n].grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
def test_compile_fullgraph_training_matches_eager():
    torch._dynamo.reset()
    _, ours = _pair(init_values=0.2, drop_path_rate=0.0)
    ours.train()
    x, y = _images(2), torch.tensor([0, 1])
    F.cross_entropy(ours(x), y).backward()
    eager = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    F.cross_entropy(torch.compile(ours, fullgraph=True)(x), y).backward()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(device):
    """The inference forward (bf16 weights, default backend) captured in a CUDA graph and replayed
    on new images gives the eager result."""
    _, ours = _pair(init_values=0.1, reg_tokens=1, embed_dim=160)
    ours = ours.to(device=device, dtype=torch.bfloat16)
    static_x = _images(4).to(device=device, dtype=torch.bfloat16)
    with vitkern.use_backend("auto"), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, autotune) outside the capture
            for _ in range(3):
                ours(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = ours(static_x)
        new_x = _images(4, seed=7).to(device=device, dtype=torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        want = ours(new_x)
    torch.testing.assert_close(static_y, want, atol=1e-2, rtol=1e-2)
    assert not torch.equal(static_y, ours(_images(4).to(device=device, dtype=torch.bfloat16)))


@pytest.mark.gpu
def test_gpu_compile_fullgraph_autocast(device):
    """torch.compile(fullgraph=True) over the kernel ops (custom ops, autocast applied inside the
    public functions): no graph break, the eager results, inference and a training backward."""
    torch._dynamo.reset()
    _, ours = _pair(init_values=0.1, embed_dim=160)
    ours = ours.to(device)
    x, y = _images(4).to(device), torch.tensor([0, 1, 2, 3], device=device)
    compiled = torch.compile(ours, fullgraph=True)
    with vitkern.use_backend("auto"), torch.autocast(device.type, dtype=torch.bfloat16):
        with torch.no_grad():
            want, got = ours(x).float(), compiled(x).float()
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
        ours.train()
        F.cross_entropy(ours(x).float(), y).backward()
        eager = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        F.cross_entropy(compiled(x).float(), y).backward()
    for n, p in ours.named_parameters():
        assert (p.grad - eager[n]).abs().max() <= 0.05 * eager[n].abs().max() + 1e-4, n


@pytest.mark.gpu
def test_gpu_auto_backend_matches_timm(device):
    ref, ours = _pair(init_values=0.1, embed_dim=160)
    ref, ours = ref.to(device), ours.to(device)
    x = _images(4).to(device)
    with vitkern.use_backend("auto"), torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-3, rtol=1e-3)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got, want = ours(x).float(), ref(x).float()
        assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", [
    dict(init_values=0.3, reg_tokens=1, drop_path_rate=0.5),                  # packed qkv, LayerScale, drop path
    dict(qk_norm=True, embed_dim=160, reg_tokens=2, no_embed_class=True),     # head dim 80, q/k norms
], ids=["layerscale-droppath", "qknorm-hd80-registers"])
def test_torch_backend_matches_reference(dtype, config):
    """The model on the "torch" backend (torch's SDPA, F.linear, F.layer_norm, conv2d, in the
    model's dtype) against the "reference" backend: logits and every parameter gradient, within
    the whole-op tolerance of vitkern.testing.numerics at the result's magnitude."""
    from vitkern.testing.numerics import RELATIVE_TOLERANCE

    _, ours = _pair(**config)
    ours = ours.to(dtype).train()
    x, y = _images(2).to(dtype), torch.tensor([3, 8])
    results = {}
    for backend in ("torch", "reference"):
        ours.zero_grad()
        torch.manual_seed(5)  # the same drop-path draws on both backends
        with vitkern.use_backend(backend):
            logits = ours(x)
            F.cross_entropy(logits.float(), y).backward()
        results[backend] = logits.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}
    (got, got_grads), (want, want_grads) = results["torch"], results["reference"]
    assert got.dtype == want.dtype == dtype
    tol = RELATIVE_TOLERANCE[dtype]

    def close(name, a, b, floor=0.0):
        err, scale = (a.double() - b.double()).abs().max().item(), max(b.double().abs().max().item(), floor)
        assert torch.isfinite(a).all() and err <= tol * scale, f"{name}: error {err:.3g}, magnitude {scale:.3g}"

    close("logits", got, want)
    # a gradient that is 0 in exact arithmetic (the k-norm bias: softmax ignores a per-row shift)
    # carries rounding noise only: the floor is a twentieth of the largest gradient's magnitude
    floor = 0.05 * max(g.abs().max().item() for g in want_grads.values())
    for name, g in want_grads.items():
        close(name, got_grads[name], g, floor)


def _layer_decay_groups(model, optimizer=None):
    """{parameter name: (layer lr scale, weight decay)} as timm's layer-wise lr decay groups it."""
    from timm.optim import param_groups_layer_decay

    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer.param_groups if optimizer is not None else param_groups_layer_decay(
        model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65
    )
    return {names[id(p)]: (round(g["lr_scale"], 12), g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("config", [
    dict(),
    dict(reg_tokens=2, pre_norm=True, init_values=0.1, qk_norm=True),
    dict(class_token=False, global_pool="avg", depth=3),
], ids=["token", "reg-prenorm-ls-qknorm", "avg-fc_norm"])
def test_group_matcher_layer_decay_groups_as_timm(config):
    timm_optim = pytest.importorskip("timm.optim")
    ref, ours = _pair(**config)
    assert ours.group_matcher() == ref.group_matcher() and ours.group_matcher(coarse=True) == ref.group_matcher(True)
    want = _layer_decay_groups(ref)
    assert len({scale for scale, _ in want.values()}) == len(ours.blocks) + 2  # stem, each block, the end
    assert _layer_decay_groups(ours) == want
    opt_ref = timm_optim.create_optimizer_v2(ref, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    opt = timm_optim.create_optimizer_v2(ours, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    assert _layer_decay_groups(ours, opt) == _layer_decay_groups(ref, opt_ref)


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg", fc_norm=True), dict(init_values=0.1)],
                         ids=["final-norm", "fc-norm", "layerscale"])
def test_deferred_residuals_match_the_plain_blocks(kw):
    """forward_features runs the blocks with their residual adds deferred into the next norm; a
    forward hook on a block (it must see the block's output, not an (x, pending) pair) or
    gradient checkpointing takes the plain blocks: the same outputs and gradients."""
    torch.manual_seed(0)
    model = ViT(**dict(TINY, **kw))
    images = torch.randn(2, 3, TINY["img_size"], TINY["img_size"])
    assert model._defer_residuals()
    deferred = model(images)
    g = torch.randn_like(deferred)
    deferred.backward(g)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(out))
    assert not model._defer_residuals()
    plain = model(images)
    handle.remove()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].shape[-1] == TINY["embed_dim"]
    torch.testing.assert_close(deferred, plain, atol=1e-5, rtol=1e-5)
    plain.backward(g)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    with vitkern.use_backend("cuda"):  # its epilogues scale a branch only with a residual
        assert not model._defer_residuals()
    inputs = []  # a pre-hook must see the whole stream, not its part without the pending branch
    handle = model.blocks[1].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    assert not model._defer_residuals()
    torch.testing.assert_close(model(images), plain, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert len(inputs) == 1 and model._defer_residuals()
    model.set_grad_checkpointing(True)
    assert not model._defer_residuals()
    with torch.no_grad():
        assert model._defer_residuals()  # checkpointing only applies with autograd on
