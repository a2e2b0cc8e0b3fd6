"""The Triton attention kernels (vitkern.ops.attention), forward and backward.

On a machine without a GPU the kernels run on CPU tensors through the Triton interpreter (the
conftest sets TRITON_INTERPRET=1). Accuracy follows the flash-attention rule: the kernel's error
against the float64 reference is at most twice the error of PyTorch's own SDPA in the same dtype,
plus the rounding noise of that dtype at the result's magnitude. Kernel outputs are poisoned
(NaN-filled) before the launch, so an element a kernel fails to write fails the test.

The default run covers every feature once at awkward shapes (T = 1, 17, 197, 257, ragged
Tq != Tk, head dims 32 / 64 / 72 / 80 / 96 / 128 / 256, causal, GQA and MQA, packed qkv views,
key-padding masks); the full cross product is marked ``slow``.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

import vitkern
from vitkern import _backend
from vitkern.ops import attention as A
from vitkern.ops.attention import configs as attn_configs, launch as attn_launch, op as attn_op, sdpa
from vitkern.ops.attention.tiles import _attn_desc_load, _attn_desc_store, _attn_descs
from vitkern.ops import _config
from vitkern.ops._config import INTERPRETING, KernelConfig
from vitkern.testing.numerics import assert_flash_rule, poisoned, poisoned_like, tf32_active, tf32_atol

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRETING), reason="Triton kernels need a GPU or TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True)
def _triton_backend():
    vitkern.use_backend("triton")  # the conftest restores the previous choice


@contextlib.contextmanager
def _fp32_precision(value: str):
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def _rand(shape, dtype, device, scale=1.0, gen=None):
    return (torch.randn(shape, generator=gen, dtype=F32) * scale).to(device=device, dtype=dtype)


def _sdpa(q, k, v, causal, scale, bias):
    """PyTorch's SDPA (with GQA expanded by hand, bias as an additive key-padding mask)."""
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = bias.to(q.dtype)[:, :, None, :]
    if causal:  # SDPA takes one or the other: fold the (top-left) causal mask into the float mask
        tq, tk = q.shape[2], k.shape[2]
        visible = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        mask = mask.masked_fill(~visible, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _references(q, k, v, dout, causal, scale, bias):
    """fp64 reference (out, lse, dq, dk, dv) and PyTorch's SDPA in the inputs' dtype (out, dq, dk, dv)."""
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = A.attention_ref(*leaves64, causal=causal, scale=scale, return_lse=True,
                                   key_padding_bias=None if bias is None else bias.double())
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_lp = _sdpa(*leaves, causal, scale, bias)
    out_lp = torch.nan_to_num(out_lp)  # torch's CPU kernels may give NaN rows for empty masks
    grads_lp = torch.autograd.grad(out_lp, leaves, dout)
    return (out64, lse64, *grads64), (out_lp.detach(), *grads_lp)


def _make_inputs(b, h, hkv, tq, tk, d, dtype, device, packed=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if packed:
        assert tq == tk and hkv == h
        qkv = _rand((b, tq, 3, h, d), dtype, device, gen=gen)
        q, k, v = attn_op._packed_views(qkv)
    else:
        q = _rand((b, h, tq, d), dtype, device, gen=gen)
        k = _rand((b, hkv, tk, d), dtype, device, gen=gen)
        v = _rand((b, hkv, tk, d), dtype, device, gen=gen)
    dout = _rand((b, h, tq, d), dtype, device, gen=gen)
    return q, k, v, dout


def _run_kernels(q, k, v, dout, causal, scale, bias, deterministic, bwd_mode=None):
    """The launchers straight, into NaN-poisoned outputs (packed inputs get (B, T, H, D) outputs
    and one packed gradient buffer, as the packed op uses them); ``bwd_mode`` forces the
    backward's path ("fused", "atomic", "dq_kernel"; None: the launcher's plan)."""
    b, h, tq, d = q.shape
    packed = q._base is not None and q._base is k._base and q._base.dim() == 5
    if packed:
        out = poisoned((b, tq, h, d), q.dtype, q.device).transpose(1, 2)
        dq, dk, dv = attn_op._packed_views(poisoned(q._base.shape, q.dtype, q.device))
    else:
        out = poisoned_like(q)
        dq, dk, dv = poisoned_like(q), poisoned_like(k), poisoned_like(v)
    lse = poisoned((b, h, tq), F32, q.device)
    attn_launch._attention_fwd(q, k, v, bias, causal, scale, out, lse)
    attn_launch._attention_bwd(dout, q, k, v, out, lse, None, bias, causal, scale, deterministic, dq, dk, dv,
                               mode=bwd_mode)
    return out, lse, dq, dk, dv


def _check_case(b, h, hkv, tq, tk, d, dtype, device, causal=False, packed=False, bias_kind=None,
                deterministic=False, scale=None, seed=0, bias=None, bwd_mode=None):
    """One case against the references; ``bias_kind`` draws a random key-padding bias (with one
    fully masked sequence when there are two or more), ``bias`` gives one as an fp32 tensor."""
    q, k, v, dout = _make_inputs(b, h, hkv, tq, tk, d, dtype, device, packed, seed)
    if bias is not None:
        bias = bias.to(device)
    if bias_kind is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        shape = {"batch": (b, 1, tk), "head": (b, h, tk), "shared": (1, 1, tk)}[bias_kind]
        bias = torch.zeros(shape)
        bias.masked_fill_(torch.rand(shape, generator=gen) < 0.3, float("-inf"))
        bias += torch.where(torch.rand(shape, generator=gen) < 0.5, torch.randn(shape, generator=gen), 0.0)
        if b > 1 and shape[0] > 1:
            bias[-1] = float("-inf")  # one sequence with every key masked: out 0, lse -inf
        bias = bias.to(device)
    scale_value = d ** -0.5 if scale is None else scale
    got = _run_kernels(q, k, v, dout, causal, scale_value, bias, deterministic, bwd_mode)
    ref64, ref_lp = _references(q, k, v, dout, causal, scale, bias)
    out, lse, dq, dk, dv = got
    scale_ref = max((r[torch.isfinite(r)].abs().max().item() if torch.isfinite(r).any() else 0.0)
                    for r in (ref64[0], *ref64[2:]))
    tf32 = tf32_active(dtype)
    assert_flash_rule("out", out, ref64[0], ref_lp[0], dtype, max(v.abs().max().item(), 1.0) if tf32 else 0.0, tf32)
    lse_ref = ref64[1]
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)) and torch.isfinite(lse[fin]).all()
    assert (lse[fin].double() - lse_ref[fin]).abs().max().item() <= 1e-4 * max(1.0, lse_ref[fin].abs().max().item())
    for name, g, r64, rlp in zip(("dq", "dk", "dv"), (dq, dk, dv), ref64[2:], ref_lp[1:]):
        assert_flash_rule(name, g, r64, rlp, dtype, scale_ref, tf32)
    return got


# --------------------------------------------------------------------------------------------
# Kernels against the fp64 reference (default: every feature once, at awkward shapes)
# --------------------------------------------------------------------------------------------

