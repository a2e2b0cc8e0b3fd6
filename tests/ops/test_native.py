"""The public API of every op on the "torch" backend (the ``native.py`` of each op package: torch's
SDPA, ``F.linear`` / ``F.gelu``, ``F.layer_norm``, conv2d patch embedding, in the compute dtype).

Each op runs through its public function under ``use_backend("torch")`` (so the argument checks
run) and is judged as the kernels are (vitkern.testing.numerics): its error against the float64
reference, forward and every gradient, is at most twice the error of the "reference" backend run
in the same dtype, plus the dtype's atol. Shapes are the kernel tests' (197 tokens, head dims 72 /
80, GQA, causal, key-padding masks with a fully masked sequence, a float32 residual stream with
bf16 branches, LayerScale, drop-path row scales, class / register tokens, P = 14), in float32,
float16 and bfloat16 on the test device. Besides: ``return_lse`` is refused with a reason, "auto"
on the CPU never picks this backend, the attention backend never calls the (possibly patched)
``F.scaled_dot_product_attention``, and ``SDPA_BACKENDS`` pins torch's SDPA kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import vitkern
from vitkern import _backend
from vitkern.ops.attention import attention_qkvpacked_ref, attention_ref
from vitkern.ops.attention import native as attn_native
from vitkern.ops.layer_norm import add_layer_norm_ref, layer_norm_ref
from vitkern.ops.linear import linear_ref
from vitkern.ops.mlp import mlp_ref
from vitkern.ops.patch_embed import patch_embed_ref
from vitkern.testing.numerics import assert_2x_torch, assert_flash_rule

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

OPS = ("attention", "attention_qkvpacked", "layer_norm", "add_layer_norm", "linear", "mlp", "patch_embed")


@pytest.fixture(autouse=True)
def _torch_backend():
    vitkern.use_backend("torch")  # the conftest restores the previous choice


def _rand(shape, dtype, device, scale=1.0, shift=0.0, gen=None):
    return (torch.randn(shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)


def _leaves(tensors: dict, dtype=None) -> dict:
    """Fresh leaves (cast to ``dtype`` if given) that require grad where the originals do."""
    out = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
        else:
            cast = dtype is not None and t.is_floating_point()
            out[name] = (t.detach().to(dtype) if cast else t.detach().clone()).requires_grad_(t.requires_grad)
    return out


def _as_tuple(y):
    return y if isinstance(y, tuple) else (y,)


def _compare(public, reference, tensors: dict, dtype: torch.dtype, *, op=None, finite=True, check=None):
    """``public`` on the torch backend against the float64 ``reference`` and the reference backend
    in the same dtype (``public`` under ``use_backend("reference")``): every output and the gradient
    of every input that requires grad, with :func:`assert_2x_torch` (or ``check``, same signature).
    Returns the torch backend's outputs."""
    check = check or (lambda name, a, r64, same, dt: assert_2x_torch(name, a, r64, same, dt, op=op, finite=finite))
    got_in, same_in, ref_in = _leaves(tensors), _leaves(tensors), _leaves(tensors, F64)
    got = _as_tuple(public(**got_in))
    with vitkern.use_backend("reference"):
        same = _as_tuple(public(**same_in))
    ref = _as_tuple(reference(**ref_in))
    for i, (a, s, r) in enumerate(zip(got, same, ref)):
        assert a.shape == s.shape and a.dtype == s.dtype, (i, a.shape, s.shape, a.dtype, s.dtype)
        check(f"out{i}", a.detach(), r.detach(), s.detach(), dtype)
    names = [n for n, t in tensors.items() if t is not None and t.requires_grad]
    if not names:
        return got
    gen = torch.Generator().manual_seed(7)
    dys = [torch.randn(s.shape, generator=gen).to(device=s.device, dtype=s.dtype) for s in same]
    g_got = torch.autograd.grad(got, [got_in[n] for n in names], dys)
    g_same = torch.autograd.grad(same, [same_in[n] for n in names], dys)
    g_ref = torch.autograd.grad(ref, [ref_in[n] for n in names], [d.double() for d in dys])
    for n, a, s, r in zip(names, g_got, g_same, g_ref):
        assert a.dtype == tensors[n].dtype, (n, a.dtype, tensors[n].dtype)
        check(f"d{n}", a, r, s, dtype)
    return got


