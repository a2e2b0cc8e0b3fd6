"""The public API of every op on the "reference" backend.

Forward results against torch's and timm's own modules, gradients (fp64 gradcheck of the ``_ref``
functions, fp32 grads against the torch modules), the autocast dtype rules, channels_last images,
argument errors, the backend selection rules, the drop-in SDPA's routing, and one torch.compile.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed
from timm.layers.attention import Attention

import vitkern
from vitkern import _backend
from vitkern.ops.attention import attention_qkvpacked_ref, attention_ref, sdpa as attention_sdpa
from vitkern.ops.layer_norm import add_layer_norm_ref, layer_norm_ref
from vitkern.ops.linear import linear_ref
from vitkern.ops.mlp import mlp_ref
from vitkern.ops.patch_embed import patch_embed_ref
from vitkern.testing.numerics import assert_close_same_dtype


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@pytest.fixture(autouse=True)
def _reference_backend():
    # conftest restores the previous backend after each test
    vitkern.use_backend("reference")


def _rand(*shape, dtype=F32, device="cpu", scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=F32, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


# ============================================================================================
# layer_norm / add_layer_norm
# ============================================================================================


@pytest.mark.parametrize(
    "dtype,shape,affine",
    [(F32, (2, 197, 192), True), (F16, (50, 384), True), (BF16, (3, 1, 1000), False), (F32, (1, 1000), False)],
)
def test_layer_norm_matches_torch(device, dtype, shape, affine):
    n = shape[-1]
    x = _rand(*shape, dtype=dtype, device=device, scale=3.0) + 1.0
    w = _rand(n, dtype=dtype, device=device) if affine else None
    b = _rand(n, dtype=dtype, device=device) if affine else None
    assert_close_same_dtype(vitkern.layer_norm(x, w, b, eps=1e-6), F.layer_norm(x, (n,), w, b, 1e-6))
    xt = x.transpose(0, -2) if x.dim() > 2 else x[:, ::1]  # strided input
    assert_close_same_dtype(vitkern.layer_norm(xt, w, b), F.layer_norm(xt, (n,), w, b))


@pytest.mark.parametrize("x_dtype,res_dtype", [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F32)])
def test_add_layer_norm_matches_torch(device, x_dtype, res_dtype):
    x = _rand(2, 50, 384, dtype=x_dtype, device=device)
    r = _rand(2, 50, 384, dtype=res_dtype, device=device)
    w = _rand(384, dtype=x_dtype, device=device)
    b = _rand(384, dtype=x_dtype, device=device)
    y, s = vitkern.add_layer_norm(x, r, w, b, eps=1e-6)
    s_exp = x + r
    assert_close_same_dtype(s, s_exp)
    assert_close_same_dtype(y, F.layer_norm(s_exp, (384,), w.to(s_exp.dtype), b.to(s_exp.dtype), 1e-6))
    assert s.data_ptr() not in (x.data_ptr(), r.data_ptr())


def test_layer_norm_grads(device):
    gc = functools.partial(torch.autograd.gradcheck, eps=1e-6, atol=1e-5, fast_mode=True)
    x = _rand(3, 5, 8, dtype=F64, device=device, requires_grad=True)
    r = _rand(3, 5, 8, dtype=F64, device=device, requires_grad=True)
    w = _rand(8, dtype=F64, device=device, requires_grad=True)
    b = _rand(8, dtype=F64, device=device, requires_grad=True)
    assert gc(lambda *a: layer_norm_ref(*a, eps=1e-5), (x, w, b))
    assert gc(lambda *a: add_layer_norm_ref(*a, eps=1e-5), (x, r, w, b))
    # fp32 grads of the public functions against torch's
    args = [_rand(2, 197, 192, device=device, requires_grad=True) for _ in range(2)]
    wb = [_rand(192, device=device, requires_grad=True) for _ in range(2)]
    g = _rand(2, 197, 192, device=device)
    y, s = vitkern.add_layer_norm(args[0], args[1], *wb)
    got = torch.autograd.grad((y * g).sum() + (s * g).sum(), args + wb)
    s_t = args[0] + args[1]
    want = torch.autograd.grad((F.layer_norm(s_t, (192,), *wb) * g).sum() + (s_t * g).sum(), args + wb)
    for a, e in zip(got, want):
        assert_close_same_dtype(a, e, atol=1e-4, rtol=1e-4)


def test_layer_norm_autocast(device):
    x = _rand(2, 50, 192, device=device)
    w, b = _rand(192, device=device), _rand(192, device=device)
    with torch.autocast(device.type, dtype=BF16):
        y = vitkern.layer_norm(x.to(BF16), w, b)
        y2, s2 = vitkern.add_layer_norm(x.to(BF16), x, w, b)
    assert y.dtype == F32 and y2.dtype == F32 and s2.dtype == F32
    assert_close_same_dtype(y, F.layer_norm(x.to(BF16).float(), (192,), w, b))
    assert_close_same_dtype(s2, x.to(BF16).float() + x)
    assert_close_same_dtype(y2, F.layer_norm(x.to(BF16).float() + x, (192,), w, b))


def test_layer_norm_errors(device):
    x = _rand(4, 8, device=device)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        vitkern.layer_norm([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        vitkern.layer_norm(torch.ones(4, 8, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="weight must have shape"):
        vitkern.layer_norm(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match="bias must have shape"):
        vitkern.layer_norm(x, None, torch.ones(8, 1, device=device))
    with pytest.raises(ValueError, match="eps"):
        vitkern.layer_norm(x, eps=-1.0)
    with pytest.raises(TypeError, match="weight has dtype"):
        vitkern.layer_norm(x.to(BF16), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="weight is on meta"):
        vitkern.layer_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="residual must have shape"):
        vitkern.add_layer_norm(x, _rand(4, 9, device=device))
    with pytest.raises(TypeError, match="residual has dtype"):
        vitkern.add_layer_norm(x, x.to(BF16))
    with pytest.raises(TypeError, match="bias has dtype"):
        vitkern.add_layer_norm(x, x, None, torch.ones(8, dtype=F16, device=device))


# ============================================================================================
# linear
# ============================================================================================


def _linear_torch(x, w, b, act, residual=None, gamma=None, row_scale=None):
    y = F.linear(x, w, b)
    if act == "gelu":
        y = F.gelu(y)
    elif act == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is None:
        return y
    if gamma is not None:
        y = y * gamma
    if row_scale is not None:
        y = y * row_scale.reshape(y.shape[:-1] + (1,))
    return residual + y


@pytest.mark.parametrize(
    "dtype,x_shape,n,act",
    [
        (F32, (2, 197, 192), 384, None),
        (BF16, (50, 384), 1000, "gelu"),
        (F16, (3, 1, 1000), 192, "gelu_tanh"),
        (F32, (1000,), 192, "gelu"),
    ],
)
def test_linear_matches_torch(device, dtype, x_shape, n, act):
    k = x_shape[-1]
    x = _rand(*x_shape, dtype=dtype, device=device)
    w = _rand(n, k, dtype=dtype, device=device, scale=k**-0.5)
    b = _rand(n, dtype=dtype, device=device)
    assert_close_same_dtype(vitkern.linear(x, w, b, activation=act), _linear_torch(x, w, b, act))
    assert_close_same_dtype(vitkern.linear(x, w, activation=act), _linear_torch(x, w, None, act))


@pytest.mark.parametrize("dtype,res_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
def test_linear_residual_epilogue(device, dtype, res_dtype):
    x = _rand(2, 50, 384, dtype=dtype, device=device)
    w = _rand(192, 384, dtype=dtype, device=device, scale=384**-0.5)
    b = _rand(192, dtype=dtype, device=device)
    res = _rand(2, 50, 192, dtype=res_dtype, device=device)
    gamma = _rand(192, dtype=dtype, device=device)
    keep = (torch.rand(2, device=device) > 0.5).float() / 0.5
    rows = keep[:, None].expand(2, 50)
    out = vitkern.linear(x, w, b, activation="gelu", residual=res, residual_scale=gamma, row_scale=rows)
    assert out.dtype == res_dtype
    # fp32 reference of the same math (the epilogue computes in fp32 with one cast)
    y = F.linear(x, w, b).float()
    want = (res.float() + rows.reshape(2, 50, 1) * gamma.float() * F.gelu(y)).to(res_dtype)
    assert_close_same_dtype(out, want)
    # row_scale as (M,) is the same thing
    out2 = vitkern.linear(x, w, b, activation="gelu", residual=res, residual_scale=gamma, row_scale=rows.reshape(-1))
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    # residual alone
    assert_close_same_dtype(vitkern.linear(x, w, b, residual=res),
                            (res.float() + F.linear(x, w, b).float()).to(res_dtype))


def _linear_ref_positional(x, w, b, res, gamma, rows, activation):
    return linear_ref(x, w, b, activation=activation, residual=res, residual_scale=gamma, row_scale=rows)


def test_linear_grads(device):
    gc = functools.partial(torch.autograd.gradcheck, eps=1e-6, atol=1e-5, fast_mode=True)
    mk = functools.partial(_rand, dtype=F64, device=device, requires_grad=True)
    x, w, b, res, gamma, rows = mk(2, 3, 6), mk(5, 6), mk(5), mk(2, 3, 5), mk(5), mk(6)
    for act in (None, "gelu", "gelu_tanh"):
        fn = functools.partial(_linear_ref_positional, activation=act)
        assert gc(fn, (x, w, b, res, gamma, rows))
    # fp32 grads of the public function against the torch composition
    mk32 = functools.partial(_rand, device=device, requires_grad=True)
    args = [mk32(2, 197, 192), mk32(384, 192, scale=0.07), mk32(384), mk32(2, 197, 384), mk32(384), mk32(2, 197)]
    g = _rand(2, 197, 384, device=device)
    out = vitkern.linear(args[0], args[1], args[2], activation="gelu_tanh", residual=args[3],
                         residual_scale=args[4], row_scale=args[5])
    got = torch.autograd.grad((out * g).sum(), args)
    want = torch.autograd.grad((_linear_torch(*args[:3], "gelu_tanh", *args[3:]) * g).sum(), args)
    for a, e in zip(got, want):
        assert_close_same_dtype(a, e, atol=2e-4, rtol=2e-4)


def test_linear_autocast(device):
    x = _rand(2, 50, 192, device=device)
    w = _rand(384, 192, device=device, scale=0.07)
    b, gamma = _rand(384, device=device), _rand(384, device=device)
    res32 = _rand(2, 50, 384, device=device)
    with torch.autocast(device.type, dtype=BF16):
        plain = vitkern.linear(x, w, b, activation="gelu")
        stream = vitkern.linear(x, w, b, residual=res32, residual_scale=gamma)
        stream_bf16 = vitkern.linear(x, w, b, residual=res32.to(BF16))
        # what timm computes: bf16 GEMM, fp32 LayerScale gamma promotes, fp32 residual stream
        timm_plain = F.gelu(F.linear(x, w, b))
        timm_stream = res32 + gamma * F.linear(x, w, b)
    assert plain.dtype == BF16 and stream.dtype == F32 and stream_bf16.dtype == BF16
    assert_close_same_dtype(plain, timm_plain)
    # gamma is cast to bf16 under autocast: allow bf16 rounding of the branch
    assert_close_same_dtype(stream, timm_stream, atol=3e-2, rtol=1e-2)


def test_linear_errors(device):
    x = _rand(2, 5, 8, device=device)
    w = _rand(4, 8, device=device)
    res = _rand(2, 5, 4, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 8\)"):
        vitkern.linear(x, _rand(4, 7, device=device))
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        vitkern.linear(x, _rand(8, device=device))
    with pytest.raises(ValueError, match="bias must have shape"):
        vitkern.linear(x, w, _rand(5, device=device))
    with pytest.raises(ValueError, match="activation must be one of"):
        vitkern.linear(x, w, activation="relu")
    with pytest.raises(TypeError, match="activation must be None or a string"):
        vitkern.linear(x, w, activation=F.gelu)
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 5, 4\)"):
        vitkern.linear(x, w, residual=_rand(2, 5, 8, device=device))
    # LayerScale / drop path without a residual scale the branch (its add runs later)
    g, rs = _rand(4, device=device), _rand(10, device=device)
    torch.testing.assert_close(vitkern.linear(x, w, residual_scale=g, row_scale=rs),
                               F.linear(x, w) * g * rs.reshape(2, 5, 1))
    with pytest.raises(ValueError, match="residual_scale must have shape"):
        vitkern.linear(x, w, residual_scale=_rand(8, device=device))
    with pytest.raises(ValueError, match=r"row_scale must have shape \(10,\)"):
        vitkern.linear(x, w, row_scale=_rand(2, device=device))
    with pytest.raises(ValueError, match="residual_scale must have shape"):
        vitkern.linear(x, w, residual=res, residual_scale=_rand(8, device=device))
    with pytest.raises(ValueError, match=r"row_scale must have shape \(10,\)"):
        vitkern.linear(x, w, residual=res, row_scale=_rand(2, device=device))
    with pytest.raises(TypeError, match="weight has dtype bfloat16 but x has float32"):
        vitkern.linear(x, w.to(BF16))
    with pytest.raises(TypeError, match="residual must have the compute dtype"):
        vitkern.linear(x.to(BF16), w.to(BF16), residual=res.to(F16))
    with pytest.raises(TypeError, match="row_scale must have dtype"):
        vitkern.linear(x.to(BF16), w.to(BF16), residual=res, row_scale=torch.ones(10, dtype=F16, device=device))
    with pytest.raises(ValueError, match="weight is on meta"):
        vitkern.linear(x, w.to("meta"))


# ============================================================================================
# mlp
# ============================================================================================


def _timm_mlp(k, hidden, n, act, bias=True, dtype=F32, device="cpu"):
    act_layer = functools.partial(nn.GELU, approximate="tanh") if act == "gelu_tanh" else nn.GELU
    m = Mlp(k, hidden, n, act_layer=act_layer, bias=bias).to(device=device, dtype=dtype)
    return m


def _mlp_args(m):
    return (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)


@pytest.mark.parametrize(
    "dtype,x_shape,hidden,n,act",
    [
        (F32, (2, 197, 192), 768, 192, "gelu"),
        (BF16, (2, 50, 384), 1000, 384, "gelu_tanh"),
        (F16, (3, 1, 192), 384, 1000, "gelu"),
    ],
)
def test_mlp_matches_timm(device, dtype, x_shape, hidden, n, act):
    m = _timm_mlp(x_shape[-1], hidden, n, act, dtype=dtype, device=device)
    x = _rand(*x_shape, dtype=dtype, device=device)
    with torch.no_grad():
        assert_close_same_dtype(vitkern.mlp(x, *_mlp_args(m), activation=act), m(x))


def test_mlp_no_bias_and_residual(device):
    m = _timm_mlp(192, 384, 192, "gelu", bias=False, device=device)
    x = _rand(2, 50, 192, device=device)
    res = _rand(2, 50, 192, device=device)
    gamma = _rand(192, device=device)
    rows = torch.tensor([0.0, 2.0], device=device)[:, None].expand(2, 50)
    with torch.no_grad():
        out = vitkern.mlp(x, *_mlp_args(m), residual=res, residual_scale=gamma, row_scale=rows)
        assert_close_same_dtype(out, res + rows[..., None] * gamma * m(x))
        assert_close_same_dtype(vitkern.mlp(x, *_mlp_args(m), activation=None), m.fc2(m.fc1(x)))


def test_mlp_grads(device):
    mk = functools.partial(_rand, dtype=F64, device=device, requires_grad=True)
    args = (mk(2, 3, 4), mk(6, 4), mk(6), mk(5, 6), mk(5), mk(2, 3, 5), mk(5), mk(2, 3))
    fn = lambda *a: mlp_ref(*a[:5], activation="gelu", residual=a[5], residual_scale=a[6], row_scale=a[7])  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, fast_mode=True)
    fn0 = lambda x, w1, w2: mlp_ref(x, w1, None, w2, None, activation="gelu_tanh")  # noqa: E731
    assert torch.autograd.gradcheck(fn0, (args[0], args[1], args[3]), eps=1e-6, atol=1e-5, fast_mode=True)
    # fp32 grads against timm's Mlp
    m = _timm_mlp(192, 384, 192, "gelu", device=device)
    x = _rand(2, 50, 192, device=device, requires_grad=True)
    g = _rand(2, 50, 192, device=device)
    params = [x, *_mlp_args(m)]
    got = torch.autograd.grad((vitkern.mlp(x, *_mlp_args(m)) * g).sum(), params)
    want = torch.autograd.grad((m(x) * g).sum(), params)
    for a, e in zip(got, want):
        assert_close_same_dtype(a, e, atol=1e-4, rtol=1e-4)


def test_mlp_autocast(device):
    m = _timm_mlp(192, 384, 192, "gelu", device=device)
    x = _rand(2, 50, 192, device=device)
    res = _rand(2, 50, 192, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=BF16):
        out = vitkern.mlp(x, *_mlp_args(m))
        out_res = vitkern.mlp(x, *_mlp_args(m), residual=res)
        want = m(x)
        want_res = res + m(x)
    assert out.dtype == BF16 and out_res.dtype == F32
    assert_close_same_dtype(out, want)
    assert_close_same_dtype(out_res, want_res, dtype=BF16)


def test_mlp_errors(device):
    x = _rand(2, 5, 8, device=device)
    w1, b1 = _rand(16, 8, device=device), _rand(16, device=device)
    w2, b2 = _rand(4, 16, device=device), _rand(4, device=device)
    with pytest.raises(ValueError, match="fc1_weight must have shape"):
        vitkern.mlp(x, _rand(16, 9, device=device), b1, w2, b2)
    with pytest.raises(ValueError, match="fc1_bias must have shape"):
        vitkern.mlp(x, w1, b2, w2, b2)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(N, 16\)"):
        vitkern.mlp(x, w1, b1, _rand(4, 15, device=device), b2)
    with pytest.raises(ValueError, match="fc2_bias must have shape"):
        vitkern.mlp(x, w1, b1, w2, b1)
    with pytest.raises(ValueError, match="activation must be one of"):
        vitkern.mlp(x, w1, b1, w2, b2, activation="silu")
    with pytest.raises(TypeError, match="fc2_weight has dtype"):
        vitkern.mlp(x, w1, b1, w2.to(F16), b2)
    with pytest.raises(ValueError, match="residual must have shape"):
        vitkern.mlp(x, w1, b1, w2, b2, residual=x)


# ============================================================================================
# attention
# ============================================================================================


def _qkv(b, h, hkv, tq, tk, d, dtype=F32, device="cpu", requires_grad=False):
    mk = functools.partial(_rand, dtype=dtype, device=device, requires_grad=requires_grad)
    return mk(b, h, tq, d), mk(b, hkv, tk, d), mk(b, hkv, tk, d)


def _lse_fp64(q, k, causal=False, scale=None, bias=None):
    q, k = q.double(), k.double()
    h, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // hkv, dim=1)
    s = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias.double()[:, :, None, :]
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize(
    "dtype,b,h,hkv,tq,tk,d,causal",
    [
        (F32, 2, 3, 3, 197, 197, 64, False),
        (BF16, 1, 2, 2, 50, 50, 80, True),
        (F16, 2, 4, 2, 1, 1, 32, False),
        (F32, 1, 4, 1, 50, 197, 32, True),  # MQA, Tq < Tk causal (top-left)
        (BF16, 2, 4, 2, 197, 50, 64, True),  # GQA, Tq > Tk causal: no empty rows
    ],
)
def test_attention_matches_sdpa(device, dtype, b, h, hkv, tq, tk, d, causal):
    q, k, v = _qkv(b, h, hkv, tq, tk, d, dtype, device)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != h)
    out, lse = vitkern.attention(q, k, v, causal=causal, return_lse=True)
    assert_close_same_dtype(out, want)
    assert not out.isnan().any()
    assert lse.dtype == F32 and lse.shape == (b, h, tq)
    torch.testing.assert_close(lse.double(), _lse_fp64(q, k, causal), atol=1e-4, rtol=1e-5)
    # scale, strided (non-contiguous) inputs
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    want = F.scaled_dot_product_attention(qt, k, v, is_causal=causal, scale=0.3, enable_gqa=hkv != h)
    assert_close_same_dtype(vitkern.attention(qt, k, v, causal=causal, scale=0.3, deterministic=True), want)


def test_attention_qkvpacked(device):
    b, t, h, d = 2, 197, 3, 64
    qkv = _rand(b, t, 3 * h * d, dtype=BF16, device=device).view(b, t, 3, h, d)
    out, lse = vitkern.attention_qkvpacked(qkv, return_lse=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert out.shape == (b, t, h, d) and lse.shape == (b, h, t) and lse.dtype == F32
    assert_close_same_dtype(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    out_c = vitkern.attention_qkvpacked(qkv, causal=True, scale=0.2)
    assert_close_same_dtype(out_c, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2).transpose(1, 2))


def test_attention_grads(device):
    gc = functools.partial(torch.autograd.gradcheck, eps=1e-6, atol=1e-5)
    q, k, v = _qkv(2, 4, 2, 3, 5, 4, F64, device, requires_grad=True)
    bias = torch.zeros(2, 1, 5, dtype=F64, device=device)
    bias[1, 0, :] = float("-inf")  # batch 1: every key masked
    bias[0, 0, 3] = float("-inf")
    bias[0, 0, 1] = 0.5

    def fn(q, k, v, causal, with_bias):
        out, lse = attention_ref(q, k, v, causal=causal, return_lse=True, key_padding_bias=bias if with_bias else None)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert gc(functools.partial(fn, causal=False, with_bias=True), (q, k, v))  # full Jacobian once
    assert gc(functools.partial(fn, causal=True, with_bias=False), (q, k, v), fast_mode=True)
    qkv = _rand(2, 3, 3, 2, 4, dtype=F64, device=device, requires_grad=True)
    assert gc(lambda t: attention_qkvpacked_ref(t, causal=True), (qkv,), fast_mode=True)
    # fp32 grads of the public function against torch's SDPA (GQA, causal, Tq != Tk)
    q, k, v = _qkv(2, 4, 2, 50, 64, 32, F32, device, requires_grad=True)
    g = _rand(2, 4, 50, 32, device=device)
    got = torch.autograd.grad((vitkern.attention(q, k, v, causal=True) * g).sum(), (q, k, v))
    want = torch.autograd.grad(
        (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * g).sum(), (q, k, v)
    )
    for a, e in zip(got, want):
        assert_close_same_dtype(a, e, atol=1e-4, rtol=1e-4)


def test_attention_fully_masked_rows(device):
    """A key-padding mask that hides every key: out 0 (as torch's SDPA), lse -inf, finite grads."""
    q, k, v = _qkv(2, 2, 2, 5, 7, 16, F32, device, requires_grad=True)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool, device=device)
    mask[1] = False
    mask[0, ..., 4:] = False
    out = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close_same_dtype(out, want)
    assert (out[1] == 0).all()
    bias = torch.zeros(2, 1, 7, device=device).masked_fill(~mask[:, :, 0], float("-inf"))
    _, lse = attention_ref(q, k, v, return_lse=True, key_padding_bias=bias)
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert (grads[0][1] == 0).all()


