"""vitkern.nn modules against their torch / timm counterparts: state_dict keys, forward, backward.

CPU, reference backend (the kernels have their own tests under tests/ops).
"""

import functools
import warnings

import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

import vitkern
from vitkern.nn import Attention, Block, DropPath, LayerNorm, LayerScale, Linear, Mlp, PatchEmbed, resolve_activation

timm_layers = pytest.importorskip("timm.layers")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

ATOL = 1e-5
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _reference_backend():
    with vitkern.use_backend("reference"):
        yield


def _copy(dst: tnn.Module, src: tnn.Module) -> None:
    """Same keys (checked) and src's weights, randomised so that no parameter is trivially 0 or 1.

    (Conv weights (D, C, P, P): p[0].numel() = C * P * P is the fan-in.)
    """
    assert list(dst.state_dict()) == list(src.state_dict())
    with torch.no_grad():
        for p in src.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.3)  # norm scales/shifts, biases, LayerScale gammas
            else:
                p.normal_(0.0, p[0].numel() ** -0.5)  # unit-variance outputs
    dst.load_state_dict(src.state_dict())


def _check_fwd_bwd(ours: tnn.Module, ref: tnn.Module, *inputs, atol=ATOL, rtol=RTOL, call=None):
    call = call or (lambda m, *xs: m(*xs))
    xs_a = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    xs_b = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out_a, out_b = call(ours, *xs_a), call(ref, *xs_b)
    assert out_a.shape == out_b.shape and out_a.dtype == out_b.dtype
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    g = torch.randn_like(out_b)
    out_a.backward(g)
    out_b.backward(g)
    for xa, xb in zip(xs_a, xs_b):
        if xa.grad is not None or xb.grad is not None:
            torch.testing.assert_close(xa.grad, xb.grad, atol=atol, rtol=rtol)
    params_b = dict(ref.named_parameters())
    for name, pa in ours.named_parameters():
        pb = params_b[name]
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(eps=1e-6), dict(bias=False), dict(elementwise_affine=False)],
    ids=["default", "eps1e-6", "no-bias", "no-affine"],
)
def test_layer_norm_matches_torch(kwargs):
    ours, ref = LayerNorm(48, **kwargs), tnn.LayerNorm(48, **kwargs)
    assert isinstance(ours, tnn.LayerNorm)
    assert ours.eps == ref.eps
    if kwargs.get("bias") is False:
        assert ours.bias is None and "bias" not in ours.state_dict()
    _copy(ours, ref)
    _check_fwd_bwd(ours, ref, torch.randn(2, 5, 48))


def test_layer_norm_multi_dim_shape_and_forward_add():
    ours, ref = LayerNorm((4, 6)), tnn.LayerNorm((4, 6))
    _copy(ours, ref)
    _check_fwd_bwd(ours, ref, torch.randn(3, 4, 6))
    x, r = torch.randn(2, 7, 4, 6), torch.randn(2, 7, 4, 6)
    y, s = ours.forward_add(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, ref(x + r), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="normalized_shape"):
        ours(torch.randn(2, 6, 4))


def test_layer_norm_factory_kwargs_and_reset():
    m = LayerNorm(8, device="cpu", dtype=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16
    with torch.no_grad():
        m.weight.fill_(3.0)
    m.reset_parameters()
    assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# ------------------------------------------------------------------------------------------------
# Linear
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias):
    ours, ref = Linear(24, 40, bias=bias), tnn.Linear(24, 40, bias=bias)
    assert isinstance(ours, tnn.Linear)
    if not bias:
        assert ours.bias is None and list(ours.state_dict()) == ["weight"]
    _copy(ours, ref)
    _check_fwd_bwd(ours, ref, torch.randn(2, 3, 24))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", tnn.GELU(approximate="tanh")])
def test_linear_activation_and_residual_epilogue(act):
    ours = Linear(16, 32, activation=act)
    ref = tnn.Linear(16, 32)
    _copy(ours, ref)
    approx = "none" if act == "gelu" else "tanh"
    assert ours.activation == ("gelu" if approx == "none" else "gelu_tanh")
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x), F.gelu(ref(x), approximate=approx), atol=ATOL, rtol=RTOL)
    r, gamma, rows = torch.randn(2, 5, 32), torch.randn(32), torch.tensor([0.0, 2.0]).repeat_interleave(5)
    want = r + rows[:, None].reshape(2, 5, 1) * gamma * F.gelu(ref(x), approximate=approx)
    torch.testing.assert_close(ours(x, residual=r, residual_scale=gamma, row_scale=rows), want, atol=ATOL, rtol=RTOL)
    assert "activation=" in repr(ours)