# --------------------------------------------------------------------------------------------
# Registration and selection
# --------------------------------------------------------------------------------------------


def test_every_op_with_a_reference_has_a_torch_backend():
    for op in OPS:
        assert "reference" in _backend.registered_backends(op), op
        impl = _backend.backend_impl(op, "torch")
        assert impl is not None, op
        assert impl.dtypes is None, f"{op}: the torch backend takes every dtype the public function takes"
        assert impl.fn.__module__.endswith(".native"), (op, impl.fn.__module__)


def test_auto_on_cpu_never_picks_torch(monkeypatch):
    """"auto" on CPU tensors: the Triton kernels under the interpreter, else the reference."""
    x = torch.randn(4, 8)
    w = torch.randn(8)
    for interpreting, expected in ((True, "triton"), (False, "reference")):
        monkeypatch.setattr(_backend, "triton_interpreting", lambda: interpreting)
        with vitkern.use_backend("auto"):
            fn = _backend.select_impl("layer_norm", x.device, x, w, None, 1e-5)
        assert fn is _backend.backend_impl("layer_norm", expected).fn
    with vitkern.use_backend("torch"):
        fn = _backend.select_impl("layer_norm", x.device, x, w, None, 1e-5)
    assert fn is _backend.backend_impl("layer_norm", "torch").fn


def test_return_lse_is_refused_with_a_reason(device):
    q = torch.randn(1, 2, 5, 16, device=device)
    with pytest.raises(vitkern.BackendUnavailableError, match="backend 'torch'.*return_lse"):
        vitkern.attention(q, q, q, return_lse=True)
    with pytest.raises(vitkern.BackendUnavailableError, match="return_lse"):
        vitkern.attention_qkvpacked(torch.randn(1, 5, 3, 2, 16, device=device), return_lse=True)
    impl = _backend.backend_impl("attention", "torch")
    flags = dict(causal=False, scale=None, return_lse=True, deterministic=False, key_padding_bias=None)
    assert any("return_lse" in r for r in impl.reasons(device, (q, q, q), flags))
    assert impl.reasons(device, (q, q, q), dict(flags, return_lse=False)) == []
    with vitkern.use_backend("auto"):  # "auto" never stops at torch: the lse comes from another backend
        out, lse = vitkern.attention(q, q, q, return_lse=True)
    assert lse.shape == (1, 2, 5) and lse.dtype == F32


# --------------------------------------------------------------------------------------------
# linear and mlp
# --------------------------------------------------------------------------------------------


def _linear_inputs(m, n, k, dtype, device, *, bias=True, residual=None, scale=False, row_scale=False, lead=None):
    gen = torch.Generator().manual_seed(1234 + m + n + k)
    shape = lead + (k,) if lead is not None else (m, k)
    t = dict(x=_rand(shape, dtype, device, gen=gen), weight=_rand((n, k), dtype, device, k ** -0.5, gen=gen),
             bias=_rand((n,), dtype, device, 0.5, gen=gen) if bias else None, residual=None, residual_scale=None,
             row_scale=None)
    if residual is not None:
        t["residual"] = _rand(shape[:-1] + (n,), residual, device, gen=gen)
        if scale:
            t["residual_scale"] = _rand((n,), dtype, device, 0.5, gen=gen)
        if row_scale:
            rows = torch.Size(shape[:-1]).numel()
            t["row_scale"] = (torch.rand(rows, generator=gen) < 0.7).float().div(0.7).to(device)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    return t