CASES = [
    # dtype, b, h, hkv, tq, tk, d, causal, packed, bias, deterministic
    (BF16, 2, 3, 3, 197, 197, 64, False, True, None, False),   # ViT-B/16: packed qkv, atomic dQ
    (F16, 1, 2, 2, 257, 257, 80, True, True, None, True),      # ViT-H/14 head dim 80 = 64 + 16
    (BF16, 2, 4, 2, 17, 17, 72, False, False, None, False),    # 72 = 64 + 16 (8 masked), GQA
    (F16, 1, 4, 1, 50, 197, 96, True, False, None, False),     # 96 = 64 + 32, MQA, Tq < Tk causal
    (BF16, 1, 2, 2, 197, 50, 128, True, False, None, True),    # Tq > Tk causal (top-left)
    (F16, 1, 2, 2, 1, 17, 32, False, False, None, False),      # a single query
    (BF16, 1, 2, 1, 17, 1, 256, True, False, None, True),      # a single key, head dim 256
    (F32, 1, 2, 2, 17, 33, 64, False, False, None, True),      # fp32, IEEE dots
    (F16, 2, 2, 2, 33, 70, 64, False, False, "batch", False),  # key padding, fully masked batch
    (BF16, 2, 4, 2, 40, 70, 80, True, False, "head", True),    # per-head padding bias, causal, GQA
    (BF16, 2, 4, 2, 70, 130, 128, False, False, "batch", False),  # 128, atomic dQ: sm_90's 64 x 64 tile
]


@pytest.mark.parametrize("dtype,b,h,hkv,tq,tk,d,causal,packed,bias,deterministic", CASES)
def test_kernels_match_fp64_reference(device, dtype, b, h, hkv, tq, tk, d, causal, packed, bias, deterministic):
    _check_case(b, h, hkv, tq, tk, d, dtype, device, causal=causal, packed=packed, bias_kind=bias,
                deterministic=deterministic)


def test_kernels_fp32_tf32_configs(device):
    # TF32 selects other configs (and TF32 dots on a GPU; the interpreter computes them exactly)
    with _fp32_precision("tf32"):
        _check_case(1, 2, 2, 33, 47, 80, F32, device, causal=True, bias_kind="shared")


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 mantissa bits, round to nearest: cvt.rna.tf32.f32), as fp32."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_flash_emulation(q, k, v, dout, scale):
    """A flash forward / backward whose every dot rounds its operands to TF32, in float64 (what
    the kernels compute on a GPU under TF32, up to the order of the fp32 sums)."""
    t = lambda x: _round_tf32(x).double()  # noqa: E731
    s = t(q) @ t(k).transpose(-1, -2) * scale
    p = torch.softmax(s, dim=-1)
    out = (t(p) @ t(v))
    dp = t(dout) @ t(v).transpose(-1, -2)
    dv = t(p).transpose(-1, -2) @ t(dout)
    ds = p * (dp - (dout.double() * out).sum(-1, keepdim=True))
    dq = t(ds) @ t(k) * scale
    dk = t(ds).transpose(-1, -2) @ t(q) * scale
    return out, dq, dk, dv