def test_resolve_activation():
    assert resolve_activation(None) is None
    assert resolve_activation(tnn.GELU) == "gelu"
    assert resolve_activation(tnn.GELU()) == "gelu"
    assert resolve_activation(functools.partial(tnn.GELU, approximate="tanh")) == "gelu_tanh"
    assert resolve_activation("gelu_new") == "gelu_tanh"
    assert resolve_activation("gelu_pytorch_tanh") == "gelu_tanh"
    assert resolve_activation(timm_layers.activations.GELUTanh) == "gelu_tanh"
    assert resolve_activation(F.gelu) == "gelu"
    with pytest.raises(ValueError, match="relu|activation"):
        resolve_activation("relu")
    with pytest.raises(ValueError):
        resolve_activation(tnn.ReLU)


# ------------------------------------------------------------------------------------------------
# Mlp
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours_act,timm_act,extra",
    [
        (tnn.GELU, tnn.GELU, dict()),
        ("gelu_tanh", functools.partial(tnn.GELU, approximate="tanh"), dict()),
        (tnn.GELU(approximate="tanh"), timm_layers.activations.GELUTanh, dict(bias=(True, False))),
        (tnn.GELU, tnn.GELU, dict(out_features=24, hidden_features=50)),
    ],
    ids=["gelu", "gelu_tanh-name", "gelu_tanh-instance-bias-pair", "out-features"],
)
def test_mlp_matches_timm(ours_act, timm_act, extra):
    ours = Mlp(32, hidden_features=extra.pop("hidden_features", 64), act_layer=ours_act, **extra)
    ref = timm_layers.Mlp(32, hidden_features=ours.fc1.out_features, act_layer=timm_act, **extra)
    _copy(ours, ref)
    _check_fwd_bwd(ours, ref, torch.randn(2, 7, 32))


def test_mlp_residual_epilogue_and_hidden_norm():
    ours = Mlp(32, 64, norm_layer=functools.partial(LayerNorm, eps=1e-6))
    ref = timm_layers.Mlp(32, 64, norm_layer=timm_layers.LayerNorm)
    _copy(ours, ref)
    assert "norm.weight" in ours.state_dict()
    x, r, gamma = torch.randn(2, 7, 32), torch.randn(2, 7, 32), torch.randn(32)
    _check_fwd_bwd(
        ours,
        ref,
        x,
        r,
        call=lambda m, x, r: m(x, residual=r, residual_scale=gamma) if isinstance(m, Mlp) else r + gamma * m(x),
    )


def test_mlp_dropout_training_matches_timm():
    ours, ref = Mlp(16, 32, drop=0.3), timm_layers.Mlp(16, 32, drop=0.3)
    _copy(ours, ref)
    ours.train(), ref.train()
    x = torch.randn(4, 5, 16)
    torch.manual_seed(1)
    a = ours(x)
    torch.manual_seed(1)
    b = ref(x)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim,heads,kwargs",
    [
        (64, 2, dict(qkv_bias=True)),
        (64, 4, dict(qkv_bias=False)),
        (160, 2, dict(qkv_bias=True)),  # head dim 80
        (64, 2, dict(qkv_bias=True, qk_norm=True)),
        (64, 2, dict(qk_norm=True, scale_norm=True, proj_bias=False)),
    ],
    ids=["bias", "no-bias-4-heads", "head-dim-80", "qk-norm", "qk-and-scale-norm-no-proj-bias"],
)
def test_attention_matches_timm(dim, heads, kwargs):
    ours = Attention(dim, num_heads=heads, **kwargs)
    ref = timm_layers.Attention(dim, num_heads=heads, norm_layer=timm_layers.LayerNorm, **kwargs)
    _copy(ours, ref)
    if kwargs.get("qk_norm"):
        assert {"q_norm.weight", "k_norm.weight"} <= set(ours.state_dict())
    _check_fwd_bwd(ours, ref, torch.randn(2, 13, dim))