# (m, n, k, dtype, activation, bias, residual dtype, residual_scale, row_scale): test_linear.py's
LINEAR_CASES = [
    (197, 576, 192, BF16, None, True, None, False, False),         # qkv, ViT-Ti
    (197, 768, 192, BF16, "gelu", True, None, False, False),       # fc1, ViT-Ti
    (394, 192, 768, BF16, None, True, F32, True, True),            # fc2 + LayerScale + drop path, fp32 stream
    (197, 384, 384, F16, "gelu_tanh", True, F16, True, False),
    (197, 384, 1536, F16, None, False, F16, False, True),
    (1, 1000, 768, BF16, None, True, None, False, False),          # classifier head, batch 1
    (37, 100, 588, F32, "gelu", True, F32, True, True),
    (197, 192, 192, F32, None, True, F32, False, False),
    (50, 1000, 384, F16, "gelu", False, None, False, False),
    (197, 384, 192, BF16, "gelu_tanh", True, BF16, True, True),    # bf16 stream, row_scale cast to bf16
    (37, 100, 64, F32, "quick_gelu", True, F32, True, True),       # OpenAI CLIP's activation
]


def _linear(x, weight, bias, **kw):
    return vitkern.linear(x, weight, bias, **kw)


@pytest.mark.parametrize("m,n,k,dtype,activation,bias,res,scale,rs", LINEAR_CASES)
def test_linear(device, m, n, k, dtype, activation, bias, res, scale, rs):
    t = _linear_inputs(m, n, k, dtype, device, bias=bias, residual=res, scale=scale, row_scale=rs)
    (y,) = _compare(lambda **a: _linear(**a, activation=activation),
                    lambda **a: linear_ref(**a, activation=activation), t, dtype)
    assert y.dtype == (res or dtype)