def test_tf32_tolerance_admits_tf32_rounding():
    """The TF32 rule accepts what TF32 dots really produce (emulated), with a 3x margin, where the
    IEEE 2x-of-torch rule against exact fp32 SDPA does not: on a GPU the old rule would fail."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 2, 197, 80, generator=gen) for _ in range(4))
    scale = 80 ** -0.5
    ref64, ref_lp = _references(q, k, v, dout, False, scale, None)
    emu = _tf32_flash_emulation(q, k, v, dout, scale)
    refs = (ref64[0], *ref64[2:])
    scale_ref = max(r.abs().max().item() for r in refs)
    scales = (max(v.abs().max().item(), 1.0), scale_ref, scale_ref, scale_ref)
    old_rule_fails = False
    for name, e, r64, rlp, sc in zip(("out", "dq", "dk", "dv"), emu, refs, ref_lp, scales):
        got = e.float()
        err = (got.double() - r64).abs().max().item()
        magnitude = max(sc, r64.abs().max().item(), 1.0)
        assert err <= tf32_atol(magnitude) / 3, f"{name}: TF32 error {err:.2e}"
        assert_flash_rule(name, got, r64, rlp, F32, sc, tf32=True)
        try:
            assert_flash_rule(name, got, r64, rlp, F32, sc if name != "out" else 0.0)
        except AssertionError:
            old_rule_fails = True
    assert old_rule_fails, "TF32 rounding passes the IEEE rule: the TF32 tolerance would be untested"


def test_kernels_custom_scale(device):
    _check_case(1, 2, 2, 20, 30, 64, F16, device, scale=0.3)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_kernels_negative_and_zero_scale(device, scale):
    # the forward's row max is on raw scores: a negative scale runs on -q, a zero one on the
    # smallest normal scale (uniform weights; the masked tail and the padded keys stay masked).
    # torch's CPU SDPA, the same-dtype term of the rule, gives NaN gradients for these scales
    # with a causal mask, so the causal diagonal is left to the other tests
    _check_case(1, 2, 2, 20, 70, 64, BF16, device, scale=scale)
    _check_case(2, 2, 2, 20, 70, 80, F16, device, bias_kind="batch", scale=scale)


# --------------------------------------------------------------------------------------------
# The forward's single key loop: where the masked blocks fall, and the key-length buckets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("d", [72, 80])
def test_kernels_197_tokens_causal_padding(device, dtype, d):
    # ViT's 197 tokens (three full key blocks of 64 and a tail of 5), head dims 72 / 80 (masked
    # tail, two pieces), causal, a key-padding bias with one sequence fully masked (out 0, lse -inf)
    _check_case(2, 2, 1, 197, 197, d, dtype, device, causal=True, bias_kind="batch", deterministic=dtype == F32)


@pytest.mark.parametrize("tq,tk,causal", [
    (33, 40, False),    # one key block, and it is masked (Tk < BLOCK_N): the loop starts masked
    (33, 128, False),   # Tk a multiple of BLOCK_N: no block is masked
    (70, 129, False),   # one key past the last full block
    (200, 64, True),    # causal with Tq > Tk: rows past Tk see every key
    (64, 200, True),    # causal with Tq < Tk: the diagonal, then nothing
])
def test_single_loop_mask_boundaries(device, tq, tk, causal):
    # the forward's key loop and the backward's query loop (dK/dV) and key loop (dQ kernel for
    # the causal cases, atomic dQ for the others): each one loop, masked only where needed
    _check_case(1, 2, 2, tq, tk, 64, BF16, device, causal=causal, deterministic=causal)


def test_forward_masked_leading_key_blocks(device):
    # the key-padding bias masks the leading key blocks of every row of sequence 0 (m stays
    # -inf, then finite: alpha = 0 where m was -inf) and every key of sequence 1
    tk = 197
    bias = torch.randn(2, 1, tk) * 0.5
    bias[0, :, 150:160] = float("-inf")
    bias[1] = float("-inf")
    leading = bias.clone()
    leading[0, :, :128] = float("-inf")
    _check_case(2, 2, 2, 70, tk, 64, F16, device, bias=leading)
    bias[0, :, :64] = float("-inf")  # causal: rows below 64 see no key, the others the rest
    _check_case(2, 2, 2, 100, tk, 64, BF16, device, causal=True, bias=bias)


def _recorded_fwd_configs(monkeypatch):
    seen = []
    real = attn_launch.launch

    def spy(kernel, grid, *args, config=None, **kwargs):
        if kernel is attn_launch._attention_fwd_kernel:
            seen.append(config)
        return real(kernel, grid, *args, config=config, **kwargs)

    monkeypatch.setattr(attn_launch, "launch", spy)
    return seen


@pytest.mark.parametrize("tk,block_n", [(197, 64), (2048, 64), (2100, 128)])
def test_forward_tiles_follow_the_key_length_bucket(device, monkeypatch, tk, block_n):
    # the sm_90 bf16 forward at head dim 64: 128 x 64 tiles up to 2048 keys, 128 x 128 past it
    # (the interpreter runs the chosen BLOCK_M / BLOCK_N; it ignores warps and stages)
    if torch.cuda.is_available():
        pytest.skip("the interpreter's arch (VITKERN_INTERPRET_ARCH) picks the tables here")
    monkeypatch.setenv("VITKERN_INTERPRET_ARCH", "90")
    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 1)  # the plain kernel (no key split)
    seen = _recorded_fwd_configs(monkeypatch)
    _check_case(1, 2, 1, 5, tk, 64, BF16, device, bias_kind="batch")
    assert [(c.meta["BLOCK_M"], c.meta["BLOCK_N"]) for c in seen] == [(128, block_n)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("d", [32, 64, 72, 80, 128, 256])
@pytest.mark.parametrize("tq,tk", [(1, 1), (17, 17), (197, 197), (257, 257), (1, 197), (197, 17), (50, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_full_matrix(device, dtype, d, tq, tk, causal):
    _check_case(1, 4, 2, tq, tk, d, dtype, device, causal=causal, deterministic=(tq + d) % 2 == 0)


@pytest.mark.slow
@pytest.mark.parametrize("d", A.ATTENTION_HEAD_DIMS)
def test_kernels_every_head_dim(device, d):
    # every head dim 16..256 in steps of 8, forward and backward: the dQ kernel and the fused
    # backward in turn (the atomic path where the head dim has no masked tail, at the matrix above)
    _check_case(1, 2, 1, 33, 40, d, BF16, device, causal=True, bias_kind="batch",
                bwd_mode="fused" if d % 16 else "dq_kernel")


@pytest.mark.slow
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 3), (8, 1)])
@pytest.mark.parametrize("bias", [None, "batch", "head", "shared"])
def test_kernels_gqa_and_masks(device, h, hkv, bias):
    _check_case(2, h, hkv, 70, 129, 64, F16, device, causal=hkv == 2, bias_kind=bias, deterministic=h == 4)


# --------------------------------------------------------------------------------------------
# Public functions on the Triton backend: autograd, layouts, lse, determinism
# --------------------------------------------------------------------------------------------


def _ref_grads(fn, inputs, dout):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dout.double())


def test_attention_autograd_strided_gqa(device):
    """vitkern.attention on non-contiguous views (a transposed layout, a sliced head dim with a
    non-unit last stride, which is copied), GQA, causal, against the fp64 reference."""
    b, h, hkv, tq, tk, d = 2, 4, 2, 30, 45, 64
    base_q = _rand((b, tq, h, d), BF16, device).transpose(1, 2)         # (B, H, T, D) view
    k = _rand((b, hkv, tk, 2 * d), BF16, device)[..., ::2]             # last stride 2
    v = _rand((b, tk, hkv, d), BF16, device).permute(0, 2, 1, 3)
    q, k, v = (t.requires_grad_() for t in (base_q, k, v))
    dout = _rand((b, h, tq, d), BF16, device)
    out = vitkern.attention(q, k, v, causal=True)
    assert out.shape == (b, h, tq, d) and out.dtype == BF16
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_grads = _ref_grads(lambda *t: A.attention_ref(*t, causal=True), (q, k, v), dout)
    _, lp_grads = _ref_grads(lambda *t: A.attention_ref(*t, causal=True), (q, k, v), dout)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and g.dtype == BF16
        torch.testing.assert_close(g.double(), r, atol=5e-2, rtol=5e-2)


def test_attention_qkvpacked_layout_and_grads(device):
    b, t, h, d = 1, 197, 2, 80
    x = _rand((b, t, 3 * h * d), F16, device).requires_grad_()
    qkv = x.view(b, t, 3, h, d)
    out, lse = vitkern.attention_qkvpacked(qkv, return_lse=True)
    assert out.shape == (b, t, h, d) and out.is_contiguous() and lse.shape == (b, h, t)
    dout = _rand((b, t, h, d), F16, device)
    (gx,) = torch.autograd.grad(out, (x,), dout)
    assert gx.shape == x.shape
    q, k, v = (u.transpose(1, 2) for u in qkv.unbind(2))
    want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=4e-3, rtol=4e-3)
    xr = x.detach().double().requires_grad_()
    ref = A.attention_qkvpacked_ref(xr.view(b, t, 3, h, d))
    (gref,) = torch.autograd.grad(ref, (xr,), dout.double())
    torch.testing.assert_close(gx.double(), gref, atol=1e-2, rtol=1e-2)


def test_lse_and_its_gradient(device):
    """return_lse: natural-log lse in fp32; a loss that uses lse gets its gradient too."""
    b, h, tq, tk, d = 1, 2, 33, 50, 64
    q, k, v, _ = _make_inputs(b, h, h, tq, tk, d, F32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = vitkern.attention(q, k, v, causal=True, return_lse=True)
    assert lse.dtype == F32 and lse.shape == (b, h, tq)
    grads = torch.autograd.grad(out.square().sum() + (lse * torch.linspace(-1, 1, tq)).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = A.attention_ref(*leaves, causal=True, return_lse=True)
    ref = torch.autograd.grad(out64.square().sum() + (lse64 * torch.linspace(-1, 1, tq).double()).sum(), leaves)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-6)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-4)


def test_deterministic_backward_is_bit_reproducible(device):
    b, h, hkv, t, d = 1, 4, 2, 70, 64
    q, k, v, dout = _make_inputs(b, h, hkv, t, t, d, BF16, device)

    def grads(deterministic):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = vitkern.attention(*leaves, deterministic=deterministic)
        return torch.autograd.grad(out, leaves, dout)

    first, second = grads(True), grads(True)
    assert all(torch.equal(a, b_) for a, b_ in zip(first, second))
    # the atomic dQ path agrees up to summation order
    for a, b_ in zip(first, grads(False)):
        torch.testing.assert_close(a, b_, atol=2e-2, rtol=2e-2)


def test_deterministic_algorithms_flag_selects_dq_kernel(device, monkeypatch):
    seen = []
    real = attn_launch._attention_bwd

    def spy(*args):
        seen.append(args[10])  # the deterministic argument
        return real(*args)

    monkeypatch.setattr(attn_launch, "_attention_bwd", spy)
    q, k, v, dout = _make_inputs(1, 2, 2, 17, 17, 64, F16, device)
    q.requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.autograd.grad(vitkern.attention(q, k, v), (q,), dout)
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.autograd.grad(vitkern.attention(q, k, v), (q,), dout)
    assert seen == [True, False]


def test_auto_backend_runs_the_kernels(device, monkeypatch):
    calls = []
    real = attn_launch._attention_fwd
    monkeypatch.setattr(attn_launch, "_attention_fwd", lambda *a: calls.append(1) or real(*a))
    q, k, v, _ = _make_inputs(1, 2, 2, 17, 17, 32, F16, device)
    vitkern.use_backend("auto")
    vitkern.attention(q, k, v)
    assert calls == [1]


def test_memory_is_linear_in_sequence_length(device):
    """No launcher (forward or backward, either dQ path) allocates anything of size Tq x Tk."""
    sizes = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    b, h, t, d = 1, 1, 257, 16
    q, k, v, dout = _make_inputs(b, h, h, t, t, d, F16, device)
    for deterministic in (False, True):
        with Allocations():
            out, lse = attn_op._attention_fwd_op(q, k, v, None, False, 0.25, deterministic)
            attn_op._attention_bwd_op(dout, q, k, v, out, lse, None, None, False, 0.25, deterministic)
    assert sizes and max(sizes) < t * t


# --------------------------------------------------------------------------------------------
# The drop-in SDPA on the kernels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,mask_kind,mask_shape",
    [(BF16, "bool", (2, 1, 1, 197)), (F16, "additive", (2, 3, 1, 197)), (F32, "bool", (1, 197)),
     (BF16, "additive", (1, 1, 1, 197))],
)
def test_sdpa_key_padding_on_kernels(device, monkeypatch, dtype, mask_kind, mask_shape):
    monkeypatch.setattr(sdpa, "_torch_sdpa", lambda *a, **kw: pytest.fail("fell back to torch's SDPA"))
    kernel_calls = []
    real = attn_launch._attention_fwd
    monkeypatch.setattr(attn_launch, "_attention_fwd", lambda *a: kernel_calls.append(a[3] is not None) or real(*a))
    t = 197 if dtype != F32 else 61  # fp32 (IEEE) runs small tiles: slow under the interpreter
    mask_shape = mask_shape[:-1] + (t,)
    q, k, v, dout = _make_inputs(2, 3, 3, t, t, 64, dtype, device)
    if mask_kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
        mask[..., 0] = True
        if mask_shape[0] == 2:
            mask[1] = False  # a fully masked sequence: zeros, as torch's SDPA
    else:
        mask = _rand(mask_shape, dtype, "cpu")
    mask = mask.to(device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = vitkern.scaled_dot_product_attention(*leaves, attn_mask=mask)
    grads = torch.autograd.grad(out, leaves, dout)
    assert kernel_calls == [True]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = torch.nan_to_num(F.scaled_dot_product_attention(*ref_leaves, attn_mask=mask))
    want_grads = torch.autograd.grad(want, ref_leaves, dout)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == F32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, want, **tol)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **tol)


def test_sdpa_causal_gqa_on_kernels(device, monkeypatch):
    monkeypatch.setattr(sdpa, "_torch_sdpa", lambda *a, **kw: pytest.fail("fell back to torch's SDPA"))
    q, k, v, _ = _make_inputs(1, 4, 2, 50, 70, 72, F16, device)
    got = vitkern.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_sdpa_fallbacks_warn_once(device, monkeypatch):
    monkeypatch.setattr(sdpa, "_warned_reasons", set())
    q, k, v, _ = _make_inputs(1, 2, 2, 17, 17, 20, F16, device)  # head dim 20: not a kernel head dim
    with pytest.warns(UserWarning, match="head dim 20"):
        got = vitkern.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vitkern.scaled_dot_product_attention(q, k, v)  # once per reason
    q, k, v, _ = _make_inputs(1, 2, 2, 17, 17, 32, F16, device)
    dense = torch.randn(17, 17).to(device=device, dtype=F16)
    with pytest.warns(UserWarning, match="not a key-padding mask"):
        got = vitkern.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=dense))


# --------------------------------------------------------------------------------------------
# Errors, registered ops, torch.compile
# --------------------------------------------------------------------------------------------


def test_unsupported_head_dim_raises(device):
    """Head dims outside the kernels' set: an explicit "triton" raises naming the head dim, "auto"
    runs the reference (as timm runs such a model)."""
    vitkern.use_backend("triton")
    for d in (12, 20, 264):
        q, k, v, _ = _make_inputs(1, 1, 1, 5, 5, d, F16, device)
        with pytest.raises(vitkern.BackendUnavailableError, match=f"head dim {d}"):
            vitkern.attention(q, k, v)
        with pytest.raises(ValueError, match=f"q: unsupported head dim {d}"):
            attn_op._attention_triton(q, k, v)  # the launcher's own guard
    qkv = _rand((1, 5, 3, 2, 36), F16, device)
    with pytest.raises(vitkern.BackendUnavailableError, match="head dim 36"):
        vitkern.attention_qkvpacked(qkv)
    vitkern.use_backend("auto")
    q, k, v, _ = _make_inputs(1, 1, 1, 5, 5, 20, F16, device)
    torch.testing.assert_close(vitkern.attention(q, k, v), A.attention_ref(q, k, v))
    torch.testing.assert_close(vitkern.attention_qkvpacked(qkv), A.attention_qkvpacked_ref(qkv))


def test_backend_supports_predicates(device):
    q, k, v, _ = _make_inputs(1, 1, 1, 5, 5, 16, F64, device)
    flags = dict(causal=False, scale=None, return_lse=False, deterministic=False)
    reasons = _backend.backend_impl("attention", "triton").reasons(device, (q, k, v), dict(flags))
    assert any("float64" in r for r in reasons)
    reasons = _backend.backend_impl("attention_qkvpacked", "triton").reasons(device, (torch.stack([q, k, v], 2),),
                                                                              dict(flags))
    assert any("float64" in r for r in reasons)
    q, k, v = (t.float() for t in (q, k, v))
    assert attn_op._attention_triton_supports(q, k, v, **flags, key_padding_bias=None) is None
    bias = torch.zeros(1, 1, 5, device=device, requires_grad=True)
    assert "requires grad" in attn_op._attention_triton_supports(q, k, v, **flags, key_padding_bias=bias)


def test_head_dim_pieces():
    for d in A.ATTENTION_HEAD_DIMS:
        da, db = attn_configs._attn_pieces(d)
        assert da & (da - 1) == 0 and (db == 0 or (db & (db - 1) == 0 and db >= 16))
        assert d <= da + db <= triton_next_pow2(d)
        if db:
            assert da >= d // 2 and da + db < triton_next_pow2(d)  # a split beats padding
    assert (attn_configs._attn_pieces(80) == (64, 16) and attn_configs._attn_pieces(96) == (64, 32)
            and attn_configs._attn_pieces(72) == (64, 16))
    assert attn_configs._attn_pieces(64) == (64, 0) and attn_configs._attn_pieces(112) == (128, 0)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def test_config_tables_cover_every_head_dim():
    for kernel, arch, precision in itertools.product(("fwd", "dkdv", "dq"), (80, 90), ("16bit", "tf32", "ieee")):
        table = attn_configs._ATTN_CONFIGS[(kernel, arch, precision)]
        assert table[-1][0] == 256 and [w for w, _ in table] == sorted(w for w, _ in table)
        for _, config in table:
            assert isinstance(config, KernelConfig) and config.archs == (arch,)
            assert set(config.meta) == {"BLOCK_M", "BLOCK_N"}
        for d in A.ATTENTION_HEAD_DIMS:
            da, db = attn_configs._attn_pieces(d)
            assert attn_configs._attn_config(kernel, arch, precision, da + db) is not None


# --------------------------------------------------------------------------------------------
# Split-KV forward (small grids): partial results per key split merged through their lse
# --------------------------------------------------------------------------------------------


def _recorded_kernels(monkeypatch):
    seen = []
    real = attn_launch.launch

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel, grid))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(attn_launch, "launch", spy)
    return seen


@pytest.mark.parametrize("t,splits,sms", [(1, 1, 64), (197, 4, 64), (1025, 3, 64),
                                          pytest.param(4096, 4, 256, marks=pytest.mark.slow)])
def test_split_kv_forward_matches_the_plain_forward(device, monkeypatch, t, splits, sms):
    # batch 1, 2 heads: 2 x ceil(T / 128) query blocks on 64 SMs (the interpreter's SM count,
    # raised here; 256 for T = 4096's 64 query blocks) take one key split per free SM; T = 1 has
    # one key block and never splits
    if torch.cuda.is_available():
        pytest.skip("the interpreter's SM count decides the split here")
    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", sms)
    seen = _recorded_kernels(monkeypatch)
    q, k, v, dout = _make_inputs(1, 2, 2, t, t, 32, BF16, device)
    plain = (poisoned_like(q), poisoned((1, 2, t), F32, device))
    attn_launch._attention_fwd(q, k, v, None, False, 32 ** -0.5, *plain, kv_splits=1)
    split = (poisoned_like(q), poisoned((1, 2, t), F32, device))
    attn_launch._attention_fwd(q, k, v, None, False, 32 ** -0.5, *split)
    launched = [(kernel, grid) for kernel, grid in seen[1:]]
    if splits == 1:
        assert launched == [(attn_launch._attention_fwd_kernel, (2 * triton_cdiv(t, 128),))]
    else:
        assert launched[0] == (attn_launch._attention_fwd_split_kernel, (2 * triton_cdiv(t, 128), splits))
        assert launched[1][0] is attn_launch._attention_fwd_merge_kernel
    # the same softmax, summed in another order: one bf16 rounding of the output, fp32 of the lse
    torch.testing.assert_close(split[0].float(), plain[0].float(), atol=2 ** -8, rtol=2 ** -7)
    torch.testing.assert_close(split[1], plain[1], atol=1e-5, rtol=1e-6)
    # and the whole op (forward split, backward from its lse) against the references
    _check_case(1, 2, 2, t, t, 32, BF16, device)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_split_kv_forward_causal_padding_gqa(device, monkeypatch, dtype):
    # causal: the splits past a query block's diagonal see no key (out 0, lse -inf, weight 0);
    # key padding with a fully masked sequence; GQA; head dim 72's masked tail
    if torch.cuda.is_available():
        pytest.skip("the interpreter's SM count decides the split here")
    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 64)
    seen = _recorded_kernels(monkeypatch)
    _check_case(2, 2, 1, 150, 197, 72, dtype, device, causal=True, bias_kind="batch")
    assert any(kernel is attn_launch._attention_fwd_split_kernel for kernel, _ in seen)


def test_split_kv_forward_is_16bit_only(device, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter's SM count decides the split here")
    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 256)
    seen = _recorded_kernels(monkeypatch)
    _check_case(1, 2, 2, 40, 197, 64, F32, device, deterministic=True)
    assert not any(kernel is attn_launch._attention_fwd_split_kernel for kernel, _ in seen)


# --------------------------------------------------------------------------------------------
# TMA descriptors (sm_90): the same results as the pointer path, and where they apply
# --------------------------------------------------------------------------------------------


def _forward_both_ways(q, k, v, bias, causal, out_like, kv_splits=1, seqs=None):
    """The forward through pointers and through TMA descriptors, into poisoned outputs."""
    results = []
    for tma in (False, True):
        out = poisoned_like(out_like)
        lse = poisoned((q.shape[0], q.shape[1], q.shape[2]), F32, q.device)
        attn_launch._attention_fwd(q, k, v, bias, causal, q.shape[-1] ** -0.5, out, lse, kv_splits=kv_splits,
                                   seqs=seqs, tma=tma)
        results.append((out, lse))
    return results


@pytest.mark.parametrize("dtype,d,b,h,hkv,tq,tk,causal,packed,bias_kind", [
    (BF16, 64, 2, 3, 3, 197, 197, False, True, None),     # ViT's packed qkv
    (F16, 72, 2, 4, 2, 100, 197, True, False, "batch"),   # a masked head-dim piece, GQA, padding
    (BF16, 80, 1, 2, 1, 257, 50, False, False, "head"),   # two pieces (64 + 16), MQA
    (BF16, 128, 1, 2, 2, 1, 17, True, False, None),       # one query row
    (F32, 64, 2, 2, 2, 33, 70, True, False, None),        # fp32, IEEE dots
])
def test_tma_forward_equals_the_pointer_forward(device, dtype, d, b, h, hkv, tq, tk, causal, packed, bias_kind):
    # the descriptors zero-fill rows past T (the pointer path repeats row T - 1) and columns past
    # D: both are masked or multiplied by zeros, so the two paths compute the same values
    q, k, v, _ = _make_inputs(b, h, hkv, tq, tk, d, dtype, device, packed, seed=3)
    bias = None
    if bias_kind is not None:
        shape = {"batch": (b, 1, tk), "head": (b, h, tk)}[bias_kind]
        bias = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.3,
                           float("-inf"), 0.0).to(device)
    out_like = torch.empty((b, tq, h, d), dtype=dtype, device=device).transpose(1, 2) if packed else q
    (out_p, lse_p), (out_t, lse_t) = _forward_both_ways(q, k, v, bias, causal, out_like)
    if INTERPRETING:
        assert torch.equal(out_t, out_p) and torch.equal(lse_t, lse_p)
    else:
        torch.testing.assert_close(out_t, out_p, atol=0, rtol=0) if dtype != F32 else \
            torch.testing.assert_close(out_t, out_p)
    assert not out_t.isnan().any()


def test_tma_split_kv_forward_equals_the_pointer_forward(device, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter's SM count decides the split here")
    monkeypatch.setattr(_config, "INTERPRET_NUM_SMS", 64)
    q, k, v, _ = _make_inputs(1, 2, 2, 197, 197, 72, BF16, device, seed=8)
    (out_p, lse_p), (out_t, lse_t) = _forward_both_ways(q, k, v, None, True, q, kv_splits=3)
    assert torch.equal(out_t, out_p) and torch.equal(lse_t, lse_p)


def test_tma_varlen_forward_keeps_each_sequence_to_its_rows(device):
    # a packed sequence's descriptors end at its last row: the tile stores of a short sequence
    # must not write the next sequence's rows (which another program writes), and the key tiles
    # read zeros, not the next sequence, past its end; an empty sequence in between
    lens = (5, 0, 130, 64, 1)
    total, h, d = sum(lens), 2, 64
    gen = torch.Generator().manual_seed(2)
    q, k, v = (_rand((total, h, d), BF16, device, gen=gen) for _ in range(3))
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    view = attn_op._seq_view
    for longest in (None, max(lens)):
        seqs = attn_launch.PackedSeqs(cu, cu, longest, longest)
        (out_p, lse_p), (out_t, lse_t) = _forward_both_ways(view(q), view(k), view(v), None, False, view(q),
                                                            seqs=seqs)
        assert torch.equal(out_t, out_p) and torch.equal(lse_t, lse_p)
    ref = A.attention_varlen_ref(q.double(), k.double(), v.double(), cu, cu)
    torch.testing.assert_close(out_t[0].transpose(0, 1).double(), ref, atol=2e-2, rtol=2e-2)


@triton.jit
def _copy_rows_through_descriptors(X, Y, n, stride_t, D: tl.constexpr, BLOCK: tl.constexpr, DA: tl.constexpr,
                                   DB: tl.constexpr):
    """Y[:n, :D] = X[:n, :D] + 1 through the attention kernels' descriptor helpers, one tile."""
    xa, xb = _attn_descs(X, n, stride_t, D, BLOCK, DA, DB)
    ya, yb = _attn_descs(Y, n, stride_t, D, BLOCK, DA, DB)
    a, b = _attn_desc_load(xa, xb, 0, DA, DB)
    _attn_desc_store(ya, yb, 0, a.to(tl.float32) + 1.0, b.to(tl.float32) + 1.0, DA, DB)


