"""Unusual and hostile inputs: each test pins one fault that once gave a silent wrong answer, a
crash or an unclear error (strided 1-D vectors, zero-size dims, "auto" routing, error messages,
the SDPA drop-in's mask handling). The property tests (tests/test_properties.py) sweep the same
classes of input at random."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern._backend import triton_interpreting
from vitkern.ops.attention import sdpa as attention_sdpa
from vitkern.ops.linear import linear_ref
from vitkern.ops.mlp import mlp_ref
from vitkern.ops.patch_embed import patch_embed_ref

_TRITON = torch.cuda.is_available() or triton_interpreting()


def _backends():
    out = ["reference"]
    out.append(pytest.param(
        "triton", marks=pytest.mark.skipif(not _TRITON, reason="needs a GPU or TRITON_INTERPRET=1")
    ))
    out.append(pytest.param("cuda", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and vitkern.cuda_extension_available()), reason="needs the CUDA extension")))
    return out


BACKENDS = _backends()


def _vectors(n: int, device):
    """(N,) vectors that are not contiguous: expanded from one element (stride 0), a [::2] slice
    (stride 2), a column of a matrix (stride = row length)."""
    return {
        "expanded": torch.randn(1, device=device).expand(n),
        "sliced": torch.randn(2 * n, device=device)[::2],
        "column": torch.randn(n, 3, device=device)[:, 1],
    }


# --------------------------------------------------------------------------------------------
# Fault 1: the GEMM epilogue read 1-D vectors as if contiguous
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["expanded", "sliced", "column"])
def test_linear_strided_vectors(backend, kind, device):
    vitkern.use_backend(backend)
    m, k, n = 5, 3, 8
    x = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device)
    bias, gamma = _vectors(n, device)[kind], _vectors(n, device)[kind]
    row_scale = _vectors(m, device)[kind]
    residual = torch.randn(m, n, device=device)
    # the minimal case: M = 1, K = 1, N = 8, an expanded bias
    x1, w1 = torch.randn(1, 1, device=device), torch.randn(8, 1, device=device)
    b1 = torch.randn(1, device=device).expand(8)
    torch.testing.assert_close(vitkern.linear(x1, w1, b1), F.linear(x1, w1, b1.contiguous()))
    got = vitkern.linear(x, w, bias, activation="gelu", residual=residual, residual_scale=gamma, row_scale=row_scale)
    want = linear_ref(x, w, bias.contiguous(), activation="gelu", residual=residual,
                      residual_scale=gamma.contiguous(), row_scale=row_scale.contiguous())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_strided_vectors_backward(backend, device):
    vitkern.use_backend(backend)
    m, k, n = 6, 4, 8
    x = torch.randn(m, k, device=device, requires_grad=True)
    w = torch.randn(n, k, device=device, requires_grad=True)
    b0 = torch.randn(1, device=device, requires_grad=True)
    g0 = torch.randn(2 * n, device=device, requires_grad=True)
    r0 = torch.rand(m, 2, device=device, requires_grad=True)
    residual = torch.randn(m, n, device=device)

    def run(fn, contiguous):
        b, g, r = b0.expand(n), g0[::2], r0[:, 1]
        if contiguous:
            b, g, r = b.contiguous(), g.contiguous(), r.contiguous()
        y = fn(x, w, b, residual=residual, residual_scale=g, row_scale=r)
        return (y, *torch.autograd.grad(y.square().sum(), (x, w, b0, g0, r0)))

    for got, want in zip(run(vitkern.linear, False), run(linear_ref, True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["expanded", "sliced"])
def test_mlp_strided_vectors(backend, kind, device):
    vitkern.use_backend(backend)
    m, k, hidden, n = 5, 4, 16, 8
    x = torch.randn(m, k, device=device)
    w1, w2 = torch.randn(hidden, k, device=device), torch.randn(n, hidden, device=device)
    b1, b2 = _vectors(hidden, device)[kind], _vectors(n, device)[kind]
    gamma, rs = _vectors(n, device)[kind], _vectors(m, device)[kind]
    residual = torch.randn(m, n, device=device)
    got = vitkern.mlp(x, w1, b1, w2, b2, residual=residual, residual_scale=gamma, row_scale=rs)
    want = mlp_ref(x, w1, b1.contiguous(), w2, b2.contiguous(), residual=residual,
                   residual_scale=gamma.contiguous(), row_scale=rs.contiguous())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["expanded", "sliced"])
def test_patch_embed_strided_bias(backend, kind, device):
    vitkern.use_backend(backend)
    images = torch.randn(2, 3, 8, 8, device=device)
    weight = torch.randn(8, 3, 4, 4, device=device)
    bias = _vectors(8, device)[kind]
    prefix = torch.randn(1, 1, 8, device=device)
    pos = torch.randn(1, 5, 8, device=device)
    got = vitkern.patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix)
    want = patch_embed_ref(images, weight, bias.contiguous(), pos_embed=pos, prefix_tokens=prefix)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_strided_affine(backend, device):
    vitkern.use_backend(backend)
    x = torch.randn(4, 16, device=device)
    w, b = torch.randn(1, device=device).expand(16), torch.randn(32, device=device)[::2]
    torch.testing.assert_close(vitkern.layer_norm(x, w, b), F.layer_norm(x, (16,), w, b), atol=1e-5, rtol=1e-5)
    y, s = vitkern.add_layer_norm(x, x.flip(0), w, b)
    torch.testing.assert_close(y, F.layer_norm(x + x.flip(0), (16,), w, b), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Fault 2: zero-size dims (B = 0, T = 0, K = 0), forward and backward, on every backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_zero_rows_with_row_scale_backward(backend, activation, device):
    """Drop path on an empty batch: the K = 0 weight-gradient GEMM once read row_scale[0] of an
    empty tensor (a segfault under the interpreter, an illegal address on a GPU)."""
    vitkern.use_backend(backend)
    x = torch.randn(0, 5, 4, device=device, requires_grad=True)
    w = torch.randn(8, 4, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    g = torch.randn(8, device=device, requires_grad=True)
    residual = torch.randn(0, 5, 8, device=device, requires_grad=True)
    rs = torch.ones(0, device=device, requires_grad=True)
    y = vitkern.linear(x, w, b, activation=activation, residual=residual, residual_scale=g, row_scale=rs)
    assert y.shape == (0, 5, 8)
    grads = torch.autograd.grad(y.sum(), (x, w, b, g, residual, rs))
    for t, gr in zip((x, w, b, g, residual, rs), grads):
        assert gr.shape == t.shape and not gr.count_nonzero()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_zero_rows_with_row_scale_backward(backend, device):
    vitkern.use_backend(backend)
    x = torch.randn(0, 4, device=device, requires_grad=True)
    w1 = torch.randn(16, 4, device=device, requires_grad=True)
    w2 = torch.randn(8, 16, device=device, requires_grad=True)
    b1, b2 = (torch.randn(n, device=device, requires_grad=True) for n in (16, 8))
    residual = torch.randn(0, 8, device=device)
    rs = torch.ones(0, device=device, requires_grad=True)
    y = vitkern.mlp(x, w1, b1, w2, b2, residual=residual, row_scale=rs)
    grads = torch.autograd.grad(y.sum(), (x, w1, b1, w2, b2, rs))
    for t, gr in zip((x, w1, b1, w2, b2, rs), grads):
        assert gr.shape == t.shape and not gr.count_nonzero()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_zero_reduction(backend, device):
    """K = 0: the output is the epilogue of a zero accumulator (the Triton path once failed in a
    reshape), and the weight gradient is empty."""
    vitkern.use_backend(backend)
    x = torch.randn(3, 0, device=device, requires_grad=True)
    w = torch.randn(5, 0, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    y = vitkern.linear(x, w, b, activation="gelu_tanh")
    torch.testing.assert_close(y, F.gelu(b, approximate="tanh").expand(3, 5))
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b))
    assert dx.shape == (3, 0) and dw.shape == (5, 0)
    torch.testing.assert_close(db, 3 * torch.autograd.grad(F.gelu(b, approximate="tanh").sum(), b)[0])
    h = vitkern.mlp(torch.randn(2, 0, device=device), torch.randn(4, 0, device=device), torch.randn(4, device=device),
                    torch.randn(3, 4, device=device), None)
    assert h.shape == (2, 3)


# --------------------------------------------------------------------------------------------
# Fault 3: drop path on an empty batch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(not _TRITON, reason="triton"))]
)
def test_drop_path_empty_batch(backend, device):
    from vitkern.models import ViT
    from vitkern.nn import Block

    vitkern.use_backend(backend)
    blk = Block(32, 2, drop_path=0.5).to(device).train()
    x = torch.randn(0, 5, 32, device=device, requires_grad=True)
    y = blk(x)
    y.sum().backward()
    assert y.shape == (0, 5, 32)
    model = ViT(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                drop_path_rate=0.5).to(device).train()
    out = model(torch.randn(0, 3, 16, 16, device=device))
    out.sum().backward()
    assert out.shape == (0, 3)


# --------------------------------------------------------------------------------------------
# Fault 4: "auto" routes shapes the Triton kernels refuse; only an explicit backend raises
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not _TRITON, reason="needs a GPU or TRITON_INTERPRET=1")
def test_auto_falls_back_for_unsupported_head_dim(device):
    from vitkern.models import ViT

    vitkern.use_backend("auto")
    q, k, v = (torch.randn(1, 2, 7, 20, device=device) for _ in range(3))
    torch.testing.assert_close(vitkern.attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    model = ViT(img_size=16, patch_size=8, embed_dim=40, depth=1, num_heads=2, num_classes=3).to(device).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16, device=device)).shape == (2, 3)  # head dim 20
    vitkern.use_backend("triton")
    with pytest.raises(vitkern.BackendUnavailableError, match="head dim 20"):
        vitkern.attention(q, k, v)


# --------------------------------------------------------------------------------------------
# Fault 5: errors that name the argument and what was expected
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(not _TRITON, reason="triton"))]
)
def test_attention_zero_head_dim_is_a_clear_error(backend, device):
    vitkern.use_backend(backend)
    q = torch.randn(1, 2, 3, 0, device=device)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        vitkern.attention(q, q, q)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        vitkern.attention_qkvpacked(torch.randn(1, 3, 3, 2, 0, device=device))


@pytest.mark.parametrize("shape, match", [((0, 5, 8), "non-empty"), ((1, 5, 0), "non-empty"),
                                          ((1, 1, 8), "no grid tokens")])
def test_resample_pos_embed_empty_is_a_clear_error(shape, match):
    with pytest.raises(ValueError, match=match):
        vitkern.resample_pos_embed(torch.randn(shape), 3)
    with pytest.raises(ValueError, match="no grid tokens"):
        vitkern.resample_pos_embed(torch.randn(1, 0, 8), 3, num_prefix_tokens=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_no_patches_agrees(backend, device):
    """H = 0: only the prefix tokens (+ their pos_embed); the reference once raised a conv error."""
    vitkern.use_backend(backend)
    images = torch.randn(2, 3, 0, 8, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 4, 4, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    prefix = torch.randn(1, 2, 4, device=device, requires_grad=True)
    pos = torch.randn(1, 2, 4, device=device, requires_grad=True)
    out = vitkern.patch_embed(images, weight, bias, pos_embed=pos, prefix_tokens=prefix)
    torch.testing.assert_close(out, (prefix + pos).expand(2, -1, -1))
    grads = torch.autograd.grad(out.sum(), (images, weight, bias, prefix, pos), allow_unused=True)
    assert all(g is None or not g.count_nonzero() for g in grads[:3])
    torch.testing.assert_close(grads[3], torch.full_like(prefix, 2.0))


def test_patch_embed_reference_empty_reduction():
    """C = 0 (an empty reduction): the bias for every patch; conv2d gets this shape wrong."""
    out = patch_embed_ref(torch.randn(2, 0, 8, 8), torch.randn(4, 0, 4, 4), torch.arange(4.0))
    torch.testing.assert_close(out, torch.arange(4.0).expand(2, 4, 4))


# --------------------------------------------------------------------------------------------
# Fault 7: the SDPA drop-in with a mask that requires grad, or one on another device
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not _TRITON, reason="needs a GPU or TRITON_INTERPRET=1")
def test_sdpa_float_mask_requiring_grad_goes_to_torch(device, monkeypatch):
    monkeypatch.setattr(attention_sdpa, "_warned_reasons", set())
    vitkern.use_backend("triton")
    q, k, v = (torch.randn(2, 2, 5, 16, device=device) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5, device=device, requires_grad=True)
    with pytest.warns(UserWarning, match="requires grad"):
        out = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, want)
    (g,) = torch.autograd.grad(out.square().sum(), mask)
    (g_want,) = torch.autograd.grad(want.square().sum(), mask)
    torch.testing.assert_close(g, g_want)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no grad recorded: the kernels take it
        torch.testing.assert_close(vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask), want)


def test_sdpa_mask_on_another_device_raises(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    mask = torch.zeros(1, 1, 1, 5, device="meta")
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        vitkern.scaled_dot_product_attention(q, q, q, attn_mask=mask)