def test_attention_causal_mask_and_residual():
    ours, ref = Attention(64, num_heads=2, qkv_bias=True), timm_layers.Attention(64, num_heads=2, qkv_bias=True)
    _copy(ours, ref)
    x = torch.randn(2, 9, 64)
    torch.testing.assert_close(ours(x, is_causal=True), ref(x, is_causal=True), atol=ATOL, rtol=RTOL)
    # key-padding mask (bool, True = attend), broadcast over heads and queries
    keep = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    keep[1, ..., 6:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x, attn_mask=keep), ref(x, attn_mask=keep), atol=ATOL, rtol=RTOL)
    r, gamma = torch.randn(2, 9, 64), torch.randn(64)
    rows = torch.tensor([2.0, 0.0]).repeat_interleave(9)
    want = r + rows.reshape(2, 9, 1) * gamma * ref(x)
    got = ours(x, residual=r, residual_scale=gamma, row_scale=rows)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[1], r[1])


def test_attention_dropout_training_uses_reference_path():
    ours = Attention(32, num_heads=2, attn_drop=0.25, proj_drop=0.1)
    ref = timm_layers.Attention(32, num_heads=2, attn_drop=0.25, proj_drop=0.1)
    _copy(ours, ref)
    ours.train(), ref.train()
    x = torch.randn(2, 6, 32)
    import vitkern.nn.attention as attn_mod

    attn_mod._warned_attn_drop = False
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="attn_drop"):
        a = ours(x)
    torch.manual_seed(3)
    b = ref(x)  # timm: F.scaled_dot_product_attention(dropout_p=...) then proj dropout
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ours(x)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match="shape"):
        Attention(32, num_heads=2)(torch.randn(4, 32))


# ------------------------------------------------------------------------------------------------
# PatchEmbed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_patch_embed_matches_timm(bias):
    ours = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=48, bias=bias)
    ref = timm_layers.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=48, bias=bias)
    _copy(ours, ref)
    assert isinstance(ours.proj, tnn.Conv2d)
    assert (ours.num_patches, ours.grid_size) == (ref.num_patches, ref.grid_size)
    _check_fwd_bwd(ours, ref, torch.randn(2, 3, 32, 32))


def test_patch_embed_tokens_and_sizes():
    ours = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    ref = timm_layers.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    _copy(ours, ref)
    x = torch.randn(2, 3, 32, 32)
    pos, cls = torch.randn(1, 17, 16), torch.randn(1, 1, 16)
    want = torch.cat([cls.expand(2, -1, -1), ref(x)], dim=1) + pos
    torch.testing.assert_close(ours(x, pos_embed=pos, prefix_tokens=cls), want, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="img_size"):
        ours(torch.randn(1, 3, 40, 32))
    loose = PatchEmbed(img_size=32, patch_size=8, embed_dim=16, strict_img_size=False)
    assert loose(torch.randn(1, 3, 40, 24)).shape == (1, 15, 16)
    with pytest.raises(ValueError, match="divisible"):
        loose(torch.randn(1, 3, 30, 24))
    padded = PatchEmbed(img_size=32, patch_size=8, embed_dim=16, strict_img_size=False, dynamic_img_pad=True)
    padded_ref = timm_layers.PatchEmbed(
        img_size=32, patch_size=8, embed_dim=16, strict_img_size=False, dynamic_img_pad=True
    )
    _copy(padded, padded_ref)
    y = torch.randn(2, 3, 30, 21)
    torch.testing.assert_close(padded(y), padded_ref(y), atol=ATOL, rtol=RTOL)
    assert padded.dynamic_feat_size((30, 21)) == (4, 3)


# ------------------------------------------------------------------------------------------------
# Block, LayerScale, DropPath
# ------------------------------------------------------------------------------------------------


def _timm_block(dim, heads, **kw):
    return timm_vit.Block(dim, heads, qkv_bias=True, **kw)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(init_values=0.1), dict(qk_norm=True, init_values=1e-5), dict(mlp_ratio=2.5)],
    ids=["plain", "layerscale", "qk-norm-layerscale", "mlp-ratio-2.5"],
)
def test_block_matches_timm(kwargs):
    ours = Block(64, 2, qkv_bias=True, **kwargs)
    ref = _timm_block(64, 2, **kwargs)
    _copy(ours, ref)
    if kwargs.get("init_values"):
        assert {"ls1.gamma", "ls2.gamma"} <= set(ours.state_dict())
    _check_fwd_bwd(ours, ref, torch.randn(2, 11, 64))