def test_tma_descriptors_end_at_their_slice(device):
    # what keeps a packed sequence's tiles to its own rows, checked directly (the interpreter runs
    # programs in order, so a later sequence would hide an overwrite in the op's own tests): a
    # descriptor of n rows loads zeros past row n and column D, and drops stores there
    x = _rand((32, 80), BF16, device)
    y = torch.zeros_like(x)
    _copy_rows_through_descriptors[(1,)](x, y, 5, 80, D=72, BLOCK=16, DA=64, DB=16)
    expected = torch.zeros_like(x)
    expected[:5, :72] = (x[:5, :72].float() + 1).to(BF16)
    assert torch.equal(y, expected)


def test_tma_choice(device, monkeypatch):
    calls = []
    monkeypatch.setattr(attn_launch, "ensure_scratch_allocator", lambda: calls.append(1))
    x = torch.empty((2, 3, 10, 64), dtype=BF16, device=device)
    pieces = (64, 0)
    # sm_90 takes descriptors where every tensor is addressable (and sets the scratch allocator
    # of the launching thread: autograd's backward thread, a server's workers)
    assert attn_launch._attn_use_tma(None, 90, "16bit", x, x, pieces=pieces) and calls == [1]
    assert attn_launch._attn_use_tma(None, 90, "tf32", x, pieces=pieces)
    assert not attn_launch._attn_use_tma(None, 90, "ieee", x, pieces=pieces)  # fp32 FMA dots
    assert not attn_launch._attn_use_tma(None, 80, "16bit", x, x, pieces=pieces)
    assert not attn_launch._attn_use_tma(False, 90, "16bit", x, pieces=pieces)
    assert attn_launch._attn_use_tma(True, 80, "ieee", x, pieces=pieces)  # forced: tests
    # not addressable: a token stride of 40 bytes (D = 20), a base off 16 bytes, a 4-byte piece
    odd = torch.empty((2, 3, 10, 20), dtype=BF16, device=device)
    shifted = torch.empty((2 * 3 * 10 * 64 + 1,), dtype=BF16, device=device)[1:].view(2, 3, 10, 64)
    assert not attn_launch._attn_tma_ok(odd, pieces=(16, 4))
    assert not attn_launch._attn_tma_ok(shifted, pieces=pieces)
    assert not attn_launch._attn_tma_ok(x, pieces=(64, 2))
    assert not attn_launch._attn_use_tma(None, 90, "16bit", x, odd, pieces=pieces)
    with pytest.raises(ValueError, match="tma=True needs 16-byte aligned"):
        attn_launch._attn_use_tma(True, 90, "16bit", odd, pieces=pieces)
    # the packed qkv view (B, T, 3, H, D) seen as (B, H, T, D) is addressable at D = 64
    q, _, _ = attn_op._packed_views(torch.empty((2, 10, 3, 4, 64), dtype=BF16, device=device))
    assert attn_launch._attn_tma_ok(q, pieces=pieces)


