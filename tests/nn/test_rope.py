"""Rope2D's tables and the q / k prologue reference against timm's RoPE modules and EvaAttention's
q / k path (same frequencies, same random inputs)."""

import copy

import pytest
import torch
from torch import nn

from vitkern.nn.rope import Rope2D
from vitkern.testing.numerics import assert_flash_rule
from vitkern.ops.qk_prologue import QKNorm, RopeTables, apply_qk_prologue_ref

pos = pytest.importorskip("timm.layers.pos_embed_sincos")


def _timm_tables(module, *args, **kwargs):
    return RopeTables.from_cat(module.get_embed(*args, **kwargs))


AXIAL = [
    dict(),                                             # EVA-02: inverse frequencies, index grid
    dict(grid_offset=1.0),
    dict(ref_grid_size=(16, 16)),                       # EVA's fine-tuning rescale
    dict(grid_indexing="xy"),
    dict(layout="half"),
    dict(in_pixels=True),                               # pixel bands on a [-1, 1] grid
    dict(in_pixels=True, linear_bands=True, max_res=128),
    dict(temperature=100.0),
]


@pytest.mark.parametrize("cfg", AXIAL, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "eva")
@pytest.mark.parametrize("grid", [(14, 14), (6, 9)])
def test_axial_tables_match_timm(cfg, grid):
    ref = pos.RotaryEmbeddingCat(
        dim=32, temperature=cfg.get("temperature", 10000.0), in_pixels=cfg.get("in_pixels", False),
        linear_bands=cfg.get("linear_bands", False), max_res=cfg.get("max_res", 224), feat_shape=list(grid),
        ref_feat_shape=list(cfg["ref_grid_size"]) if "ref_grid_size" in cfg else None,
        grid_offset=cfg.get("grid_offset", 0.0), grid_indexing=cfg.get("grid_indexing", "ij"),
        rotate_half=cfg.get("layout") == "half")
    ours = Rope2D(32, kind="axial", grid_size=grid, **cfg).tables()
    theirs = _timm_tables(ref)
    torch.testing.assert_close(ours.sin, theirs.sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.cos, theirs.cos, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(), dict(normalize_coords="max"), dict(normalize_coords="min"),
                                 dict(min_period=0.5, max_period=50.0), dict(layout="interleaved"),
                                 dict(grid_offset=0.25), dict(grid_indexing="xy")],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_dinov3_tables_match_timm(cfg):
    grid = (7, 5)
    ref = pos.RotaryEmbeddingDinoV3(
        dim=32, temperature=100.0 if "min_period" not in cfg else None, min_period=cfg.get("min_period"),
        max_period=cfg.get("max_period"), feat_shape=list(grid),
        normalize_coords=cfg.get("normalize_coords", "separate"), grid_offset=cfg.get("grid_offset", 0.0),
        grid_indexing=cfg.get("grid_indexing", "ij"), rotate_half=cfg.get("layout", "half") == "half")
    ours = Rope2D(32, kind="dinov3", grid_size=grid, **cfg).tables()
    theirs = _timm_tables(ref)
    torch.testing.assert_close(ours.sin, theirs.sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.cos, theirs.cos, rtol=0, atol=1e-6)