@pytest.mark.parametrize(
    "dtype,mask_kind,mask_shape",
    [
        (F32, "bool", (2, 1, 1, 197)),
        (BF16, "additive", (2, 3, 1, 197)),
        (F16, "bool", (1, 197)),
        (F32, "additive", (1, 3, 1, 1)),
    ],
)
def test_sdpa_key_padding_routed(device, monkeypatch, dtype, mask_kind, mask_shape):
    def no_fallback(*a, **kw):
        raise AssertionError("routed call fell back to torch's SDPA")

    q, k, v = _qkv(2, 3, 3, 197, 197, 64, dtype, device)
    if mask_kind == "bool":
        mask = torch.rand(mask_shape, device=device) > 0.3
        mask[..., 0] = True
    else:
        mask = _rand(*mask_shape, dtype=dtype, device=device)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    monkeypatch.setattr(attention_sdpa, "_torch_sdpa", no_fallback)
    assert_close_same_dtype(vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask), want)
    assert_close_same_dtype(vitkern.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1),
           F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1))


def test_sdpa_gqa_and_fallbacks_warn_once(device, monkeypatch):
    monkeypatch.setattr(attention_sdpa, "_warned_reasons", set())
    q, k, v = _qkv(2, 4, 2, 50, 60, 32, F32, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # routed calls never warn
        assert_close_same_dtype(vitkern.scaled_dot_product_attention(q, k, v, enable_gqa=True),
               F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    full_mask = _rand(50, 60, device=device)  # a general (Tq, Tk) mask: torch's SDPA
    with pytest.warns(UserWarning, match="not a key-padding mask"):
        out = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, enable_gqa=True)
    assert_close_same_dtype(out, F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, enable_gqa=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once only
        vitkern.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, enable_gqa=True)
    with pytest.warns(UserWarning, match="dropout_p"):
        out = vitkern.scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True)
    assert out.shape == q.shape
    with pytest.warns(UserWarning, match="float64"):
        q64, k64, v64 = (t.double() for t in (q, k, v))
        assert_close_same_dtype(vitkern.scaled_dot_product_attention(q64, k64, v64, enable_gqa=True),
               F.scaled_dot_product_attention(q64, k64, v64, enable_gqa=True))
    # invalid calls raise torch's own errors
    with pytest.warns(UserWarning, match="without enable_gqa"), pytest.raises(RuntimeError):
        vitkern.scaled_dot_product_attention(q, k, v)