def test_forward_launch_takes_tma_on_sm90_only(device, monkeypatch):
    seen = []
    real = attn_launch.launch
    monkeypatch.setattr(attn_launch, "launch", lambda kernel, grid, *a, **kw: seen.append(kw.get("TMA")) or
                        real(kernel, grid, *a, **kw))
    q, k, v, _ = _make_inputs(1, 2, 2, 40, 40, 64, BF16, device)
    for arch, expected in ((90, True), (80, False)):
        with _config.arch_override(arch):
            out, lse = poisoned_like(q), poisoned((1, 2, 40), F32, device)
            attn_launch._attention_fwd(q, k, v, None, False, 0.125, out, lse, kv_splits=1)
        assert seen[-1] is expected


def test_kv_splits_choice():
    # B = 1, 12 heads, T = 197 at 128 x 64 tiles: 24 programs, 4 key blocks on 132 SMs
    assert attn_configs._attn_kv_splits(24, 4, 132) == 4
    assert attn_configs._attn_kv_splits(132, 4, 132) == 1      # the grid fills the SMs
    assert attn_configs._attn_kv_splits(6144, 4, 132) == 1     # B = 256
    assert attn_configs._attn_kv_splits(24, 1, 132) == 1       # one key block
    assert attn_configs._attn_kv_splits(18, 17, 64) == 3       # 64 // 18
    # never an empty split: 17 key blocks in 16 splits would leave one empty at 2 a split
    assert attn_configs._attn_kv_splits(2, 17, 132) == 9
    assert attn_configs._attn_kv_splits(40, 17, 132) == 3