def test_mixed_tables_match_timm_per_layer_and_head():
    torch.manual_seed(0)
    ref = pos.RotaryEmbeddingMixed(dim=4 * 16, depth=3, num_heads=4, feat_shape=[5, 6])
    ours = Rope2D(16, kind="mixed", grid_size=(5, 6), depth=3, num_heads=4)
    assert ours.freqs.shape == ref.freqs.shape
    with torch.no_grad():
        ours.freqs.copy_(ref.freqs)
    embed = ref.get_embed()  # (depth, heads, N, 2 D)
    for layer in range(3):
        t = ours.tables(layer=layer)
        theirs = RopeTables.from_cat(embed[layer])
        assert t.sin.shape == (4, 30, 16)
        torch.testing.assert_close(t.sin, theirs.sin, rtol=0, atol=1e-6)
        torch.testing.assert_close(t.cos, theirs.cos, rtol=0, atol=1e-6)
    # the frequencies are a parameter: gradients reach them through the tables
    t = ours.tables(layer=1)
    (t.sin.sum() + t.cos.sum()).backward()
    assert ours.freqs.grad is not None and ours.freqs.grad[:, 1].abs().sum() > 0
    assert ours.freqs.grad[:, 0].abs().sum() == 0


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("norm_kind", [None, "layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prologue_matches_timm_eva_q_path(layout, prefix, norm_kind, dtype):
    """EvaAttention: q = q_norm(q); q = cat(q[:npt], apply_rot_embed_cat(q[npt:], rope)).type_as(v)."""
    torch.manual_seed(1)
    B, H, D, grid = 2, 3, 32, (4, 5)
    T = prefix + grid[0] * grid[1]
    x = torch.randn(B, H, T, D, dtype=dtype)
    rope_mod = pos.RotaryEmbeddingCat(dim=D, in_pixels=False, feat_shape=list(grid), rotate_half=layout == "half")
    emb = rope_mod.get_embed()
    if norm_kind == "layer":
        module = nn.LayerNorm(D, eps=1e-6)
    elif norm_kind == "rms":
        module = nn.RMSNorm(D, eps=1e-6)
    else:
        module = nn.Identity()
    if norm_kind is not None:
        with torch.no_grad():
            module.weight.normal_()
            if getattr(module, "bias", None) is not None:
                module.bias.normal_()
    expected = module.float()(x.float())
    expected = torch.cat([expected[:, :, :prefix],
                          pos.apply_rot_embed_cat(expected[:, :, prefix:], emb, half=layout == "half")], dim=2)
    got = apply_qk_prologue_ref(x, QKNorm.from_module(module), RopeTables.from_cat(emb, layout), prefix)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected.to(dtype), **({} if dtype == torch.float32 else dict(rtol=0, atol=0)))


def test_prologue_reference_gradients_reach_norm_and_tables():
    torch.manual_seed(2)
    x = torch.randn(1, 2, 7, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    sin = torch.randn(6, 8, requires_grad=True)
    cos = torch.randn(6, 8, requires_grad=True)
    y = apply_qk_prologue_ref(x, QKNorm("layer", w, b), RopeTables(sin, cos), num_prefix_tokens=1)
    y.square().sum().backward()
    for t in (x, w, b, sin, cos):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_qknorm_from_timm_modules():
    layers = pytest.importorskip("timm.layers")
    n = QKNorm.from_module(layers.LayerNorm(16, eps=1e-5))
    assert n.kind == "layer" and n.eps == 1e-5 and n.bias is not None
    n = QKNorm.from_module(layers.RmsNorm(16))
    assert n.kind == "rms" and n.bias is None
    assert QKNorm.from_module(nn.Identity()) is None and QKNorm.from_module(None) is None
    with pytest.raises(ValueError, match="BatchNorm1d"):
        QKNorm.from_module(nn.BatchNorm1d(16))
    with pytest.raises(ValueError, match="normalises over"):
        QKNorm.from_module(nn.LayerNorm((4, 16)))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="kind"):
        QKNorm("batch")
    with pytest.raises(ValueError, match="eps"):
        QKNorm("rms", eps=0.0)
    with pytest.raises(ValueError, match="no bias"):
        QKNorm("rms", bias=torch.zeros(4))
    with pytest.raises(ValueError, match="layout"):
        RopeTables(torch.zeros(3, 4), torch.zeros(3, 4), layout="split")
    with pytest.raises(ValueError, match="differ in shape"):
        RopeTables(torch.zeros(3, 4), torch.zeros(3, 6))
    t = RopeTables(torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="head dim is 8"):
        t.check(heads=2, tokens=3, head_dim=8, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="5 tokens"):
        t.check(heads=2, tokens=5, head_dim=4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="q_norm.weight has 8 elements; the head dim is 4"):
        QKNorm("layer", torch.ones(8)).check(4, torch.device("cpu"), "q_norm")
    with pytest.raises(ValueError, match="multiple of 4"):
        Rope2D(30)
    with pytest.raises(ValueError, match="depth and num_heads"):
        Rope2D(16, kind="mixed")
    with pytest.raises(ValueError, match="layer"):
        Rope2D(16, kind="mixed", depth=2, num_heads=2, grid_size=3).tables()
    with pytest.raises(ValueError, match="grid_size"):
        Rope2D(16).tables()
    with pytest.raises(ValueError, match="ref_grid_size"):
        Rope2D(16, kind="dinov3", ref_grid_size=4)


eva = pytest.importorskip("timm.models.eva")


def _eva_attention_vitkern(attn, x, rope_tables):
    """EvaAttention's forward with vitkern's attention op and its fused-prologue arguments."""
    import vitkern

    B, N, C = x.shape
    qkv = attn.qkv(x) if attn.q_bias is None else torch.nn.functional.linear(
        x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    qkv = qkv.view(B, N, 3, attn.num_heads, -1)
    out = vitkern.attention_qkvpacked(qkv, q_norm=QKNorm.from_module(attn.q_norm),
                                      k_norm=QKNorm.from_module(attn.k_norm), rope=rope_tables,
                                      num_prefix_tokens=attn.num_prefix_tokens)
    return attn.proj(attn.norm(out.reshape(B, N, C)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rotate_half", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_with_prologue_matches_timm_eva_attention(backend, rotate_half, qk_norm):
    import vitkern

    if backend == "triton" and not vitkern.ops.attention.op.TRITON_DTYPES:
        pytest.skip("no triton")
    torch.manual_seed(3)
    dim, heads, grid, prefix = 64, 4, (3, 5), 1
    attn = eva.EvaAttention(dim, num_heads=heads, num_prefix_tokens=prefix, qk_norm=qk_norm,
                            norm_layer=nn.LayerNorm, scale_norm=False, rotate_half=rotate_half).eval()
    if qk_norm:
        with torch.no_grad():
            for m in (attn.q_norm, attn.k_norm):
                m.weight.normal_()
                m.bias.normal_()
    rope = pos.RotaryEmbeddingCat(dim=dim // heads, in_pixels=False, feat_shape=list(grid), rotate_half=rotate_half)
    emb = rope.get_embed()
    x = torch.randn(2, prefix + grid[0] * grid[1], dim, requires_grad=True)
    expected = attn(x, rope=emb)
    g = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, *attn.parameters()], g)
    with vitkern.use_backend(backend):
        got = _eva_attention_vitkern(attn, x, RopeTables.from_cat(emb, "half" if rotate_half else "interleaved"))
    got_grads = torch.autograd.grad(got, [x, *attn.parameters()], g)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_prologue_argument_errors():
    import vitkern

    q = torch.randn(1, 2, 5, 8)
    t = RopeTables(torch.zeros(4, 8), torch.ones(4, 8))
    with pytest.raises(TypeError, match="q_norm must be a vitkern.QKNorm"):
        vitkern.attention(q, q, q, q_norm=nn.LayerNorm(8))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        vitkern.attention(q, q, q, rope=t, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="4 rows; the inputs have 5 tokens"):
        vitkern.attention(q, q, q, rope=t)
    with pytest.raises(ValueError, match="self-attention"):
        vitkern.attention(q, torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), rope=t, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="exceeds"):
        vitkern.attention(q, q, q, num_prefix_tokens=6)
    # rope with identity tables (sin 0, cos 1) is the plain attention
    out = vitkern.attention(q, q, q, rope=t, num_prefix_tokens=1)
    torch.testing.assert_close(out, vitkern.attention(q, q, q))
    # a Rope2D is taken for its own grid
    r = vitkern.Rope2D(8, grid_size=(2, 2))
    torch.testing.assert_close(vitkern.attention(q, q, q, rope=r, num_prefix_tokens=1),
                               vitkern.attention(q, q, q, rope=r.tables(), num_prefix_tokens=1))
    with pytest.raises(ValueError, match="tables per block"):
        vitkern.attention(q, q, q, rope=vitkern.Rope2D(8, kind="mixed", depth=1, num_heads=2, grid_size=2),
                          num_prefix_tokens=1)


def test_attention_prologue_compiles_fullgraph():
    import vitkern

    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    norm = QKNorm("rms", torch.randn(16))
    tables = vitkern.Rope2D(16, grid_size=(2, 2)).tables()

    def f(q, k, v):
        return vitkern.attention(q, k, v, q_norm=norm, k_norm=norm, rope=tables, num_prefix_tokens=1)

    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v), f(q, k, v))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_nn_attention_with_rope_matches_timm_attention_rope(qk_norm, masked):
    """vitkern.nn.Attention(num_prefix_tokens=...)(x, rope=...) against timm's AttentionRope (same
    state_dict keys), through the packed prologue path and the masked SDPA path."""
    import vitkern
    from timm.layers.attention import AttentionRope

    torch.manual_seed(5)
    dim, heads, grid, prefix = 64, 4, (3, 4), 1
    ref = AttentionRope(dim, num_heads=heads, qkv_bias=True, num_prefix_tokens=prefix, qk_norm=qk_norm,
                        norm_layer=nn.LayerNorm).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = vitkern.nn.Attention(dim, num_heads=heads, qkv_bias=True, qk_norm=qk_norm, num_prefix_tokens=prefix,
                                norm_layer=nn.LayerNorm).eval()
    ours.load_state_dict(ref.state_dict())
    rope = vitkern.Rope2D(dim // heads, grid_size=grid)
    emb = torch.cat([rope.tables().sin, rope.tables().cos], dim=-1)
    x = torch.randn(2, prefix + grid[0] * grid[1], dim)
    mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril() if masked else None
    out, out_timm = ours(x, mask, rope=rope), ref(x, rope=emb, attn_mask=mask)
    # against timm in float64, within twice timm's own float32 error (outputs reach ~20 here: a
    # fixed 1e-5 is a few ulps, below what summation order alone moves)
    out64 = copy.deepcopy(ref).double()(x.double(), rope=emb.double(), attn_mask=mask)
    assert_flash_rule("out", out, out64, out_timm, torch.float32, scale=out64.abs().max().item())