def test_sdpa_patched_into_timm_attention(device, monkeypatch):
    torch.manual_seed(1)
    attn = Attention(192, num_heads=3, qkv_bias=True).to(device).eval()
    assert attn.fused_attn
    x = _rand(2, 197, 192, device=device)
    mask = torch.ones(2, 1, 1, 197, dtype=torch.bool, device=device)
    mask[1, ..., 150:] = False
    with torch.no_grad():
        want, want_masked = attn(x), attn(x, attn_mask=mask)
    calls = []

    def counting_sdpa(*a, **kw):
        calls.append(1)
        return vitkern.scaled_dot_product_attention(*a, **kw)

    monkeypatch.setattr(attention_sdpa, "_torch_sdpa", lambda *a, **kw: pytest.fail("fell back"))
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        got, got_masked = attn(x), attn(x, attn_mask=mask)
    assert len(calls) == 2
    assert_close_same_dtype(got, want)
    assert_close_same_dtype(got_masked, want_masked)


def test_attention_autocast(device):
    q, k, v = _qkv(2, 3, 3, 50, 50, 64, F32, device)
    with torch.autocast(device.type, dtype=BF16):
        out = vitkern.attention(q, k, v)
        out_sdpa = vitkern.scaled_dot_product_attention(q, k.to(BF16), v)
        want = F.scaled_dot_product_attention(q, k, v)
        packed = vitkern.attention_qkvpacked(torch.stack([q, k, v], 2).transpose(1, 3))
    assert out.dtype == BF16 and out_sdpa.dtype == BF16 and packed.dtype == BF16 and want.dtype == BF16
    assert_close_same_dtype(out, want)
    assert_close_same_dtype(out_sdpa, want)
    assert_close_same_dtype(packed, want.transpose(1, 2))