def test_forward_plan():
    plan = attn_configs._attn_fwd_plan
    # ViT-B/16 at batch 1 on an H100: 128 x 64 tiles, 4 splits of one key block
    config, splits, per_split = plan(90, "16bit", 64, False, 12, 197, 197, 132)
    assert _tiles(config) == (128, 64, 8, 3) and (splits, per_split) == (4, 1)
    assert plan(90, "16bit", 64, False, 256 * 12, 197, 197, 132)[1:] == (1, 4)   # batch 256: no split
    assert plan(90, "ieee", 64, False, 12, 197, 197, 132)[1] == 1                # fp32 never splits
    assert plan(90, "16bit", 64, False, 12, 197, 197, None, kv_splits=1)[1] == 1
    assert plan(90, "16bit", 64, False, 12, 1025, 1025, 132, kv_splits=5)[1:] == (5, 4)  # 17 key blocks
    # head dim 104 (128, masked): the split kernel's own tile
    config, splits, _ = plan(90, "16bit", 128, True, 2, 197, 197, 132)
    assert _tiles(config) == (128, 32, 8, 3) and splits > 1
    assert _tiles(plan(90, "16bit", 128, True, 2, 197, 197, 132, kv_splits=1)[0]) == (128, 64, 8, 3)


def triton_cdiv(a, b):
    return -(-a // b)


def _tiles(config):
    return config.meta["BLOCK_M"], config.meta["BLOCK_N"], config.num_warps, config.num_stages


# --------------------------------------------------------------------------------------------
# The fused short-sequence backward: dQ, dK, dV in one kernel, per-program fp32 dQ scratch
# --------------------------------------------------------------------------------------------


_FUSED_CASES = [
    # dtype, head dim, causal, kv heads (of 2 query heads)
    (BF16, 64, False, 2),   # ViT-B/16's head dim
    (F16, 72, True, 1),     # 72 = 64 + 16 with 8 masked, causal, GQA
    (F32, 80, True, 2),     # fp32 pads 80 to one masked 128-wide tile
]
_FUSED_SLOW_CASES = [
    (F16, 64, True, 1), (F32, 64, False, 1), (BF16, 72, False, 2), (F32, 72, True, 1), (BF16, 80, False, 1),
    (F16, 80, True, 2),     # 80 = 64 + 16: two dQ scratch pieces
]


def _check_fused_backward(device, dtype, d, causal, hkv):
    # 197 tokens (the last key block a tail); against the fp64 reference and torch's SDPA (the
    # flash rule), bit-identical on a second run (no atomics: each program sums its dQ in a fixed
    # order), and equal within the dtype's rounding to the separate dQ kernel's path
    b, h, t = 1, 2, 197
    fused = _check_case(b, h, hkv, t, t, d, dtype, device, causal=causal, bwd_mode="fused")
    q, k, v, dout = _make_inputs(b, h, hkv, t, t, d, dtype, device)
    again = _run_kernels(q, k, v, dout, causal, d ** -0.5, None, False, "fused")
    other = _run_kernels(q, k, v, dout, causal, d ** -0.5, None, True, "dq_kernel")
    for name, a, b_, c in zip(("dq", "dk", "dv"), fused[2:], again[2:], other[2:]):
        assert torch.equal(a, b_), f"{name}: the fused backward is not bit-reproducible"
        # the same sums in another order: a few roundings of the dtype at the gradients' magnitude
        tol = {F32: 1e-5, F16: 2e-3, BF16: 2e-2}[dtype] * max(1.0, c.abs().max().item())
        torch.testing.assert_close(a.float(), c.float(), atol=tol, rtol=0, msg=name)


@pytest.mark.parametrize("dtype,d,causal,hkv", _FUSED_CASES)
def test_fused_backward_matches_references_and_the_dq_kernel(device, dtype, d, causal, hkv):
    _check_fused_backward(device, dtype, d, causal, hkv)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,d,causal,hkv", _FUSED_SLOW_CASES)
def test_fused_backward_matrix(device, dtype, d, causal, hkv):
    _check_fused_backward(device, dtype, d, causal, hkv)


def test_fused_backward_persistent_grid_and_key_padding(device, monkeypatch):
    # 3 x 4 = 12 (batch, kv head) pairs on the interpreter's 4 SMs: the plan's fused kernel, 8
    # programs, so 4 of them take a second pair and reuse their scratch; a key-padding bias with
    # one fully masked sequence, causal, Tq != Tk; then the packed layout
    if torch.cuda.is_available():
        pytest.skip("the interpreter's SM count sizes the grid here")
    seen = _recorded_kernels(monkeypatch)
    _check_case(3, 4, 4, 70, 129, 64, BF16, device, causal=True, bias_kind="batch")
    (fused,) = [grid for kernel, grid in seen if kernel is attn_launch._attention_bwd_fused_kernel]
    assert fused == (2 * _config.INTERPRET_NUM_SMS,)
    seen.clear()
    _check_case(1, 2, 2, 150, 150, 32, F16, device, packed=True, bwd_mode="fused")
    assert not any(kernel is attn_launch._attention_bwd_dkdv_kernel for kernel, _ in seen)


def test_backward_plan():
    plan = attn_configs._attn_bwd_plan
    # ViT-B/16 at batch 256 on an H100: 3072 (batch, head) pairs, 264 programs, each with a
    # 197 x 64 fp32 scratch (rounded to 224 rows) and its q / dO: 264 x 106 KB = 28 MB of L2
    p = plan(90, "16bit", 64, False, 256, 12, 12, 197, 197, 132, False)
    assert p.mode == "fused" and p.programs == 264 and p.dq_config is None
    assert _tiles(p.config) == (32, 64, 4, 1)
    assert plan(90, "16bit", 64, False, 256, 12, 12, 197, 197, 132, True).mode == "fused"  # deterministic too
    assert plan(90, "16bit", 64, False, 256, 16, 16, 257, 257, 132, False).mode == "fused"  # ViT-L/16
    # past the L2 budget: T = 577 at head dim 64, T = 257 at 80 (ViT-H/14)
    assert plan(90, "16bit", 64, False, 256, 12, 12, 577, 577, 132, False).mode == "atomic"
    assert plan(90, "16bit", 64, False, 256, 12, 12, 577, 577, 132, True).mode == "dq_kernel"
    assert plan(90, "16bit", 80, False, 256, 16, 16, 257, 257, 132, False).mode == "atomic"
    # fewer pairs than SMs (batch 1): the dK/dV kernel's grid has a program per key block
    p = plan(90, "16bit", 64, False, 1, 12, 12, 197, 197, 132, False)
    assert p.mode == "atomic" and p.programs == 4 * 12
    # no tile of its own: masked head dims, fp32; no keys
    assert plan(90, "16bit", 80, True, 256, 16, 16, 197, 197, 132, False).mode == "dq_kernel"
    assert plan(90, "ieee", 64, False, 256, 12, 12, 197, 197, 132, False).mode == "atomic"
    assert plan(90, "16bit", 64, False, 256, 12, 12, 197, 0, 132, False).mode == "atomic"
    assert plan(90, "16bit", 64, False, 256, 12, 12, 197, 197, None, False).mode == "atomic"
    # GQA: the pairs are the kv heads, the scratch holds the group's query heads (4 x 50 rows
    # pass the budget, 4 x 197 do not)
    assert plan(90, "16bit", 64, False, 256, 32, 8, 50, 50, 132, False).mode == "fused"
    assert plan(90, "16bit", 64, False, 256, 32, 8, 197, 197, 132, False).mode == "atomic"
    assert plan(90, "16bit", 64, False, 16, 32, 8, 50, 50, 132, False).mode == "atomic"  # 128 pairs
    # forced modes
    p = plan(90, "16bit", 64, False, 2, 4, 4, 197, 197, None, False, mode="fused")
    assert p.mode == "fused" and p.programs == 2
    p = plan(90, "16bit", 80, True, 2, 4, 4, 197, 197, None, False, mode="dq_kernel")
    assert p.mode == "dq_kernel" and p.dq_config is not None and p.programs == 4 * 2 * 4
    with pytest.raises(ValueError, match="masked tail"):
        plan(90, "16bit", 80, True, 2, 4, 4, 197, 197, None, False, mode="atomic")
    with pytest.raises(ValueError, match="backward mode"):
        plan(90, "16bit", 64, False, 2, 4, 4, 197, 197, None, False, mode="split")


def test_fused_backward_l2_bytes():
    # per program: the scratch (Tq rounded up to whole query blocks x width x 4 bytes, per query
    # head of the group) and its q and dO
    assert attn_configs._attn_fused_bytes(1, 1, 197, 64, 32, 2) == 224 * 64 * 4 + 2 * 197 * 64 * 2
    assert attn_configs._attn_fused_bytes(264, 2, 50, 80, 16, 2) == 264 * 2 * (64 * 80 * 4 + 2 * 50 * 80 * 2)


@pytest.mark.parametrize("d,tk,dtype,arch,tiles", [
    # sm_90 16-bit: 128 x 64 up to 2048 keys at head widths <= 64 (2 blocks per SM), the long
    # table's 128 x 128 past it; head dims 72 / 80 / 128 read the length-independent tables
    (64, 1, BF16, 90, (128, 64, 8, 3)),
    (64, 197, BF16, 90, (128, 64, 8, 3)),
    (64, 1025, F16, 90, (128, 64, 8, 3)),
    (64, 2048, BF16, 90, (128, 64, 8, 3)),
    (64, 2049, BF16, 90, (128, 128, 8, 3)),
    (64, 4096, F16, 90, (128, 128, 8, 3)),
    (32, 197, BF16, 90, (128, 64, 8, 3)),
    (32, 4096, BF16, 90, (128, 64, 8, 3)),   # widths <= 48: the long table's 128 x 64 as well
    (56, 197, BF16, 90, (128, 64, 8, 3)),    # 56 pads to one masked 64-wide tile
    (56, 4096, BF16, 90, (128, 64, 8, 3)),   # masked: 128 x 128 spilled on 3.6 at every length
    (80, 257, BF16, 90, (128, 64, 8, 3)),
    (72, 729, BF16, 90, (128, 64, 8, 3)),
    (128, 4096, BF16, 90, (128, 64, 8, 3)),
    (256, 197, BF16, 90, (128, 32, 8, 2)),
    # fp32 and sm_80 have no key-length entries
    (64, 197, F32, 90, (16, 32, 4, 1)),
    (64, 197, BF16, 80, (128, 64, 8, 3)),
    (64, 4096, BF16, 80, (128, 64, 8, 3)),
])
def test_forward_config_by_key_length(d, tk, dtype, arch, tiles):
    da, db = attn_configs._attn_pieces(d, split=dtype != F32)
    with _fp32_precision("ieee"):
        precision = attn_configs._attn_precision(dtype)
    config = attn_configs._attn_config("fwd", arch, precision, da + db, d != da + db, tk=tk)
    assert _tiles(config) == tiles and config.archs == (arch,)


def test_key_length_buckets_and_backward_tables():
    assert attn_configs._attn_tk_bucket(None) is None
    assert attn_configs._attn_tk_bucket(1) == attn_configs._attn_tk_bucket(2048) == 2048
    assert attn_configs._attn_tk_bucket(2049) is None
    for (kernel, arch, precision, bucket), table in attn_configs._ATTN_SEQ_CONFIGS.items():
        assert kernel == "fwd" and bucket in attn_configs.ATTN_TK_BUCKETS
        assert [w for w, _ in table] == sorted(w for w, _ in table)
        for _, config in table:
            assert config.archs == (arch,) and set(config.meta) == {"BLOCK_M", "BLOCK_N"}
    # the backward kernels take no key-length bucket: tk changes nothing
    for kernel in ("dkdv", "dq"):
        assert (attn_configs._attn_config(kernel, 90, "16bit", 64, tk=197)
                == attn_configs._attn_config(kernel, 90, "16bit", 64))


@pytest.mark.parametrize("arch,regs,warps,shared,blocks", [
    (90, 208, 8, 112 * 1024, 1),   # the 128 x 128 tile at head dim 64 before: registers bind
    (90, 116, 8, 64 * 1024, 2),    # 128 x 64: 120 x 256 registers a block
    (90, 128, 8, 80 * 1024, 2),    # exactly 32768 registers a block
    (90, 129, 8, 80 * 1024, 1),    # 136 per thread after the per-warp rounding
    (90, 106, 4, 56 * 1024, 4),
    (90, 64, 4, 120 * 1024, 1),    # shared memory binds (with the 1 KB reserved per block)
    (90, 32, 16, 1024, 4),         # threads bind: 2048 a SM
    (80, 64, 4, 80 * 1024, 2),     # A100: 164 KB a SM
])
def test_blocks_per_sm(arch, regs, warps, shared, blocks):
    assert attn_configs.blocks_per_sm(arch, regs, warps, shared) == blocks


def _opcheck_inputs(device, dtype=F16):
    return _make_inputs(1, 2, 1, 9, 13, 48, dtype, device)  # 48 = 32 + 16: both head-dim tiles


def test_opcheck_attention_ops(device):
    q, k, v, dout = _opcheck_inputs(device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    bias = torch.zeros(1, 1, 13, device=device)
    bias[..., 5] = float("-inf")
    torch.library.opcheck(torch.ops.vitkern.attention_fwd.default, (q, k, v, bias, True, 0.125, False))
    torch.library.opcheck(torch.ops.vitkern.attention_fwd.default, (q, k, v, None, False, 0.125, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out, lse = attn_op._attention_fwd_op(q.detach(), k.detach(), v.detach(), None, False, 0.125, True)
    torch.library.opcheck(torch.ops.vitkern.attention_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out, lse, None, None, False, 0.125, True))
    qkv = _rand((1, 9, 3, 2, 32), BF16, device).requires_grad_()
    torch.library.opcheck(torch.ops.vitkern.attention_qkvpacked_fwd.default, (qkv, True, 0.125, True))
    out, lse = attn_op._attention_qkvpacked_fwd_op(qkv.detach(), False, 0.125, True)
    torch.library.opcheck(torch.ops.vitkern.attention_qkvpacked_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, None, False, 0.125, True))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    q, k, v, dout = _make_inputs(1, 2, 2, 17, 17, 64, BF16, device)
    qkv = _rand((1, 17, 3, 2, 64), BF16, device)

    def step(q, k, v, qkv):
        out = vitkern.attention(q, k, v, causal=True)
        packed = vitkern.attention_qkvpacked(qkv)
        return (out.float().square().sum() + packed.float().sum())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, qkv)]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, qkv)]
    eager_loss = step(*eager_leaves)
    eager_grads = torch.autograd.grad(eager_loss, eager_leaves)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_empty_inputs(device):
    q = torch.zeros(0, 2, 5, 32, device=device, dtype=F16, requires_grad=True)
    k = torch.zeros(0, 2, 7, 32, device=device, dtype=F16, requires_grad=True)
    out = vitkern.attention(q, k, k)
    assert out.shape == (0, 2, 5, 32)
    q = torch.zeros(1, 2, 0, 32, device=device, dtype=F16, requires_grad=True)
    k = torch.randn(1, 2, 7, 32, device=device, dtype=F16, requires_grad=True)
    out, lse = vitkern.attention(q, k, k, return_lse=True)
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
    (gk,) = torch.autograd.grad(out.sum(), (k,))
    assert torch.equal(gk, torch.zeros_like(k))


@pytest.mark.slow
def test_torch_compile_inductor(device):
    torch._dynamo.reset()
    q, k, v, dout = _make_inputs(1, 2, 2, 17, 17, 64, F16, device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    fn = torch.compile(lambda q, k, v: vitkern.attention(q, k, v, causal=True) * 2, fullgraph=True)
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    eager = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    want = vitkern.attention(*eager, causal=True) * 2
    torch.testing.assert_close(out, want)
    for g, w in zip(grads, torch.autograd.grad(want, eager, dout)):
        torch.testing.assert_close(g, w)