def test_block_drop_path_training_matches_timm():
    ours = Block(32, 2, qkv_bias=True, init_values=0.5, drop_path=0.5)
    ref = _timm_block(32, 2, init_values=0.5, drop_path=0.5)
    _copy(ours, ref)
    ours.train(), ref.train()
    x = torch.randn(8, 5, 32)
    # Same RNG stream: one (B,) Bernoulli draw per branch, in the same order as timm's DropPath.
    torch.manual_seed(7)
    a = ours(x)
    torch.manual_seed(7)
    b = ref(x)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=ATOL, rtol=RTOL)


def _deferred(blk, *, chained=True):
    """A Block run through forward_deferred as a module: the stream entering with (or without) a
    pending branch, the output materialised (the pending branch added)."""

    class Deferred(tnn.Module):
        def __init__(self):
            super().__init__()
            self.blk = blk

        def forward(self, x):
            if chained:  # half of the stream arrives as a pending branch, as from a previous block
                x, pending = 0.5 * x, (0.5 * x).to(x.dtype)
            else:
                pending = None
            s, b = self.blk.forward_deferred(x, pending)
            return s + b

    return Deferred()


@pytest.mark.parametrize("chained", [False, True])
@pytest.mark.parametrize("kwargs", [dict(), dict(init_values=0.1)], ids=["plain", "layerscale"])
def test_block_deferred_residual_matches_timm(kwargs, chained):
    """forward_deferred's adds in the norms (add_layer_norm) give timm's block, forward and every
    gradient, with a pending branch from a previous block or without one."""
    ours = Block(64, 2, qkv_bias=True, **kwargs)
    ref = _timm_block(64, 2, **kwargs)
    _copy(ours, ref)
    plain = tnn.Module()
    plain.blk = ref  # the same parameter names as the deferred wrapper's
    _check_fwd_bwd(_deferred(ours, chained=chained), plain, torch.randn(2, 11, 64),
                   call=lambda m, x: m(x) if m is not plain else m.blk(x))


def test_block_deferred_drop_path_and_16bit_branch_gradients():
    """Drop path draws the same masks as forward (and timm); under autocast the pending branch is
    bf16 and its gradient comes back in bf16 from add_layer_norm's pass, the stream's in fp32."""
    ours = Block(32, 2, qkv_bias=True, init_values=0.5, drop_path=0.5).train()
    x = torch.randn(8, 5, 32)
    torch.manual_seed(7)
    a = ours(x)
    torch.manual_seed(7)
    s, b = ours.forward_deferred(x)
    torch.testing.assert_close(s + b, a, atol=ATOL, rtol=RTOL)
    ours.eval()
    seen = {}
    xs = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, b = ours.forward_deferred(xs)
        assert s.dtype == torch.float32 and b.dtype == torch.bfloat16
        def record(name):
            def hook(g):
                seen[name] = g.dtype
            return hook

        b.register_hook(record("pending"))
        s2, b2 = ours.forward_deferred(s, b)  # the next block adds b in its norm1
        s.register_hook(record("stream"))
        with vitkern.use_backend("reference"):
            ref2 = ours(ours(x))
    (s2 + b2).float().sum().backward()
    assert seen == {"pending": torch.bfloat16, "stream": torch.float32}
    torch.testing.assert_close((s2 + b2).float(), ref2.float(), atol=0.05, rtol=0.02)


def test_drop_path_row_scale_is_per_sample():
    dp = DropPath(0.25).train()
    x = torch.randn(64, 7, 4)
    torch.manual_seed(5)
    rows = dp.row_scale(x)
    assert rows.shape == (64 * 7,)
    per_sample = rows.reshape(64, 7)
    assert torch.all(per_sample == per_sample[:, :1])  # constant over a sample's tokens
    values = set(per_sample[:, 0].tolist())
    assert values == {0.0, torch.tensor(1.0 / 0.75).item()}
    torch.manual_seed(5)
    y = dp(x)  # the same draw as row_scale's
    kept = per_sample[:, 0] > 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert torch.all(y[~kept] == 0)
    assert dp.eval().row_scale(x) is None and dp(x) is x
    # A block whose whole branch is dropped returns its input.
    blk = Block(16, 2, drop_path=1.0).train()
    z = torch.randn(3, 4, 16)
    torch.testing.assert_close(blk(z), z)