def test_attention_errors(device):
    q, k, v = _qkv(2, 4, 2, 5, 6, 8, F32, device)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        vitkern.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must have shape \(2, Hkv, Tk, 8\)"):
        vitkern.attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="k has 3 heads, which must divide q's 4 heads"):
        vitkern.attention(q, _rand(2, 3, 6, 8, device=device), _rand(2, 3, 6, 8, device=device))
    with pytest.raises(ValueError, match="k must have at least one key"):
        vitkern.attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="v must have shape"):
        vitkern.attention(q, k, v[:, :, :5])
    with pytest.raises(TypeError, match="causal must be a bool"):
        vitkern.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="scale must be None or a finite number"):
        vitkern.attention(q, k, v, scale=float("inf"))
    with pytest.raises(TypeError, match="k has dtype bfloat16 but q has float32"):
        vitkern.attention(q, k.to(BF16), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        vitkern.attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, T, 3, H, D\)"):
        vitkern.attention_qkvpacked(_rand(2, 5, 2, 4, 8, device=device))
    with pytest.raises(ValueError, match="qkv must have 5 dimensions"):
        vitkern.attention_qkvpacked(q)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        vitkern.attention_qkvpacked(_rand(2, 5, 3, 4, 8, device=device), return_lse="yes")


# ============================================================================================
# patch_embed / resample_pos_embed
# ============================================================================================