def test_linear_leading_dims_strides_and_row_scale_shape(device):
    """A transposed 3-D input, row_scale given as x's leading shape (flattened by the public
    function), a float32 residual with a bf16 branch."""
    t = _linear_inputs(0, 192, 384, BF16, device, residual=F32, scale=True, row_scale=True, lead=(2, 197))
    t["x"] = t["x"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert not t["x"].is_contiguous()
    t["row_scale"] = torch.tensor([0.0, 1.25], device=device)[:, None].expand(2, 197).contiguous()
    (y,) = _compare(lambda **a: _linear(**a, activation="gelu"), lambda **a: linear_ref(**a, activation="gelu"),
                    t, BF16)
    assert y.dtype == F32 and y.shape == (2, 197, 192)
    assert torch.equal(y[0].detach(), t["residual"][0].detach())  # row scale 0: the residual as is


# (m, d, hidden, n, dtype, activation, bias, residual dtype, residual_scale, row_scale): test_mlp.py's
MLP_CASES = [
    (197, 192, 768, 192, BF16, "gelu", True, F32, True, True),        # ViT-Ti block MLP, fp32 stream
    (197, 384, 1536, 384, F16, "gelu_tanh", True, F16, False, False),  # ViT-S, JAX GELU
    (50, 192, 768, 192, F32, "gelu", True, None, False, False),
    (394, 64, 256, 64, BF16, None, False, BF16, True, False),
    (1, 192, 768, 100, F32, "gelu_tanh", True, F32, True, True),       # one row, N = 100
    (37, 588, 200, 96, F16, "gelu", True, None, False, False),
    (50, 64, 256, 64, BF16, "quick_gelu", True, F32, True, True),
]


@pytest.mark.parametrize("m,d,hidden,n,dtype,activation,bias,res,scale,rs", MLP_CASES)
def test_mlp(device, m, d, hidden, n, dtype, activation, bias, res, scale, rs):
    gen = torch.Generator().manual_seed(m + d + hidden + n)
    t = dict(x=_rand((m, d), dtype, device, gen=gen),
             fc1_weight=_rand((hidden, d), dtype, device, d ** -0.5, gen=gen),
             fc1_bias=_rand((hidden,), dtype, device, 0.5, gen=gen) if bias else None,
             fc2_weight=_rand((n, hidden), dtype, device, hidden ** -0.5, gen=gen),
             fc2_bias=_rand((n,), dtype, device, 0.5, gen=gen) if bias else None,
             residual=_rand((m, n), res, device, gen=gen) if res else None,
             residual_scale=_rand((n,), dtype, device, 0.5, gen=gen) if scale else None,
             row_scale=(torch.rand(m, generator=gen) < 0.7).float().div(0.7).to(device) if rs else None)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    (y,) = _compare(lambda **a: vitkern.mlp(**a, activation=activation),
                    lambda **a: mlp_ref(**a, activation=activation), t, dtype)
    assert y.dtype == (res or dtype)


# --------------------------------------------------------------------------------------------
# layer_norm and add_layer_norm
# --------------------------------------------------------------------------------------------


def _affine(n, dtype, device, affine):
    w = _rand((n,), dtype, device, 0.5, 1.0).requires_grad_(True) if "w" in affine else None
    b = _rand((n,), dtype, device, 0.5).requires_grad_(True) if "b" in affine else None
    return w, b


@pytest.mark.parametrize("dtype,n,batch,affine", [
    (F32, 192, 2, "wb"), (BF16, 192, 1, ""), (F16, 384, 1, "w"), (BF16, 768, 2, "wb"), (F32, 768, 1, "b"),
    (BF16, 1000, 1, "wb"), (F16, 1024, 1, "wb"), (F32, 16384, 1, "wb"),
], ids=lambda v: str(v).replace("torch.", ""))
def test_layer_norm(device, dtype, n, batch, affine):
    w, b = _affine(n, dtype, device, affine)
    t = dict(x=_rand((batch, 197, n), dtype, device, 2.0, 1.0).requires_grad_(True), weight=w, bias=b)
    _compare(lambda **a: vitkern.layer_norm(**a, eps=1e-6), lambda **a: layer_norm_ref(**a, eps=1e-6), t, dtype,
             finite=False)


@pytest.mark.parametrize("x_dtype,r_dtype,n,affine", [
    (BF16, BF16, 768, "wb"), (BF16, F32, 384, "wb"), (F16, F32, 1000, "w"), (F32, F32, 192, ""),
    (F16, F16, 4096, "b"),
], ids=lambda v: str(v).replace("torch.", ""))
def test_add_layer_norm(device, x_dtype, r_dtype, n, affine):
    w, b = _affine(n, x_dtype, device, affine)
    t = dict(x=_rand((1, 197, n), x_dtype, device, 2.0).requires_grad_(True),
             residual=_rand((1, 197, n), r_dtype, device, 3.0, 1.0).requires_grad_(True), weight=w, bias=b)
    y, s = _compare(vitkern.add_layer_norm, add_layer_norm_ref, t, x_dtype, finite=False)
    assert y.dtype == s.dtype == r_dtype


# --------------------------------------------------------------------------------------------
# patch_embed
# --------------------------------------------------------------------------------------------

# (B, C, H, W, P, D, dtype, layout, weight_cl, n_prefix, pos, bias, add_dtype): test_patch_embed.py's
PATCH_CASES = [
    (2, 3, 32, 48, 16, 192, BF16, "nchw", False, 1, "full", True, None),          # timm ViT: cls + pos
    (2, 3, 28, 42, 14, 64, F32, "channels_last", False, 5, "full", True, None),   # P = 14, cls + 4 registers
    (2, 1, 24, 40, 8, 64, F16, "nchw", False, 0, "patch", False, None),
    (1, 4, 64, 32, 32, 64, BF16, "channels_last", True, 5, "patch", True, None),  # no_embed_class
    (1, 4, 14, 28, 14, 768, BF16, "nchw", False, 1, "full", True, F32),           # fp32 pos / cls: fp32 tokens
    (2, 3, 16, 32, 16, 768, F32, "strided", False, 1, None, True, None),          # cls, no pos_embed
    (2, 3, 16, 24, 8, 192, F16, "channels_last", True, 0, None, True, None),      # plain PatchEmbed
    (1, 1, 42, 28, 14, 192, F32, "nchw", True, 2, "full", False, None),
    (2, 3, 28, 28, 14, 64, F16, "nchw", False, 3, "patch", True, F32),            # fp32 registers, patch pos
]


@pytest.mark.parametrize("b,c,h,w,p,d,dtype,layout,weight_cl,n_prefix,pos,bias,add_dtype", PATCH_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_patch_embed(device, b, c, h, w, p, d, dtype, layout, weight_cl, n_prefix, pos, bias, add_dtype):
    gen = torch.Generator().manual_seed(b + c + h + w + p + d)
    images = _rand((b, c, h, 2 * w if layout == "strided" else w), dtype, device, gen=gen)
    if layout == "strided":
        images = images[..., ::2]
    elif layout == "channels_last":
        images = images.to(memory_format=torch.channels_last)
    weight = _rand((d, c, p, p), dtype, device, (c * p * p) ** -0.5, gen=gen)
    if weight_cl:
        weight = weight.to(memory_format=torch.channels_last)
    n = (h // p) * (w // p)
    add_dtype = add_dtype or dtype
    length = {"full": n_prefix + n, "patch": n, None: 0}[pos]
    t = dict(images=images, weight=weight, bias=_rand((d,), dtype, device, 0.5, gen=gen) if bias else None,
             pos_embed=_rand((1, length, d), add_dtype, device, 0.02, gen=gen) if pos else None,
             prefix_tokens=_rand((1, n_prefix, d), add_dtype, device, 0.02, gen=gen) if n_prefix else None)
    for v in t.values():
        if v is not None:
            v.requires_grad_(True)
    (y,) = _compare(vitkern.patch_embed, patch_embed_ref, t, dtype, op="patch_embed", finite=False)
    assert y.shape == (b, n_prefix + n, d) and y.dtype == add_dtype


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def _flash_check(scale):
    def check(name, got, ref64, same, dtype):
        assert_flash_rule(name, got, ref64, same, dtype, scale if name.startswith("d") else 0.0)
    return check


def _grad_scale(t: dict, tq: int) -> float:
    """The magnitude of the problem for the gradients' ulp floor (a dK that is 0, as for one key)."""
    values = [v.detach().nan_to_num(posinf=0.0, neginf=0.0).abs().max().item()
              for v in t.values() if v is not None and v.is_floating_point()]
    return max(1.0, *values) * tq ** 0.5


# dtype, b, h, hkv, tq, tk, d, causal: test_attention.py's shapes
ATTENTION_CASES = [
    (BF16, 2, 3, 3, 197, 197, 64, False),   # ViT-B/16 tokens
    (F16, 1, 2, 2, 257, 257, 80, True),     # ViT-H/14 head dim 80
    (BF16, 2, 4, 2, 17, 17, 72, False),     # head dim 72, GQA
    (F16, 1, 4, 1, 50, 197, 96, True),      # MQA, Tq < Tk causal
    (BF16, 1, 2, 2, 197, 50, 128, True),    # Tq > Tk causal (top-left)
    (F16, 1, 2, 2, 1, 17, 32, False),       # a single query
    (BF16, 1, 2, 1, 17, 1, 256, True),      # a single key, head dim 256
    (F32, 1, 2, 2, 17, 33, 64, False),
    (F32, 2, 6, 2, 197, 197, 40, True),     # a head dim the Triton kernels do not take
]


@pytest.mark.parametrize("dtype,b,h,hkv,tq,tk,d,causal", ATTENTION_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_attention(device, dtype, b, h, hkv, tq, tk, d, causal):
    gen = torch.Generator().manual_seed(b * h + tq + d)
    t = dict(q=_rand((b, h, tq, d), dtype, device, gen=gen).requires_grad_(True),
             k=_rand((b, hkv, tk, d), dtype, device, gen=gen).requires_grad_(True),
             v=_rand((b, hkv, tk, d), dtype, device, gen=gen).requires_grad_(True))
    (out,) = _compare(lambda **a: vitkern.attention(**a, causal=causal, deterministic=causal),
                      lambda **a: attention_ref(**a, causal=causal), t, dtype, check=_flash_check(_grad_scale(t, tq)))
    assert out.shape == (b, h, tq, d) and out.dtype == dtype


@pytest.mark.parametrize("dtype,t_,h,d,causal", [(BF16, 197, 3, 64, False), (F16, 50, 2, 80, True),
                                                  (F32, 17, 4, 72, False)])
def test_attention_qkvpacked(device, dtype, t_, h, d, causal):
    qkv = _rand((2, t_, 3, h, d), dtype, device).requires_grad_(True)
    (out,) = _compare(lambda qkv: vitkern.attention_qkvpacked(qkv, causal=causal, scale=0.1),
                      lambda qkv: attention_qkvpacked_ref(qkv, causal=causal, scale=0.1), dict(qkv=qkv), dtype,
                      check=_flash_check(_grad_scale(dict(qkv=qkv), t_)))
    assert out.shape == (2, t_, h, d) and out.is_contiguous()


def _padding_bias(shape, device, *, finite_part=True, seed=1):
    """An additive key-padding bias (float32): -inf for ~30% of the keys, random finite values on
    half of the others, and every key of the last sequence masked (output 0, as the reference)."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.zeros(shape).masked_fill_(torch.rand(shape, generator=gen) < 0.3, float("-inf"))
    if finite_part:
        bias += torch.where(torch.rand(shape, generator=gen) < 0.5, torch.randn(shape, generator=gen), 0.0)
    if shape[0] > 1:
        bias[-1] = float("-inf")
    return bias.to(device)


@pytest.mark.parametrize("dtype,b,h,hkv,tq,tk,d,mask_kind", [
    (F16, 2, 2, 2, 33, 70, 64, "bool"),        # bool (B, 1, 1, Tk), a fully masked sequence
    (BF16, 2, 4, 2, 40, 70, 80, "float"),      # additive float (B, H, 1, Tk), GQA
    (F32, 3, 2, 2, 197, 197, 72, "bool"),
])
def test_attention_key_padding_through_sdpa(device, dtype, b, h, hkv, tq, tk, d, mask_kind):
    """The drop-in SDPA hands key-padding masks to op "attention" as key_padding_bias; fully masked
    rows give 0 and finite gradients, as the reference; a float mask gets its gradient too."""
    gen = torch.Generator().manual_seed(tq + tk)
    bias = _padding_bias((b, h if mask_kind == "float" else 1, tk), device, finite_part=mask_kind == "float")
    t = dict(q=_rand((b, h, tq, d), dtype, device, gen=gen).requires_grad_(True),
             k=_rand((b, hkv, tk, d), dtype, device, gen=gen).requires_grad_(True),
             v=_rand((b, hkv, tk, d), dtype, device, gen=gen).requires_grad_(True),
             mask=bias.isfinite()[:, :, None] if mask_kind == "bool" else bias[:, :, None].to(dtype).requires_grad_())

    def public(q, k, v, mask):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to torch's SDPA warns: it must route to op "attention"
            return vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hkv != h)

    def reference(q, k, v, mask):
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=F64, device=device).masked_fill(~mask, float("-inf"))
        return attention_ref(q, k, v, key_padding_bias=mask[:, :, 0])

    (out,) = _compare(public, reference, t, dtype, check=_flash_check(_grad_scale(t, tq)))
    assert torch.equal(out[-1].detach(), torch.zeros_like(out[-1]))


def test_attention_causal_with_padding_bias_and_empty_rows(device):
    """Causal together with a key-padding bias (SDPA takes one or the other: the backend folds
    them): the first keys masked, so the first query rows see no key at all."""
    b, h, tq, tk, d = 2, 2, 20, 24, 64
    bias = _padding_bias((b, 1, tk), device)
    bias[0, :, :3] = float("-inf")  # rows 0..2 of sequence 0 see nothing under the causal mask
    bias[1, :, 5] = 0.0
    gen = torch.Generator().manual_seed(3)
    for dtype in (F32, BF16):
        t = dict(q=_rand((b, h, tq, d), dtype, device, gen=gen).requires_grad_(True),
                 k=_rand((b, h, tk, d), dtype, device, gen=gen).requires_grad_(True),
                 v=_rand((b, h, tk, d), dtype, device, gen=gen).requires_grad_(True))
        kw = dict(causal=True, scale=None, return_lse=False, deterministic=False)
        ref = attention_ref(*(x.detach().double() for x in t.values()), key_padding_bias=bias.double(), **kw)
        same = attention_ref(*(x.detach() for x in t.values()), key_padding_bias=bias, **kw)
        out = attn_native.attention_torch(*t.values(), key_padding_bias=bias, **kw)
        assert_flash_rule("out", out.detach(), ref, same, dtype)
        assert torch.equal(out[0, :, :3].detach(), torch.zeros_like(out[0, :, :3]))
        grads = torch.autograd.grad(out, list(t.values()), torch.ones_like(out))
        assert all(torch.isfinite(g).all() for g in grads)
        assert torch.equal(grads[0][0, :, :3], torch.zeros_like(grads[0][0, :, :3]))


def test_attention_fully_masked_rows_never_reach_sdpa_all_masked(device, monkeypatch):
    """No SDPA kernel sees an all -inf row (some give NaN for it): the backend hands them 0s and
    zeroes their output."""
    seen = []
    real = attn_native._torch_sdpa

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attn_native, "_torch_sdpa", spy)
    q = torch.randn(2, 2, 5, 16, device=device)
    bias = torch.zeros(2, 1, 7, device=device)
    bias[1] = float("-inf")
    out = attn_native.attention_torch(q, q[:, :, :1].expand(2, 2, 7, 16), q[:, :, :1].expand(2, 2, 7, 16),
                                      key_padding_bias=bias)
    (mask,) = seen
    assert not torch.isneginf(mask).all(-1).any()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()


def test_attention_never_calls_functional_sdpa(device, monkeypatch):
    """The backend calls torch's SDPA saved at import: patching F.scaled_dot_product_attention
    (to vitkern's drop-in, or to anything else) neither recurses nor changes the result."""
    q = torch.randn(2, 4, 9, 32, device=device)
    k = torch.randn(2, 2, 9, 32, device=device)
    want = vitkern.attention(q, k, k)

    def boom(*args, **kwargs):
        raise AssertionError("F.scaled_dot_product_attention was called")

    monkeypatch.setattr(F, "scaled_dot_product_attention", boom)
    torch.testing.assert_close(vitkern.attention(q, k, k), want, rtol=0, atol=0)
    torch.testing.assert_close(vitkern.attention_qkvpacked(torch.randn(1, 9, 3, 2, 32, device=device)).shape,
                               torch.Size([1, 9, 2, 32]))
    monkeypatch.setattr(F, "scaled_dot_product_attention", vitkern.scaled_dot_product_attention)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool, device=device)
    got = F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want)


def test_sdpa_backends_pins_torchs_kernel(device, monkeypatch):
    q = torch.randn(1, 2, 9, 32, device=device)
    want = vitkern.attention(q, q, q)
    monkeypatch.setattr(attn_native, "SDPA_BACKENDS", [SDPBackend.MATH])
    torch.testing.assert_close(vitkern.attention(q, q, q), want)
    if device.type == "cpu":  # no memory-efficient kernel on the CPU: pinned to it, torch refuses the call
        monkeypatch.setattr(attn_native, "SDPA_BACKENDS", [SDPBackend.EFFICIENT_ATTENTION])
        with pytest.raises(RuntimeError):
            vitkern.attention(q, q, q)


def test_autocast_dtypes_match_the_reference(device):
    """Under autocast the torch backend returns what the reference returns (dtypes and values)."""
    gen = torch.Generator().manual_seed(5)
    x = _rand((2, 17, 64), F32, device, gen=gen)
    w = _rand((64, 64), F32, device, 0.125, gen=gen)
    res = _rand((2, 17, 64), F32, device, gen=gen)
    q = _rand((1, 2, 17, 32), F32, device, gen=gen)
    images = _rand((1, 3, 28, 28), F32, device, gen=gen)
    pw = _rand((64, 3, 14, 14), F32, device, 0.05, gen=gen)
    cls = _rand((1, 1, 64), F32, device, gen=gen)
    calls = [
        lambda: vitkern.linear(x, w, None, activation="gelu"),
        lambda: vitkern.linear(x, w, None, residual=res, residual_scale=w[0]),
        lambda: vitkern.mlp(x, w, None, w, None, residual=res),
        lambda: vitkern.layer_norm(x, w[0], None),
        lambda: vitkern.add_layer_norm(x, res)[0],
        lambda: vitkern.attention(q, q, q),
        lambda: vitkern.patch_embed(images, pw, None, prefix_tokens=cls),
    ]
    for i, call in enumerate(calls):
        with torch.autocast(device.type, dtype=BF16):
            got = call()
            with vitkern.use_backend("reference"):
                want = call()
        assert got.dtype == want.dtype, (i, got.dtype, want.dtype)
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2, msg=lambda m: f"call {i}: {m}")


def test_deterministic_flag_is_accepted(device):
    q = torch.randn(1, 2, 17, 32, device=device, requires_grad=True)
    out = vitkern.attention(q, q, q, deterministic=True)
    (g1,) = torch.autograd.grad(out.sum(), q)
    (g2,) = torch.autograd.grad(vitkern.attention(q, q, q, deterministic=True).sum(), q)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("pinned", [None, [SDPBackend.MATH]], ids=["torch-picks", "pinned-math"])
def test_compile_fullgraph_all_ops(device, monkeypatch, pinned):
    """torch.compile(fullgraph=True) traces every op of the torch backend (SDPA_BACKENDS too) without a
    graph break (aot_eager: dynamo and AOT autograd, no code generation, to stay fast), with
    eager's results and gradients."""
    torch._dynamo.reset()
    monkeypatch.setattr(attn_native, "SDPA_BACKENDS", pinned)
    d, h = 32, 2
    gen = torch.Generator().manual_seed(0)
    mk = lambda *shape, scale=1.0: _rand(shape, F32, device, scale, gen=gen).requires_grad_(True)  # noqa: E731
    p = dict(pw=mk(d, 3, 8, 8, scale=0.1), pb=mk(d), pos=mk(1, 5, d), cls=mk(1, 1, d), ln_w=mk(d), ln_b=mk(d),
             qkv_w=mk(3 * d, d, scale=0.2), proj_w=mk(d, d, scale=0.2), gamma=mk(d), fc1_w=mk(4 * d, d, scale=0.2),
             fc1_b=mk(4 * d), fc2_w=mk(d, 4 * d, scale=0.1), fc2_b=mk(d))

    def block(images, mask, rows):
        x = vitkern.patch_embed(images, p["pw"], p["pb"], pos_embed=p["pos"], prefix_tokens=p["cls"])
        b, t, _ = x.shape
        hdn = vitkern.layer_norm(x, p["ln_w"], p["ln_b"], eps=1e-6)
        qkv = vitkern.linear(hdn, p["qkv_w"]).view(b, t, 3, h, d // h)
        a = vitkern.attention_qkvpacked(qkv).reshape(b, t, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a2 = vitkern.attention(q, k[:, :1], v[:, :1], causal=True)
        a3 = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = vitkern.linear(a + a3.transpose(1, 2).reshape(b, t, d), p["proj_w"], residual=x, residual_scale=p["gamma"],
                           row_scale=rows)
        hdn, x = vitkern.add_layer_norm(a2.transpose(1, 2).reshape(b, t, d), x, p["ln_w"], p["ln_b"])
        return vitkern.mlp(hdn, p["fc1_w"], p["fc1_b"], p["fc2_w"], p["fc2_b"], activation="gelu_tanh", residual=x)

    images = _rand((2, 3, 16, 16), F32, device, gen=gen)
    mask = torch.tensor([[True] * 5, [False] * 5], device=device)[:, None, None, :]  # sequence 1 fully masked
    rows = torch.tensor([1.0] * 5 + [0.0] * 5, device=device)
    eager = block(images, mask, rows)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(images, mask, rows)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    leaves = list(p.values())
    grads = torch.autograd.grad(compiled.square().sum(), leaves)
    for c, e in zip(grads, torch.autograd.grad(eager.square().sum(), leaves)):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