def test_layer_scale_module():
    ls = LayerScale(8, init_values=0.3)
    assert list(ls.state_dict()) == ["gamma"] and torch.all(ls.gamma == 0.3)
    x = torch.randn(2, 8)
    torch.testing.assert_close(ls(x), x * 0.3)


# ------------------------------------------------------------------------------------------------
# SwiGLU MLPs (timm's GluMlp / SwiGLUPacked and SwiGLU) on the fused SwiGLU GEMMs
# ------------------------------------------------------------------------------------------------


def _swiglu_pair(kind: str, dtype, k=72, hidden=100):
    from vitkern.models.eva import SwiGLU
    from vitkern.nn import SwiGLUPacked

    if kind == "packed":
        ours, ref = SwiGLUPacked(k, 2 * hidden), timm_layers.SwiGLUPacked(k, 2 * hidden)
    elif kind == "packed-norm":
        ours = SwiGLUPacked(k, 2 * hidden, norm_layer=functools.partial(LayerNorm, eps=1e-6))
        ref = timm_layers.SwiGLUPacked(k, 2 * hidden, norm_layer=timm_layers.LayerNorm)
    elif kind == "separate":
        ours, ref = SwiGLU(k, hidden), timm_layers.SwiGLU(k, hidden)
    else:  # timm's sub-LN SwiGLU (EVA-02's scale_mlp)
        ours = SwiGLU(k, hidden, norm_layer=functools.partial(tnn.LayerNorm, eps=1e-6))
        ref = timm_layers.SwiGLU(k, hidden, norm_layer=functools.partial(tnn.LayerNorm, eps=1e-6))
    _copy(ours, ref)
    return ours.to(dtype), ref.to(dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["packed", "packed-norm", "separate", "separate-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_swiglu_modules_match_timm(backend, kind, dtype):
    """vitkern's SwiGLUPacked / eva.SwiGLU against timm's modules with the same random weights
    (timm's keys): 197 tokens, K = 72, a hidden width of 100 (not a multiple of any tile),
    forward and every gradient. fp32: close to timm's; 16-bit: the numerics rule against timm's
    module in float64 (error <= 2x timm's own 16-bit error + atol)."""
    import copy

    from vitkern.testing.numerics import assert_2x_torch

    ours, ref = _swiglu_pair(kind, dtype)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 197, 72).to(dtype)
    if dtype == torch.float32:
        with vitkern.use_backend(backend):
            _check_fwd_bwd(ours, ref, x, atol=1e-4, rtol=1e-4)
        return
    ref64 = copy.deepcopy(ref).double()
    runs = []
    for m, xin in ((ours, x), (ref, x), (ref64, x.double())):
        xin = xin.clone().requires_grad_(True)
        with vitkern.use_backend(backend):
            y = m(xin)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
        y.backward(g)
        runs.append({"y": y.detach(), "x": xin.grad, **{n: p.grad for n, p in m.named_parameters()}})
    for name in runs[0]:
        assert_2x_torch(f"{kind}:{name}", runs[0][name], runs[2][name], runs[1][name], dtype)


@pytest.mark.parametrize("kind", ["packed", "separate"])
def test_swiglu_modules_residual_epilogue(kind):
    ours, ref = _swiglu_pair(kind, torch.float32, k=48, hidden=40)
    x, r, gamma = torch.randn(2, 7, 48), torch.randn(2, 7, 48), torch.randn(48)
    rs = (torch.rand(14) < 0.6).float() / 0.6
    with vitkern.use_backend("triton"):
        _check_fwd_bwd(ours, ref, x, r, call=lambda m, x, r: m(x, residual=r, residual_scale=gamma, row_scale=rs)
                       if m is ours else r + rs.view(2, 7, 1) * gamma * m(x))


def test_swiglu_packed_dropout_training_matches_timm():
    from vitkern.nn import SwiGLUPacked

    ours, ref = SwiGLUPacked(16, 32, drop=0.3).train(), timm_layers.SwiGLUPacked(16, 32, drop=0.3).train()
    _copy(ours, ref)
    x = torch.randn(3, 5, 16)
    torch.manual_seed(7)
    a = ours(x)
    torch.manual_seed(7)
    torch.testing.assert_close(a, ref(x))