def _timm_vit_stem(img_size, patch, dim, class_token, reg_tokens, no_embed_class, pos_embed, device, dtype=F32):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=img_size, patch_size=patch, embed_dim=dim, depth=0, num_heads=1, num_classes=0,
        class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
        pos_embed="learn" if pos_embed else "none", global_pool="token" if class_token else "avg",
    ).to(device=device, dtype=dtype)
    assert isinstance(vit.patch_embed, PatchEmbed)  # the stem under test is timm.layers.PatchEmbed
    with torch.no_grad():
        for p in (vit.cls_token, vit.reg_token, vit.pos_embed):
            if p is not None:
                p.normal_()
    prefix = [t for t in (vit.cls_token, vit.reg_token) if t is not None]
    prefix = torch.cat(prefix, dim=1) if prefix else None
    def stem(images):
        return vit._pos_embed(vit.patch_embed(images))

    stem.tokens = (vit.cls_token, vit.reg_token)
    return stem, vit.patch_embed.proj, prefix, vit.pos_embed


@pytest.mark.parametrize(
    "dtype,img,patch,dim,cls,reg,no_embed_class,pos,channels_last",
    [
        (F32, (32, 48), 16, 192, True, 0, False, True, False),  # timm default ViT
        (BF16, (28, 42), 14, 384, True, 4, True, True, True),  # DINOv2-style: registers, no_embed_class
        (F16, (32, 32), 8, 192, False, 0, True, True, False),  # no prefix tokens
        (F32, (16, 32), 16, 1000, True, 1, False, False, True),  # prefix tokens, no pos_embed
        (F32, (32, 16), 16, 192, False, 0, False, False, False),  # bare patchify + GEMM
    ],
)
def test_patch_embed_matches_timm(device, dtype, img, patch, dim, cls, reg, no_embed_class, pos, channels_last):
    stem, proj, prefix, pos_embed = _timm_vit_stem(img, patch, dim, cls, reg, no_embed_class, pos, device, dtype)
    images = _rand(2, 3, *img, dtype=dtype, device=device)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = stem(images)
        got = vitkern.patch_embed(images, proj.weight, proj.bias, pos_embed=pos_embed, prefix_tokens=prefix)
    k = prefix.shape[1] if prefix is not None else 0
    assert got.shape == (2, k + (img[0] // patch) * (img[1] // patch), dim)
    assert_close_same_dtype(got, want)


def test_patch_embed_grads(device):
    mk = functools.partial(_rand, dtype=F64, device=device, requires_grad=True)
    images, w, b, prefix = mk(2, 3, 4, 6), mk(5, 3, 2, 3), mk(5), mk(1, 2, 5)
    for pos in (mk(1, 4, 5), mk(1, 6, 5)):
        assert torch.autograd.gradcheck(
            lambda *a: patch_embed_ref(*a[:3], pos_embed=a[3], prefix_tokens=a[4]),
            (images, w, b, pos, prefix), eps=1e-6, atol=1e-5, fast_mode=True,
        )
    # fp32 grads against timm
    stem, proj, _, pos_embed = _timm_vit_stem((32, 48), 16, 192, True, 2, False, True, device)
    cls_token, reg_token = stem.tokens
    images = _rand(2, 3, 32, 48, device=device, requires_grad=True)
    params = [images, proj.weight, proj.bias, cls_token, reg_token, pos_embed]
    g = _rand(2, 9, 192, device=device)
    prefix = torch.cat([cls_token, reg_token], dim=1)
    got = torch.autograd.grad(
        (vitkern.patch_embed(images, proj.weight, proj.bias, pos_embed=pos_embed, prefix_tokens=prefix) * g).sum(),
        params,
    )
    want = torch.autograd.grad((stem(images) * g).sum(), params)
    for a, e in zip(got, want):
        assert_close_same_dtype(a, e, atol=1e-4, rtol=1e-4)


def test_patch_embed_autocast(device):
    stem, proj, prefix, pos_embed = _timm_vit_stem((32, 32), 16, 192, True, 0, False, True, device)
    images = _rand(2, 3, 32, 32, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=BF16):
        want = stem(images)  # timm: bf16 conv, float32 tokens after the cat / pos_embed add
        got = vitkern.patch_embed(images, proj.weight, proj.bias, pos_embed=pos_embed, prefix_tokens=prefix)
        bare = vitkern.patch_embed(images, proj.weight, proj.bias)
    assert want.dtype == F32 and bare.dtype == BF16
    assert_close_same_dtype(got, want)


def test_patch_embed_errors(device):
    images = _rand(2, 3, 32, 32, device=device)
    w, b = _rand(8, 3, 16, 16, device=device), _rand(8, device=device)
    with pytest.raises(ValueError, match=r"must be multiples of the patch size \(16, 16\)"):
        vitkern.patch_embed(_rand(2, 3, 33, 32, device=device), w, b)
    with pytest.raises(ValueError, match="images has 4 channels but weight expects 3"):
        vitkern.patch_embed(_rand(2, 4, 32, 32, device=device), w, b)
    with pytest.raises(ValueError, match="images must have 4 dimensions"):
        vitkern.patch_embed(images[0], w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        vitkern.patch_embed(images, w, _rand(3, device=device))
    with pytest.raises(ValueError, match=r"pos_embed has length 7 but must have length 4 \(patch tokens only\) or 5"):
        vitkern.patch_embed(
            images, w, b, pos_embed=_rand(1, 7, 8, device=device), prefix_tokens=_rand(1, 1, 8, device=device)
        )
    with pytest.raises(ValueError, match=r"pos_embed has length 5 but must have length 4 \(patch tokens only\) for"):
        vitkern.patch_embed(images, w, b, pos_embed=_rand(1, 5, 8, device=device))
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1, L, 8\)"):
        vitkern.patch_embed(images, w, b, pos_embed=_rand(2, 4, 8, device=device))
    with pytest.raises(ValueError, match=r"prefix_tokens must have shape \(1, K, 8\)"):
        vitkern.patch_embed(images, w, b, prefix_tokens=_rand(1, 1, 7, device=device))
    with pytest.raises(ValueError, match="prefix_tokens must have 3 dimensions"):
        vitkern.patch_embed(images, w, b, prefix_tokens=_rand(1, 8, device=device))
    with pytest.raises(TypeError, match="weight has dtype"):
        vitkern.patch_embed(images, w.to(BF16), b)
    with pytest.raises(TypeError, match="pos_embed must have the compute dtype"):
        vitkern.patch_embed(images.to(BF16), w.to(BF16), b.to(BF16), pos_embed=_rand(1, 4, 8, dtype=F16, device=device))


@pytest.mark.parametrize(
    "length,prefix,new_size,old_size,interpolation,antialias",
    [
        (1 + 14 * 14, 1, (16, 16), None, "bicubic", False),
        (1 + 14 * 14, 1, (10, 12), None, "bicubic", True),
        (5 + 16 * 16, 5, (12, 20), None, "bilinear", False),
        (6 * 8, 0, (8, 6), (6, 8), "bicubic", True),
        (1 + 4, 1, 3, None, "nearest", False),
    ],
)
def test_resample_pos_embed_matches_timm(device, length, prefix, new_size, old_size, interpolation, antialias):
    pos = _rand(1, length, 192, device=device)
    size = (new_size, new_size) if isinstance(new_size, int) else new_size
    want = resample_abs_pos_embed(pos, list(size), old_size=old_size, num_prefix_tokens=prefix,
                                  interpolation=interpolation, antialias=antialias)
    got = vitkern.resample_pos_embed(pos, new_size, old_size=old_size, num_prefix_tokens=prefix,
                                     interpolation=interpolation, antialias=antialias)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    got16 = vitkern.resample_pos_embed(pos.to(BF16), new_size, old_size, prefix, interpolation, antialias)
    assert got16.dtype == BF16 and got16.shape == got.shape


def test_resample_pos_embed_identity_and_errors(device):
    pos = _rand(1, 1 + 16, 8, device=device)
    assert vitkern.resample_pos_embed(pos, (4, 4)) is pos
    with pytest.raises(ValueError, match="new_size must be"):
        vitkern.resample_pos_embed(pos, (4, 0))
    with pytest.raises(ValueError, match="old_size"):
        vitkern.resample_pos_embed(pos, (5, 5), old_size=(3, 4))
    with pytest.raises(ValueError, match="not a square grid: pass old_size"):
        vitkern.resample_pos_embed(pos, (5, 5), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="num_prefix_tokens must be in"):
        vitkern.resample_pos_embed(pos, (5, 5), num_prefix_tokens=18)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        vitkern.resample_pos_embed(pos, (5, 5), interpolation="cubic")
    with pytest.raises(ValueError, match="pos_embed must have 3 dimensions"):
        vitkern.resample_pos_embed(pos[0], (5, 5))


# ============================================================================================
# Backend selection rules
# ============================================================================================


def _call_every_op(device):
    x = _rand(2, 5, 8, device=device)
    w = _rand(8, 8, device=device)
    q = _rand(2, 2, 5, 4, device=device)
    return [
        lambda: vitkern.layer_norm(x),
        lambda: vitkern.add_layer_norm(x, x),
        lambda: vitkern.linear(x, w),
        lambda: vitkern.mlp(x, w, None, w, None),
        lambda: vitkern.attention(q, q, q),
        lambda: vitkern.attention_qkvpacked(_rand(2, 5, 3, 2, 4, device=device)),
        lambda: vitkern.scaled_dot_product_attention(q, q, q),
        lambda: vitkern.patch_embed(_rand(2, 3, 4, 4, device=device), _rand(8, 3, 2, 2, device=device)),
    ]


def test_backend_rules_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with vitkern.use_backend("triton"):
        for call in _call_every_op(cpu):
            with pytest.raises(vitkern.BackendUnavailableError, match="backend 'triton' cannot run this call: .+"):
                call()
    with vitkern.use_backend("reference"):
        for call in _call_every_op(cpu):
            call()
    with vitkern.use_backend("auto"):
        for call in _call_every_op(cpu):
            call()
    x = _rand(2, 8)
    with vitkern.use_backend("cuda"):
        with pytest.raises(vitkern.BackendUnavailableError, match="vitkern.linear: backend 'cuda'"):
            vitkern.linear(x, _rand(4, 8))
        with pytest.raises(vitkern.BackendUnavailableError, match="vitkern.mlp: backend 'cuda'"):
            vitkern.mlp(x, _rand(4, 8), None, _rand(8, 4), None)
        vitkern.layer_norm(x)  # not an extension op: "cuda" means auto there
    assert vitkern.get_backend() == "reference"  # the context managers restored it
    with pytest.raises(ValueError, match="vitkern backend must be one of"):
        vitkern.use_backend("fast")


def test_backend_env_default(monkeypatch):
    monkeypatch.setenv("VITKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="VITKERN_BACKEND must be one of"):
        _backend._default_from_env()
    monkeypatch.setenv("VITKERN_BACKEND", " Reference ")
    assert _backend._default_from_env() == "reference"
    monkeypatch.delenv("VITKERN_BACKEND")
    assert _backend._default_from_env() == "auto"


# ============================================================================================
# torch.compile
# ============================================================================================


def test_compile_fullgraph_all_ops(device):
    torch._dynamo.reset()
    d, h = 32, 2
    mk = functools.partial(_rand, device=device)
    params = dict(
        pw=mk(d, 3, 8, 8, scale=0.1), pb=mk(d), pos=mk(1, 5, d), cls=mk(1, 1, d), ln_w=mk(d), ln_b=mk(d),
        qkv_w=mk(3 * d, d, scale=0.2), proj_w=mk(d, d, scale=0.2), gamma=mk(d),
        fc1_w=mk(4 * d, d, scale=0.2), fc1_b=mk(4 * d), fc2_w=mk(d, 4 * d, scale=0.1), fc2_b=mk(d),
    )

    def block(images, mask, p):
        x = vitkern.patch_embed(images, p["pw"], p["pb"], pos_embed=p["pos"], prefix_tokens=p["cls"])
        b, t, _ = x.shape
        hdn = vitkern.layer_norm(x, p["ln_w"], p["ln_b"], eps=1e-6)
        qkv = vitkern.linear(hdn, p["qkv_w"]).view(b, t, 3, h, d // h)
        a = vitkern.attention_qkvpacked(qkv).reshape(b, t, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a2, lse = vitkern.attention(q, k, v, causal=True, return_lse=True)
        a3 = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = vitkern.linear(a + a3.transpose(1, 2).reshape(b, t, d), p["proj_w"], residual=x, residual_scale=p["gamma"])
        hdn, x = vitkern.add_layer_norm(a2.transpose(1, 2).reshape(b, t, d), x, p["ln_w"], p["ln_b"])
        x = vitkern.mlp(hdn, p["fc1_w"], p["fc1_b"], p["fc2_w"], p["fc2_b"], activation="gelu_tanh", residual=x)
        pos = vitkern.resample_pos_embed(p["pos"], (3, 3))
        return x, lse, pos

    images = mk(2, 3, 16, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]], device=device)[:, None, None, :]
    eager = block(images, mask, params)
    compiled = torch.compile(block, fullgraph=True)(images, mask, params)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
